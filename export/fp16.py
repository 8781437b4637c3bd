"""FP16 copy of the FP32 model, for GPU providers (CUDA, TensorRT)."""

from __future__ import annotations

from pathlib import Path

import onnx
from onnxconverter_common.float16 import convert_float_to_float16


def to_fp16(fp32_path: Path, fp16_path: Path) -> Path:
    """Convert weights and arithmetic to float16, keeping the contract's input and outputs.

    The uint8 ``image`` input and the float32 ``probabilities`` and ``cam`` outputs are kept
    (``keep_io_types``), so the runtime feeds and reads the FP16 model like the others. The casts
    of the uint8 input stay float32 (the converter would otherwise mistype them); a cast to
    float16 follows them. A graph output that other nodes also read (tf2onnx merges the
    ``features`` pooling with the head's own) is first given an Identity of its own, as the
    converter would otherwise leave its readers float32 among float16 nodes.
    """
    model = onnx.load(str(fp32_path))
    _detach_outputs(model.graph)
    inputs = {i.name for i in model.graph.input}
    input_casts = [
        n.name for n in model.graph.node if n.op_type == "Cast" and inputs & set(n.input)
    ]
    model = convert_float_to_float16(model, keep_io_types=True, node_block_list=input_casts)
    onnx.save(model, str(fp16_path))
    return fp16_path


def _detach_outputs(graph: onnx.GraphProto) -> None:
    """Let every graph output that nodes also consume come from an Identity of its own."""
    consumed = {name for node in graph.node for name in node.input}
    for output in graph.output:
        if output.name not in consumed:
            continue
        inner = f"{output.name}__inner"
        for node in graph.node:
            node.output[:] = [inner if o == output.name else o for o in node.output]
            node.input[:] = [inner if i == output.name else i for i in node.input]
        graph.node.append(onnx.helper.make_node("Identity", [inner], [output.name]))
