"""Fold the input normalization of a QDQ model into the first convolution's dequantization.

The model's input is uint8 and its first step is ``(x - mean) / std``. When ``mean`` is an
integer in [0, 255], that is exactly the dequantization of ``x`` with zero point ``mean`` and
scale ``1 / std``, so the uint8 image can feed the first integer convolution directly, with no
float Cast/Sub/Mul and no re-quantization. It is exact (no calibration rounding) and padding
stays right (QLinearConv pads with the zero point, i.e. with a real 0). On EfficientNet-Lite0 at
224 px these float ops on the full-size input took about a quarter of the INT8 run time.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from edge_runtime.model.contract import INPUT_NAME

log = logging.getLogger(__name__)
_SCALING_OPS = frozenset({"Cast", "Sub", "Mul", "Div", "QuantizeLinear", "DequantizeLinear"})
_LAYOUT_OPS = frozenset({"Reshape", "Transpose", "Squeeze", "Unsqueeze"})  # work on uint8 too


def fold_input_scaling(path: Path, mean: float, std: float) -> bool:
    """Rewrite the QDQ model at ``path`` in place; returns False (file untouched) when the
    normalization cannot be folded exactly or the graph does not have the expected shape.

    Layout ops on the way (tf2onnx's NHWC -> NCHW Reshape or Transpose) are kept and replayed on
    the uint8 image; the scaling and re-quantization ops are removed.
    """
    if not (float(mean).is_integer() and 0 <= mean <= 255 and std > 0):
        return False
    model = onnx.load(str(path))
    graph = model.graph
    consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)
    chain, tensor = [], INPUT_NAME
    while True:
        users = consumers[tensor]
        if len(users) != 1 or users[0].op_type not in _SCALING_OPS | _LAYOUT_OPS:
            return False
        node = users[0]
        if node.op_type == "DequantizeLinear" and all(
            user.op_type == "Conv" for user in consumers[node.output[0]]
        ):
            break
        chain.append(node)
        tensor = node.output[0]
    scale = numpy_helper.from_array(np.array(1.0 / std, np.float32), "image_fold_scale")
    zero_point = numpy_helper.from_array(np.array(int(mean), np.uint8), "image_fold_zero_point")
    graph.initializer.extend([scale, zero_point])
    source, retyped = INPUT_NAME, set()
    for layout in (n for n in chain if n.op_type in _LAYOUT_OPS):  # replay them on uint8
        layout.input[0] = source
        source = layout.output[0]
        retyped.add(source)
    kept_info = [v for v in graph.value_info if v.name not in retyped]  # now uint8: re-infer
    del graph.value_info[:]
    graph.value_info.extend(kept_info)
    node.input[:] = [source, scale.name, zero_point.name]
    removed = {id(n) for n in chain if n.op_type in _SCALING_OPS}
    kept = [n for n in graph.node if id(n) not in removed]
    del graph.node[:]
    graph.node.extend(_without_dead_nodes(kept, {o.name for o in graph.output}))
    _drop_unused_initializers(graph)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    log.info("folded (x - %g) / %g into the first convolution's input", mean, std)
    return True


def _without_dead_nodes(nodes: list[onnx.NodeProto], outputs: set[str]) -> list[onnx.NodeProto]:
    """Drop nodes whose outputs nobody reads (the constant branches of the removed chain)."""
    while True:
        used = {name for n in nodes for name in n.input} | outputs
        alive = [n for n in nodes if any(o in used for o in n.output)]
        if len(alive) == len(nodes):
            return alive
        nodes = alive


def _drop_unused_initializers(graph: onnx.GraphProto) -> None:
    used = {name for n in graph.node for name in n.input}
    keep = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
