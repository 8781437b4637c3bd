"""Folding the input normalization into the first INT8 convolution is exact and removes the
float ops on the full-size input."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edge_runtime.model.contract import INPUT_NAME
from export.input_fold import fold_input_scaling
from export.quantize import QuantConfig, quantize_int8

MEAN, STD = 127.0, 128.0


def _save(path, nodes, inits, *, out_channels: int) -> None:
    """Save a graph from the uint8 16 x 16 image to ``out`` ``[N, out_channels, 16, 16]``."""
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.UINT8, [None, 16, 16, 1])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [None, out_channels, 16, 16])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


def _scaled_conv_model(path) -> None:
    """uint8 NHWC image -> (x - 127) / 128 -> Reshape to NCHW -> 3x3 conv (pads) -> output."""
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.normal(size=(4, 1, 3, 3)).astype(np.float32), "w")
    inits = [
        weight,
        numpy_helper.from_array(np.array(MEAN, np.float32), "mean"),
        numpy_helper.from_array(np.array(1 / STD, np.float32), "inv_std"),
        numpy_helper.from_array(np.array([-1, 1, 16, 16], np.int64), "nchw"),
    ]
    nodes = [
        helper.make_node("Cast", [INPUT_NAME], ["f"], to=TensorProto.FLOAT),
        helper.make_node("Sub", ["f", "mean"], ["centred"]),
        helper.make_node("Mul", ["centred", "inv_std"], ["scaled"]),
        helper.make_node("Reshape", ["scaled", "nchw"], ["x"]),
        helper.make_node("Conv", ["x", "w"], ["out"], pads=[1, 1, 1, 1]),
    ]
    _save(path, nodes, inits, out_channels=4)


def _run(path, images):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {INPUT_NAME: images})[0]


@pytest.mark.parametrize("mean", [127.5, -1.0, 300.0])
def test_non_integer_or_out_of_range_mean_is_not_folded(tmp_path, mean):
    fp32, int8 = tmp_path / "fp32.onnx", tmp_path / "int8.onnx"
    _scaled_conv_model(fp32)
    images = np.random.default_rng(1).integers(0, 256, (4, 16, 16, 1), dtype=np.uint8)
    quantize_int8(fp32, int8, images, QuantConfig())
    original = int8.read_bytes()
    assert not fold_input_scaling(int8, mean, STD)
    assert int8.read_bytes() == original


def _flip_ensemble_model(path) -> None:
    """A flip ensemble's input: the uint8 image and its mirror as one batch (Concat of the image
    and its Slice backwards along the width), read by two members that each scale it and
    convolve it; their outputs side by side."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(np.array(MEAN, np.float32), "mean"),
        numpy_helper.from_array(np.array(1 / STD, np.float32), "inv_std"),
        numpy_helper.from_array(np.array([-1, 1, 16, 16], np.int64), "nchw"),
        numpy_helper.from_array(np.array([-1], np.int64), "last"),
        numpy_helper.from_array(np.array([-(2**62)], np.int64), "before_first"),
        numpy_helper.from_array(np.array([2], np.int64), "width"),
        numpy_helper.from_array(np.array([-1], np.int64), "backwards"),
    ]
    nodes = [
        helper.make_node(
            "Slice", [INPUT_NAME, "last", "before_first", "width", "backwards"], ["mirrored"]
        ),
        helper.make_node("Concat", [INPUT_NAME, "mirrored"], ["views"], axis=0),
    ]
    for m in range(2):
        inits.append(
            numpy_helper.from_array(rng.normal(size=(4, 1, 3, 3)).astype(np.float32), f"w{m}")
        )
        nodes += [
            helper.make_node("Cast", ["views"], [f"f{m}"], to=TensorProto.FLOAT),
            helper.make_node("Sub", [f"f{m}", "mean"], [f"c{m}"]),
            helper.make_node("Mul", [f"c{m}", "inv_std"], [f"s{m}"]),
            helper.make_node("Reshape", [f"s{m}", "nchw"], [f"x{m}"]),
            helper.make_node("Conv", [f"x{m}", f"w{m}"], [f"out{m}"], pads=[1, 1, 1, 1]),
        ]
    nodes.append(helper.make_node("Concat", ["out0", "out1"], ["out"], axis=1))
    _save(path, nodes, inits, out_channels=8)


