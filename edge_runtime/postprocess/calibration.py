"""Temperature scaling, the calibration both training and the runtime apply, and its fit on
labelled scans (``edge-train`` on validation, ``edge-classify adapt`` on a site): defined once
here."""

from __future__ import annotations

import math

import numpy as np

__all__ = ["PROBABILITY_FLOOR", "TEMPERATURE_RANGE", "apply_temperature", "fit_temperature"]

PROBABILITY_FLOOR = 1e-30  # probabilities are clipped here before the log (float32-safe)
TEMPERATURE_RANGE = (0.05, 20.0)


def apply_temperature(probabilities: np.ndarray, temperature: float) -> np.ndarray:
    """``softmax(log(p) / T)`` of each row of softmax probabilities ``[N, K]``, which equals
    ``softmax(logits / T)``: ``T > 1`` softens, ``T < 1`` sharpens, the arg-max is unchanged.

    Returns the input itself when ``T == 1``; otherwise a new array of the input's dtype whose
    rows sum to 1. The temperature is not checked here (see ``training.evaluation.metrics``).
    """
    if temperature == 1.0:
        return probabilities
    logits = np.log(np.clip(probabilities, PROBABILITY_FLOOR, None)) / temperature
    logits -= logits.max(axis=1, keepdims=True)
    exp = np.exp(logits)
    return exp / exp.sum(axis=1, keepdims=True)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def _nll_at(log_p: np.ndarray, y: np.ndarray, temperature: float) -> float:
    return float(-_log_softmax(log_p / temperature)[np.arange(len(y)), y].mean())


def fit_temperature(
    probabilities: np.ndarray,
    labels: np.ndarray,
    *,
    bounds: tuple[float, float] = TEMPERATURE_RANGE,
) -> float:
    """The temperature in ``bounds`` that minimises the mean negative log-likelihood of
    :func:`apply_temperature` ``(probabilities, T)`` ``[N, K]`` for int ``labels`` ``[N]``.

    A log-spaced grid over ``bounds`` finds the basin, golden-section search on ``log T`` refines
    it. Fit it on scans the probabilities' model was not fitted on (validation, or
    out-of-fold). Returns 1.0 for no scans.
    """
    y = np.asarray(labels, dtype=np.int64)
    if len(y) == 0:
        return 1.0
    log_p = np.log(np.clip(np.asarray(probabilities, np.float64), PROBABILITY_FLOOR, 1.0))
    lo, hi = math.log(bounds[0]), math.log(bounds[1])
    grid = np.linspace(lo, hi, 61)
    losses = [_nll_at(log_p, y, math.exp(g)) for g in grid]
    i = int(np.argmin(losses))
    a, b = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    ratio = (math.sqrt(5) - 1) / 2
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = _nll_at(log_p, y, math.exp(c)), _nll_at(log_p, y, math.exp(d))
    while b - a > 1e-5:
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = _nll_at(log_p, y, math.exp(c))
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = _nll_at(log_p, y, math.exp(d))
    return float(math.exp((a + b) / 2))
