"""Finding and replacing the last layer of an edge-classify ONNX graph.

Models from ``edge-export`` end in training/model/layers.py's ``ClassActivationHead``: pooled
features ``[N, D]`` -> ``MatMul(kernel [D, K]) + bias`` (or one ``Gemm``) -> ``Softmax`` ->
``probabilities``, and ``cam = MatMul(feature_map_nhwc, kernel)``. In an INT8 (QDQ) model the
kernel and bias are ``DequantizeLinear`` of int8/int32 initializers, and the logits and the maps
pass through ``QuantizeLinear -> DequantizeLinear`` pairs whose ranges were calibrated for the
parent's layer. An adapted layer is written in float32 into both precisions: the kernel and bias
become float initializers (read by the logits and the maps alike), and the two calibrated pairs
after the layer are dropped, since a new layer's logits need not fit the old ranges. That layer
is ``D x K`` multiply-adds per scan, noise beside the backbone; the backbone keeps its INT8
arithmetic. The pooled tensor the layer reads becomes the ``features`` output.

An ensemble (training/model/ensemble.py ``combine``) averages its members' probabilities, each
member ending in the layer above (over a batch of two views, or one branch per view, when
mirrored), and outputs ``features``: each member's pooled features, averaged over the views,
concatenated ``[N, sum D_m]``. Its adapted model reads a single layer over that output,
``probabilities = Softmax(MatMul(features, W) + b)``, replacing the averaging; the parent's own
layer for that is the members' logit average, ``W = [W_1; ...; W_M] / M`` and ``b = mean(b_m)``:
exactly the mean of the members' logits over members and views (all linear), close to but not
the mean of their probabilities that the parent outputs. Its ``cam`` stays the parent's. Adapted
again, such a model is found as one layer reading the ``features`` output (``cam`` and
``cam_kernel`` then empty: the cam is left alone).

Needs the ``onnx`` package (the ``adapt`` extra).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from edge_runtime.adapt.fit import Head
from edge_runtime.model.contract import CAM, FEATURES, PROBABILITIES, ContractError

_PASS_THROUGH = frozenset({"Identity"})


@dataclass(frozen=True)
class HeadGraph:
    """Where the last layer sits in a graph (tensor names)."""

    pooled: str  # the [N, D] tensor the layer reads
    kernel: str  # the [D, K] tensor the logits read (stored [K, D] when kernel_transposed)
    kernel_transposed: bool
    bias: str
    logits: str  # output of the Add / Gemm
    cam_kernel: str  # the kernel tensor the cam MatMul reads ([D, K])
    cam: str  # output of the cam MatMul


@dataclass(frozen=True)
class EnsembleHeadGraph:
    """Where an ensemble's last layers sit (module docstring)."""

    members: tuple[HeadGraph, ...]  # each member's layer (its first view), in features order
    widths: tuple[int, ...]  # D_m of each member


class _Graph:
    """Producer and consumer look-ups over an ``onnx.GraphProto``."""

    def __init__(self, graph) -> None:
        self.graph = graph
        self.producer = {out: node for node in graph.node for out in node.output}
        self.consumers: dict[str, list] = {}
        for node in graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
        self.initializers = {init.name: init for init in graph.initializer}

    def upstream(self, name: str) -> str:
        """Follow Identity and QuantizeLinear -> DequantizeLinear pairs back to their source."""
        while True:
            node = self.producer.get(name)
            if node is None:
                return name
            if node.op_type in _PASS_THROUGH:
                name = node.input[0]
            elif node.op_type == "DequantizeLinear" and self._is_quantize(node.input[0]):
                name = self.producer[node.input[0]].input[0]
            else:
                return name

    def _is_quantize(self, name: str) -> bool:
        node = self.producer.get(name)
        return node is not None and node.op_type == "QuantizeLinear"

    def is_constant(self, name: str) -> bool:
        if name in self.initializers:
            return True
        node = self.producer.get(name)
        return (
            node is not None
            and node.op_type == "DequantizeLinear"
            and all(i in self.initializers for i in node.input if i)
        )

    def constant(self, name: str) -> np.ndarray:
        """The value of an initializer, or of DequantizeLinear over initializers (float32)."""
        from onnx import helper, numpy_helper

        if name in self.initializers:
            return numpy_helper.to_array(self.initializers[name]).astype(np.float32)
        node = self.producer[name]
        arrays = [numpy_helper.to_array(self.initializers[i]) for i in node.input if i]
        q, scale = arrays[0].astype(np.float32), arrays[1].astype(np.float32)
        zero = arrays[2].astype(np.float32) if len(arrays) > 2 else np.zeros_like(scale)
        axis = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), 1)
        if scale.ndim == 1 and q.ndim > 1:
            shape = [1] * q.ndim
            shape[axis % q.ndim] = -1
            scale, zero = scale.reshape(shape), zero.reshape(shape)
        return ((q - zero) * scale).astype(np.float32)


