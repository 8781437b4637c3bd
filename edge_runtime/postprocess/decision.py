"""From calibrated probabilities to a call: the malignant operating point and the unfamiliar-scan
flag, as the model's metadata states them (``edge-export`` chooses both on validation scans).

Missing a cancer costs more than a second look, so a model may carry a malignant threshold below
the top-1 rule's: a scan is called malignant when P(malignant) >= the threshold, otherwise the
more probable of the other classes. A scan unlike anything the model was trained on is flagged
``unfamiliar`` (and abstains) when the distance of its pooled features to the nearest training
class mean, in units of the training features' spread, is above the threshold chosen on
validation scans.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

MALIGNANT = "malignant"
NORMAL = "normal"
UNFAMILIAR_METHOD = "nearest_class_mean_scaled_distance"
MIN_SCALE = 1e-6  # the smallest spread stored: metadata keeps 6 decimals
# the malignant sensitivity an operating point is chosen for (edge-export on validation scans,
# edge-classify adapt on a site's scans)
SENSITIVITY_TARGET = 0.90


def decide(
    probabilities: np.ndarray,
    class_names: Sequence[str],
    malignant_threshold: float,
    lesion_found: np.ndarray | None = None,
) -> np.ndarray:
    """The called class per row of calibrated ``probabilities`` ``[N, K]``.

    With ``lesion_found`` (bool ``[N]``, the lesion output's verdict; the model's normal rule
    ``lesion_head``): normal exactly where no lesion was found, elsewhere the call among the
    other classes. With ``malignant_threshold`` > 0: malignant where P(malignant) >= it, else
    the most probable other class; with 0: plain top-1.

    Returns:
        int ``[N]`` indices into ``class_names``.
    """
    p = probabilities.copy()
    names = list(class_names)
    normal = names.index(NORMAL) if NORMAL in names else None
    if lesion_found is not None and normal is not None:
        p[:, normal] = np.where(lesion_found, -np.inf, np.inf)
    top = p.argmax(axis=1)
    if malignant_threshold <= 0 or MALIGNANT not in names:
        return top
    k = names.index(MALIGNANT)
    others = p.copy()
    others[:, k] = -np.inf
    malignant = probabilities[:, k] >= malignant_threshold
    if lesion_found is not None and normal is not None:
        malignant &= lesion_found
    return np.where(malignant, k, others.argmax(axis=1))


def lesion_verdict(
    normal_rule: str,
    lesion_found: np.ndarray | None,
    probabilities: np.ndarray,
    class_names: Sequence[str],
    malignant_threshold: float,
    normal_gate: float = 0.0,
) -> np.ndarray | None:
    """Where a model reports a lesion, by its normal rule (``NormalRule``'s values), for
    :func:`decide`'s ``lesion_found``; None for the ``classifier`` rule or without a lesion
    output or a normal class.

    ``lesion_head``: where the lesion output found one. ``lesion_head_or_classifier``: where it
    found one, except where the classifier gates it: its calibrated top-1 is normal, or (with
    ``normal_gate`` > 0) P(normal) is at least ``normal_gate``. The gate never overrides the
    malignant operating point: a scan whose P(malignant) reaches ``malignant_threshold`` (> 0)
    keeps its lesion. Training measures the gate through this function at threshold 0
    (``training.evaluation.lesion_metrics.gated``): export chooses the operating point later.

    Args:
        normal_rule: the model's rule.
        lesion_found: bool ``[N]``, the lesion output's verdict (``lesion.find_lesion``), or None.
        probabilities: calibrated ``[N, K]``.
        class_names: the model's classes.
        malignant_threshold: the model's operating point (0: top-1).
        normal_gate: the model's ``normal_gate`` (0: the classifier's call alone).
    """
    if lesion_found is None or normal_rule == "classifier" or NORMAL not in class_names:
        return None
    if normal_rule == "lesion_head":
        return lesion_found
    if normal_rule != "lesion_head_or_classifier":
        raise ValueError(f"unknown normal rule {normal_rule!r}")
    names = list(class_names)
    normal = names.index(NORMAL)
    gated = probabilities.argmax(axis=1) == normal
    if normal_gate > 0:
        gated |= probabilities[:, normal] >= normal_gate
    if malignant_threshold > 0 and MALIGNANT in names:
        gated &= probabilities[:, names.index(MALIGNANT)] < malignant_threshold
    return lesion_found & ~gated


def unfamiliar_stats(features: np.ndarray, labels: np.ndarray, num_classes: int) -> dict[str, Any]:
    """The reference the unfamiliar score measures against: each class's mean of the training
    scans' pooled ``features`` ``[N, D]`` and the features' spread (the per-dimension standard
    deviation around the class means, floored at 1% of its median and at ``MIN_SCALE``, so
    that a feature that never varies, or a model whose features never vary, divides by no
    zero)."""
    means = np.stack(
        [
            features[labels == k].mean(axis=0) if np.any(labels == k) else features.mean(axis=0)
            for k in range(num_classes)
        ]
    )
    spread = (features - means[labels]).std(axis=0)
    spread = np.maximum(spread, max(0.01 * float(np.median(spread)), MIN_SCALE))
    # rounded in float64: float32 values rounded in float32 print with 17 digits in JSON, twice
    # the metadata to parse at every start, for the same float32 values when read back
    return {
        "method": UNFAMILIAR_METHOD,
        "means": np.round(means.astype(np.float64), 6).tolist(),
        "scale": np.round(spread.astype(np.float64), 6).tolist(),
    }


def unfamiliar_scores(features: np.ndarray, stats: Mapping[str, Any]) -> np.ndarray:
    """Root-mean-square scaled distance of each row of ``features`` ``[N, D]`` to the nearest
    class mean of ``stats`` (:func:`unfamiliar_stats`); about 1 for typical training scans.

    Raises:
        ValueError: ``stats`` is not of this method or does not match the features' width.
    """
    if stats.get("method") != UNFAMILIAR_METHOD:
        raise ValueError(
            f"unfamiliar-scan metadata of method {stats.get('method')!r} is not supported "
            f"(this runtime reads {UNFAMILIAR_METHOD!r})"
        )
    means = np.asarray(stats["means"], np.float32)
    scale = np.asarray(stats["scale"], np.float32)
    if means.shape[1] != features.shape[1] or scale.shape[0] != features.shape[1]:
        raise ValueError(
            f"unfamiliar-scan metadata is for {means.shape[1]} features; the model gives "
            f"{features.shape[1]}"
        )
    scaled = (features[:, None, :] - means[None]) / scale
    return np.sqrt(np.mean(scaled**2, axis=2)).min(axis=1)


def malignant_operating_point(
    p_malignant: np.ndarray, is_malignant: np.ndarray, min_sensitivity: float = SENSITIVITY_TARGET
) -> dict[str, float] | None:
    """The largest threshold on P(malignant) whose sensitivity on these scans is at least
    ``min_sensitivity``, with the sensitivity and specificity it gives there (malignant vs the
    rest); None without malignant scans. The threshold is kept inside (0, 1).
    """
    positives = np.sort(p_malignant[is_malignant])[::-1]
    if positives.size == 0:
        return None
    needed = max(1, int(np.ceil(min_sensitivity * positives.size - 1e-9)))
    threshold = float(np.clip(positives[needed - 1], 1e-6, 1.0 - 1e-6))
    called = p_malignant >= threshold
    negatives = ~is_malignant
    return {
        "threshold": threshold,
        "min_sensitivity": float(min_sensitivity),
        "sensitivity": float(np.mean(called[is_malignant])),
        "specificity": float(np.mean(~called[negatives])) if negatives.any() else float("nan"),
        "scans": len(p_malignant),
        "malignant_scans": int(positives.size),
    }
