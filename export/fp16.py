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
    float16 follows them.
    """
    model = onnx.load(str(fp32_path))
    inputs = {i.name for i in model.graph.input}
    input_casts = [
        n.name for n in model.graph.node if n.op_type == "Cast" and inputs & set(n.input)
    ]
    model = convert_float_to_float16(model, keep_io_types=True, node_block_list=input_casts)
    onnx.save(model, str(fp16_path))
    return fp16_path
