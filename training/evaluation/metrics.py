"""Test-set metrics: calibration (temperature), classification scores, bootstrap and fold summaries.

Everything returned is plain Python (``dict``, ``list``, ``float``, ``int``, ``None``) so that it
can be written with ``json.dumps`` as is; an undefined value (a class absent from the test set,
an AUC with one class only) is ``None``, never ``NaN``. Imports no TensorFlow.

Point metrics come from scikit-learn (``confusion_matrix``, ``f1_score``, ``roc_auc_score``,
``log_loss``, ``calibration_curve``) and fold intervals from ``scipy.stats.t``. The bootstrap
is vectorised: every resample is a row of sample multiplicities, so one sort of the scores and
one matrix product serve all of them (``_weighted_auc`` is ``roc_auc_score`` with those
multiplicities as ``sample_weight``, for all rows at once).

Example:
    >>> t = fit_temperature(val_probs, val_labels)
    >>> names = ["normal", "benign", "malignant"]
    >>> metrics = evaluate(y_test, apply_temperature(test_probs, t), names)
    >>> metrics["macro_f1"], metrics["ci95"]["macro_f1"]
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from scipy import stats
from sklearn.calibration import calibration_curve
from sklearn.metrics import confusion_matrix, f1_score, log_loss, roc_auc_score

from edge_runtime.postprocess.calibration import TEMPERATURE_RANGE
from edge_runtime.postprocess.calibration import apply_temperature as runtime_temperature
from edge_runtime.postprocess.calibration import fit_temperature as runtime_fit_temperature

__all__ = [
    "apply_temperature",
    "binary_auc",
    "evaluate",
    "evaluate_subsets",
    "expected_calibration_error",
    "fit_temperature",
    "reliability_curve",
    "summarize_folds",
]

ECE_BINS = 15
N_BOOT = 1000
MALIGNANT = "malignant"


# --------------------------------------------------------------------------- input checks


def _check(y_true: np.ndarray, probs: np.ndarray, func: str) -> tuple[np.ndarray, np.ndarray]:
    probs = np.asarray(probs, dtype=np.float64)
    y = np.asarray(y_true)
    if probs.ndim != 2:
        raise ValueError(
            f"The 'probs' parameter of {func} must be a 2-D array [N, classes]. "
            f"Got shape {probs.shape} instead."
        )
    y = y.reshape(-1)
    integral = np.issubdtype(y.dtype, np.integer) or np.all(np.equal(np.mod(y, 1), 0))
    if y.size and not integral:
        raise ValueError(
            f"The 'y_true' parameter of {func} must hold integer class indices. "
            f"Got dtype {y.dtype} instead."
        )
    y = y.astype(np.int64)
    if len(y) != len(probs):
        raise ValueError(
            f"The 'y_true' and 'probs' parameters of {func} must have the same length. "
            f"Got {len(y)} labels and {len(probs)} rows instead."
        )
    k = probs.shape[1]
    if y.size and (y.min() < 0 or y.max() >= k):
        raise ValueError(
            f"The 'y_true' parameter of {func} must hold indices in [0, {k}). "
            f"Got values in [{y.min()}, {y.max()}] instead; check that class_names matches the "
            "model's outputs."
        )
    return y, probs


def _float(x: float | np.floating | None) -> float | None:
    """A plain float, or None for None / NaN / inf."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _ratio(num: float, den: float) -> float | None:
    return float(num) / float(den) if den > 0 else None


# --------------------------------------------------------------------------- temperature


def apply_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    """Rescale softmax probabilities by a temperature: ``softmax(log(p) / T)``, exactly as the
    runtime does (:func:`edge_runtime.postprocess.calibration.apply_temperature`).

    The arg-max of every row is unchanged; ``T > 1`` softens, ``T < 1`` sharpens.

    Args:
        probs: softmax probabilities, shape [N, K].
        temperature: a positive temperature.

    Returns:
        Calibrated probabilities, shape [N, K], float64, rows summing to 1.

    Raises:
        ValueError: if the temperature is not a positive finite number.
    """
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(
            "The 'temperature' parameter of apply_temperature must be a positive finite number. "
            f"Got {temperature!r} instead."
        )
    probs = np.asarray(probs, dtype=np.float64)
    if probs.size == 0:
        return probs.copy()
    return runtime_temperature(probs / probs.sum(axis=1, keepdims=True), temperature)


