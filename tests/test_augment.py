"""Training augmentation and the gray-level jitter probe."""

from __future__ import annotations

import numpy as np
import pytest


def _flat_batch(value: int = 128, n: int = 8, size: int = 32) -> np.ndarray:
    return np.full((n, size, size, 1), value, np.uint8)


def _intensity_only(**changes):
    from training.augmentation.augment import AugmentConfig

    base = dict(rotation_deg=0.0, zoom=0.0, gain=0.0, contrast=0.0, gamma=0.0, flip=False)
    return AugmentConfig(**{**base, **changes})


def test_augmenter_adds_pixel_noise_only_when_asked():
    pytest.importorskip("tensorflow")
    from training.augmentation.augment import make_augmenter

    images = _flat_batch()
    quiet = np.asarray(make_augmenter(_intensity_only(noise=0.0), seed=0)(images)[0])
    noisy = np.asarray(make_augmenter(_intensity_only(noise=0.05), seed=0)(images)[0])
    assert quiet.dtype == np.uint8 and quiet.shape == images.shape
    np.testing.assert_array_equal(quiet, images)
    per_image_std = noisy.reshape(len(noisy), -1).std(axis=1)
    assert per_image_std.max() > 2.0  # up to 0.05 * 255 ~ 13 gray levels
    assert per_image_std.max() < 0.05 * 255 * 1.2
    assert abs(float(noisy.mean()) - 128) < 2  # zero-mean noise


def test_jitter_moves_each_pixel_at_most_the_amplitude_and_is_seeded():
    pytest.importorskip("tensorflow")
    from training.augmentation.augment import jitter_gray_levels

    images = np.array([[0, 1, 128, 254, 255]], np.uint8).repeat(50, axis=0)
    jittered = jitter_gray_levels(images, 2, seed=3)
    assert jittered.dtype == np.uint8
    assert np.abs(jittered.astype(int) - images).max() == 2
    assert jittered.min() == 0 and jittered.max() == 255  # clipped, never wrapped
    np.testing.assert_array_equal(jittered, jitter_gray_levels(images, 2, seed=3))
    assert not np.array_equal(jittered, jitter_gray_levels(images, 2, seed=4))


def test_scanner_style_is_identity_at_chance_zero_and_varies_depth_gain_at_one():
    pytest.importorskip("tensorflow")
    import tensorflow as tf

    from training.augmentation.scanner_style import ScannerStyle, apply_scanner_style

    flat = tf.constant(np.full((4, 32, 32, 1), 0.5, np.float32))
    same = apply_scanner_style(flat, ScannerStyle(chance=0.0), tf.random.Generator.from_seed(0))
    np.testing.assert_array_equal(np.asarray(same), np.asarray(flat))

    tgc_only = ScannerStyle(chance=1.0, speckle=0.0, dynamic_range=(1.0, 1.0), blur_sigma=(1, 1))
    out = np.asarray(apply_scanner_style(flat, tgc_only, tf.random.Generator.from_seed(0)))
    assert out.shape == (4, 32, 32, 1) and out.min() >= 0.0 and out.max() <= 1.0
    rows = out[..., 0].mean(axis=2)  # [N, S]: the gain curve over depth
    assert (rows.max(axis=1) - rows.min(axis=1)).min() > 0.02  # gain varies with depth
    assert out[..., 0].std(axis=2).max() < 1e-3  # ... and not across a row


def test_scanner_style_keeps_masks_and_uint8_range_in_the_augmenter():
    pytest.importorskip("tensorflow")
    from training.augmentation.augment import make_augmenter

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, 32, 32, 1), dtype=np.uint8)
    masks = np.zeros_like(images)
    masks[:, 8:20, 8:20] = 255
    config = _intensity_only(noise=0.0, scanner_style=1.0)
    out, moved = make_augmenter(config, seed=1)(images, masks)
    out, moved = np.asarray(out), np.asarray(moved)
    assert out.dtype == np.uint8 and out.shape == images.shape
    np.testing.assert_array_equal(moved, masks)  # no geometry here: the masks stay put
    assert (out != images).mean() > 0.5  # the style changed most pixels
