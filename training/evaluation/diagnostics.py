"""Signs that a training run failed or proves little, as warnings with advice.

A run can finish without an error and still be worthless: a model at chance, a loss that never
fell, a calibration temperature pinned at its bound, or a split with a handful of images per
class. :func:`check_run` names each of these, and ``edge-train`` logs them as warnings.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Mapping, Sequence

import numpy as np

from training.evaluation.metrics import TEMPERATURE_RANGE

log = logging.getLogger(__name__)

MIN_PER_CLASS = 5  # fewer images of a class in a validation or test split: its metrics say little
CHANCE_MARGIN = 0.05  # accuracy within this of always answering the commonest class is chance
LOSS_FALL = 0.9  # the best training loss should be below this share of the first epoch's
BOUND_TOLERANCE = 0.02  # relative distance to a temperature bound that counts as "at" it


class Evaluation(enum.Enum):
    """What a trained model's test split is: it decides the advice for a thin split."""

    HOLDOUT = "holdout"  # the final model's held-out share of the data
    CROSS_VALIDATION = "cross-validation"  # one fold of --folds (RUN/cv/fold<k>)
    SCANNER_HELD_OUT = "scanner-held-out"  # one scanner of --leave-scanner-out (RUN/scanners/*)


_THIN_ADVICE = {
    Evaluation.HOLDOUT: "Add data; cross-validation (one --backbone with --folds K) tests every "
    "image once, and its cv_metrics.json sums up all the folds.",
    Evaluation.CROSS_VALIDATION: "Add data; this is one fold of a cross-validation: read its "
    "cv_metrics.json, which sums up all the folds (every image tested once), rather than one "
    "fold's metrics.",
    Evaluation.SCANNER_HELD_OUT: "Add data; this is one fold of the scanner-held-out protocol, "
    "tested on every scan of the scanner left out: protocol.md sets the scanners side by side.",
}


def check_run(
    rows: Sequence[Mapping[str, object]],
    metrics: Mapping[str, object],
    labels: np.ndarray,
    splits: np.ndarray,
    class_names: Sequence[str],
    *,
    evaluation: Evaluation = Evaluation.HOLDOUT,
) -> list[str]:
    """Warnings (with advice) about one trained model; empty when nothing looks wrong.

    Args:
        rows: the per-epoch rows of :func:`training.fit.fit` (``loss``, ``val_loss``, ...).
        metrics: the test metrics (:func:`training.evaluation.metrics.evaluate`) with
        ``temperature``. labels: class index of every image, shape [N].
        splits: ``"train"``, ``"val"``, ``"test"`` or ``"excluded"`` per image, shape [N].
        class_names: the classes in index order.
        evaluation: what the test split is (the final model's, or one fold's): a thin split's
            advice depends on it.

    Returns:
        One message per problem found.
    """
    return [
        *_thin_splits(labels, splits, class_names, evaluation),
        *_at_chance(metrics, labels[splits == "test"]),
        *_flat_loss(rows),
        *_temperature_at_bound(metrics.get("temperature")),
    ]


def log_warnings(warnings: Sequence[str], where: str) -> None:
    """Log each warning, naming the run folder it is about."""
    for message in warnings:
        log.warning("%s: %s", where, message)


def _thin_splits(
    labels: np.ndarray, splits: np.ndarray, class_names: Sequence[str], evaluation: Evaluation
) -> list[str]:
    out = []
    for split in ("val", "test"):
        counts = np.bincount(labels[splits == split], minlength=len(class_names))
        named = zip(class_names, counts, strict=True)
        thin = [f"{n} {name}" for name, n in named if n < MIN_PER_CLASS]
        if thin:
            out.append(
                f"the {split} split has only {', '.join(thin)} image(s) (of {int(counts.sum())}): "
                f"fewer than {MIN_PER_CLASS} per class, so its accuracy moves by "
                f"{1 / max(1, counts.sum()):.0%} per image and says little. "
                + _THIN_ADVICE[evaluation]
            )
    return out


def _at_chance(metrics: Mapping[str, object], y_test: np.ndarray) -> list[str]:
    accuracy = metrics.get("accuracy")
    if accuracy is None or len(y_test) == 0:
        return []
    matrix = np.asarray(metrics.get("confusion_matrix") or [[0]])
    predicted = int(np.count_nonzero(matrix.sum(axis=0)))
    majority = float(np.bincount(y_test).max() / len(y_test))
    if accuracy > majority + CHANCE_MARGIN and predicted > 1:
        return []
    how = "one class for every test image" if predicted <= 1 else f"{predicted} classes"
    where = "below" if accuracy < majority - CHANCE_MARGIN else "at"
    return [
        f"test accuracy {accuracy:.3f} is {where} chance (always answering the commonest class "
        f"scores {majority:.3f}; the model predicted {how}): it has not learned. Check that the "
        "labels match the images, then train longer (--epochs), at another --learning-rate, "
        "or with more images per class."
    ]


def _flat_loss(rows: Sequence[Mapping[str, object]]) -> list[str]:
    losses = [float(r["loss"]) for r in rows if isinstance(r.get("loss"), (int, float))]
    if len(losses) < 2:
        return []
    out = []
    if min(losses[1:]) > LOSS_FALL * losses[0]:
        out.append(
            f"the training loss fell less than {1 - LOSS_FALL:.0%} (first epoch "
            f"{losses[0]:.3f} -> best later {min(losses[1:]):.3f}): try another "
            "--learning-rate or more --epochs."
        )
    val = [float(r["val_loss"]) for r in rows if isinstance(r.get("val_loss"), (int, float))]
    if len(val) > 2 and int(np.argmin(val)) == 0:
        out.append(
            f"the validation loss was lowest after the first epoch ({val[0]:.3f}; {len(val)} "
            "epochs run), so the weights kept are those of epoch 1: the model stopped before "
            "it learned. Try a lower --learning-rate or more training images."
        )
    return out


def _temperature_at_bound(temperature: object) -> list[str]:
    if not isinstance(temperature, (int, float)):
        return []
    low, high = TEMPERATURE_RANGE
    if temperature >= high * (1 - BOUND_TOLERANCE):
        return [
            f"the calibration temperature is at its upper bound ({temperature:.3f}): the "
            "validation predictions carry almost no information about the labels, so "
            "calibration flattened them. The model has not learned (see the warnings above)."
        ]
    if temperature <= low * (1 + BOUND_TOLERANCE):
        return [
            f"the calibration temperature is at its lower bound ({temperature:.3f}): the "
            "validation split is too small or too easy to calibrate on; confidences are "
            "not to be trusted."
        ]
    return []
