"""Tiny hand-built ONNX models that meet (or deliberately break) the contract; no TensorFlow.

The contract model scores "dark blob present" crudely: enough to exercise the runtime end to end.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edge_runtime.model.contract import ModelSpec

CLASSES = ("normal", "benign", "malignant")


def make_contract_model(
    path: Path,
    *,
    size: int = 64,
    spec: ModelSpec | None = None,
    input_dtype=TensorProto.UINT8,
    outputs: tuple[str, str] = ("probabilities", "cam"),
    seed: int = 0,
    lesion_stride: int = 0,
    features: bool = False,
) -> Path:
    """Write a small conv model: image uint8 [N,size,size,1] -> probabilities [N,K], cam.

    ``lesion_stride`` > 0 adds the v2 ``lesion`` output ``[N, size/stride, size/stride, 1]``:
    the probability that a pixel is dark (below gray 64, averaged over stride x stride blocks),
    so a dark blob drawn on a bright scan is "the lesion". ``features`` adds ``features``
    ``[N, K]`` (the pooled map the softmax reads).
    """
    spec = spec or ModelSpec(
        class_names=CLASSES,
        input_size=size,
        lesion_stride=lesion_stride,
        lesion_threshold=0.5,
    )
    k = len(spec.class_names)
    rng = np.random.default_rng(seed)
    weight = rng.normal(0, 0.05, (k, 1, 8, 8)).astype(np.float32)
    bias = np.linspace(-0.1, 0.1, k).astype(np.float32)
    nodes = [
        helper.make_node("Cast", ["image"], ["x"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["x", "scale"], ["xs"]),
        helper.make_node("Transpose", ["xs"], ["nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("Conv", ["nchw", "w", "b"], ["feat"], strides=[8, 8]),
        helper.make_node("Transpose", ["feat"], [outputs[1]], perm=[0, 2, 3, 1]),
        helper.make_node("ReduceMean", ["feat"], ["pooled"], axes=[2, 3], keepdims=0),
        helper.make_node("Softmax", ["pooled"], [outputs[0]], axis=1),
    ]
    inits = [
        numpy_helper.from_array(np.array(1 / 255.0, np.float32), "scale"),
        numpy_helper.from_array(weight, "w"),
        numpy_helper.from_array(bias, "b"),
    ]
    h = size // 8
    graph_outputs = [
        helper.make_tensor_value_info(outputs[0], TensorProto.FLOAT, ["N", k]),
        helper.make_tensor_value_info(outputs[1], TensorProto.FLOAT, ["N", h, h, k]),
    ]
    if lesion_stride:
        s = lesion_stride
        nodes += _lesion_nodes(s)
        inits += _lesion_inits()
        graph_outputs.append(
            helper.make_tensor_value_info(
                "lesion", TensorProto.FLOAT, ["N", size // s, size // s, 1]
            )
        )
    if features:
        nodes.append(helper.make_node("Identity", ["pooled"], ["features"]))
        graph_outputs.append(helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", k]))
    graph = helper.make_graph(
        nodes,
        "contract_test",
        [helper.make_tensor_value_info("image", input_dtype, ["N", size, size, 1])],
        graph_outputs,
        inits,
    )
    return _save(graph, spec, path)


def _lesion_nodes(stride: int) -> list:
    """``lesion``: dark = sigmoid((64 - x) / 8) per pixel of the float image ``x`` (NHWC),
    averaged over stride x stride blocks."""
    return [
        helper.make_node("Sub", ["dark_at", "x"], ["dark_diff"]),
        helper.make_node("Mul", ["dark_diff", "dark_gain"], ["lesion_logit"]),
        helper.make_node("Sigmoid", ["lesion_logit"], ["dark"]),
        helper.make_node("Transpose", ["dark"], ["dark_nchw"], perm=[0, 3, 1, 2]),
        helper.make_node(
            "AveragePool",
            ["dark_nchw"],
            ["lesion_nchw"],
            kernel_shape=[stride, stride],
            strides=[stride, stride],
        ),
        helper.make_node("Transpose", ["lesion_nchw"], ["lesion"], perm=[0, 2, 3, 1]),
    ]


def _lesion_inits() -> list:
    return [
        numpy_helper.from_array(np.array(64.0, np.float32), "dark_at"),
        numpy_helper.from_array(np.array(1 / 8.0, np.float32), "dark_gain"),
    ]


# Dark-fraction thresholds of :func:`make_head_model`'s features (gray level / 255).
HEAD_THRESHOLDS = (0.04, 0.07, 0.1, 0.14, 0.18, 0.24, 0.3, 0.4)


def head_feature_count() -> int:
    """D of :func:`make_head_model`: three box shapes times the thresholds."""
    return 3 * len(HEAD_THRESHOLDS)


def make_head_model(
    path: Path,
    kernel: np.ndarray,
    bias: np.ndarray,
    *,
    size: int = 64,
    spec: ModelSpec | None = None,
    features: bool = False,
    lesion_stride: int = 0,
) -> Path:
    """A fixed hand-built backbone with a real last layer, laid out as tf2onnx writes the
    bundled models: pooled ``GlobalAveragePool -> Squeeze``, ``MatMul(kernel) + bias ->
    Softmax`` and ``cam = MatMul(NHWC map, kernel)``.

    The feature map is, per pixel (stride 2), how much darker the mean of a 7x7, a wide 3x11 and
    a tall 11x3 box is than each of :data:`HEAD_THRESHOLDS` (``relu(t - mean)``, piecewise
    linear, so INT8 rounding is not amplified); pooled, these measure the dark area of the scan,
    which carries the synthetic classes (no lesion, a wide oval, a tall mass). ``kernel`` is
    ``[D, K]`` with ``D = head_feature_count()``. ``lesion_stride`` > 0 adds the v2 ``lesion``
    output of :func:`make_contract_model` (dark pixels; ``spec`` says its stride).
    """
    spec = spec or ModelSpec(class_names=CLASSES, input_size=size)
    d = head_feature_count()
    k = len(spec.class_names)
    if kernel.shape != (d, k) or bias.shape != (k,):
        raise ValueError(f"kernel must be [{d}, {k}] and bias [{k}]")
    boxes = np.zeros((3, 1, 11, 11), np.float32)
    boxes[0, 0, 2:9, 2:9] = 1 / 49
    boxes[1, 0, 4:7, :] = 1 / 33
    boxes[2, 0, :, 4:7] = 1 / 33
    steep = 10.0  # features in tenths of the full gray range
    spread = np.zeros((d, 3, 1, 1), np.float32)
    offsets = np.zeros(d, np.float32)
    for box in range(3):
        for j, threshold in enumerate(HEAD_THRESHOLDS):
            spread[box * len(HEAD_THRESHOLDS) + j, box] = -steep
            offsets[box * len(HEAD_THRESHOLDS) + j] = threshold * steep
    nodes = [
        helper.make_node("Cast", ["image"], ["x"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["x", "scale"], ["xs"]),
        helper.make_node("Transpose", ["xs"], ["nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("Conv", ["nchw", "boxes"], ["means"], strides=[2, 2], pads=[5] * 4),
        helper.make_node("Conv", ["means", "spread", "offsets"], ["dark_logit"]),
        helper.make_node("Relu", ["dark_logit"], ["fmap"]),
        helper.make_node("GlobalAveragePool", ["fmap"], ["gap"]),
        helper.make_node("Squeeze", ["gap", "squeeze_axes"], ["pooled"]),
        helper.make_node("MatMul", ["pooled", "kernel"], ["matmul"]),
        helper.make_node("Add", ["matmul", "bias"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
        helper.make_node("Transpose", ["fmap"], ["fmap_nhwc"], perm=[0, 2, 3, 1]),
        helper.make_node("MatMul", ["fmap_nhwc", "kernel"], ["cam"]),
    ]
    inits = [
        numpy_helper.from_array(np.array(1 / 255.0, np.float32), "scale"),
        numpy_helper.from_array(boxes, "boxes"),
        numpy_helper.from_array(spread, "spread"),
        numpy_helper.from_array(offsets, "offsets"),
        numpy_helper.from_array(np.array([2, 3], np.int64), "squeeze_axes"),
        numpy_helper.from_array(kernel.astype(np.float32), "kernel"),
        numpy_helper.from_array(bias.astype(np.float32), "bias"),
    ]
    h = size // 2
    outputs = [
        helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", k]),
        helper.make_tensor_value_info("cam", TensorProto.FLOAT, ["N", h, h, k]),
    ]
    if features:
        nodes.append(helper.make_node("Identity", ["pooled"], ["features"]))
        outputs.append(helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", d]))
    if lesion_stride:
        nodes, inits = nodes + _lesion_nodes(lesion_stride), inits + _lesion_inits()
        side = size // lesion_stride
        outputs.append(
            helper.make_tensor_value_info("lesion", TensorProto.FLOAT, ["N", side, side, 1])
        )
    graph = helper.make_graph(
        nodes,
        "head_test",
        [helper.make_tensor_value_info("image", TensorProto.UINT8, ["N", size, size, 1])],
        outputs,
        inits,
    )
    return _save(graph, spec, path)


def _save(graph, spec: ModelSpec, path: Path) -> Path:
    """Write ``graph`` as an opset-17 model carrying ``spec``'s metadata."""
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    for key, value in spec.to_metadata().items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, path)
    return path