def fit_temperature(
    val_probs: np.ndarray,
    val_labels: np.ndarray,
    *,
    bounds: tuple[float, float] = TEMPERATURE_RANGE,
) -> float:
    """Fit the temperature that minimises validation negative log-likelihood
    (:func:`edge_runtime.postprocess.calibration.fit_temperature`, after checking the arguments).

    Args:
        val_probs: validation softmax probabilities, shape [N, K].
        val_labels: validation class indices, shape [N].
        bounds: the range of temperatures searched.

    Returns:
        The temperature, a plain float; 1.0 when the validation set is empty.
    """
    y, probs = _check(val_labels, val_probs, "fit_temperature")
    return runtime_fit_temperature(probs, y, bounds=bounds)


# --------------------------------------------------------------------------- calibration


def reliability_curve(
    probs: np.ndarray, y_true: np.ndarray, *, n_bins: int = ECE_BINS
) -> dict[str, np.ndarray]:
    """Top-1 confidence against accuracy in equal-width confidence bins.

    Args:
        probs: probabilities, shape [N, K].
        y_true: class indices, shape [N].
        n_bins: number of equal-width bins over [0, 1]; bin ``b`` holds ``(b/n, (b+1)/n]``.

    Returns:
        ``edges`` [n_bins + 1], and per bin ``count``, ``confidence`` (mean), ``accuracy`` (NaN
        where the bin is empty).
    """
    y, probs = _check(y_true, probs, "reliability_curve")
    conf = probs.max(axis=1) if len(y) else np.zeros(0)
    correct = (probs.argmax(axis=1) == y) if len(y) else np.zeros(0, bool)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    bins = np.searchsorted(edges[1:-1], conf)  # calibration_curve's own binning
    count = np.bincount(bins, minlength=n_bins).astype(np.float64)
    confidence, accuracy = np.full(n_bins, np.nan), np.full(n_bins, np.nan)
    if len(y):
        used = count > 0
        accuracy[used], confidence[used] = calibration_curve(correct, conf, n_bins=n_bins)
    return {"edges": edges, "count": count, "confidence": confidence, "accuracy": accuracy}


def expected_calibration_error(
    probs: np.ndarray, y_true: np.ndarray, *, n_bins: int = ECE_BINS
) -> float | None:
    """Expected calibration error of the top-1 confidence (count-weighted |accuracy - confidence|).

    Returns:
        The ECE in [0, 1], or None for an empty set.
    """
    curve = reliability_curve(probs, y_true, n_bins=n_bins)
    n = curve["count"].sum()
    if n == 0:
        return None
    used = curve["count"] > 0
    gap = np.abs(curve["accuracy"][used] - curve["confidence"][used])
    return float((curve["count"][used] * gap).sum() / n)


# --------------------------------------------------------------------------- AUC


