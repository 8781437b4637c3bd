"""The classifier: uint8 grayscale in, ``probabilities`` and ``cam`` out (the model contract)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import keras
from keras import layers

from edge_runtime.contract import CAM, INPUT_NAME, PROBABILITIES
from training.backbones import Backbone, build_backbone, pixel_scaling
from training.layers import ClassActivationHead, PixelScale


def build_classifier(
    num_classes: int,
    *,
    backbone: Backbone = Backbone.EFFICIENTNET_LITE0,
    input_size: int = 224,
    weights: str | Path | None = "imagenet",
    dropout: float = 0.3,
) -> keras.Model:
    """Build the two-output classifier of the contract.

    Input ``image``: uint8 ``[N, S, S, 1]``; scaling to the backbone's range is inside the graph.
    Outputs ``probabilities`` ``[N, K]`` and ``cam`` ``[N, h, w, K]``.
    """
    image = keras.Input((input_size, input_size, 1), dtype="uint8", name=INPUT_NAME)
    mean, std, channels = pixel_scaling(backbone)
    scaled = PixelScale(mean, std, channels, name="pixel_scale")(image)
    features = build_backbone(backbone, input_size, weights)(scaled)
    logits, cam = ClassActivationHead(num_classes, dropout, name="head")(features)
    probabilities = layers.Activation("softmax", name=PROBABILITIES, dtype="float32")(logits)
    cam = layers.Identity(name=CAM, dtype="float32")(cam)
    return keras.Model(image, {PROBABILITIES: probabilities, CAM: cam}, name="edge_classifier")


def probabilities_model(model: keras.Model) -> keras.Model:
    """The same layers with only the ``probabilities`` output, for fitting and ``predict``."""
    return keras.Model(model.input, model.get_layer(PROBABILITIES).output, name="edge_classifier_p")


def load_classifier(path: str | Path) -> keras.Model:
    """Load a saved classifier (custom layers are registered on import of this module)."""
    return keras.models.load_model(path, compile=False)


def nested_layers(model: keras.Model) -> Iterator[keras.layers.Layer]:
    """Every layer of ``model``, descending into nested models (the backbone)."""
    for layer in model.layers:
        yield layer
        if isinstance(layer, keras.Model):
            yield from nested_layers(layer)