def find_head(model, *, source: str = "model") -> HeadGraph | EnsembleHeadGraph:
    """Locate the last layer (module docstring) in an ``onnx.ModelProto``: a single model's, or
    each member's of an ensemble.

    Raises:
        ContractError: the graph does not end in that pattern, naming what was found instead.
    """
    g = _Graph(model.graph)

    def fail(detail: str) -> ContractError:
        return ContractError(
            f"{source}: cannot adapt this model: its last layer is not the edge-classify "
            "pattern (Softmax over MatMul + Add or Gemm of the pooled features, and cam a "
            "MatMul with the same kernel; or an ensemble averaging such members' "
            f"probabilities): {detail}. Adapt a model made by edge-export."
        )

    softmax = g.producer.get(g.upstream(PROBABILITIES))
    if softmax is None or softmax.op_type != "Softmax":
        softmaxes, others = _sources(g, PROBABILITIES, lambda t: _op(g, t) == "Softmax")
        if not softmaxes or others:
            found = ", ".join(sorted(others)) or (softmax.op_type if softmax else "an input")
            raise fail(
                f"{PROBABILITIES!r} does not come from a Softmax, nor from an average of "
                f"Softmax outputs (found {found})"
            )
        return _find_ensemble(g, [g.producer[t] for t in softmaxes], fail)
    pooled, kernel, transposed, bias, logits = _match_layer(g, softmax, fail)
    kernel_value = g.constant(kernel)
    if transposed:
        kernel_value = kernel_value.T
    cam_node = g.producer.get(g.upstream(CAM))
    cam_kernel = cam_node.input[1] if cam_node is not None and cam_node.op_type == "MatMul" else ""
    same = cam_kernel == kernel or (
        bool(cam_kernel)
        and g.is_constant(cam_kernel)
        and np.allclose(g.constant(cam_kernel), kernel_value, rtol=1e-3, atol=1e-5)
    )
    if pooled == FEATURES and (cam_node is None or cam_node.op_type != "MatMul"):
        # an adapted ensemble: its layer reads the features output, its cam is the parent's mean
        return HeadGraph(pooled, kernel, transposed, bias, logits, cam_kernel="", cam="")
    if cam_node is None or cam_node.op_type != "MatMul" or not g.is_constant(cam_kernel):
        raise fail(f"{CAM!r} does not come from a MatMul with a constant kernel")
    if not same:
        raise fail(f"{CAM!r} is computed with another kernel than the logits")
    return HeadGraph(
        pooled=pooled,
        kernel=kernel,
        kernel_transposed=transposed,
        bias=bias,
        logits=logits,
        cam_kernel=cam_kernel,
        cam=cam_node.output[0],
    )


def _match_layer(g: _Graph, softmax, fail) -> tuple[str, str, bool, str, str]:
    """``(pooled, kernel, kernel_transposed, bias, logits)`` of the layer a Softmax reads."""
    logits = g.upstream(softmax.input[0])
    node = g.producer.get(logits)
    if node is not None and node.op_type == "Gemm":
        attrs = {a.name: a for a in node.attribute}
        for name, wanted in (("alpha", 1.0), ("beta", 1.0)):
            if name in attrs and attrs[name].f != wanted:
                raise fail(f"its Gemm has {name} {attrs[name].f}")
        if "transA" in attrs and attrs["transA"].i:
            raise fail("its Gemm transposes the features")
        if (
            len(node.input) < 3
            or not g.is_constant(node.input[1])
            or not g.is_constant(node.input[2])
        ):
            raise fail("its Gemm's kernel or bias is not a constant")
        transposed = bool(attrs["transB"].i) if "transB" in attrs else False
        return node.input[0], node.input[1], transposed, node.input[2], logits
    if node is not None and node.op_type == "Add":
        matmul, bias = _split_add(g, node)
        if matmul is None or not g.is_constant(matmul.input[1]):
            raise fail("its Add is not MatMul(features, constant kernel) + constant bias")
        return matmul.input[0], matmul.input[1], False, bias, logits
    raise fail(f"the Softmax reads {node.op_type if node else 'a graph input'}")