def make_ensemble_model(
    path: Path,
    kernels: tuple[np.ndarray, ...],
    biases: tuple[np.ndarray, ...],
    *,
    size: int = 64,
    spec: ModelSpec | None = None,
    mirror: bool = False,
) -> Path:
    """An ensemble laid out as training/model/ensemble.py ``combine`` exports it: member ``m``
    pools ``D_m = kernels[m].shape[0]`` features (the first ``D_m`` channels of
    :func:`make_head_model`'s dark-area map), ``probabilities`` is the mean of the members'
    ``Softmax(MatMul(pooled, kernel) + bias)``, ``features`` the Concat of their pooled
    ``[N, D_m]``, ``cam`` the mean of their ``MatMul(map, kernel)`` and ``lesion`` the dark
    pixels of :func:`make_contract_model`. With ``mirror`` each member runs the scan and its
    mirror as one batch of two (``Concat`` on axis 0), and its probabilities, pooled features
    and maps are averaged over the two views (``Split``, ``Add``, ``Mul`` by 0.5).

    Raises:
        ValueError: a kernel is not ``[D_m, K]`` with ``D_m <= head_feature_count()``, or the
            biases do not match.
    """
    spec = spec or ModelSpec(class_names=CLASSES, input_size=size, lesion_stride=4)
    k = len(spec.class_names)
    if len(kernels) != len(biases) or any(
        kern.ndim != 2 or kern.shape[1] != k or not 0 < kern.shape[0] <= head_feature_count()
        for kern in kernels
    ):
        raise ValueError(f"kernels must be [D_m <= {head_feature_count()}, {k}], one bias each")
    boxes = np.zeros((3, 1, 11, 11), np.float32)
    boxes[0, 0, 2:9, 2:9] = 1 / 49
    boxes[1, 0, 4:7, :] = 1 / 33
    boxes[2, 0, :, 4:7] = 1 / 33
    d = head_feature_count()
    spread = np.zeros((d, 3, 1, 1), np.float32)
    offsets = np.zeros(d, np.float32)
    for box in range(3):
        for j, threshold in enumerate(HEAD_THRESHOLDS):
            spread[box * len(HEAD_THRESHOLDS) + j, box] = -10.0
            offsets[box * len(HEAD_THRESHOLDS) + j] = threshold * 10.0
    nodes = [
        helper.make_node("Cast", ["image"], ["x"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["x", "scale"], ["xs"]),
        helper.make_node("Transpose", ["xs"], ["nchw1"], perm=[0, 3, 1, 2]),
    ]
    if mirror:
        nodes += [
            helper.make_node(
                "Slice", ["nchw1", "flip_start", "flip_end", "flip_axes", "flip_step"], ["flipped"]
            ),
            helper.make_node("Concat", ["nchw1", "flipped"], ["nchw"], axis=0),
        ]
    else:
        nodes.append(helper.make_node("Identity", ["nchw1"], ["nchw"]))
    inits = [
        numpy_helper.from_array(np.array(1 / 255.0, np.float32), "scale"),
        numpy_helper.from_array(boxes, "boxes"),
        numpy_helper.from_array(np.array(1 / len(kernels), np.float32), "share"),
        numpy_helper.from_array(np.array([2, 3], np.int64), "squeeze_axes"),
    ]
    if mirror:
        inits += [
            numpy_helper.from_array(np.array(0.5, np.float32), "half"),
            numpy_helper.from_array(np.array([-1], np.int64), "flip_start"),
            numpy_helper.from_array(np.array([np.iinfo(np.int64).min], np.int64), "flip_end"),
            numpy_helper.from_array(np.array([3], np.int64), "flip_axes"),
            numpy_helper.from_array(np.array([-1], np.int64), "flip_step"),
        ]
    nodes.append(
        helper.make_node("Conv", ["nchw", "boxes"], ["means"], strides=[2, 2], pads=[5] * 4)
    )
    probabilities, pooled, cams = [], [], []
    for m, (kernel, bias) in enumerate(zip(kernels, biases, strict=True)):
        dm = kernel.shape[0]
        inits += [
            numpy_helper.from_array(spread[:dm], f"m{m}_spread"),
            numpy_helper.from_array(offsets[:dm], f"m{m}_offsets"),
            numpy_helper.from_array(kernel.astype(np.float32), f"m{m}_kernel"),
            numpy_helper.from_array(bias.astype(np.float32), f"m{m}_bias"),
        ]
        nodes += [
            helper.make_node("Conv", ["means", f"m{m}_spread", f"m{m}_offsets"], [f"m{m}_logit"]),
            helper.make_node("Relu", [f"m{m}_logit"], [f"m{m}_fmap"]),
            helper.make_node("GlobalAveragePool", [f"m{m}_fmap"], [f"m{m}_gap"]),
            helper.make_node("Squeeze", [f"m{m}_gap", "squeeze_axes"], [f"m{m}_pooled"]),
            helper.make_node("MatMul", [f"m{m}_pooled", f"m{m}_kernel"], [f"m{m}_matmul"]),
            helper.make_node("Add", [f"m{m}_matmul", f"m{m}_bias"], [f"m{m}_logits"]),
            helper.make_node("Softmax", [f"m{m}_logits"], [f"m{m}_probabilities"], axis=-1),
            helper.make_node("Transpose", [f"m{m}_fmap"], [f"m{m}_nhwc"], perm=[0, 2, 3, 1]),
            helper.make_node("MatMul", [f"m{m}_nhwc", f"m{m}_kernel"], [f"m{m}_cam"]),
        ]
        for name, out in (
            (f"m{m}_probabilities", probabilities),
            (f"m{m}_pooled", pooled),
            (f"m{m}_cam", cams),
        ):
            if mirror:
                nodes += [
                    helper.make_node("Split", [name], [f"{name}_a", f"{name}_b"], axis=0),
                    helper.make_node("Add", [f"{name}_a", f"{name}_b"], [f"{name}_sum"]),
                    helper.make_node("Mul", [f"{name}_sum", "half"], [f"{name}_views"]),
                ]
                out.append(f"{name}_views")
            else:
                out.append(name)
    nodes += [
        helper.make_node("Sum", probabilities, ["probabilities_sum"]),
        helper.make_node("Mul", ["probabilities_sum", "share"], ["probabilities"]),
        helper.make_node("Concat", pooled, ["features"], axis=-1),
        helper.make_node("Sum", cams, ["cam_sum"]),
        helper.make_node("Mul", ["cam_sum", "share"], ["cam"]),
    ]
    nodes += _lesion_nodes(spec.lesion_stride or 4)
    inits += _lesion_inits()
    h, side = size // 2, size // (spec.lesion_stride or 4)
    total = sum(kern.shape[0] for kern in kernels)
    outputs = [
        helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", k]),
        helper.make_tensor_value_info("cam", TensorProto.FLOAT, ["N", h, h, k]),
        helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", total]),
        helper.make_tensor_value_info("lesion", TensorProto.FLOAT, ["N", side, side, 1]),
    ]
    graph = helper.make_graph(
        nodes,
        "ensemble_test",
        [helper.make_tensor_value_info("image", TensorProto.UINT8, ["N", size, size, 1])],
        outputs,
        inits,
    )
    return _save(graph, spec, path)