def _weighted_auc(scores: np.ndarray, positive: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Rank AUC (ties count one half) for each row of sample weights, shape [B, N] -> [B].

    Bootstrap resamples are expressed as multiplicities of the original samples, so one sort of
    the scores serves every resample. NaN where a row has no positive or no negative weight.
    """
    order = np.argsort(scores, kind="mergesort")
    s = scores[order]
    pos = positive[order]
    w = weights[:, order].astype(np.float64)
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
    w_pos = np.add.reduceat(np.where(pos, w, 0.0), starts, axis=1)
    w_neg = np.add.reduceat(np.where(pos, 0.0, w), starts, axis=1)
    below = np.cumsum(w_neg, axis=1) - w_neg
    num = (w_pos * (below + 0.5 * w_neg)).sum(axis=1)
    den = w_pos.sum(axis=1) * w_neg.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def _auc(scores: np.ndarray, positive: np.ndarray) -> float | None:
    """ROC AUC, or None unless both classes are present."""
    if positive.all() or not positive.any():
        return None
    return _float(roc_auc_score(positive, scores))


def _resample_counts(n: int, n_boot: int, seed: int) -> np.ndarray:
    """Multiplicity of each sample in each bootstrap resample, shape [n_boot, n]."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_boot, n))
    flat = (np.arange(n_boot)[:, None] * n + idx).ravel()
    return np.bincount(flat, minlength=n_boot * n).reshape(n_boot, n)


def _interval(values: np.ndarray) -> list[float] | None:
    values = values[np.isfinite(values)]
    if values.size == 0:
        return None
    lo, hi = np.percentile(values, [2.5, 97.5])
    return [float(lo), float(hi)]


def binary_auc(
    y_true_binary: np.ndarray,
    scores: np.ndarray,
    *,
    n_boot: int = N_BOOT,
    seed: int = 0,
) -> dict:
    """ROC AUC of a binary problem with a percentile-bootstrap 95% interval.

    Used for benign-vs-malignant AUC per scanner: pass ``y == malignant`` restricted to the
    benign and malignant images, and the malignant probability as score.

    Args:
        y_true_binary: truthy for the positive class, shape [N].
        scores: higher means more likely positive, shape [N].
        n_boot: bootstrap resamples (0 for no interval).
        seed: seed of the resampling.

    Returns:
        ``{"auc", "ci95", "n", "n_positive"}``; ``auc`` and ``ci95`` are None when only one class
        is present.
    """
    positive = np.asarray(y_true_binary).reshape(-1).astype(bool)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if len(positive) != len(scores):
        raise ValueError(
            "The 'y_true_binary' and 'scores' parameters of binary_auc must have the same length. "
            f"Got {len(positive)} and {len(scores)} instead."
        )
    auc = _auc(scores, positive)
    ci = None
    if auc is not None and n_boot > 0:
        counts = _resample_counts(len(scores), n_boot, seed)
        ci = _interval(_weighted_auc(scores, positive, counts))
    return {"auc": auc, "ci95": ci, "n": len(scores), "n_positive": int(positive.sum())}


# --------------------------------------------------------------------------- evaluate


def _macro_f1(cm: np.ndarray) -> np.ndarray:
    """Macro F1 of confusion matrices [..., K, K] over the classes present in truth, for the
    bootstrap's resampled matrices (the point value is ``f1_score``'s; a test checks they agree).

    A subset without some class (a source without normal scans) is scored on the classes it
    has; its scans called that class still count, as misses of their own class, as with
    ``sklearn.metrics.f1_score(average="macro", labels=<classes present in truth>)``.
    """
    tp = np.diagonal(cm, axis1=-2, axis2=-1).astype(np.float64)
    den = cm.sum(axis=-1) + cm.sum(axis=-2)  # 2tp + fp + fn
    seen = cm.sum(axis=-1) > 0
    f1 = np.where(seen, 2 * tp / np.where(seen, den, 1), 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return f1.sum(axis=-1) / seen.sum(axis=-1)


def _empty_metrics(class_names: Sequence[str]) -> dict:
    k = len(class_names)
    per = {"sensitivity": None, "specificity": None, "precision": None, "f1": None, "support": 0}
    ci = {"accuracy": None, "macro_f1": None}
    if MALIGNANT in class_names:
        ci.update({"malignant_sensitivity": None, "malignant_auc": None})
    out = {
        "n": 0,
        "accuracy": None,
        "macro_f1": None,
        "balanced_accuracy": None,
        "per_class": {name: dict(per) for name in class_names},
        "confusion_matrix": [[0] * k for _ in range(k)],
        "roc_auc": {name: None for name in class_names},
        "ece": None,
        "nll": None,
        "brier": None,
        "ci95": ci,
    }
    if MALIGNANT in class_names:
        out["malignant_auc"] = None
    return out


def evaluate(
    y_true: np.ndarray,
    probs: np.ndarray,
    class_names: Sequence[str],
    *,
    n_boot: int = N_BOOT,
    seed: int = 0,
) -> dict:
    """Classification and calibration metrics of one test set, JSON-ready.

    Args:
        y_true: class indices, shape [N].
        probs: probabilities, shape [N, K], K == len(class_names).
        class_names: names of the classes in index order.
        n_boot: bootstrap resamples for the 95% intervals (0 to skip them).
        seed: seed of the bootstrap.

    Returns:
        ``n``, ``accuracy``, ``macro_f1`` (over the classes present in truth),
        ``balanced_accuracy`` (mean recall over classes present), ``per_class`` ``{name:
        {sensitivity, specificity, precision, f1, support}}``, ``confusion_matrix`` (rows = true),
        ``roc_auc`` ``{name: one-vs-rest AUC or None}``, ``malignant_auc`` (only when a class is
        named "malignant"), ``ece`` (15 bins, top-1), ``nll``, ``brier`` (multi-class, summed over
        classes), and ``ci95`` ``{metric: [lo, hi] or None}`` for accuracy, macro_f1 and, with a
        malignant class, malignant_sensitivity and malignant_auc.

    Raises:
        ValueError: on mismatched shapes or labels outside the classes.
    """
    y, probs = _check(y_true, probs, "evaluate")
    names = [str(c) for c in class_names]
    k = len(names)
    if probs.shape[1] != k:
        raise ValueError(
            f"The 'class_names' parameter of evaluate must name every column of probs. "
            f"Got {k} names for {probs.shape[1]} columns instead."
        )
    n = len(y)
    if n == 0:
        return _empty_metrics(names)
    pred = probs.argmax(axis=1)
    cm = confusion_matrix(y, pred, labels=np.arange(k))
    tp = np.diag(cm)
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    per_class = {}
    for i, name in enumerate(names):
        fn, fp = support[i] - tp[i], predicted[i] - tp[i]
        tn = n - tp[i] - fn - fp
        per_class[name] = {
            "sensitivity": _ratio(tp[i], tp[i] + fn),
            "specificity": _ratio(tn, tn + fp),
            "precision": _ratio(tp[i], tp[i] + fp),
            "f1": _ratio(2 * tp[i], 2 * tp[i] + fp + fn),
            "support": int(support[i]),
        }
    recalls = [
        per_class[c]["sensitivity"] for c in names if per_class[c]["sensitivity"] is not None
    ]
    roc_auc = {name: _auc(probs[:, i], y == i) for i, name in enumerate(names)}
    onehot = np.eye(k)[y]
    present = np.unique(y)
    out = {
        "n": n,
        "accuracy": float((pred == y).mean()),
        "macro_f1": float(f1_score(y, pred, labels=present, average="macro", zero_division=0)),
        "balanced_accuracy": float(np.mean(recalls)),
        "per_class": per_class,
        "confusion_matrix": cm.astype(int).tolist(),
        "roc_auc": roc_auc,
        "ece": expected_calibration_error(probs, y),
        "nll": float(log_loss(y, probs / probs.sum(axis=1, keepdims=True), labels=np.arange(k))),
        "brier": float(((probs - onehot) ** 2).sum(axis=1).mean()),
    }
    m = names.index(MALIGNANT) if MALIGNANT in names else None
    if m is not None:
        out["malignant_auc"] = roc_auc[MALIGNANT]
    out["ci95"] = _bootstrap(y, pred, probs, k, m, n_boot=n_boot, seed=seed)
    return out


def _bootstrap(
    y: np.ndarray,
    pred: np.ndarray,
    probs: np.ndarray,
    k: int,
    m: int | None,
    *,
    n_boot: int,
    seed: int,
) -> dict[str, list[float] | None]:
    keys = ["accuracy", "macro_f1"]
    if m is not None:
        keys += ["malignant_sensitivity", "malignant_auc"]
    if n_boot <= 0:
        return dict.fromkeys(keys)
    n = len(y)
    counts = _resample_counts(n, n_boot, seed)  # [B, N]
    # Per-resample confusion matrices: weight each (true, pred) cell by multiplicity.
    cell = np.zeros((n, k * k))
    cell[np.arange(n), y * k + pred] = 1.0
    cms = (counts @ cell).reshape(n_boot, k, k)
    out: dict[str, list[float] | None] = {
        "accuracy": _interval(np.trace(cms, axis1=1, axis2=2) / n),
        "macro_f1": _interval(_macro_f1(cms)),
    }
    if m is not None:
        support = cms[:, m, :].sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            sens = np.where(support > 0, cms[:, m, m] / np.where(support > 0, support, 1), np.nan)
        out["malignant_sensitivity"] = _interval(sens)
        out["malignant_auc"] = _interval(_weighted_auc(probs[:, m], y == m, counts))
    return out


def evaluate_subsets(
    y_true: np.ndarray,
    probs: np.ndarray,
    class_names: Sequence[str],
    subsets: Mapping[str, np.ndarray],
    *,
    n_boot: int = N_BOOT,
    seed: int = 0,
) -> dict[str, dict]:
    """``evaluate`` on each named boolean mask (e.g. one per source or scanner).

    Empty subsets are left out of the result.

    Args:
        y_true: class indices, shape [N].
        probs: probabilities, shape [N, K].
        class_names: names of the classes in index order.
        subsets: ``{name: boolean mask of shape [N]}``.
        n_boot: bootstrap resamples per subset.
        seed: seed of the bootstrap.

    Returns:
        ``{name: metrics}`` for every non-empty subset, in the order given.
    """
    y, probs = _check(y_true, probs, "evaluate_subsets")
    out = {}
    for name, mask in subsets.items():
        mask = np.asarray(mask)
        if mask.dtype != bool or mask.shape != y.shape:
            raise ValueError(
                f"The subset {name!r} of evaluate_subsets must be a boolean mask of shape "
                f"{y.shape}. Got dtype {mask.dtype} and shape {mask.shape} instead."
            )
        if mask.any():
            out[str(name)] = evaluate(y[mask], probs[mask], class_names, n_boot=n_boot, seed=seed)
    return out


# --------------------------------------------------------------------------- folds


# Fold-summarized metrics that can exceed 1 (the rest are rates, AUCs or errors in [0, 1]).
_UNBOUNDED_ABOVE_ONE = frozenset({"nll", "brier", "temperature"})


def _stats(values: Sequence[float | None], upper: float | None = 1.0) -> dict:
    """Mean, sd and t-interval; the interval is cut to [0, ``upper``], where the metric lives
    (with 3 folds an unclipped interval of an AUC near 1 runs past 1)."""
    v = np.array([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64)
    if v.size == 0:
        return {"mean": None, "std": None, "ci95": None, "n": 0}
    mean = float(v.mean())
    if v.size == 1:
        return {"mean": mean, "std": None, "ci95": None, "n": 1}
    sd = float(v.std(ddof=1))
    half = float(stats.t.ppf(0.975, v.size - 1)) * sd / math.sqrt(v.size)
    high = mean + half if upper is None else min(mean + half, upper)
    return {"mean": mean, "std": sd, "ci95": [max(mean - half, 0.0), high], "n": int(v.size)}


def _is_scalar(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def summarize_folds(fold_metrics: Sequence[Mapping]) -> dict:
    """Mean, standard deviation and t-interval of each metric across cross-validation folds.

    Args:
        fold_metrics: one ``evaluate`` result per fold (extra scalar keys such as
            ``temperature`` are summarised too).

    Returns:
        ``folds``; ``n`` (test images over all folds); ``metrics`` ``{name: {mean, std, ci95, n}}``
        for every top-level scalar, the interval being mean ± t(0.975, k-1)·sd/√k over the k folds
        where it is defined, cut to [0, 1] (to [0, inf) for ``nll``, ``brier`` and
        ``temperature``); ``per_class`` ``{class: {sensitivity, specificity, precision, f1:
        {mean, std, ci95, n}}}``; ``roc_auc`` likewise per class; ``confusion_matrix`` summed.
    """
    folds = list(fold_metrics)
    scalar_keys = [
        key
        for key in dict.fromkeys(k for f in folds for k in f)
        if key != "n" and all(f.get(key) is None or _is_scalar(f.get(key)) for f in folds)
    ]
    summary: dict = {
        "folds": len(folds),
        "n": int(sum(f.get("n", 0) for f in folds)),
        "metrics": {
            key: _stats([f.get(key) for f in folds], None if key in _UNBOUNDED_ABOVE_ONE else 1.0)
            for key in scalar_keys
        },
    }
    classes = list(dict.fromkeys(c for f in folds for c in f.get("per_class", {})))
    summary["per_class"] = {
        c: {
            field: _stats([f.get("per_class", {}).get(c, {}).get(field) for f in folds])
            for field in ("sensitivity", "specificity", "precision", "f1")
        }
        for c in classes
    }
    summary["roc_auc"] = {c: _stats([f.get("roc_auc", {}).get(c) for f in folds]) for c in classes}
    matrices = [np.asarray(f["confusion_matrix"]) for f in folds if "confusion_matrix" in f]
    summary["confusion_matrix"] = (
        np.sum(matrices, axis=0).astype(int).tolist() if matrices else None
    )
    return summary
