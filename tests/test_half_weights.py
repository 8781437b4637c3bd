"""An FP32 file with float16-stored convolution weights: half the bytes, the same arithmetic."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from export.fp16 import HALF_SUFFIX, store_conv_weights_as_float16


def _conv_model(path, *, kernel_also_read_by_add: bool = False):
    """image [1, 4, 16, 16] -> Conv (8 filters, 3x3, bias) -> Relu -> Conv -> output."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.normal(size=(8, 4, 3, 3)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.normal(size=(8,)).astype(np.float32), "b1"),
        numpy_helper.from_array(rng.normal(size=(2, 8, 3, 3)).astype(np.float32), "w2"),
    ]
    nodes = [
        helper.make_node("Conv", ["image", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2"], ["out"], pads=[1, 1, 1, 1]),
    ]
    outputs = [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 2, 16, 16])]
    if kernel_also_read_by_add:
        nodes.append(helper.make_node("Add", ["w2", "w2"], ["w2_twice"]))
        outputs.append(helper.make_tensor_value_info("w2_twice", TensorProto.FLOAT, [2, 8, 3, 3]))
    graph = helper.make_graph(
        nodes,
        "convs",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 4, 16, 16])],
        outputs,
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(path))
    return path


def _run(path, x):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["out"], {"image": x})[0]


def test_convolution_kernels_are_stored_half_and_compute_as_before(tmp_path):
    source = _conv_model(tmp_path / "full.onnx")
    target = store_conv_weights_as_float16(source, tmp_path / "half.onnx")
    stored = {i.name: i.data_type for i in onnx.load(str(target)).graph.initializer}
    assert stored == {
        "w1" + HALF_SUFFIX: TensorProto.FLOAT16,
        "w2" + HALF_SUFFIX: TensorProto.FLOAT16,
        "b1": TensorProto.FLOAT,  # biases stay float32
    }
    x = np.random.default_rng(1).normal(size=(1, 4, 16, 16)).astype(np.float32)
    full, half = _run(source, x), _run(target, x)
    assert full.dtype == half.dtype == np.float32
    # rounding each weight to float16 moves it by <= 2**-11 of itself: close, not equal
    assert 0 < np.abs(full - half).max() <= 2e-3 * np.abs(full).max()


def test_a_kernel_that_other_nodes_read_stays_float32(tmp_path):
    source = _conv_model(tmp_path / "full.onnx", kernel_also_read_by_add=True)
    target = store_conv_weights_as_float16(source, tmp_path / "half.onnx")
    stored = {i.name: i.data_type for i in onnx.load(str(target)).graph.initializer}
    assert stored["w2"] == TensorProto.FLOAT and "w1" + HALF_SUFFIX in stored


def test_a_graph_without_convolution_weights_is_refused(tmp_path):
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "relu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    source = tmp_path / "relu.onnx"
    onnx.save(helper.make_model(graph), str(source))
    with pytest.raises(ValueError, match=r"relu\.onnx: no float32 convolution weight"):
        store_conv_weights_as_float16(source, tmp_path / "half.onnx")
    assert not (tmp_path / "half.onnx").exists()
