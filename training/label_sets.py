"""Per-source label sets: each source's loss covers only the classes that source labels.

BUSI labels normal, benign and malignant scans; BUS-BRA holds lesions only. With a plain
softmax loss every BUS-BRA scan also teaches "not normal", and the cheapest way to learn that is
to recognize BUS-BRA's look (scanner, frame, crop), not the lesion. Renormalizing the softmax over
the source's own classes takes that lesson away: the normal-vs-lesion decision is then learned
only where both occur, inside one source. Sources that label every class get the plain loss.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
import numpy as np

_EPSILON = 1e-7


def source_label_sets(
    sources: Sequence[str], labels: np.ndarray, num_classes: int
) -> dict[str, np.ndarray]:
    """For each source, a boolean mask of the classes that occur among its (training) labels."""
    sets = {}
    for source in sorted(set(sources)):
        present = np.asarray(labels)[np.asarray(sources) == source]
        sets[source] = np.bincount(present, minlength=num_classes) > 0
    return sets


def allowed_classes(
    sources: Sequence[str], label_sets: dict[str, np.ndarray], num_classes: int
) -> np.ndarray:
    """``[N, C]`` float mask: the label set of each scan's source (all classes if unknown)."""
    every = np.ones(num_classes, bool)
    masks = [label_sets.get(source, every) for source in sources]
    return np.array(masks, np.float32).reshape(len(sources), num_classes)


def targets(labels: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """``[N, 2C]`` training targets: the one-hot label, then the allowed-class mask."""
    num_classes = allowed.shape[1]
    return np.concatenate([np.eye(num_classes, dtype=np.float32)[labels], allowed], axis=1)


class LabelSetCrossEntropy(keras.losses.Loss):
    """Cross-entropy of the softmax renormalized over each scan's allowed classes.

    ``y_true`` is ``targets(...)``; ``y_pred`` the probabilities. Label smoothing spreads its
    mass over the allowed classes only. With every class allowed this is exactly Keras'
    ``CategoricalCrossentropy(label_smoothing=...)``.
    """

    def __init__(self, label_smoothing: float = 0.0, name: str = "label_set_crossentropy"):
        super().__init__(name=name)
        self.label_smoothing = label_smoothing

    def call(self, y_true, y_pred):
        num_classes = y_pred.shape[-1]
        one_hot, allowed = y_true[:, :num_classes], y_true[:, num_classes:]
        spread = allowed / keras.ops.sum(allowed, axis=-1, keepdims=True)
        target = (1.0 - self.label_smoothing) * one_hot + self.label_smoothing * spread
        probs = keras.ops.clip(y_pred, _EPSILON, 1.0)
        within = keras.ops.maximum(keras.ops.sum(allowed * probs, axis=-1), _EPSILON)
        return -keras.ops.sum(target * keras.ops.log(probs), axis=-1) + keras.ops.log(within)

    def get_config(self) -> dict:
        return {"name": self.name, "label_smoothing": self.label_smoothing}


def accuracy(y_true, y_pred):
    """Top-1 accuracy over all classes (the allowed-class mask does not change the answer)."""
    labels = keras.ops.argmax(y_true[:, : y_pred.shape[-1]], axis=-1)
    return keras.ops.cast(keras.ops.equal(labels, keras.ops.argmax(y_pred, axis=-1)), "float32")
