"""Parity gates: an exported model must agree with the one it came from."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from edge_runtime.model.verify import MAX_RECHECK_FRACTION, MIN_TOP1_AGREEMENT, recheck_failure
from edge_runtime.postprocess.recheck import with_recheck

MAX_PROBABILITY_DIFF = 1e-4
# An FP32 file whose convolution weights are stored in float16 against the same graph with
# float32 weights: rounding a weight to float16 moves it by at most 2**-11 of itself, which moved
# probabilities by at most 3e-3 on v3 (random inputs); 1e-2 leaves room and still refuses a
# broken rewrite, which moves them by far more.
MAX_HALF_WEIGHTS_PROBABILITY_DIFF = 1e-2
MAX_ACCURACY_DROP = 0.01
MIN_LESION_DICE = 0.95  # mean Dice between the reduced-precision and the FP32 lesion outlines
THIN_EVIDENCE_IMAGES = 100  # below this, one changed answer moves agreement by more than 1%


@dataclass(frozen=True)
class ParityReport:
    """How a candidate model's probabilities compare with a reference on the same images."""

    name: str
    n: int
    max_abs_diff: float
    top1_agreement: float
    reference_accuracy: float | None
    candidate_accuracy: float | None
    failures: tuple[str, ...]

    @property
    def passed(self) -> bool:
        return not self.failures

    def summary(self) -> str:
        verdict = "PASS" if self.passed else "FAIL: " + "; ".join(self.failures)
        accuracy = ""
        if self.reference_accuracy is not None:
            accuracy = f", accuracy {self.reference_accuracy:.4f} -> {self.candidate_accuracy:.4f}"
        return (
            f"{self.name}: {self.n} images, max |dp| {self.max_abs_diff:.2e}, top-1 agreement "
            f"{self.top1_agreement:.4f}{accuracy}: {verdict}"
        )


def compare(
    name: str,
    reference: np.ndarray,
    candidate: np.ndarray,
    labels: np.ndarray | None = None,
    *,
    max_abs_diff: float | None = None,
    min_agreement: float = 1.0,
    max_accuracy_drop: float | None = None,
) -> ParityReport:
    """Compare probabilities ``[N, K]`` and apply the gates that are given."""
    if reference.shape != candidate.shape or len(reference) == 0:
        raise ValueError(
            f"{name}: need two non-empty probability arrays of one shape. Got "
            f"{reference.shape} and {candidate.shape}."
        )
    diff = float(np.max(np.abs(reference - candidate)))
    ref_top, cand_top = reference.argmax(1), candidate.argmax(1)
    agreement = float(np.mean(ref_top == cand_top))
    failures = []
    if max_abs_diff is not None and diff > max_abs_diff:
        failures.append(f"max probability difference {diff:.2e} > {max_abs_diff:.0e}")
    if agreement < min_agreement:
        failures.append(f"top-1 agreement {agreement:.4f} < {min_agreement:.4f}")
    ref_acc = cand_acc = None
    if labels is not None:
        ref_acc, cand_acc = float(np.mean(ref_top == labels)), float(np.mean(cand_top == labels))
        if max_accuracy_drop is not None and ref_acc - cand_acc > max_accuracy_drop:
            failures.append(f"accuracy drop {ref_acc - cand_acc:.4f} > {max_accuracy_drop:.2f}")
    return ParityReport(name, len(reference), diff, agreement, ref_acc, cand_acc, tuple(failures))


def fp32_gate(keras_probs: np.ndarray, onnx_probs: np.ndarray, labels=None) -> ParityReport:
    """ONNX FP32 vs Keras: max probability difference <= 1e-4 and identical top-1."""
    return compare(
        "onnx-fp32 vs keras",
        keras_probs,
        onnx_probs,
        labels,
        max_abs_diff=MAX_PROBABILITY_DIFF,
        min_agreement=1.0,
    )


def reduced_precision_gate(
    precision: str,
    fp32_probs: np.ndarray,
    probs: np.ndarray,
    labels=None,
    *,
    min_agreement: float = MIN_TOP1_AGREEMENT,
    max_accuracy_drop: float = MAX_ACCURACY_DROP,
    max_abs_diff: float | None = None,
    name: str | None = None,
) -> ParityReport:
    """INT8 or FP16 vs FP32: by default top-1 agreement >= 99% and accuracy drop <= 1 point
    (and, where given, max probability difference <= ``max_abs_diff``)."""
    return compare(
        name or f"onnx-{precision} vs onnx-fp32",
        fp32_probs,
        probs,
        labels,
        max_abs_diff=max_abs_diff,
        min_agreement=min_agreement,
        max_accuracy_drop=max_accuracy_drop,
    )


def int8_gate(
    fp32_probs: np.ndarray, int8_probs: np.ndarray, labels=None, **thresholds
) -> ParityReport:
    """INT8 vs FP32: top-1 agreement >= 99% and accuracy drop <= 1 point."""
    return reduced_precision_gate("int8", fp32_probs, int8_probs, labels, **thresholds)


