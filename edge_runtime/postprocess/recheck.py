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
"no lesion found", so normal. INT8 can cross either while its top-1 lead is wide. Export finds,
on validation scans, how far from each boundary INT8 stood where it crossed it
(:func:`call_margins`), and the runtime reruns every scan that near either boundary
(:func:`near_a_call`). Unlike the top-1 margin this is an estimate, not a bound: the file gate
(:mod:`edge_runtime.model.verify`) measures the calls as made on the held-out scans.
"""

from __future__ import annotations

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
    spec: ModelSpec,
    fp32_lesion_peaks: np.ndarray | None = None,
    int8_lesion_peaks: np.ndarray | None = None,
) -> tuple[float, float]:
    """The margins of :func:`near_a_call` for ``spec``'s operating point and lesion threshold:
    the smallest that rerun every one of these scans on which INT8 lies on the other side of
    that boundary than FP32 (its calibrated P(malignant); its lesion map's peak,
    :func:`~edge_runtime.postprocess.lesion.lesion_peak`). 0 where none crossed, or where the
    model has no such boundary. Smaller than the largest change INT8 makes, which reruns every
    scan near a boundary that INT8 moves anywhere (a fifth to two fifths of validation scans for
    EfficientNet-Lite models whose operating point lies near 0.15).

    Args:
        fp32_probabilities, int8_probabilities: uncalibrated ``[N, K]``, as the graphs output.
        spec: the INT8 model's contract (classes, temperature, operating point, lesion
            threshold).
        fp32_lesion_peaks, int8_lesion_peaks: ``[N]`` or None.

    Raises:
        ValueError: the arrays differ in shape or are empty.
    """
    _same_shape(fp32_probabilities, int8_probabilities)
    names = list(spec.class_names)
    malignant = 0.0
    if MALIGNANT in names and spec.malignant_threshold > 0:
        k = names.index(MALIGNANT)
        fp32 = apply_temperature(fp32_probabilities, spec.temperature)[:, k]
        int8 = apply_temperature(int8_probabilities, spec.temperature)[:, k]
        malignant = _crossing_margin(fp32, int8, spec.malignant_threshold)
    lesion = 0.0
    if fp32_lesion_peaks is not None and int8_lesion_peaks is not None:
        _same_shape(fp32_lesion_peaks, int8_lesion_peaks)
        lesion = _crossing_margin(fp32_lesion_peaks, int8_lesion_peaks, spec.lesion_threshold)
    return malignant, lesion


def _crossing_margin(fp32: np.ndarray, int8: np.ndarray, boundary: float) -> float:
    """The largest ``|int8 - boundary|`` among rows where ``int8`` and ``fp32`` lie on different
    sides of ``boundary`` (``>=`` it or not); 0 where none do. Capped at 1."""
    crossed = (int8 >= boundary) != (fp32 >= boundary)
    if not crossed.any():
        return 0.0
    return float(min(1.0, np.abs(int8[crossed] - boundary).max()))


def needs_recheck(probabilities: np.ndarray, margin: float) -> np.ndarray:
    """Boolean mask of the rows whose top-1 lead is below ``margin``."""
    return top1_lead(probabilities) < margin


def rerun_rule(spec: ModelSpec) -> str:
    """:func:`near_a_call`'s rule for ``spec``'s margins, in words (for reports and the
    dashboard): ``"INT8 top-1 lead < 0.128, P(malignant) within 0.031 of the operating point
    or lesion peak within 0.050 of the lesion threshold"``; a margin of 0 is left out."""
    parts = [f"INT8 top-1 lead < {spec.recheck_margin:.3f}"]
    if spec.recheck_malignant_margin > 0:
        parts.append(
            f"P(malignant) within {spec.recheck_malignant_margin:.3f} of the operating point"
        )
    if spec.recheck_lesion_margin > 0:
        parts.append(f"lesion peak within {spec.recheck_lesion_margin:.3f} of the lesion threshold")
    return ", ".join(parts[:-1]) + (" or " if len(parts) > 1 else "") + parts[-1]


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
