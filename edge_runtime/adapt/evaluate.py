"""Evidence for an adaptation: grouped cross-validation on the site's own scans.

Every scan is predicted once by a last layer fitted without its group (scikit-learn's
``StratifiedGroupKFold``); the penalty strength is chosen inside each training part by a second,
inner grouped cross-validation, so the estimate covers the whole procedure. The parent's
predictions of the same scans are the baseline. Intervals are 95% percentile intervals of a
bootstrap over groups (patients), paired between before and after.

Needs scikit-learn (the ``adapt`` extra).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from edge_runtime.adapt.fit import (
    STRENGTHS,
    Head,
    MalignantGuard,
    fit_with_strength,
    weighted_log_loss,
)

MAX_FOLDS = 5
INNER_FOLDS = 3
BOOTSTRAP_ROUNDS = 2000


@dataclass(frozen=True)
class CrossValidation:
    """Out-of-fold logits ``[N, K]`` of the adapted layer, and the strengths the folds chose."""

    logits: np.ndarray
    folds: int
    strengths: tuple[float, ...]


def n_folds(labels: np.ndarray, groups: np.ndarray, classes: int) -> int:
    """Folds for grouped stratified CV: up to 5, at most the groups of the rarest class."""
    per_class = [len(set(groups[labels == c])) for c in range(classes)]
    return max(2, min(MAX_FOLDS, *per_class))


def _splits(labels: np.ndarray, groups: np.ndarray, folds: int, seed: int):
    from sklearn.model_selection import StratifiedGroupKFold

    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    return list(splitter.split(np.zeros(len(labels)), labels, groups))


@dataclass(frozen=True)
class SiteFeatures:
    """The site's labelled scans as the last layer sees them.

    Attributes:
        features: ``[N, D]`` the model's ``features`` output per scan.
        labels: ``[N]`` class indices.
        groups: ``[N]`` patient (or file) groups: a group never spans a fold's two parts.
        kept: ``[N]`` bool, the malignant scans the parent calls malignant, whose call a
            :class:`MalignantGuard` keeps (None: no guard).
    """

    features: np.ndarray
    labels: np.ndarray
    groups: np.ndarray
    kept: np.ndarray | None = None

    def take(self, index: np.ndarray) -> SiteFeatures:
        kept = None if self.kept is None else self.kept[index]
        return SiteFeatures(self.features[index], self.labels[index], self.groups[index], kept)

    def guarded(self, head: Head, guard: MalignantGuard | None) -> Head:
        """``head`` under ``guard`` on this site's kept scans (``head`` itself without one)."""
        if guard is None or self.kept is None:
            return head
        return guard.apply(head, self.features[self.kept])


def choose_strength(
    site: SiteFeatures,
    parent: Head,
    *,
    strengths: Sequence[float] = STRENGTHS,
    seed: int = 0,
    free_columns: Sequence[int] | None = None,
) -> float:
    """The strength with the lowest class-balanced out-of-fold log-loss (grouped CV) of the fit
    of ``free_columns`` (default: the whole layer)."""
    k = parent.bias.shape[0]
    folds = min(INNER_FOLDS, n_folds(site.labels, site.groups, k))
    ordered = sorted(strengths, reverse=True)  # strong to weak: each fit starts from the last
    logits = np.zeros((len(ordered), len(site.labels), k))
    for train, test in _splits(site.labels, site.groups, folds, seed):
        head, part = parent, site.take(train)
        for i, strength in enumerate(ordered):
            head = fit_with_strength(
                part.features,
                part.labels,
                parent,
                strength,
                start=head,
                free_columns=free_columns,
            )
            logits[i, test] = head.logits(site.features[test])
    losses = [weighted_log_loss(row, site.labels) for row in logits]
    return float(ordered[int(np.argmin(losses))])


