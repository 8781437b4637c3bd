"""Refitting a model's last layer on a site's scans: multinomial logistic regression pulled
towards the parent's weights, temperature and operating point.

The loss over pooled features ``x`` (``[N, D]``) with labels ``y`` is the class-balanced mean
cross-entropy of ``softmax(x @ W + b)`` plus ``weight_penalty / 2 * ||W - W0||^2`` and
``bias_penalty / 2 * ||b - b0||^2``: with few scans the weights stay near the parent's
(``W0``, ``b0``) unless the scans pull them away. scikit-learn's ``LogisticRegression`` shrinks
towards zero only, so this is minimized here with scipy's L-BFGS and an exact gradient.

Needs scipy (the ``adapt`` extra).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# Penalty strengths tried, relative to the spread of the features (fit_with_strength): ``c``
# makes one unit of loss gradient move a logit by about ``1 / c``; small ``c`` lets a few scans
# rewrite the layer, large ``c`` keeps the parent's. Grouped CV chooses among them.
STRENGTHS = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0)


@dataclass(frozen=True)
class Head:
    """A last layer: ``logits = features @ kernel + bias``; ``kernel`` ``[D, K]``, ``bias``
    ``[K]``, float32."""

    kernel: np.ndarray
    bias: np.ndarray

    def logits(self, features: np.ndarray) -> np.ndarray:
        """``[N, D]`` features -> ``[N, K]`` logits (float64)."""
        return features.astype(np.float64) @ self.kernel.astype(np.float64) + self.bias


def balanced_weights(labels: np.ndarray, classes: int) -> np.ndarray:
    """Per-sample weights ``n / (K * n_c)`` (scikit-learn's ``class_weight="balanced"``); a
    class absent from ``labels`` is ignored."""
    counts = np.bincount(labels, minlength=classes).astype(np.float64)
    present = int((counts > 0).sum())
    return len(labels) / (present * counts[labels])


def fit_head(
    features: np.ndarray,
    labels: np.ndarray,
    parent: Head,
    *,
    weight_penalty: float,
    bias_penalty: float,
    sample_weight: np.ndarray | None = None,
    start: Head | None = None,
    free_columns: Sequence[int] | None = None,
    max_iter: int = 500,
) -> Head:
    """Minimize the weighted cross-entropy plus the pull towards ``parent`` (module docstring).

    Args:
        features: ``[N, D]`` pooled features.
        labels: ``[N]`` class indices in ``0..K-1``.
        parent: the starting point and the centre of the penalty.
        weight_penalty: ``lambda_W >= 0`` (0 with separable data has no minimum: L-BFGS stops
            at ``max_iter``).
        bias_penalty: ``lambda_b >= 0``.
        sample_weight: ``[N]`` weights (default: :func:`balanced_weights`).
        start: where L-BFGS starts (default: ``parent``); a nearby solution saves iterations.
        free_columns: the classes whose weights and bias the fit may change (default: all);
            the others keep ``parent``'s.
        max_iter: L-BFGS iterations at most.

    Returns:
        The fitted head (float32).

    Raises:
        ValueError: shapes disagree, a label is outside ``0..K-1``, or a penalty is negative.
    """
    from scipy.optimize import minimize

    x = np.asarray(features, dtype=np.float64)
    w0, b0 = parent.kernel.astype(np.float64), parent.bias.astype(np.float64)
    d, k = w0.shape
    if x.ndim != 2 or x.shape[1] != d or b0.shape != (k,) or len(labels) != len(x) or not len(x):
        raise ValueError(
            f"fit_head needs features [N, {d}] and N labels for a head [{d}, {k}]. Got features "
            f"{x.shape}, {len(labels)} labels and bias {b0.shape} instead."
        )
    if labels.min() < 0 or labels.max() >= k:
        raise ValueError(f"labels must be in 0..{k - 1}. Got {labels.min()}..{labels.max()}.")
    if weight_penalty < 0 or bias_penalty < 0:
        raise ValueError(
            f"penalties must be >= 0. Got {weight_penalty} and {bias_penalty} instead."
        )
    weights = balanced_weights(labels, k) if sample_weight is None else sample_weight
    weights = np.asarray(weights, dtype=np.float64) / np.sum(weights)
    onehot = np.eye(k)[labels]
    free = np.arange(k) if free_columns is None else np.asarray(sorted(set(free_columns)))
    if free.size == 0 or free.min() < 0 or free.max() >= k:
        raise ValueError(f"free_columns must name classes in 0..{k - 1}. Got {free_columns}.")
    f = free.size
    begin = parent if start is None else start

    def unpack(theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        w, b = w0.copy(), b0.copy()  # the columns not free keep the parent's
        w[:, free], b[free] = theta[: d * f].reshape(d, f), theta[d * f :]
        return w, b

    def loss_and_grad(theta: np.ndarray) -> tuple[float, np.ndarray]:
        w, b = unpack(theta)
        z = x @ w + b
        z -= z.max(axis=1, keepdims=True)
        log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        dw, db = (w - w0)[:, free], (b - b0)[free]
        loss = -np.sum(weights * np.sum(onehot * log_p, axis=1))
        loss += 0.5 * weight_penalty * np.sum(dw * dw) + 0.5 * bias_penalty * np.sum(db * db)
        residual = (weights[:, None] * (np.exp(log_p) - onehot))[:, free]  # d loss / d z
        grad_w = x.T @ residual + weight_penalty * dw
        grad_b = residual.sum(axis=0) + bias_penalty * db
        return float(loss), np.concatenate([grad_w.ravel(), grad_b])

    theta0 = np.concatenate(
        [begin.kernel.astype(np.float64)[:, free].ravel(), begin.bias.astype(np.float64)[free]]
    )
    found = minimize(
        loss_and_grad,
        theta0,
        jac=True,
        method="L-BFGS-B",
        options={"maxiter": max_iter, "gtol": 1e-6, "ftol": 1e-10},
    )
    w, b = unpack(found.x)
    return Head(w.astype(np.float32), b.astype(np.float32))


def fit_with_strength(
    features: np.ndarray,
    labels: np.ndarray,
    parent: Head,
    strength: float,
    *,
    start: Head | None = None,
    free_columns: Sequence[int] | None = None,
) -> Head:
    """:func:`fit_head` with ``lambda_W = strength * mean ||x - mean(x)||^2`` and
    ``lambda_b = strength``, so that ``strength`` means the same whatever the scale of the
    features. The spread about the mean, not the norm: pooled features share a large common
    part (letterbox padding, tissue) that says nothing about the class."""
    centred = features - np.mean(features, axis=0, dtype=np.float64)
    scale = float(np.mean(np.sum(np.square(centred), axis=1)))
    return fit_head(
        features,
        labels,
        parent,
        weight_penalty=strength * max(scale, 1e-12),
        bias_penalty=strength,
        start=start,
        free_columns=free_columns,
    )


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise ``softmax(logits / temperature)`` of ``[N, K]``."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def weighted_log_loss(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Class-balanced mean negative log-likelihood of the true class."""
    p = softmax(logits, temperature)[np.arange(len(labels)), labels]
    w = balanced_weights(labels, logits.shape[1])
    return float(np.sum(w * -np.log(np.clip(p, 1e-12, None))) / np.sum(w))


_KEEP_MARGIN = 1e-3  # in logits / temperature: just inside the threshold, not on it


@dataclass(frozen=True)
class MalignantGuard:
    """What :func:`keep_malignant_calls` needs of a model: its normal and malignant classes and
    the operating point the adapted model runs at."""

    normal: int
    malignant: int
    threshold: float
    temperature: float

    def apply(self, head: Head, features: np.ndarray) -> Head:
        return keep_malignant_calls(
            head,
            features,
            normal=self.normal,
            malignant=self.malignant,
            threshold=self.threshold,
            temperature=self.temperature,
        )


def keep_malignant_calls(
    head: Head,
    features: np.ndarray,
    *,
    normal: int,
    malignant: int,
    threshold: float,
    temperature: float,
) -> Head:
    """``head`` with its normal bias lowered, where needed, so that every row of ``features``
    (``[M, D]``: the malignant scans the parent calls malignant) is still called malignant.

    Refitting the normal column changes no other logit, so it can only lose a cancer by raising
    P(normal) until P(malignant) falls below ``threshold`` (with 0: until normal wins top-1). The
    largest normal logit that keeps a row malignant has a closed form; the bias is set just
    below the smallest of them over the rows (and never raised). Rows already lost by the
    parent are not constrained.
    """
    if not len(features):
        return head
    z = head.logits(features) / temperature
    others = np.delete(np.arange(z.shape[1]), normal)
    if threshold > 0:
        # P(malignant) >= t  <=>  exp(z_n) <= exp(z_m) (1 - t) / t - sum_{other lesion} exp(z_c)
        rest = [c for c in others if c != malignant]
        room = np.exp(z[:, malignant]) * (1.0 - threshold) / threshold
        room -= np.exp(z[:, rest]).sum(axis=1)
        with np.errstate(divide="ignore"):
            ceiling = np.where(room > 0, np.log(np.maximum(room, 1e-300)), -np.inf)
    else:
        ceiling = z[:, malignant]  # top-1: the normal logit stays below the malignant one
    reachable = np.isfinite(ceiling)  # else not even P(normal) = 0 makes it malignant
    if not reachable.any():
        return head
    excess = float(np.max(z[reachable, normal] - (ceiling[reachable] - _KEEP_MARGIN)))
    if excess <= 0:
        return head
    bias = head.bias.astype(np.float64).copy()
    bias[normal] -= excess * temperature
    return Head(head.kernel, bias.astype(np.float32))
