"""Scanner-style augmentation: how another maker's scanner, or the same one set up differently,
would render the same tissue.

Each effect is drawn independently, on a chance per scan, in the tf.data graph (float
``[N, S, S, 1]`` scans in [0, 1]; masks are not moved, since none of these change geometry):

- speckle: multiplicative, spatially correlated noise, as coherent scattering paints it;
- time-gain compensation: a smooth gain curve over depth (rows), as the TGC sliders set it;
- dynamic range: the log-compression window, ``y = 1 - (1 - x) * r`` (the display's white
  point fixed, its black point moved), as the DR setting in dB changes it;
- resolution: down-sampling and back, as a coarser probe or a smaller scan sector gives;
- blur: a Gaussian point-spread of 0.5-1.5 pixels.

Gain, contrast and gamma stay in :mod:`training.augmentation.augment`.
"""

from __future__ import annotations

from dataclasses import dataclass

import tensorflow as tf


@dataclass(frozen=True)
class ScannerStyle:
    """How far each effect goes; ``chance`` is the chance per scan of each effect."""

    chance: float = 0.0
    speckle: float = 0.2  # largest std of the multiplicative speckle
    tgc: float = 0.4  # largest +- gain at each of the TGC control depths
    tgc_points: int = 5
    dynamic_range: tuple[float, float] = (0.75, 1.35)  # range of r in y = 1 - (1 - x) r
    resolution: tuple[float, float] = (0.35, 0.8)  # down-sampling factor of the side
    blur_sigma: tuple[float, float] = (0.5, 1.5)  # pixels


def _gaussian_blur(x: tf.Tensor, sigma: tf.Tensor, radius: int = 3) -> tf.Tensor:
    offsets = tf.range(-radius, radius + 1, dtype=tf.float32)
    kernel = tf.exp(-(offsets**2) / (2.0 * sigma**2))
    kernel = kernel / tf.reduce_sum(kernel)
    rows = tf.reshape(kernel, [-1, 1, 1, 1])
    cols = tf.reshape(kernel, [1, -1, 1, 1])
    padded = tf.pad(x, [[0, 0], [radius, radius], [radius, radius], [0, 0]], mode="SYMMETRIC")
    out = tf.nn.conv2d(padded, rows, strides=1, padding="VALID")
    return tf.nn.conv2d(out, cols, strides=1, padding="VALID")


def apply_scanner_style(x: tf.Tensor, style: ScannerStyle, generator: tf.random.Generator):
    """``x`` (float32 ``[N, S, S, 1]`` in [0, 1]) rendered as by another scanner setup.

    Returns:
        float32 ``[N, S, S, 1]`` clipped to [0, 1]; each scan gets each effect with chance
        ``style.chance`` (``x`` itself when it is 0).
    """
    if style.chance <= 0:
        return x
    n = tf.shape(x)[0]
    side = tf.shape(x)[1]
    per_scan = tf.stack([n, 1, 1, 1])

    def chosen() -> tf.Tensor:
        return generator.uniform(per_scan, 0.0, 1.0) < style.chance

    noise = _gaussian_blur(generator.normal(tf.shape(x)), tf.constant(1.0))
    noise = noise / (tf.math.reduce_std(noise) + 1e-6)
    strength = generator.uniform(per_scan, 0.0, style.speckle)
    x = tf.where(chosen(), x * (1.0 + strength * noise), x)

    points = generator.uniform([n, style.tgc_points, 1, 1], 1.0 - style.tgc, 1.0 + style.tgc)
    curve = tf.image.resize(points, tf.stack([side, 1]), method="bilinear")
    x = tf.where(chosen(), x * curve, x)

    low, high = style.dynamic_range
    r = generator.uniform(per_scan, low, high)
    x = tf.where(chosen(), 1.0 - (1.0 - tf.clip_by_value(x, 0.0, 1.0)) * r, x)

    low, high = style.resolution
    factor = generator.uniform([], low, high)
    small = tf.maximum(tf.cast(tf.cast(side, tf.float32) * factor, tf.int32), 8)
    coarse = tf.image.resize(x, tf.stack([small, small]), method="area")
    coarse = tf.image.resize(coarse, tf.stack([side, side]), method="bilinear")
    x = tf.where(chosen(), coarse, x)

    low, high = style.blur_sigma
    x = tf.where(chosen(), _gaussian_blur(x, generator.uniform([], low, high)), x)
    return tf.clip_by_value(x, 0.0, 1.0)
