"""Tiny hand-built ONNX models that meet (or deliberately break) the contract; no TensorFlow.

The contract model scores "dark blob present" crudely: enough to exercise the runtime end to end.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edge_runtime.contract import ModelSpec

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
        nodes += [
            # dark = sigmoid((64 - x) / 8) per pixel, then averaged over stride blocks
            helper.make_node("Sub", ["dark_at", "x"], ["dark_diff"]),
            helper.make_node("Mul", ["dark_diff", "dark_gain"], ["dark_logit"]),
            helper.make_node("Sigmoid", ["dark_logit"], ["dark"]),
            helper.make_node("Transpose", ["dark"], ["dark_nchw"], perm=[0, 3, 1, 2]),
            helper.make_node(
                "AveragePool", ["dark_nchw"], ["lesion_nchw"], kernel_shape=[s, s], strides=[s, s]
            ),
            helper.make_node("Transpose", ["lesion_nchw"], ["lesion"], perm=[0, 2, 3, 1]),
        ]
        inits += [
            numpy_helper.from_array(np.array(64.0, np.float32), "dark_at"),
            numpy_helper.from_array(np.array(1 / 8.0, np.float32), "dark_gain"),
        ]
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
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    for key, value in spec.to_metadata().items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, path)
    return path
