"""Small registered Keras layers that travel with the model (no Lambda: Keras 3 safe mode)."""

from __future__ import annotations

import keras
import numpy as np
from keras import layers, ops

PACKAGE = "edge_classify"


def bilinear_weights(source: int, size: int) -> np.ndarray:
    """``[size, source]`` weights of 1-D bilinear interpolation with half-pixel centres (as
    TensorFlow's and ONNX's ``half_pixel`` resize): output ``i`` samples the input at
    ``(i + 0.5) * source / size - 0.5``, clamped to the first and last pixel."""
    position = np.clip((np.arange(size) + 0.5) * source / size - 0.5, 0, source - 1)
    lower = np.floor(position).astype(int)
    upper = np.minimum(lower + 1, source - 1)
    weights = np.zeros((size, source), np.float64)
    weights[np.arange(size), lower] += 1 - (position - lower)
    weights[np.arange(size), upper] += position - lower
    return weights.astype(np.float32)


@keras.saving.register_keras_serializable(package=PACKAGE)
class PixelScale(layers.Layer):
    """uint8 pixels -> float ``(x - mean) / std``, optionally replicated to several channels."""

    def __init__(self, mean: float, std: float, channels: int = 1, **kwargs) -> None:
        super().__init__(**kwargs)
        self.mean, self.std, self.channels = float(mean), float(std), int(channels)

    def call(self, x):
        x = (ops.cast(x, "float32") - self.mean) / self.std
        return ops.concatenate([x] * self.channels, axis=-1) if self.channels > 1 else x

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], self.channels)

    def get_config(self) -> dict:
        return {
            **super().get_config(),
            "mean": self.mean,
            "std": self.std,
            "channels": self.channels,
        }


@keras.saving.register_keras_serializable(package=PACKAGE)
class ClassActivationHead(layers.Layer):
    """Global average pooling -> dropout -> dense, plus the class activation maps.

    With GAP followed by a dense layer the class activation map is exact and cheap:
    ``cam[n, y, x, k] = sum_c features[n, y, x, c] * kernel[c, k]``, and the mean of the map over
    space plus the bias is the class logit. Returns ``(logits, cam)``.
    """

    def __init__(self, num_classes: int, dropout: float = 0.3, **kwargs) -> None:
        super().__init__(**kwargs)
        self.num_classes, self.dropout_rate = int(num_classes), float(dropout)
        self.dropout = layers.Dropout(self.dropout_rate)

    def build(self, input_shape) -> None:
        channels = input_shape[-1]
        self.kernel = self.add_weight(
            name="kernel", shape=(channels, self.num_classes), initializer="glorot_uniform"
        )
        self.bias = self.add_weight(name="bias", shape=(self.num_classes,), initializer="zeros")

    def call(self, features, training=None):
        pooled = self.dropout(ops.mean(features, axis=(1, 2)), training=training)
        logits = ops.matmul(pooled, self.kernel) + self.bias
        cam = ops.einsum("nhwc,ck->nhwk", features, self.kernel)
        return logits, cam

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.num_classes), (*input_shape[:-1], self.num_classes)

    def get_config(self) -> dict:
        return {
            **super().get_config(),
            "num_classes": self.num_classes,
            "dropout": self.dropout_rate,
        }


@keras.saving.register_keras_serializable(package=PACKAGE)
class MirrorWidth(layers.Layer):
    """Mirror images or maps ``[N, H, W, C]`` left to right (a flip test-time augmentation).
    Kept to load ensembles saved before :class:`WithMirror` ran both views as one batch."""

    def call(self, x):
        return ops.flip(x, axis=2)


@keras.saving.register_keras_serializable(package=PACKAGE)
class WithMirror(layers.Layer):
    """``[N, H, W, C]`` -> ``[2N, H, W, C]``: the batch, then the batch mirrored left to right,
    so that a model runs both views of a flip test-time augmentation as one batch (one pass
    through each layer instead of two)."""

    def call(self, x):
        return ops.concatenate([x, ops.flip(x, axis=2)], axis=0)

    def compute_output_shape(self, input_shape):
        return (None, *input_shape[1:])


@keras.saving.register_keras_serializable(package=PACKAGE)
class MeanOfViews(layers.Layer):
    """``[2N, ...]`` from a model run on :class:`WithMirror`'s batch -> ``[N, ...]``: the mean of
    the two views. With ``mirror_back``, maps ``[2N, H, W, C]`` of the mirrored view are mirrored
    back before the mean, so that both lie on the scan's own pixels."""

    def __init__(self, mirror_back: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        self.mirror_back = bool(mirror_back)

    def call(self, x):
        plain, mirrored = ops.split(x, 2, axis=0)
        if self.mirror_back:
            mirrored = ops.flip(mirrored, axis=2)
        return (plain + mirrored) / 2.0

    def compute_output_shape(self, input_shape):
        return (None, *input_shape[1:])

    def get_config(self) -> dict:
        return {**super().get_config(), "mirror_back": self.mirror_back}


@keras.saving.register_keras_serializable(package=PACKAGE)
class ResizeSquare(layers.Layer):
    """Bilinear resize of a square ``[N, H, H, C]`` to ``[N, size, size, C]`` (half-pixel
    centres, no antialiasing: ``keras.ops.image.resize``'s ``bilinear``).

    Computed as two matrix products with fixed interpolation weights rather than an image
    resize op: tf2onnx turns a resize between static shapes into an ONNX ``Resize`` with float
    scales, and ``floor(5 * float32(1.4))`` is 6, not 7, so an ONNX file of a 5 -> 7 resize is
    wrong (it fails to load). Matrix products export as ``MatMul`` with every shape exact.

    With ``as_uint8`` the result is rounded and clipped back to uint8, the dtype a member model's
    ``image`` input takes; otherwise it stays float32.
    """

    def __init__(self, size: int, as_uint8: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        self.size, self.as_uint8 = int(size), bool(as_uint8)

    def build(self, input_shape) -> None:
        weights = bilinear_weights(int(input_shape[1]), self.size)
        self.weights_ = ops.convert_to_tensor(weights, dtype="float32")

    def call(self, x):
        # [N, C, H, W]: weights @ x @ weights^T resizes both axes (ONNX MatMul broadcasts the
        # constant over N and C; export.convert declares the output's static shape)
        planes = ops.transpose(ops.cast(x, "float32"), (0, 3, 1, 2))
        planes = ops.matmul(ops.matmul(self.weights_, planes), ops.transpose(self.weights_))
        resized = ops.transpose(planes, (0, 2, 3, 1))
        if not self.as_uint8:
            return resized
        return ops.cast(ops.clip(ops.round(resized), 0.0, 255.0), "uint8")

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.size, self.size, input_shape[-1])

    def get_config(self) -> dict:
        return {**super().get_config(), "size": self.size, "as_uint8": self.as_uint8}