def _shared_cast_model(path) -> None:
    """One Cast of the image read by two members: one scales it and convolves it (foldable),
    the other pools it first (a float op, as the resize of a member at a smaller side), so
    that its branch cannot fold; their outputs side by side."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(np.array(MEAN, np.float32), "mean"),
        numpy_helper.from_array(np.array(1 / STD, np.float32), "inv_std"),
        numpy_helper.from_array(np.array([-1, 1, 16, 16], np.int64), "nchw"),
        numpy_helper.from_array(rng.normal(size=(4, 1, 3, 3)).astype(np.float32), "w0"),
        numpy_helper.from_array(rng.normal(size=(4, 1, 3, 3)).astype(np.float32), "w1"),
    ]
    nodes = [
        helper.make_node("Cast", [INPUT_NAME], ["f"], to=TensorProto.FLOAT),
        helper.make_node("Sub", ["f", "mean"], ["c0"]),
        helper.make_node("Mul", ["c0", "inv_std"], ["s0"]),
        helper.make_node("Reshape", ["s0", "nchw"], ["x0"]),
        helper.make_node("Conv", ["x0", "w0"], ["out0"], pads=[1, 1, 1, 1]),
        helper.make_node("Reshape", ["f", "nchw"], ["r1"]),
        helper.make_node("AveragePool", ["r1"], ["x1"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["x1", "w1"], ["out1"], pads=[1, 1, 1, 1]),
        helper.make_node("Concat", ["out0", "out1"], ["out"], axis=1),
    ]
    _save(path, nodes, inits, out_channels=8)


def test_a_cast_shared_with_a_branch_that_cannot_fold_folds_the_branch_that_can(tmp_path):
    fp32, int8 = tmp_path / "fp32.onnx", tmp_path / "int8.onnx"
    _shared_cast_model(fp32)
    images = np.random.default_rng(1).integers(0, 256, (8, 16, 16, 1), dtype=np.uint8)
    quantize_int8(fp32, int8, images, QuantConfig(float_convs=0))
    before = _run(int8, images)

    assert fold_input_scaling(int8, MEAN, STD)

    ops = [n.op_type for n in onnx.load(str(int8)).graph.node]
    assert "Sub" not in ops and ops.count("Cast") == 1, ops  # the pooled member keeps its Cast
    after = _run(int8, images)
    reference = _run(fp32, images)
    assert after.shape == (8, 8, 16, 16)
    np.testing.assert_array_equal(after[:, 4:], before[:, 4:])  # the other member is untouched
    assert np.abs(after - reference).max() <= np.abs(before - reference).max() + 1e-6


@pytest.mark.parametrize(
    ("build", "shape"),
    [
        (_scaled_conv_model, (8, 4, 16, 16)),
        # every member of a flip ensemble reads the uint8 batch: both views, both members
        (_flip_ensemble_model, (16, 8, 16, 16)),
    ],
)
def test_fold_is_exact_and_removes_float_scaling(tmp_path, build, shape):
    fp32, int8 = tmp_path / "fp32.onnx", tmp_path / "int8.onnx"
    build(fp32)
    images = np.random.default_rng(1).integers(0, 256, (8, 16, 16, 1), dtype=np.uint8)
    quantize_int8(
        fp32, int8, images, QuantConfig(float_convs=0)
    )  # folds into a quantized first conv
    before = _run(int8, images)

    assert fold_input_scaling(int8, MEAN, STD)

    ops = [n.op_type for n in onnx.load(str(int8)).graph.node]
    assert not {"Cast", "Sub", "Mul"} & set(ops), ops
    after = _run(int8, images)
    reference = _run(fp32, images)
    assert after.shape == shape
    # the folded input is exact, so it is at least as close to FP32 as the calibrated one
    assert np.abs(after - reference).max() <= np.abs(before - reference).max() + 1e-6
