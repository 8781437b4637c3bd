"""The classifier: uint8 grayscale in; ``probabilities``, ``cam``, ``features`` and, with the
segmentation head, ``lesion`` out (the model contract)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import keras
from keras import layers

from edge_runtime.model.contract import CAM, FEATURES, INPUT_NAME, LESION, PROBABILITIES
from training.model.backbones import (
    Backbone,
    build_backbone,
    check_lesion_input_size,
    pixel_scaling,
)
from training.model.layers import ClassActivationHead, PixelScale
from training.model.segmentation import lesion_decoder, pyramid_levels


def build_classifier(
    num_classes: int,
    *,
    backbone: Backbone = Backbone.EFFICIENTNET_LITE0,
    input_size: int = 224,
    weights: str | Path | None = "imagenet",
    dropout: float = 0.3,
    lesion: bool = False,
) -> keras.Model:
    """Build the classifier of the contract.

    Input ``image``: uint8 ``[N, S, S, 1]``; scaling to the backbone's range is inside the graph.
    Outputs ``probabilities`` ``[N, K]``, ``cam`` ``[N, h, w, K]``, ``features`` ``[N, D]`` (the
    pooled feature map the last layer reads) and, with ``lesion``, ``lesion`` ``[N, S/4, S/4, 1]``
    (lesion probability per pixel, from :func:`training.model.segmentation.lesion_decoder` over the
    backbone's stride-8/16/32 feature maps).

    Raises:
        ValueError: ``lesion`` at a side that is not a multiple of the backbone's deepest stride
            (:func:`training.model.backbones.check_lesion_input_size`).
    """
    image = keras.Input((input_size, input_size, 1), dtype="uint8", name=INPUT_NAME)
    mean, std, channels = pixel_scaling(backbone)
    scaled = PixelScale(mean, std, channels, name="pixel_scale")(image)
    extractor = build_backbone(backbone, input_size, weights)
    outputs = {}
    if lesion:
        check_lesion_input_size(backbone, input_size)
        levels = pyramid_levels(extractor, input_size)
        extractor = keras.Model(extractor.input, levels, name="backbone")
        *pyramid, features = extractor(scaled)
        outputs[LESION] = lesion_decoder([*pyramid, features])
    else:
        features = extractor(scaled)
    logits, cam = ClassActivationHead(num_classes, dropout, name="head")(features)
    outputs[PROBABILITIES] = layers.Activation("softmax", name=PROBABILITIES, dtype="float32")(
        logits
    )
    outputs[CAM] = layers.Identity(name=CAM, dtype="float32")(cam)
    outputs[FEATURES] = layers.GlobalAveragePooling2D(name=FEATURES, dtype="float32")(features)
    return keras.Model(image, outputs, name="edge_classifier")


def has_lesion_output(model: keras.Model) -> bool:
    """Whether ``model`` has the segmentation head's ``lesion`` output."""
    return any(layer.name == LESION for layer in model.layers)


def training_model(model: keras.Model) -> keras.Model:
    """The same layers with the outputs that are trained: ``probabilities`` and, where the model
    has one, ``lesion``."""
    names = [PROBABILITIES, *([LESION] if has_lesion_output(model) else [])]
    return keras.Model(
        model.input, {n: model.get_layer(n).output for n in names}, name="edge_classifier_t"
    )


def load_classifier(path: str | Path) -> keras.Model:
    """Load a saved classifier (custom layers are registered on import of this module)."""
    return keras.models.load_model(path, compile=False)


def nested_layers(model: keras.Model) -> Iterator[keras.layers.Layer]:
    """Every layer of ``model``, descending into nested models (the backbone)."""
    for layer in model.layers:
        yield layer
        if isinstance(layer, keras.Model):
            yield from nested_layers(layer)
