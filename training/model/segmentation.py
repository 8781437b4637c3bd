"""Lesion segmentation trained with the classifier: masks as targets, the decoder, the loss.

The radiologists' lesion masks of BUSI and BUS-BRA are the strongest signal there is for "is there
a lesion here". A light FPN-style decoder over the backbone's stride-8/16/32 feature maps predicts
the lesion probability per pixel at stride :data:`LESION_STRIDE` (a quarter of the input side),
trained jointly with the classifier on Dice + binary cross-entropy. Normal scans and mirrored
lesion-free views are taught an empty mask; a lesion scan without a mask file (a user's plain class
folders) is left out of the mask loss (its weight is 0) and still teaches the class.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import keras
import numpy as np
from keras import layers, ops

from edge_runtime.io.decode import InputError
from edge_runtime.io.preprocess import fit_to_square
from edge_runtime.model.contract import LESION, ResizePolicy
from training.data.datasets import Sample, read_scan
from training.data.masks import load_lesion_mask
from training.model.layers import PACKAGE

log = logging.getLogger(__name__)
LESION_STRIDE = 4  # input pixels per pixel of the lesion output
LESION_THRESHOLD = 0.5
DECODER_FILTERS = 64
PYRAMID_STRIDES = (8, 16, 32)


def load_masks(
    samples: Sequence[Sample], size: int, policy: ResizePolicy
) -> tuple[np.ndarray, np.ndarray]:
    """Each sample's lesion mask fitted to the model's square exactly like its scan.

    Returns:
        ``(masks, known)``: uint8 ``[N, size, size, 1]`` (255 inside the lesion; the edges of a
        resized mask carry intermediate values) and bool ``[N]``, whether the mask is known:
        normal scans have an empty mask, lesion scans one from their mask files; a lesion scan
        without mask files, or one whose masks cannot be read or mark no lesion pixel (a warning
        names the file), is unknown and gets no mask loss.
    """
    masks = np.zeros((len(samples), size, size, 1), np.uint8)
    known = np.zeros(len(samples), bool)
    for index, sample in enumerate(samples):
        if sample.label == "normal":
            known[index] = True
            continue
        if not sample.masks:
            continue
        try:
            shape = read_scan(sample.path).shape
            union = load_lesion_mask(sample.masks, shape).astype(np.uint8) * 255
        except InputError as exc:
            log.warning("%s: mask skipped: %s", exc.path, exc.reason)
            continue
        if not union.any():  # a lesion scan's mask must mark its lesion
            log.warning(
                "%s: mask skipped: it marks no lesion pixel, though the scan is labelled %s "
                "(masks are 0/255 or 0/1, lesion bright)",
                sample.masks[0],
                sample.label,
            )
            continue
        masks[index, :, :, 0] = fit_to_square(union, size, policy)
        known[index] = True
    return masks, known


def pyramid_levels(backbone: keras.Model, input_size: int) -> list[keras.KerasTensor]:
    """The backbone's deepest feature map at each of the strides 8, 16 and 32 it reaches, from
    fine to coarse; its last output is always the coarsest level.

    Raises:
        ValueError: the backbone has no stride-8 feature map.
    """
    by_side: dict[int, keras.KerasTensor] = {}
    for layer in backbone.layers:
        shape = layer.output.shape
        if len(shape) == 4 and shape[1] is not None and shape[1] == shape[2]:
            by_side[int(shape[1])] = layer.output
    last = backbone.output
    coarsest = input_size // int(last.shape[1])
    levels = [by_side[input_size // s] for s in PYRAMID_STRIDES if s < coarsest]
    if not levels or input_size // int(levels[0].shape[1]) != PYRAMID_STRIDES[0]:
        raise ValueError(
            f"The backbone {backbone.name!r} has no stride-8 feature map at input size "
            f"{input_size}; the lesion decoder needs one."
        )
    return [*levels, last]


def lesion_decoder(levels: Sequence[keras.KerasTensor]) -> keras.KerasTensor:
    """FPN-style top-down decoder: lateral 1x1 convolutions, nearest 2x upsampling and sums from
    the coarsest level down to stride 8, two 3x3 convolutions, a 1x1 logit and a bilinear 2x
    upsampling to stride 4; returns the lesion probability ``[N, S/4, S/4, 1]`` (float32)."""
    x = None
    for depth, level in enumerate(reversed(levels)):
        lateral = layers.Conv2D(DECODER_FILTERS, 1, name=f"lesion_lateral{depth}")(level)
        x = lateral if x is None else layers.Add(name=f"lesion_sum{depth}")([lateral, x])
        if depth < len(levels) - 1:
            x = layers.UpSampling2D(2, interpolation="nearest", name=f"lesion_up{depth}")(x)
    for i in range(2):
        x = layers.Conv2D(DECODER_FILTERS, 3, padding="same", name=f"lesion_conv{i}")(x)
        x = layers.ReLU(name=f"lesion_relu{i}")(x)
    logit = layers.Conv2D(1, 1, name="lesion_logit")(x)
    logit = layers.UpSampling2D(2, interpolation="bilinear", name="lesion_upsample")(logit)
    return layers.Activation("sigmoid", name=LESION, dtype="float32")(logit)


def mask_targets(masks, known) -> keras.KerasTensor:
    """Full-size uint8 masks ``[N, S, S, 1]`` and their known flags ``[N]`` -> the lesion
    output's target ``[N, S/4, S/4, 2]``: the mask's mean over each 4 x 4 block, and the weight
    (1 where the mask is known, 0 elsewhere) as a second channel."""
    target = ops.average_pool(
        ops.cast(masks, "float32") / 255.0, LESION_STRIDE, LESION_STRIDE, padding="valid"
    )
    weight = ops.ones_like(target) * ops.reshape(ops.cast(known, "float32"), (-1, 1, 1, 1))
    return ops.concatenate([target, weight], axis=-1)


@keras.saving.register_keras_serializable(package=PACKAGE)
class DiceBCELoss(keras.losses.Loss):
    """Soft Dice (per scan, smoothed by 1 pixel) plus binary cross-entropy, each scan weighted by
    the second channel of ``y_true`` (:func:`mask_targets`); scans of weight 0 add nothing.
    An empty true mask is learned through the Dice term too: it is 1 - 1 / (1 + predicted area).
    """

    def __init__(self, name: str = "dice_bce", **kwargs) -> None:
        super().__init__(name=name, **kwargs)

    def call(self, y_true, y_pred):
        target, weight = y_true[..., :1], y_true[..., 1:]
        pred = ops.clip(y_pred, 1e-6, 1.0 - 1e-6)
        bce = -(target * ops.log(pred) + (1.0 - target) * ops.log(1.0 - pred))
        w = weight[:, 0, 0, 0]
        bce = ops.mean(bce, axis=(1, 2, 3))
        inter = ops.sum(target * pred, axis=(1, 2, 3))
        total = ops.sum(target, axis=(1, 2, 3)) + ops.sum(pred, axis=(1, 2, 3))
        dice = 1.0 - (2.0 * inter + 1.0) / (total + 1.0)
        return (
            (bce + dice) * w * ops.cast(ops.shape(w)[0], "float32") / ops.maximum(ops.sum(w), 1.0)
        )


@keras.saving.register_keras_serializable(package=PACKAGE)
class WeightedCategoricalCrossentropy(keras.losses.Loss):
    """Categorical cross-entropy with label smoothing, each sample weighted by its true class's
    weight (Keras' ``class_weight`` does not apply to a model with several outputs)."""

    def __init__(
        self,
        class_weights: Sequence[float],
        label_smoothing: float = 0.0,
        name: str = "weighted_cce",
        **kwargs,
    ) -> None:
        super().__init__(name=name, **kwargs)
        self.class_weights = [float(w) for w in class_weights]
        self.label_smoothing = float(label_smoothing)

    def call(self, y_true, y_pred):
        k = len(self.class_weights)
        smooth = y_true * (1.0 - self.label_smoothing) + self.label_smoothing / k
        pred = ops.clip(y_pred, 1e-7, 1.0)
        loss = -ops.sum(smooth * ops.log(pred), axis=-1)
        return loss * ops.sum(y_true * ops.convert_to_tensor(self.class_weights), axis=-1)

    def get_config(self) -> dict:
        return {
            **super().get_config(),
            "class_weights": self.class_weights,
            "label_smoothing": self.label_smoothing,
        }
