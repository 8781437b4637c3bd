"""INT8 quantization settings: convolutions kept in float stay float, the rest are quantized."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edge_runtime.model.contract import INPUT_NAME
from export.input_fold import fold_input_scaling
from export.quantize import Calibration, QuantConfig, float_prefix, quantize_int8


def _two_conv_model(path) -> None:
    """uint8 NCHW-ready image -> float -> conv1 -> relu -> conv2 -> output."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.normal(size=(4, 1, 3, 3)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.normal(size=(2, 4, 3, 3)).astype(np.float32), "w2"),
        numpy_helper.from_array(np.array([-1, 1, 16, 16], np.int64), "nchw"),
    ]
    nodes = [
        helper.make_node("Cast", [INPUT_NAME], ["f"], to=TensorProto.FLOAT),
        helper.make_node("Reshape", ["f", "nchw"], ["x"]),
        helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2"], ["out"], pads=[1, 1, 1, 1], name="conv2"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.UINT8, [None, 16, 16, 1])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [None, 2, 16, 16])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


def _quantized_weights(path) -> set[str]:
    """Names of the convolutions whose weight arrives through a DequantizeLinear."""
    graph = onnx.load(str(path)).graph
    dequantized = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    return {n.name for n in graph.node if n.op_type == "Conv" and n.input[1] in dequantized}


@pytest.mark.parametrize(("float_convs", "quantized"), [(0, {"conv1", "conv2"}), (1, {"conv2"})])
def test_first_convolutions_can_stay_float(tmp_path, float_convs, quantized):
    fp32, int8 = tmp_path / "fp32.onnx", tmp_path / "int8.onnx"
    _two_conv_model(fp32)
    images = np.random.default_rng(1).integers(0, 256, (8, 16, 16, 1), dtype=np.uint8)
    quantize_int8(fp32, int8, images, QuantConfig(float_convs=float_convs))
    assert _quantized_weights(int8) == quantized


def _residual_graph() -> onnx.GraphProto:
    """conv1 -> conv2, then add(c1, c2) -> conv3 -> add(s, c3): names and wiring only."""
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1"),
        helper.make_node("Conv", ["c1", "w2"], ["c2"], name="conv2"),
        helper.make_node("Add", ["c1", "c2"], ["s"], name="add1"),
        helper.make_node("Conv", ["s", "w3"], ["c3"], name="conv3"),
        helper.make_node("Add", ["s", "c3"], ["out"], name="add2"),
    ]
    return helper.make_graph(nodes, "g", [], [])


@pytest.mark.parametrize(
    ("convs", "kept"),
    [
        (0, []),
        (1, ["conv1"]),
        (2, ["conv1", "conv2", "add1"]),  # the sum of two float outputs stays float
        (3, ["conv1", "conv2", "add1", "conv3", "add2"]),
    ],
)
def test_the_float_prefix_takes_the_residual_sums_of_its_own_outputs(convs, kept):
    assert float_prefix(_residual_graph(), convs) == kept


def test_the_float_prefix_takes_each_ensemble_members_first_convolutions():
    """Two members, listed interleaved as tf2onnx may list them: each keeps its first two."""
    nodes = [
        helper.make_node("Conv", ["x", "a_w1"], ["a1"], name="a_conv1"),
        helper.make_node("Conv", ["a1", "a_w2"], ["a2"], name="a_conv2"),
        helper.make_node("Conv", ["a2", "a_w3"], ["a3"], name="a_conv3"),
        helper.make_node("Conv", ["x", "b_w1"], ["b1"], name="b_conv1"),
        helper.make_node("Conv", ["b1", "b_w2"], ["b2"], name="b_conv2"),
        helper.make_node("Conv", ["b2", "b_w3"], ["b3"], name="b_conv3"),
        helper.make_node("Add", ["a3", "b3"], ["out"], name="mean"),
    ]
    graph = helper.make_graph(nodes, "g", [], [])
    assert float_prefix(graph, 2) == ["a_conv1", "a_conv2", "b_conv1", "b_conv2"]


