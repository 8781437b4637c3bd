"""Widening an INT8 (QDQ) graph's activation ranges to cover a site's scans.

An INT8 model's activation ranges were calibrated on the parent's calibration scans. A new
scanner's scans can reach past them (darker gain makes larger features, for one): every
``QuantizeLinear`` then clips those values, the INT8 model's pooled features no longer match its
FP32 partner's, and a last layer fitted on the FP32 features, which reads them through the clipped
range, can disagree with its partner on most scans. ``widen_ranges`` measures, over the site's
scans, each quantized tensor's float values **on the FP32 model the INT8 one was quantized from**,
and where a tensor went past its range, widens that range to the union of the parent's and the
site's. Ranges only grow, so nothing the parent covered is clipped now; the cost is a coarser step
on those tensors.

Why the FP32 model and not the INT8 graph with its Q/DQ pairs removed: onnxruntime's quantizer
folds a ``Relu``/``Clip`` (EfficientNet-Lite's ReLU6) into the following pair's range and deletes
the node, giving its output name to the convolution. Without the pair, that tensor is the
unclipped convolution (seen: ``[-810, 605]`` for a ReLU6 output that can only be in ``[0, 6]``),
and the "widened" model called every scan normal. On the FP32 model every name still means what
the quantizer calibrated. A tensor the FP32 model does not have keeps the parent's range.

Needs the ``onnx`` package (the ``adapt`` extra).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

_LIMITS = {np.dtype(np.uint8): (0, 255), np.dtype(np.int8): (-128, 127)}


@dataclass(frozen=True)
class Widened:
    """One activation range that the site's scans went past: ``[low, high]`` before and after
    (float units of the tensor)."""

    tensor: str
    before: tuple[float, float]
    after: tuple[float, float]


@dataclass(frozen=True)
class _Pair:
    """One activation quantization: the float tensor, its QuantizeLinear, and the
    DequantizeLinear nodes reading it (all sharing a scale and zero point)."""

    tensor: str
    quantize: object
    dequantize: tuple


def _pairs(graph) -> list[_Pair]:
    initializers = {init.name for init in graph.initializer}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    pairs = []
    for node in graph.node:
        if node.op_type != "QuantizeLinear" or node.input[0] in initializers:
            continue
        users = consumers.get(node.output[0], [])
        if len(node.input) < 3 or not users or any(u.op_type != "DequantizeLinear" for u in users):
            continue  # not a plain Q -> DQ pair: left as it is
        if any(tuple(u.input[1:3]) != tuple(node.input[1:3]) for u in users):
            continue
        pairs.append(_Pair(node.input[0], node, tuple(users)))
    return pairs


_GRAPH_OUTPUT_INPUT = "_QuantizeLinear_Input"  # the quantizer's name for a graph output's input


def _measured_name(tensor: str, produced: set[str], outputs: set[str]) -> str | None:
    """The FP32 model's tensor holding what ``tensor`` of the INT8 graph holds, or None."""
    if tensor in produced:
        return tensor
    if tensor.endswith(_GRAPH_OUTPUT_INPUT) and tensor[: -len(_GRAPH_OUTPUT_INPUT)] in outputs:
        return tensor[: -len(_GRAPH_OUTPUT_INPUT)]  # a quantized graph output: its FP32 output
    return None


def _probe(reference, names: list[str]):
    """A copy of the FP32 ``reference`` with each of ``names`` a graph output."""
    from onnx import helper

    copy = type(reference)()
    copy.CopyFrom(reference)
    existing = {out.name for out in copy.graph.output}
    for name in names:
        if name not in existing:
            copy.graph.output.append(helper.make_empty_tensor_value_info(name))
    return copy


