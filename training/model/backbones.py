"""Feature extractors the classifier can sit on, each with the pixel scaling it expects.

Keras is imported where a backbone is built, so that the CLI can list the choices (``--help``)
without loading TensorFlow.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import keras


class Backbone(str, Enum):
    """Closed set of supported backbones."""

    SMALL_CNN = "small-cnn"
    EFFICIENTNET_LITE0 = "efficientnet-lite0"
    EFFICIENTNET_LITE1 = "efficientnet-lite1"
    EFFICIENTNET_LITE2 = "efficientnet-lite2"
    MOBILENET_V2 = "mobilenet-v2"
    MOBILENET_V3_SMALL = "mobilenet-v3-small"


# (mean, std, channels): uint8 pixels become (x - mean) / std, replicated to `channels`.
# EfficientNet-Lite takes one channel: its first ImageNet kernel is summed over RGB (exact for
# gray scans) so there is no channel replication.
def pixel_scaling(backbone: Backbone) -> tuple[float, float, int]:
    """The input normalization ``(mean, std, channels)`` the backbone's weights expect."""
    if lite_variant(backbone) is not None:
        from training.model.efficientnet_lite import LITE_MEAN, LITE_STD

        return float(LITE_MEAN), float(LITE_STD), 1
    if backbone is Backbone.SMALL_CNN:
        return 128.0, 128.0, 1  # an integer mean lets export fold it into the INT8 input
    return 127.5, 127.5, 3  # Keras MobileNets: [-1, 1], RGB


def lite_variant(backbone: Backbone) -> int | None:
    """0, 1 or 2 for EfficientNet-Lite0/1/2; None for the other backbones."""
    prefix = "efficientnet-lite"
    return int(backbone.value[len(prefix) :]) if backbone.value.startswith(prefix) else None


def has_pretrained_weights(backbone: Backbone) -> bool:
    """Whether ``backbone`` can start from trained weights; small-cnn always starts from scratch."""
    return backbone is not Backbone.SMALL_CNN


def output_stride(backbone: Backbone) -> int:
    """Input pixels per cell of the backbone's last feature map (its deepest stride)."""
    return 16 if backbone is Backbone.SMALL_CNN else 32


def check_lesion_input_size(backbone: Backbone, input_size: int) -> None:
    """Refuse an input side the lesion head cannot be built on.

    The lesion decoder (:func:`training.model.segmentation.lesion_decoder`) adds each feature map
    to the next coarser one upsampled 2x, so every map's side must be exactly twice the next: the
    input side must be a multiple of :func:`output_stride`.

    Raises:
        ValueError: ``input_size`` (pixels) is not a multiple of the backbone's deepest stride.
    """
    stride = output_stride(backbone)
    if input_size % stride:
        lower = input_size // stride * stride
        sides = f"{lower} or {lower + stride}" if lower else str(stride)
        raise ValueError(
            f"input side {input_size} cannot carry the lesion head on {backbone.value}: its "
            f"decoder upsamples each feature map 2x onto the next finer one, so the side must be "
            f"a multiple of {stride}, the backbone's deepest stride. Use --image-size {sides}, "
            "or train without the lesion head (--no-seg)."
        )


def build_backbone(backbone: Backbone, input_size: int, weights: str | Path | None) -> keras.Model:
    """A sub-model mapping scaled float images to the last feature map.

    Args:
        backbone: which architecture.
        input_size: side of the square input.
        weights: ``"imagenet"`` (EfficientNet-Lite: from the installed weights package), a path to
            a local weights file, or None for random initialization.

    Raises:
        ValueError: weights asked for that cannot be had here.
    """
    import keras

    channels = pixel_scaling(backbone)[2]
    inputs = keras.Input((input_size, input_size, channels), name="scaled_image")
    if weights is not None and not has_pretrained_weights(backbone):
        raise ValueError(
            f"The '{backbone.value}' backbone has no pretrained weights; pass weights=None."
        )
    if backbone is Backbone.SMALL_CNN:
        features = _small_cnn(inputs)
    elif (variant := lite_variant(backbone)) is not None:
        from training.model.efficientnet_lite import build_efficientnet_lite

        features = build_efficientnet_lite(inputs, variant, weights)
    else:
        features = _keras_application(backbone, inputs, weights)
    return keras.Model(inputs, features, name="backbone")


def _small_cnn(x):
    from keras import layers

    for i, filters in enumerate((16, 32, 64, 96)):
        x = layers.Conv2D(filters, 3, strides=2, padding="same", use_bias=False, name=f"conv{i}")(x)
        x = layers.BatchNormalization(momentum=0.9, name=f"bn{i}")(x)
        x = layers.ReLU(6.0, name=f"relu{i}")(x)
    return x


def _keras_application(backbone: Backbone, inputs, weights: str | Path | None):
    if weights is not None and weights != "imagenet" and not Path(weights).is_file():
        raise ValueError(
            f"The weights file for {backbone.value} was not found: {weights}. Pass an existing "
            "Keras .h5/.weights.h5 file or weights=None."
        )
    import keras

    weights_arg = None if weights is None else str(weights)
    try:
        if backbone is Backbone.MOBILENET_V2:
            model = keras.applications.MobileNetV2(
                include_top=False, weights=weights_arg, input_tensor=inputs
            )
        else:
            model = keras.applications.MobileNetV3Small(
                include_top=False,
                weights=weights_arg,
                input_tensor=inputs,
                include_preprocessing=False,
            )
    except Exception as exc:  # Keras reports a failed download in many shapes
        if weights == "imagenet":
            raise ValueError(
                f"Could not fetch ImageNet weights for {backbone.value} ({exc}). This machine may "
                "have no internet: download the Keras weights file elsewhere and pass its path."
            ) from exc
        raise
    if weights is None:
        _follow_batch_statistics(model)
    return model.output


# Keras builds its applications' batch norms with momentum 0.999, which suits ImageNet's
# millions of steps: over the few hundred of a training here the running statistics would stay
# near their initial values, and a network trained from scratch would pool nearly the same
# features from every scan. 0.9 is what the small CNN uses.
_FROM_SCRATCH_BN_MOMENTUM = 0.9


def _follow_batch_statistics(model) -> None:
    """Let the batch norms of an application trained from scratch track the data they see."""
    from keras import layers

    for layer in model.layers:
        if isinstance(layer, layers.BatchNormalization):
            layer.momentum = _FROM_SCRATCH_BN_MOMENTUM
