"""Float16 in two forms: an FP16 copy for GPU providers (CUDA, TensorRT), and an FP32 model whose
convolution weights are stored in float16 (half the file, float32 arithmetic)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnxconverter_common.float16 import convert_float_to_float16

HALF_SUFFIX = "_float16"


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


def store_conv_weights_as_float16(source: Path, target: Path) -> Path:
    """Write ``source`` again with each float32 convolution weight stored as float16 and cast
    back to float32 by a ``Cast`` node at the head of the graph.

    The file shrinks to about half (convolution kernels are nearly all of a CNN's weights); the
    arithmetic stays float32, and onnxruntime folds the casts away when it opens the session, so
    inference costs the same. Each weight is rounded to float16 (relative error <= 2**-11), so
    the result must be gated against ``source`` like any reduced-precision copy. Biases, the
    classifier head (``MatMul``/``Gemm``) and a weight that another kind of node also reads stay
    float32.

    Returns:
        ``target``.

    Raises:
        ValueError: ``source`` has no float32 convolution weight to store.
        onnx.checker.ValidationError: the rewritten graph is not valid ONNX.
    """
    model = onnx.load(str(source))
    graph = model.graph
    readers: dict[str, set[str]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, set()).add(node.op_type)
    kernels = {node.input[1] for node in graph.node if node.op_type == "Conv"}
    casts = []
    for init in list(graph.initializer):
        if (
            init.name not in kernels
            or init.data_type != TensorProto.FLOAT
            or readers[init.name] != {"Conv"}
        ):
            continue
        half = numpy_helper.from_array(
            numpy_helper.to_array(init).astype(np.float16), init.name + HALF_SUFFIX
        )
        graph.initializer.remove(init)
        graph.initializer.append(half)
        casts.append(
            helper.make_node(
                "Cast", [half.name], [init.name], to=TensorProto.FLOAT, name=half.name + "_cast"
            )
        )
    if not casts:
        raise ValueError(f"{source}: no float32 convolution weight to store as float16")
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(casts + nodes)
    onnx.checker.check_model(model)
    onnx.save(model, str(target))
    return target


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