def int8_recheck_gate(
    fp32_probs: np.ndarray,
    int8_probs: np.ndarray,
    margin: float,
    labels=None,
    *,
    rerun: np.ndarray | None = None,
    min_agreement: float = MIN_TOP1_AGREEMENT,
    max_accuracy_drop: float = MAX_ACCURACY_DROP,
    max_recheck_fraction: float = MAX_RECHECK_FRACTION,
) -> ParityReport:
    """The INT8 gate on the answers the runtime gives: INT8, rerun in FP32 where its top-1 lead
    is below ``margin`` (:mod:`edge_runtime.postprocess.recheck`), or on the rows of ``rerun``
    (bool ``[N]``: every row the runtime reruns, as
    :func:`~edge_runtime.postprocess.recheck.near_a_call` gives them, the top-1 rule included);
    and at most ``max_recheck_fraction`` of the scans rechecked."""
    if rerun is None:
        answers, redo = with_recheck(int8_probs, fp32_probs, margin)
        why = f"lead < {margin:.3f}"
    else:
        redo = np.asarray(rerun, bool)
        answers = np.where(redo[:, None], fp32_probs, int8_probs)
        why = f"lead < {margin:.3f} or near a call"
    report = compare(
        f"onnx-int8, FP32 recheck of {int(redo.sum())} with {why}, vs onnx-fp32",
        fp32_probs,
        answers,
        labels,
        min_agreement=min_agreement,
        max_accuracy_drop=max_accuracy_drop,
    )
    failure = recheck_failure(float(redo.mean()), max_recheck_fraction)
    if failure:
        report = replace(report, failures=(*report.failures, failure))
    return report


def half_weights_gate(
    fp32_probs: np.ndarray, half_probs: np.ndarray, labels=None, **thresholds
) -> ParityReport:
    """FP32 with float16-stored convolution weights vs the float32 weights: the INT8 gate's
    thresholds, and max probability difference <= :data:`MAX_HALF_WEIGHTS_PROBABILITY_DIFF`."""
    return reduced_precision_gate(
        "fp32",
        fp32_probs,
        half_probs,
        labels,
        max_abs_diff=MAX_HALF_WEIGHTS_PROBABILITY_DIFF,
        name="onnx-fp32 (convolution weights stored as float16) vs onnx-fp32 (float32 weights)",
        **thresholds,
    )


def fp16_gate(
    fp32_probs: np.ndarray, fp16_probs: np.ndarray, labels=None, **thresholds
) -> ParityReport:
    """FP16 vs FP32: the INT8 gate's thresholds."""
    return reduced_precision_gate("fp16", fp32_probs, fp16_probs, labels, **thresholds)


def lesion_gate(
    reference: np.ndarray,
    candidate: np.ndarray,
    threshold: float,
    *,
    min_area: float = 0.0,
    name: str = "onnx-int8 lesion vs onnx-fp32",
    min_dice: float = MIN_LESION_DICE,
) -> ParityReport:
    """The lesion outlines of a candidate against the reference's, scan by scan: each lesion map
    ``[N, h, w, 1]`` thresholded and cut to its largest component at the map's own resolution
    (none when it covers less than ``min_area`` of the map); Dice per scan (1 where both find
    no lesion), mean >= ``min_dice``.

    Reported as a :class:`ParityReport` whose ``top1_agreement`` holds the mean Dice and
    ``max_abs_diff`` the largest change of one pixel's lesion probability.
    """
    from training.evaluation.lesion_metrics import dice, predicted_mask

    if reference.shape != candidate.shape or len(reference) == 0:
        raise ValueError(
            f"{name}: need two non-empty lesion maps of one shape. Got {reference.shape} and "
            f"{candidate.shape}."
        )
    side = reference.shape[1]
    overlaps = []
    for ref, cand in zip(reference[..., 0], candidate[..., 0], strict=True):
        a = predicted_mask(ref, side, threshold, min_area)
        b = predicted_mask(cand, side, threshold, min_area)
        overlaps.append(1.0 if not (a.any() or b.any()) else dice(a, b))
    mean = float(np.mean(overlaps))
    failures = () if mean >= min_dice else (f"mean lesion Dice {mean:.4f} < {min_dice:.2f}",)
    diff = float(np.max(np.abs(reference - candidate)))
    return LesionParityReport(name, len(reference), diff, mean, None, None, failures)


@dataclass(frozen=True)
class LesionParityReport(ParityReport):
    """:func:`lesion_gate`'s report: ``top1_agreement`` holds the mean Dice of the outlines."""

    def summary(self) -> str:
        verdict = "PASS" if self.passed else "FAIL: " + "; ".join(self.failures)
        return (
            f"{self.name}: {self.n} images, max |dp| {self.max_abs_diff:.2e}, mean Dice of the "
            f"outlines {self.top1_agreement:.4f}: {verdict}"
        )


def thin_evidence(report: ParityReport) -> str | None:
    """A warning when ``report`` rests on fewer than :data:`THIN_EVIDENCE_IMAGES` images, else
    None: on a handful of images a PASS proves little."""
    if report.n >= THIN_EVIDENCE_IMAGES:
        return None
    measure = (
        "the mean Dice of the outlines"
        if isinstance(report, LesionParityReport)
        else "top-1 agreement"
    )
    return (
        f"{report.name}: only {report.n} held-out images, so one changed answer moves {measure} "
        f"by up to {1 / report.n:.1%}: the verdict is thin evidence. Gate on more held-out "
        "scans (a larger test split) before trusting this model."
    )