# ops an ensemble's averaging passes through (MeanOfViews: Split or Slice, Add, Mul or Div;
# Average: Add, Mul or Div; INT8: QuantizeLinear -> DequantizeLinear pairs)
_AVERAGING = frozenset(
    {"Add", "Sum", "Mean", "Mul", "Div", "Split", "Slice", "Identity", "Squeeze", "Reshape"}
    | {"QuantizeLinear", "DequantizeLinear"}
)
_FIRST_INPUT_ONLY = frozenset(
    {"Split", "Slice", "Squeeze", "Reshape", "QuantizeLinear", "DequantizeLinear"}
)


def _op(g: _Graph, name: str) -> str:
    node = g.producer.get(name)
    return node.op_type if node is not None else ""


def _sources(g: _Graph, start: str, stop) -> tuple[list[str], set[str]]:
    """Walk up from ``start`` through :data:`_AVERAGING` ops (constants skipped) to the tensors
    where ``stop(tensor)`` holds (in order, each once); and the ops (or "an input") met instead.
    """
    found: list[str] = []
    others: set[str] = set()
    seen: set[str] = set()
    todo = [start]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        if stop(name):
            found.append(name)
            continue
        node = g.producer.get(name)
        if node is None:
            if name not in g.initializers:
                others.add("an input")
            continue
        if node.op_type not in _AVERAGING:
            others.add(node.op_type)
            continue
        inputs = node.input[:1] if node.op_type in _FIRST_INPUT_ONLY else node.input
        todo.extend(reversed([i for i in inputs if i and not g.is_constant(i)]))
    return found, others


def _find_ensemble(g: _Graph, softmaxes: list, fail) -> EnsembleHeadGraph:
    """Group the Softmax layers averaged into ``probabilities`` by member (views share the
    member's kernel and bias; the first view's stands for the member) and order the members as
    ``features`` concatenates them: each input of its Concat must be, through the averaging
    ops, the pooled tensors of exactly one member's views."""
    groups: list[tuple[HeadGraph, np.ndarray, np.ndarray, set[str]]] = []
    for softmax in softmaxes:
        pooled, kernel, transposed, bias, logits = _match_layer(g, softmax, fail)
        where = HeadGraph(pooled, kernel, transposed, bias, logits, cam_kernel="", cam="")
        k_value, b_value = g.constant(kernel), g.constant(bias)
        k_value = k_value.T if transposed else k_value
        for _, k, b, views in groups:
            # views share the member's layer; an INT8 model quantizes each view's bias alone
            if (
                k.shape == k_value.shape
                and np.allclose(k, k_value, rtol=1e-3, atol=1e-5)
                and np.allclose(b, b_value, rtol=1e-3, atol=1e-4)
            ):
                views.add(g.upstream(pooled))
                break
        else:
            groups.append((where, k_value, b_value, {g.upstream(pooled)}))
    if FEATURES not in g.producer:
        raise fail(f"an ensemble without a {FEATURES!r} output")
    concat = g.producer.get(g.upstream(FEATURES))
    if concat is not None and concat.op_type == "Concat":
        axis = next(a.i for a in concat.attribute if a.name == "axis")
        if axis not in (1, -1):
            raise fail(f"its {FEATURES!r} Concat joins axis {axis}, not the features")
        parts = list(concat.input)
    else:
        parts = [FEATURES]
    pooled = {p for *_, views in groups for p in views}
    order = []
    for part in parts:
        reached, others = _sources(g, part, lambda t: g.upstream(t) in pooled)
        views = {g.upstream(t) for t in reached}
        match = [i for i, group in enumerate(groups) if group[3] == views]
        if len(match) != 1 or others:
            raise fail(
                f"input {len(order)} of its {FEATURES!r} output is not one member's pooled "
                "features (averaged over its views)"
            )
        order.append(match[0])
    if sorted(order) != list(range(len(groups))):
        raise fail(
            f"its {FEATURES!r} output holds {len(parts)} parts for {len(groups)} members "
            "(each member's pooled features once)"
        )
    return EnsembleHeadGraph(
        members=tuple(groups[i][0] for i in order),
        widths=tuple(int(groups[i][1].shape[0]) for i in order),
    )


