"""Kernels snapped to the INT8 grid survive tf2onnx, batch-norm folding and ORT's quantizer."""

from __future__ import annotations

import numpy as np
import pytest


def test_snap_kernel_puts_each_output_channel_on_its_own_grid():
    from training.model.int8_grid import INT8_MAX, snap_kernel

    rng = np.random.default_rng(0)
    kernel = rng.normal(0, 1, (3, 3, 4, 5)).astype(np.float32) * np.arange(1, 6)
    kernel[..., 2] = 0.0
    snapped = snap_kernel(kernel, (3,))
    peaks = np.abs(kernel).max(axis=(0, 1, 2))
    for c in range(5):
        if peaks[c] == 0:
            assert not snapped[..., c].any()
            continue
        steps = snapped[..., c] / (peaks[c] / INT8_MAX)
        np.testing.assert_allclose(steps, np.round(steps), atol=1e-4)
        assert np.abs(snapped[..., c] - kernel[..., c]).max() <= peaks[c] / INT8_MAX / 2 + 1e-6
    np.testing.assert_array_equal(snap_kernel(snapped, (3,)), snapped)


def _classifier(snap: bool):
    keras = pytest.importorskip("keras")
    from training.model.backbones import Backbone
    from training.model.classifier import build_classifier, nested_layers
    from training.model.int8_grid import snap_to_int8_grid

    keras.utils.set_random_seed(0)
    model = build_classifier(3, backbone=Backbone.EFFICIENTNET_LITE0, input_size=64, weights=None)
    rng = np.random.default_rng(0)
    for layer in nested_layers(model):  # batch norms that fold into non-trivial channel scales
        if isinstance(layer, keras.layers.BatchNormalization):
            gamma, beta, mean, var = (w.shape for w in layer.get_weights())
            layer.set_weights(
                [
                    rng.uniform(0.5, 2, gamma),
                    rng.normal(0, 0.1, beta),
                    rng.normal(0, 0.1, mean),
                    rng.uniform(0.5, 2, var),
                ]
            )
    snapped = snap_to_int8_grid(model) if snap else 0
    return model, snapped


def _weight_error(model, tmp_path) -> float:
    """Largest relative gap between the INT8 export's dequantized weights and the float ones."""
    import onnx
    from onnx import numpy_helper

    from export.convert import keras_to_onnx
    from export.quantize import QuantConfig, quantize_int8

    tmp_path.mkdir()
    fp32 = keras_to_onnx(model, 64, tmp_path / "fp32.onnx")
    prepared, int8 = tmp_path / "prepared.onnx", tmp_path / "int8.onnx"
    images = np.random.default_rng(1).integers(0, 256, (8, 64, 64, 1), dtype=np.uint8)
    quantize_int8(fp32, int8, images, QuantConfig(), prepared_path=prepared)
    floats = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(prepared)).graph.initializer}
    graph = onnx.load(str(int8)).graph
    ints = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    worst, compared = 0.0, 0
    for node in graph.node:
        name = node.input[0]
        if node.op_type != "DequantizeLinear" or ints.get(name, np.zeros(0)).dtype != np.int8:
            continue
        q, scale = ints[name].astype(np.float64), ints[node.input[1]]
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        shape = [1] * q.ndim
        shape[axis] = -1
        weights = floats[name.removesuffix("_quantized")]
        gap = np.abs(q * scale.reshape(shape) - weights).max() / np.abs(weights).max()
        worst, compared = max(worst, gap), compared + 1
    assert compared > 30  # every convolution and the classifier kernel
    return worst


@pytest.mark.slow
def test_snapped_model_and_its_int8_export_share_their_weights(tmp_path):
    pytest.importorskip("tf2onnx")
    model, snapped = _classifier(snap=True)
    assert snapped > 30
    assert _weight_error(model, tmp_path / "snapped") < 1e-5
    raw, _ = _classifier(snap=False)
    assert _weight_error(raw, tmp_path / "raw") > 1e-3  # the check can tell the difference