def widen_ranges(
    model, reference, batches: Iterable[np.ndarray], *, input_name: str = "image"
) -> tuple[Any, list[Widened]]:
    """A copy of the QDQ ``model`` whose activation ranges cover the values ``batches`` produce.

    Args:
        model: an ``onnx.ModelProto`` with QuantizeLinear -> DequantizeLinear activation pairs
            (uint8 or int8 zero points, per-tensor scales).
        reference: the FP32 ``onnx.ModelProto`` that ``model`` was quantized from (its recheck
            partner, with the same last layer): the values are measured on it, by tensor name.
        batches: input batches for ``input_name`` (the site's scans, ``[B, S, S, 1]`` uint8).
        input_name: the graph input the batches feed.

    Returns:
        ``(widened_model, changes)``: the new model, and one :class:`Widened` per range that
        grew (empty when the scans stayed inside every range; the model is then a plain copy).
        Tensors that ``reference`` does not hold keep their ranges.
    """
    import onnxruntime as ort
    from onnx import numpy_helper

    produced = {o for node in reference.graph.node for o in node.output}
    produced |= {i.name for i in reference.graph.input}
    outputs = {o.name for o in reference.graph.output}
    measured = {}
    for pair in _pairs(model.graph):
        name = _measured_name(pair.tensor, produced, outputs)
        if name is not None and _is_per_tensor(model.graph, pair):
            measured[pair.tensor] = name
    pairs = [p for p in _pairs(model.graph) if p.tensor in measured]
    copy = type(model)()
    copy.CopyFrom(model)
    if not pairs:
        return copy, []
    names = list(dict.fromkeys(measured[p.tensor] for p in pairs))
    session = ort.InferenceSession(
        _probe(reference, names).SerializeToString(), providers=["CPUExecutionProvider"]
    )
    low = dict.fromkeys(names, np.inf)
    high = dict.fromkeys(names, -np.inf)
    for batch in batches:
        for name, value in zip(names, session.run(names, {input_name: batch}), strict=True):
            low[name] = min(low[name], float(np.min(value)))
            high[name] = max(high[name], float(np.max(value)))
    low = {p.tensor: low[measured[p.tensor]] for p in pairs}
    high = {p.tensor: high[measured[p.tensor]] for p in pairs}
    initializers = {init.name: init for init in copy.graph.initializer}
    by_scale: dict[tuple[str, str], list[_Pair]] = {}
    for pair in pairs:
        by_scale.setdefault(tuple(pair.quantize.input[1:3]), []).append(pair)
    changes = []
    for (scale_name, zero_name), members in by_scale.items():
        scale = float(numpy_helper.to_array(initializers[scale_name]))
        zero_array = numpy_helper.to_array(initializers[zero_name])
        qmin, qmax = _LIMITS[zero_array.dtype]
        zero = int(zero_array)
        before = ((qmin - zero) * scale, (qmax - zero) * scale)
        seen = (min(low[p.tensor] for p in members), max(high[p.tensor] for p in members))
        step = scale / 2  # within half a step of the range: rounding, not clipping
        if seen[0] >= before[0] - step and seen[1] <= before[1] + step:
            continue
        lo, hi = min(before[0], seen[0], 0.0), max(before[1], seen[1], 0.0)
        new_scale = np.float32((hi - lo) / (qmax - qmin))
        new_zero = np.array(
            np.clip(round(qmin - lo / float(new_scale)), qmin, qmax), zero_array.dtype
        )
        # new initializers (an old one may be shared with something else): point the pairs at them
        names = (f"{scale_name}_site", f"{zero_name}_site")
        copy.graph.initializer.extend(
            [
                numpy_helper.from_array(new_scale, names[0]),
                numpy_helper.from_array(new_zero, names[1]),
            ]
        )
        members_out = {p.quantize.output[0] for p in members}
        for node in copy.graph.node:
            is_member = (node.op_type == "QuantizeLinear" and node.output[0] in members_out) or (
                node.op_type == "DequantizeLinear" and node.input[0] in members_out
            )
            if is_member:
                node.input[1], node.input[2] = names
        after = (
            (qmin - int(new_zero)) * float(new_scale),
            (qmax - int(new_zero)) * float(new_scale),
        )
        changes += [Widened(p.tensor, _round(before), _round(after)) for p in members]
    _drop_unused(copy.graph)
    return copy, changes


def _is_per_tensor(graph, pair: _Pair) -> bool:
    from onnx import numpy_helper

    initializers = {init.name: init for init in graph.initializer}
    scale, zero = (initializers.get(n) for n in pair.quantize.input[1:3])
    if scale is None or zero is None:
        return False
    return numpy_helper.to_array(scale).size == 1 and numpy_helper.to_array(zero).dtype in _LIMITS


def _round(pair: tuple[float, float]) -> tuple[float, float]:
    return (round(pair[0], 6), round(pair[1], 6))


def _drop_unused(graph) -> None:
    used = {name for node in graph.node for name in node.input}
    for init in list(graph.initializer):
        if init.name not in used:
            graph.initializer.remove(init)