def _split_add(g: _Graph, add) -> tuple[object | None, str]:
    for mine, other in ((0, 1), (1, 0)):
        producer = g.producer.get(add.input[mine])
        if (
            producer is not None
            and producer.op_type == "MatMul"
            and g.is_constant(add.input[other])
        ):
            return producer, add.input[other]
    return None, ""


def read_head(model, where: HeadGraph | EnsembleHeadGraph) -> Head:
    """The layer's float32 kernel ``[D, K]`` and bias ``[K]`` (dequantized in an INT8 model); of
    an ensemble, its members' logit average (module docstring): kernel ``[sum D_m, K]``, the
    members' kernels stacked in ``features`` order and divided by M, and the mean bias."""
    if isinstance(where, EnsembleHeadGraph):
        heads = [read_head(model, member) for member in where.members]
        m = len(heads)
        kernel = np.concatenate([h.kernel for h in heads]) / np.float32(m)
        bias = np.mean([h.bias for h in heads], axis=0)
        return Head(kernel.astype(np.float32), bias.astype(np.float32))
    g = _Graph(model.graph)
    kernel = g.constant(where.kernel)
    return Head(kernel.T.copy() if where.kernel_transposed else kernel, g.constant(where.bias))


def with_features(model, where: HeadGraph | EnsembleHeadGraph, *, source: str = "model"):
    """A copy of ``model`` with a ``features`` output: the pooled ``[N, D]`` tensor the layer
    reads. A model that has one already is returned as a copy when it is that tensor (an
    ensemble's, found by :func:`find_head`, always is).

    Raises:
        ContractError: the model's ``features`` output is another tensor.
    """
    from onnx import TensorProto, helper

    copy = type(model)()
    copy.CopyFrom(model)
    graph = copy.graph
    if isinstance(where, EnsembleHeadGraph):
        return copy
    g = _Graph(graph)
    if any(out.name == FEATURES for out in graph.output):
        if g.upstream(FEATURES) != g.upstream(where.pooled):
            raise ContractError(
                f"{source}: its {FEATURES!r} output is not the pooled tensor its last layer "
                f"reads ({where.pooled!r}), so a layer fitted on it would not fit the model."
            )
        return copy
    dims = g.constant(where.kernel).shape
    d = dims[1] if where.kernel_transposed else dims[0]
    graph.node.append(helper.make_node("Identity", [where.pooled], [FEATURES], name="features"))
    graph.output.append(helper.make_tensor_value_info(FEATURES, TensorProto.FLOAT, ["N", d]))
    return copy


def with_head(
    model,
    where: HeadGraph | EnsembleHeadGraph,
    head: Head,
    metadata: Mapping[str, str],
    *,
    source: str = "model",
):
    """A copy of ``model`` with ``head`` as its float32 last layer (module docstring), the
    ``features`` output, and ``metadata`` as its whole ``metadata_props``. Of an ensemble,
    ``probabilities`` becomes ``Softmax(MatMul(features, kernel) + bias)`` and the averaging
    that only it read is removed.

    Raises:
        ValueError: an ensemble's ``head`` is not ``[sum D_m, K]``.
    """
    copy = with_features(model, where, source=source)
    graph = copy.graph
    if isinstance(where, EnsembleHeadGraph):
        _replace_average(graph, where, head)
    else:
        kernel = head.kernel.T if where.kernel_transposed else head.kernel
        _set_constant(graph, where.kernel, np.ascontiguousarray(kernel, dtype=np.float32))
        if where.cam_kernel and where.cam_kernel != where.kernel:
            _set_constant(graph, where.cam_kernel, np.ascontiguousarray(head.kernel, np.float32))
        _set_constant(graph, where.bias, np.asarray(head.bias, dtype=np.float32))
        for tensor in (where.logits, where.cam):
            if tensor:
                _drop_qdq_after(graph, tensor)
    prune(graph)
    del copy.metadata_props[:]
    for key, value in metadata.items():
        copy.metadata_props.add(key=key, value=value)
    return copy


