"""Temperature scaling, the calibration both training and the runtime apply: defined once here."""

from __future__ import annotations

import numpy as np

__all__ = ["PROBABILITY_FLOOR", "apply_temperature"]

PROBABILITY_FLOOR = 1e-30  # probabilities are clipped here before the log (float32-safe)


def apply_temperature(probabilities: np.ndarray, temperature: float) -> np.ndarray:
    """``softmax(log(p) / T)`` of each row of softmax probabilities ``[N, K]``, which equals
    ``softmax(logits / T)``: ``T > 1`` softens, ``T < 1`` sharpens, the arg-max is unchanged.

    Returns the input itself when ``T == 1``; otherwise a new array of the input's dtype whose
    rows sum to 1. The temperature is not checked here (see ``training.metrics``).
    """
    if temperature == 1.0:
        return probabilities
    logits = np.log(np.clip(probabilities, PROBABILITY_FLOOR, None)) / temperature
    logits -= logits.max(axis=1, keepdims=True)
    exp = np.exp(logits)
    return exp / exp.sum(axis=1, keepdims=True)