def test_a_float_first_convolution_is_not_folded(tmp_path):
    fp32, int8 = tmp_path / "fp32.onnx", tmp_path / "int8.onnx"
    _two_conv_model(fp32)
    images = np.random.default_rng(1).integers(0, 256, (4, 16, 16, 1), dtype=np.uint8)
    quantize_int8(fp32, int8, images, QuantConfig(float_convs=1))
    original = int8.read_bytes()
    assert not fold_input_scaling(int8, 0.0, 1.0)
    assert int8.read_bytes() == original


def test_negative_float_convs_is_refused():
    with pytest.raises(ValueError, match="float_convs"):
        QuantConfig(float_convs=-1)


@pytest.mark.parametrize("calibration", [Calibration.PERCENTILE, Calibration.ENTROPY])
def test_histogram_calibration_takes_a_count_that_is_no_multiple_of_the_batch(
    tmp_path, calibration
):
    """onnxruntime's histogram calibrators fail on a shorter last batch; 21 images in batches
    of 8 must still quantize."""
    fp32, int8 = tmp_path / "fp32.onnx", tmp_path / "int8.onnx"
    _two_conv_model(fp32)
    images = np.random.default_rng(1).integers(0, 256, (21, 16, 16, 1), dtype=np.uint8)
    quantize_int8(
        fp32, int8, images, QuantConfig(calibration=calibration, batch_size=8, float_convs=0)
    )
    assert _quantized_weights(int8) == {"conv1", "conv2"}


def _int8_contract_model(tmp_path):
    from edge_runtime.model.contract import ModelSpec, Precision
    from tests.onnx_models import CLASSES, make_contract_model

    fp32 = make_contract_model(tmp_path / "m-fp32.onnx")
    images = np.random.default_rng(0).integers(0, 256, (16, 64, 64, 1), dtype=np.uint8)
    int8 = quantize_int8(fp32, tmp_path / "m-int8.onnx", images, QuantConfig(batch_size=8))
    proto = onnx.load(str(int8))
    del proto.metadata_props[:]
    spec = ModelSpec(class_names=CLASSES, input_size=64, precision=Precision.INT8)
    for key, value in spec.to_metadata().items():
        proto.metadata_props.add(key=key, value=value)
    onnx.save(proto, str(int8))
    return fp32, int8, images


def test_exact_int8_runs_the_qdq_graph_as_written_and_only_for_int8_models(tmp_path, monkeypatch):
    import onnxruntime as ort

    # the levels asked for, not those of a cached optimized graph (loaded with optimizations off)
    monkeypatch.setenv("EDGE_CLASSIFY_CACHE", "off")

    from edge_runtime.model.session import Provider, open_model

    fp32, int8, images = _int8_contract_model(tmp_path)

    def level(path, exact):
        model = open_model(path, provider=Provider.CPU, exact_int8=exact)
        return model.session.get_session_options().graph_optimization_level, model

    assert level(int8, False)[0] == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    exact_level, exact = level(int8, True)
    assert exact_level == ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    assert level(fp32, True)[0] == ort.GraphOptimizationLevel.ORT_ENABLE_ALL  # float: no change
    reference = open_model(fp32, provider=Provider.CPU).session.run(None, {"image": images})[0]
    emulated = exact.session.run(None, {"image": images})[0]
    assert np.abs(emulated - reference).max() < 0.05  # 8-bit rounding, nothing worse


def test_export_gates_run_int8_exactly_where_the_cpu_saturates(tmp_path, monkeypatch):
    import onnxruntime as ort

    monkeypatch.setenv("EDGE_CLASSIFY_CACHE", "off")  # the levels asked for (as above)

    import export.pipeline as pipeline

    _, int8, _ = _int8_contract_model(tmp_path)

    def level() -> ort.GraphOptimizationLevel:
        return pipeline._open(int8).session.get_session_options().graph_optimization_level

    monkeypatch.setattr(pipeline, "SATURATING_CPU", True)
    assert level() == ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    monkeypatch.setattr(pipeline, "SATURATING_CPU", False)
    assert level() == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
