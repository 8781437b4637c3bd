"""The call rules an exported model carries, chosen on the run's validation split: the malignant
operating point and the unfamiliar-scan threshold (applied by
``edge_runtime.postprocess.decision``)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np
from sklearn.metrics import confusion_matrix

from edge_runtime.postprocess.decision import (
    MIN_SCALE,
    SENSITIVITY_TARGET,
    decide,
    lesion_verdict,
    malignant_operating_point,
    unfamiliar_scores,
    unfamiliar_stats,
)
from training.evaluation.lesion_metrics import predicted_mask
from training.evaluation.metrics import apply_temperature
from training.runfolder import RunInfo

log = logging.getLogger(__name__)
MIN_MALIGNANT_SENSITIVITY = SENSITIVITY_TARGET
MIN_MALIGNANT_VALIDATION_SCANS = 10  # fewer: no operating point, plain top-1
UNFAMILIAR_QUANTILE = 0.99  # the score above which 1% of validation scans fall
# The INT8 model rounds its features output to 8 bits over the range calibration saw (a step of
# the training features' range / 255): a model none of whose features vary by more than 2 such
# steps over its training scans has nothing to measure a scan against but that rounding
UNFAMILIAR_FLOOR_STEPS = 2


def choose_operating_point(
    info: RunInfo, val_probs: np.ndarray, val_labels: np.ndarray
) -> dict | None:
    """The malignant threshold for sensitivity >= 0.90 on the validation scans (their FP32
    probabilities, calibrated with the run's temperature as the runtime does), with the
    specificity it costs there; None without a malignant class or with fewer than
    :data:`MIN_MALIGNANT_VALIDATION_SCANS` malignant validation scans."""
    if "malignant" not in info.class_names:
        return None
    k = info.class_names.index("malignant")
    malignant = val_labels == k
    if malignant.sum() < MIN_MALIGNANT_VALIDATION_SCANS:
        log.warning(
            "only %d malignant validation scans: no malignant operating point (plain top-1)",
            int(malignant.sum()),
        )
        return None
    p = apply_temperature(val_probs, info.temperature)
    point = malignant_operating_point(p[:, k], malignant, MIN_MALIGNANT_SENSITIVITY)
    top1 = p.argmax(axis=1) == k
    point["top1_sensitivity"] = float(np.mean(top1[malignant]))
    point["top1_specificity"] = float(np.mean(~top1[~malignant]))
    point["threshold"] = min(point["threshold"], 0.999999)
    log.info(
        "malignant operating point %.4f on %d validation scans: sensitivity %.3f, specificity "
        "%.3f (top-1: %.3f, %.3f)",
        point["threshold"],
        point["scans"],
        point["sensitivity"],
        point["specificity"],
        point["top1_sensitivity"],
        point["top1_specificity"],
    )
    return point


def choose_unfamiliar(
    features_of: Callable[[np.ndarray], np.ndarray],
    train_images: np.ndarray,
    train_labels: np.ndarray,
    val_images: np.ndarray,
    num_classes: int,
) -> dict:
    """The unfamiliar-scan reference (class means and spread of the training scans' pooled
    features) and its threshold: the 99th percentile of the validation scans' scores, so that
    about 1% of scans like the training data are flagged. Empty (no unfamiliar-scan rule) when
    no feature varies over the training scans by more than :data:`UNFAMILIAR_FLOOR_STEPS` 8-bit
    steps of the features' range: there is nothing to measure a scan against, and its INT8
    model's scores would be rounding alone.

    Raises:
        ValueError: the threshold is not finite (features with NaN or infinity).
    """
    features = features_of(train_images)
    stats = unfamiliar_stats(features, train_labels, num_classes)
    spread = np.asarray(stats["scale"])
    floor = max(UNFAMILIAR_FLOOR_STEPS * float(np.ptp(np.append(features, 0.0))) / 255, MIN_SCALE)
    if np.all(spread <= floor):
        log.warning(
            "the model's pooled features do not vary over the %d training scans (every "
            "feature's spread is at most %.2g, %d 8-bit steps of their range): no unfamiliar-"
            "scan rule. A model whose features never vary has not learned; train it longer",
            len(train_images),
            floor,
            UNFAMILIAR_FLOOR_STEPS,
        )
        return {}
    scores = unfamiliar_scores(features_of(val_images), stats)
    threshold = float(np.quantile(scores, UNFAMILIAR_QUANTILE))
    if not np.isfinite(threshold):
        raise ValueError(
            f"the unfamiliar-scan threshold is {threshold}: the model's features are not finite "
            "on some validation scans, so the model is broken; train it again"
        )
    log.info(
        "unfamiliar-scan threshold %.3f (the %.0fth percentile of %d validation scans' scores, "
        "from %d training scans)",
        threshold,
        100 * UNFAMILIAR_QUANTILE,
        len(scores),
        len(train_images),
    )
    return {
        **stats,
        "threshold": round(threshold, 6),
        "quantile": UNFAMILIAR_QUANTILE,
        "validation_scans": len(scores),
        "training_scans": len(train_images),
    }


def runtime_calls(
    info: RunInfo,
    probabilities: np.ndarray,
    labels: np.ndarray,
    malignant_threshold: float,
    lesion_maps: np.ndarray | None = None,
    sources: Sequence[str] | None = None,
) -> dict:
    """How the runtime calls the held-out scans, as against the top-1 metrics of training.

    The runtime's own rule (:func:`edge_runtime.postprocess.decision.decide`): the run's
    temperature, the
    malignant operating point and, for a lesion model with a normal class, its normal rule
    (``lesion_head``: normal exactly where the lesion head finds no lesion, by the runtime's
    post-processing on the model's square; ``lesion_head_or_classifier``: or where the
    classifier calls normal).

    Args:
        info: the run.
        probabilities: FP32 ``[N, K]`` uncalibrated, on the held-out scans.
        labels: int ``[N]``.
        malignant_threshold: 0 for plain top-1.
        lesion_maps: ``[N, h, w, 1]`` lesion output, or None.
        sources: each scan's dataset (``split.csv``'s ``source``), or None.

    Returns:
        ``scans``, ``accuracy``, ``recall`` per class (None where a class has no scan),
        ``confusion_matrix`` (rows true, columns called) and the ``normal_rule`` applied (with
        its ``normal_gate``); with ``sources``, ``by_source``: each source's ``scans`` and
        ``accuracy``.
    """
    rule = info.runtime_normal_rule
    calibrated = apply_temperature(probabilities, info.temperature)
    found = None
    if lesion_maps is not None:
        found = np.array(
            [
                predicted_mask(
                    m[..., 0], info.input_size, info.lesion_threshold, info.lesion_min_area
                ).any()
                for m in lesion_maps
            ]
        )
    verdict = lesion_verdict(
        rule, found, calibrated, info.class_names, malignant_threshold, info.normal_gate
    )
    called = decide(calibrated, info.class_names, malignant_threshold, verdict)
    matrix = confusion_matrix(labels, called, labels=range(len(info.class_names)))
    by_source = {}
    scan_sources = np.asarray(sources if sources is not None else [])
    for source in sorted(set(scan_sources)):
        scans = scan_sources == source
        by_source[str(source)] = {
            "scans": int(scans.sum()),
            "accuracy": float(np.mean(called[scans] == labels[scans])),
        }
    return {
        "scans": len(labels),
        "accuracy": float(np.mean(called == labels)),
        "recall": {
            name: (float(matrix[i, i] / matrix[i].sum()) if matrix[i].sum() else None)
            for i, name in enumerate(info.class_names)
        },
        "confusion_matrix": matrix.tolist(),
        "normal_rule": rule if verdict is not None else "classifier",
        "normal_gate": info.normal_gate if verdict is not None else 0.0,
        **({"by_source": by_source} if by_source else {}),
    }
