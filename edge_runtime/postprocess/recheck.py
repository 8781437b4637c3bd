"""FP32 recheck: INT8 answers too close to call are rerun in FP32.

An INT8 model flips its FP32 source's answer only where INT8's lead of the top class over the
second is smaller than twice the largest change rounding made to one probability: if INT8 leads
with class ``a`` by ``m`` and FP32 prefers ``b``, then ``(q_a - p_a) - (q_b - p_b) >= m``.
Export measures that change on validation scans and stores the largest as the INT8 model's
recheck margin (:func:`recheck_margin`); the runtime reruns in FP32 every scan whose INT8 lead
is below it (:func:`needs_recheck`), and export's parity gate scores the same answers
(:func:`with_recheck`).

The runtime's call has two more boundaries (:mod:`edge_runtime.postprocess.decision`): the
malignant operating point on calibrated P(malignant), and the lesion threshold that decides
"no lesion found", so normal. INT8 can cross either while its top-1 lead is wide. Export also
measures the largest change of each on validation scans (:func:`call_margins`), and the runtime
reruns every scan within it of either boundary (:func:`near_a_call`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from edge_runtime.model.contract import ModelSpec
from edge_runtime.postprocess.calibration import apply_temperature
from edge_runtime.postprocess.decision import MALIGNANT


def top1_lead(probabilities: np.ndarray) -> np.ndarray:
    """Top-1 minus top-2 probability of each row of ``[N, K]``."""
    ordered = np.sort(probabilities, axis=1)
    return ordered[:, -1] - ordered[:, -2]


def recheck_margin(fp32_probabilities: np.ndarray, int8_probabilities: np.ndarray) -> float:
    """The largest ``2 * max_k |int8 - fp32|`` over the rows, capped at 1 (recheck everything).

    Raises:
        ValueError: the arrays differ in shape or are empty.
    """
    _same_shape(fp32_probabilities, int8_probabilities)
    change = np.abs(int8_probabilities - fp32_probabilities).max(axis=1)
    return float(min(1.0, 2.0 * change.max()))


def call_margins(
    fp32_probabilities: np.ndarray,
    int8_probabilities: np.ndarray,
    class_names: Sequence[str],
    temperature: float,
    fp32_lesion_peaks: np.ndarray | None = None,
    int8_lesion_peaks: np.ndarray | None = None,
) -> tuple[float, float]:
    """The largest change INT8 made to calibrated P(malignant) and to the lesion map's peak
    (:func:`~edge_runtime.postprocess.lesion.lesion_peak`) over the rows: the margins of
    :func:`near_a_call` (0 where the model has no malignant class or no lesion peaks are given).

    Args:
        fp32_probabilities, int8_probabilities: uncalibrated ``[N, K]``, as the graphs output.
        class_names: the model's classes.
        temperature: the model's calibration temperature.
        fp32_lesion_peaks, int8_lesion_peaks: ``[N]`` or None.

    Raises:
        ValueError: the arrays differ in shape or are empty.
    """
    _same_shape(fp32_probabilities, int8_probabilities)
    malignant = 0.0
    if MALIGNANT in class_names:
        k = list(class_names).index(MALIGNANT)
        fp32 = apply_temperature(fp32_probabilities, temperature)[:, k]
        int8 = apply_temperature(int8_probabilities, temperature)[:, k]
        malignant = float(np.abs(int8 - fp32).max())
    lesion = 0.0
    if fp32_lesion_peaks is not None and int8_lesion_peaks is not None:
        _same_shape(fp32_lesion_peaks, int8_lesion_peaks)
        lesion = float(np.abs(int8_lesion_peaks - fp32_lesion_peaks).max())
    return min(1.0, malignant), min(1.0, lesion)


def needs_recheck(probabilities: np.ndarray, margin: float) -> np.ndarray:
    """Boolean mask of the rows whose top-1 lead is below ``margin``."""
    return top1_lead(probabilities) < margin


def near_a_call(
    spec: ModelSpec,
    probabilities: np.ndarray,
    malignant_threshold: float,
    lesion_peaks: np.ndarray | None = None,
) -> np.ndarray:
    """The rows the runtime reruns in FP32: INT8's top-1 lead is below ``spec.recheck_margin``,
    its calibrated P(malignant) lies within ``spec.recheck_malignant_margin`` of
    ``malignant_threshold`` (the operating point in use; 0: top-1), or its lesion map's peak
    within ``spec.recheck_lesion_margin`` of ``spec.lesion_threshold``.

    Args:
        spec: the INT8 model's contract.
        probabilities: its uncalibrated ``[N, K]``.
        malignant_threshold: the operating point the runtime applies.
        lesion_peaks: ``[N]``, each scan's :func:`~edge_runtime.postprocess.lesion.lesion_peak`,
            or None (no lesion output).

    Returns:
        bool ``[N]``.
    """
    redo = needs_recheck(probabilities, spec.recheck_margin)
    names = list(spec.class_names)
    if spec.recheck_malignant_margin > 0 and malignant_threshold > 0 and MALIGNANT in names:
        p = apply_temperature(probabilities, spec.temperature)[:, names.index(MALIGNANT)]
        redo |= np.abs(p - malignant_threshold) <= spec.recheck_malignant_margin
    if spec.recheck_lesion_margin > 0 and lesion_peaks is not None:
        redo |= np.abs(lesion_peaks - spec.lesion_threshold) <= spec.recheck_lesion_margin
    return redo


def with_recheck(
    int8_probabilities: np.ndarray, fp32_probabilities: np.ndarray, margin: float
) -> tuple[np.ndarray, np.ndarray]:
    """The answers the runtime gives: INT8 rows, with FP32 rows where INT8 leads by less than
    ``margin``. Returns them and the mask of rechecked rows."""
    redo = needs_recheck(int8_probabilities, margin)
    return np.where(redo[:, None], fp32_probabilities, int8_probabilities), redo


def _same_shape(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape != b.shape or len(a) == 0:
        raise ValueError(f"need two non-empty arrays of one shape. Got {a.shape} and {b.shape}.")
