"""Training-time augmentation, vectorized in the tf.data graph (never applied at evaluation).

Geometry: horizontal flip, small rotation, scaling, applied to a scan and its lesion mask alike.
Intensity, as a scanner's knobs would change
it: overall gain, contrast and gamma. Pixel noise of a few gray levels, so that the model's answer
does not hang on differences no reader could see, nor on INT8 rounding (docs/experiments.md,
"Quantization settings"). Vertical flips are left out: they put the skin line at the bottom,
which no probe produces.
Scanner style (``training.augmentation.scanner_style``): speckle, time-gain compensation, dynamic
range, resolution and blur, as another scanner or setup would render the same tissue.
Screen clutter (``training.augmentation.clutter``): caliper crosses, dotted lines, text, body
markers, rulers
and logos painted on scans of every class alike, so that they say nothing about the label.
"""

from __future__ import annotations

from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf

from training.augmentation.clutter import clutter_bank
from training.augmentation.scanner_style import ScannerStyle, apply_scanner_style

CLUTTER_BANK_SIZE = 256


@dataclass(frozen=True)
class AugmentConfig:
    rotation_deg: float = 12.0
    zoom: float = 0.15
    gain: float = 0.25  # multiplicative brightness, +-
    contrast: float = 0.25  # +-
    gamma: float = 0.3  # log-uniform around 1
    noise: float = 0.03  # largest per-image std of additive Gaussian pixel noise (1 = full scale)
    flip: bool = True
    unmark: float = 0.0  # chance of showing a scan with its burned-in marks painted out
    clutter: float = 0.0  # chance of painting synthetic screen clutter on a scan (any class)
    # chance of each scanner-style effect (training.augmentation.scanner_style)
    scanner_style: float = 0.0


def make_augmenter(config: AugmentConfig, seed: int, size: int | None = None):
    """A function ``augment(images, masks=None) -> (images, masks)`` on uint8 batches
    ``[N, S, S, 1]``: the masks (if any) move with the images and keep their gray levels.

    Args:
        config: what to vary and by how much.
        seed: the random streams' seed.
        size: the scans' side ``S``; needed only when ``config.clutter`` > 0.
    """
    geometry = keras.Sequential(
        [
            *([keras.layers.RandomFlip("horizontal", seed=seed)] if config.flip else []),
            keras.layers.RandomRotation(
                config.rotation_deg / 360.0, fill_mode="constant", seed=seed
            ),
            keras.layers.RandomZoom(
                (-config.zoom, config.zoom), fill_mode="constant", seed=seed + 1
            ),
        ]
    )
    generator = tf.random.Generator.from_seed(seed)
    style = ScannerStyle(chance=config.scanner_style)
    bank = None
    if config.clutter > 0:
        if size is None:
            raise ValueError("make_augmenter needs the scans' size to draw screen clutter")
        bank = tuple(tf.constant(a) for a in clutter_bank(CLUTTER_BANK_SIZE, size, seed))

    def augment(images: tf.Tensor, masks: tf.Tensor | None = None):
        x = tf.cast(images, tf.float32) / 255.0
        if masks is not None:
            both = geometry(tf.concat([x, tf.cast(masks, tf.float32) / 255.0], -1), training=True)
            x, moved = both[..., :1], both[..., 1:]
            masks = tf.cast(tf.clip_by_value(moved * 255.0 + 0.5, 0.0, 255.0), tf.uint8)
        else:
            x = geometry(x, training=True)
        x = apply_scanner_style(x, style, generator)
        n = tf.shape(x)[0]
        shape = tf.stack([n, 1, 1, 1])
        gamma = tf.exp(generator.uniform(shape, -config.gamma, config.gamma))
        x = tf.pow(tf.clip_by_value(x, 1e-6, 1.0), gamma)
        mean = tf.reduce_mean(x, axis=(1, 2, 3), keepdims=True)
        contrast = 1.0 + generator.uniform(shape, -config.contrast, config.contrast)
        x = (x - mean) * contrast + mean
        x = x * (1.0 + generator.uniform(shape, -config.gain, config.gain))
        sigma = generator.uniform(shape, 0.0, config.noise)
        x = x + sigma * generator.normal(tf.shape(x))
        out = tf.cast(tf.clip_by_value(x * 255.0 + 0.5, 0.0, 255.0), tf.uint8)
        if bank is not None:
            pick = generator.uniform([n], 0, CLUTTER_BANK_SIZE, dtype=tf.int32)
            paint = tf.gather(bank[1], pick) > 0
            chosen = generator.uniform(shape, 0.0, 1.0) < config.clutter
            out = tf.where(paint & chosen, tf.gather(bank[0], pick), out)
        return out, masks

    return augment


def jitter_gray_levels(images: np.ndarray, amplitude: int, seed: int) -> np.ndarray:
    """``images`` (uint8) with independent uniform noise of +-``amplitude`` gray levels per pixel.

    A probe of stability: a sound model gives the same answer on the jittered copy.
    """
    rng = np.random.default_rng(seed)
    noise = rng.integers(-amplitude, amplitude + 1, size=images.shape, dtype=np.int16)
    return np.clip(images.astype(np.int16) + noise, 0, 255).astype(np.uint8)