def cross_validate(
    site: SiteFeatures,
    parent: Head,
    *,
    strengths: Sequence[float] = STRENGTHS,
    seed: int = 0,
    free_columns: Sequence[int] | None = None,
    guard: MalignantGuard | None = None,
) -> CrossValidation:
    """Out-of-fold logits of the adapted layer (strength chosen inside each fold), fitting
    ``free_columns`` only (default: the whole layer), each fold's layer under ``guard`` on its
    own training part, as the final fit is on all the scans."""
    k = parent.bias.shape[0]
    folds = n_folds(site.labels, site.groups, k)
    logits = np.zeros((len(site.labels), k))
    chosen = []
    for train, test in _splits(site.labels, site.groups, folds, seed):
        part = site.take(train)
        strength = choose_strength(
            part, parent, strengths=strengths, seed=seed, free_columns=free_columns
        )
        head = fit_with_strength(
            part.features, part.labels, parent, strength, free_columns=free_columns
        )
        head = part.guarded(head, guard)
        logits[test] = head.logits(site.features[test])
        chosen.append(strength)
    return CrossValidation(logits, folds, tuple(chosen))


def scores(labels: np.ndarray, predicted: np.ndarray, class_names: Sequence[str]) -> dict:
    """``accuracy``, ``balanced_accuracy`` and ``recall_<class>`` (NaN for an absent class)."""
    values = _metric_arrays(labels, predicted, np.ones((1, len(labels))), class_names)
    return {key: float(value[0]) for key, value in values.items()}


def _metric_arrays(
    labels: np.ndarray, predicted: np.ndarray, weights: np.ndarray, class_names: Sequence[str]
) -> dict[str, np.ndarray]:
    """:func:`scores` for each row of ``weights`` ``[B, N]`` (bootstrap multiplicities)."""
    correct = (labels == predicted).astype(np.float64)
    out = {}
    with np.errstate(invalid="ignore", divide="ignore"):
        out["accuracy"] = weights @ correct / weights.sum(axis=1)
        recalls = [
            weights[:, labels == c] @ correct[labels == c] / weights[:, labels == c].sum(axis=1)
            for c in range(len(class_names))
        ]
    stacked = np.stack(recalls)
    present = np.isfinite(stacked)
    out["balanced_accuracy"] = np.where(present, stacked, 0).sum(0) / np.maximum(present.sum(0), 1)
    out.update({f"recall_{name}": r for name, r in zip(class_names, recalls, strict=True)})
    return out


def compare(
    labels: np.ndarray,
    before: np.ndarray,
    after: np.ndarray,
    groups: np.ndarray,
    class_names: Sequence[str],
    *,
    rounds: int = BOOTSTRAP_ROUNDS,
    seed: int = 0,
) -> dict:
    """Point estimates and 95% group-bootstrap intervals of before, after and after - before.

    Returns:
        ``{"before": m, "after": m, "difference": m}``, each ``m`` mapping ``accuracy``,
        ``balanced_accuracy`` and ``recall_<class>`` to ``{"value": v, "ci95": [lo, hi]}``
        (None where a class has no scans).
    """
    _, group_index = np.unique(groups, return_inverse=True)
    n_groups = int(group_index.max()) + 1
    rng = np.random.default_rng(seed)
    drawn = rng.integers(0, n_groups, size=(rounds, n_groups))
    multiplicity = np.stack([np.bincount(row, minlength=n_groups) for row in drawn])
    weights = multiplicity[:, group_index].astype(np.float64)
    point = {
        "before": scores(labels, before, class_names),
        "after": scores(labels, after, class_names),
    }
    point["difference"] = {k: point["after"][k] - point["before"][k] for k in point["after"]}
    boot = {
        "before": _metric_arrays(labels, before, weights, class_names),
        "after": _metric_arrays(labels, after, weights, class_names),
    }
    boot["difference"] = {k: boot["after"][k] - boot["before"][k] for k in boot["after"]}
    out: dict = {}
    for part, values in point.items():
        out[part] = {}
        for key, value in values.items():
            samples = boot[part][key]
            samples = samples[np.isfinite(samples)]
            low, high = np.percentile(samples, [2.5, 97.5]) if len(samples) else (np.nan,) * 2
            out[part][key] = {"value": _clean(value), "ci95": [_clean(low), _clean(high)]}
    return out


def _clean(value: float) -> float | None:
    return None if not np.isfinite(value) else round(float(value), 4)
