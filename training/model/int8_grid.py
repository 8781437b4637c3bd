"""Put a trained model's kernels on the INT8 grid that export's quantization will use.

Export quantizes weights to symmetric int8 with one scale per output channel,
``scale = max|w| / 127`` (``export.quantize.QuantConfig``: int8 per-channel weights). Batch
norm folding multiplies each output channel by a constant, which keeps a channel on its grid.
A float model whose kernels already lie on that grid therefore has exactly the weights of its
INT8 export, and the only difference left between the two is activation rounding. (The
exception: onnxruntime widens the step of a channel whose bias would not fit in int32 at
``input_scale * weight_scale``; it logs each one, a few dozen channels of EfficientNet-Lite0.)
"""

from __future__ import annotations

import keras
import numpy as np

from training.model.classifier import nested_layers

INT8_MAX = 127


def snap_kernel(kernel: np.ndarray, channel_axes: tuple[int, ...]) -> np.ndarray:
    """Round ``kernel`` to symmetric int8 steps, one step size per index of ``channel_axes``.

    A channel that is all zeros stays zero.
    """
    reduce = tuple(a for a in range(kernel.ndim) if a not in channel_axes)
    peak = np.abs(kernel).max(axis=reduce, keepdims=True)
    step = np.where(peak > 0, peak / INT8_MAX, 1.0)
    return (np.round(kernel / step) * step).astype(kernel.dtype)


def snap_to_int8_grid(model: keras.Model) -> int:
    """Snap every convolution, depthwise convolution and dense kernel of ``model`` (nested
    models included) in place; returns how many kernels were snapped."""
    snapped = 0
    for layer in nested_layers(model):
        kernel = getattr(layer, "kernel", None)
        if not isinstance(kernel, keras.Variable) or len(kernel.shape) < 2:
            continue
        rank = len(kernel.shape)
        # Depthwise kernels are (h, w, channels, multiplier): each (channel, multiplier) pair is
        # one output channel. Every other kernel keeps its output channels last.
        is_depthwise = isinstance(layer, keras.layers.DepthwiseConv2D)
        channel_axes = (rank - 2, rank - 1) if is_depthwise else (rank - 1,)
        kernel.assign(snap_kernel(np.asarray(kernel.numpy()), channel_axes))
        snapped += 1
    return snapped
