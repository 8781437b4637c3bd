"""FP32 recheck: INT8 answers too close to call are rerun in FP32.

An INT8 model flips its FP32 source's answer only where INT8's lead of the top class over the
second is smaller than twice the largest change rounding made to one probability: if INT8 leads
with class ``a`` by ``m`` and FP32 prefers ``b``, then ``(q_a - p_a) - (q_b - p_b) >= m``.
Export measures that change on validation scans and stores the largest as the INT8 model's
recheck margin (:func:`recheck_margin`); the runtime reruns in FP32 every scan whose INT8 lead
is below it (:func:`needs_recheck`), and export's parity gate scores the same answers
(:func:`with_recheck`).
"""

from __future__ import annotations

import numpy as np


def top1_lead(probabilities: np.ndarray) -> np.ndarray:
    """Top-1 minus top-2 probability of each row of ``[N, K]``."""
    ordered = np.sort(probabilities, axis=1)
    return ordered[:, -1] - ordered[:, -2]


def recheck_margin(fp32_probabilities: np.ndarray, int8_probabilities: np.ndarray) -> float:
    """The largest ``2 * max_k |int8 - fp32|`` over the rows, capped at 1 (recheck everything).

    Raises:
        ValueError: the arrays differ in shape or are empty.
    """
    if fp32_probabilities.shape != int8_probabilities.shape or len(fp32_probabilities) == 0:
        raise ValueError(
            "need two non-empty probability arrays of one shape. Got "
            f"{fp32_probabilities.shape} and {int8_probabilities.shape}."
        )
    change = np.abs(int8_probabilities - fp32_probabilities).max(axis=1)
    return float(min(1.0, 2.0 * change.max()))


def needs_recheck(probabilities: np.ndarray, margin: float) -> np.ndarray:
    """Boolean mask of the rows whose top-1 lead is below ``margin``."""
    return top1_lead(probabilities) < margin


def with_recheck(
    int8_probabilities: np.ndarray, fp32_probabilities: np.ndarray, margin: float
) -> tuple[np.ndarray, np.ndarray]:
    """The answers the runtime gives: INT8 rows, with FP32 rows where INT8 leads by less than
    ``margin``. Returns them and the mask of rechecked rows."""
    redo = needs_recheck(int8_probabilities, margin)
    return np.where(redo[:, None], fp32_probabilities, int8_probabilities), redo
