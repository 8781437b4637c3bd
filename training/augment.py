"""Training-time augmentation, vectorized in the tf.data graph (never applied at evaluation).

Geometry: horizontal flip, small rotation, scaling. Intensity, as a scanner's knobs would change
it: overall gain, contrast and gamma. Pixel noise of a few gray levels, so that the model's answer
does not hang on differences no reader could see, nor on INT8 rounding (docs/experiments.md,
"Quantization settings"). Vertical flips are left out: they put the skin line at the bottom,
which no probe produces.
"""

from __future__ import annotations

from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf


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


def make_augmenter(config: AugmentConfig, seed: int):
    """A function mapping a uint8 batch ``[N, S, S, 1]`` to an augmented uint8 batch."""
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

    def augment(images: tf.Tensor) -> tf.Tensor:
        x = tf.cast(images, tf.float32) / 255.0
        x = geometry(x, training=True)
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
        return tf.cast(tf.clip_by_value(x * 255.0 + 0.5, 0.0, 255.0), tf.uint8)

    return augment


def jitter_gray_levels(images: np.ndarray, amplitude: int, seed: int) -> np.ndarray:
    """``images`` (uint8) with independent uniform noise of +-``amplitude`` gray levels per pixel.

    A probe of stability: a sound model gives the same answer on the jittered copy.
    """
    rng = np.random.default_rng(seed)
    noise = rng.integers(-amplitude, amplitude + 1, size=images.shape, dtype=np.int16)
    return np.clip(images.astype(np.int16) + noise, 0, 255).astype(np.uint8)