_ADAPTED = "edge_adapt"  # prefix of the tensors an ensemble's adapted layer adds


def _replace_average(graph, where: EnsembleHeadGraph, head: Head) -> None:
    """``probabilities = Softmax(MatMul(features, kernel) + bias)`` in place of the averaging
    of the members' probabilities; nodes left without a reader are removed."""
    from onnx import helper, numpy_helper

    if head.kernel.shape[0] != sum(where.widths):
        raise ValueError(
            f"an ensemble's layer must be [{sum(where.widths)}, K]. Got {head.kernel.shape}."
        )
    for node in list(graph.node):
        if PROBABILITIES in node.output:
            graph.node.remove(node)
    kernel, bias = f"{_ADAPTED}/kernel", f"{_ADAPTED}/bias"
    graph.initializer.append(
        numpy_helper.from_array(np.ascontiguousarray(head.kernel, np.float32), kernel)
    )
    graph.initializer.append(numpy_helper.from_array(np.asarray(head.bias, np.float32), bias))
    graph.node.extend(
        [
            helper.make_node(
                "MatMul", [FEATURES, kernel], [f"{_ADAPTED}/matmul"], name=f"{_ADAPTED}/MatMul"
            ),
            helper.make_node(
                "Add", [f"{_ADAPTED}/matmul", bias], [f"{_ADAPTED}/logits"], name=f"{_ADAPTED}/Add"
            ),
            helper.make_node(
                "Softmax",
                [f"{_ADAPTED}/logits"],
                [PROBABILITIES],
                axis=-1,
                name=f"{_ADAPTED}/Softmax",
            ),
        ]
    )
    drop_dead_nodes(graph)


def drop_dead_nodes(graph) -> None:
    """Remove from ``graph`` (an ``onnx.GraphProto``) the nodes none of whose outputs a node or
    the graph's outputs read, until none is left (export's input fold uses it too)."""
    outputs = {out.name for out in graph.output}
    while True:
        used = {name for node in graph.node for name in node.input} | outputs
        dead = [node for node in graph.node if not any(o in used for o in node.output if o)]
        if not dead:
            return
        for node in dead:
            graph.node.remove(node)


def _set_constant(graph, name: str, value: np.ndarray) -> None:
    """Make ``name`` a float initializer holding ``value`` (replacing a DequantizeLinear)."""
    from onnx import numpy_helper

    for node in list(graph.node):
        if name in node.output and node.op_type == "DequantizeLinear":
            graph.node.remove(node)
    for init in list(graph.initializer):
        if init.name == name:
            graph.initializer.remove(init)
    graph.initializer.append(numpy_helper.from_array(value, name))


def _drop_qdq_after(graph, tensor: str) -> None:
    """``producer -> tensor -> Q -> DQ -> out`` becomes ``producer -> out``."""
    g = _Graph(graph)
    users = g.consumers.get(tensor, [])
    if len(users) != 1 or users[0].op_type != "QuantizeLinear":
        return
    quantize = users[0]
    after = g.consumers.get(quantize.output[0], [])
    if len(after) != 1 or after[0].op_type != "DequantizeLinear":
        return
    dequantize = after[0]
    if any(out.name == tensor for out in graph.output):
        return
    producer = g.producer[tensor]
    index = list(producer.output).index(tensor)
    producer.output[index] = dequantize.output[0]
    graph.node.remove(quantize)
    graph.node.remove(dequantize)


def prune(graph) -> None:
    """Drop initializers and value_info that no node reads or writes any more."""
    used = {name for node in graph.node for name in node.input}
    used |= {out.name for out in graph.output}
    for init in list(graph.initializer):
        if init.name not in used:
            graph.initializer.remove(init)
    produced = {name for node in graph.node for name in node.output}
    produced |= {init.name for init in graph.initializer} | {i.name for i in graph.input}
    for info in list(graph.value_info):
        if info.name not in produced:
            graph.value_info.remove(info)
