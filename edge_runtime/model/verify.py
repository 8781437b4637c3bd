"""The gate every model file a command writes passes before the command reports success.

``edge-export``, ``python -m export.requantize`` and ``edge-classify adapt`` each reload the file
they wrote and run it as the runtime will (:class:`edge_runtime.classifier.Classifier`: the
contract check at load, the FP32 recheck its metadata names), on the scans it was made from. An
INT8 file passes only if the runtime's answers agree with its FP32 partner's on at least
:data:`MIN_TOP1_AGREEMENT` of the scans, in top-1 and in the calls as made (operating point and
lesion rule applied: a candidate v4 passed the top-1 gate while agreeing on 0.981 of the
calls), its unfamiliar-scan scores lie within a median :data:`MAX_UNFAMILIAR_SCORE_CHANGE` of
the partner's, and at most :data:`MAX_RECHECK_FRACTION` of them were rerun in FP32. All are
measured, never inferred from the recheck margins: a margin that reruns nothing while INT8
disagrees fails (an adapted INT8 model once passed with agreement 0.33).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime.model.contract import INPUT_NAME, PROBABILITIES, Precision
from edge_runtime.model.session import Provider, open_model
from edge_runtime.postprocess.recheck import with_recheck

__all__ = [
    "MAX_RECHECK_FRACTION",
    "MAX_UNFAMILIAR_SCORE_CHANGE",
    "MIN_TOP1_AGREEMENT",
    "FileCheck",
    "int8_agreement",
    "recheck_failure",
    "unfamiliar_score_change",
    "verify_model_file",
]

MIN_TOP1_AGREEMENT = 0.99
# INT8 runs at ~0.4x FP32's time; rechecking at most a third of scans keeps INT8 with its FP32
# recheck at <= ~0.75x FP32's, and fails an INT8 model too unsure to be useful. (It was a fifth
# while only the top-1 lead was rechecked; rerunning the scans near the operating point and the
# lesion threshold as well reran 0.23 of a real site's 30 scans, whose operating point is chosen
# among them.)
MAX_RECHECK_FRACTION = 1 / 3
# the unfamiliar-scan score of INT8 (with its recheck) against its FP32 partner's, median relative
# difference: v4's 373 test scans measure 0.027 (90th percentile 0.13). An INT8 ensemble of two
# small models whose pooled features collapsed measured about 1800: every scan was called
# unfamiliar while its FP32 partner called almost none.
MAX_UNFAMILIAR_SCORE_CHANGE = 0.25


@dataclass(frozen=True)
class FileCheck:
    """What the runtime's answers from a written model file were measured against.

    Attributes:
        path: the file checked.
        precision: its precision.
        frames: scans (frames) it was run on.
        top1_agreement: the runtime's answers (INT8 with its FP32 recheck) against the
            reference's top-1.
        alone_top1_agreement: the file's own answers, without the recheck.
        as_called_agreement: the runtime's calls (operating point and lesion rule applied)
            against its FP32 partner's; None without a partner.
        rechecked_fraction: the share of frames rerun in FP32 (0 without a recheck partner).
        recheck_margin: the margin the file's metadata states (0: no recheck).
        max_abs_probability_diff: the largest change of one probability against the reference.
        failures: why it fails, one reason each; empty: it passes.
    """

    path: Path
    precision: str
    frames: int
    top1_agreement: float
    alone_top1_agreement: float
    as_called_agreement: float | None
    rechecked_fraction: float
    recheck_margin: float
    max_abs_probability_diff: float
    failures: tuple[str, ...]

    @property
    def passed(self) -> bool:
        return not self.failures

    def record(self) -> dict[str, Any]:
        """The numbers for a model card or an adaptation record (rounded)."""
        return {
            "frames": self.frames,
            "int8_alone_top1_agreement": round(self.alone_top1_agreement, 4),
            "top1_agreement_with_recheck": round(self.top1_agreement, 4),
            "as_called_agreement_with_recheck": None
            if self.as_called_agreement is None
            else round(self.as_called_agreement, 4),
            "recheck_margin": round(self.recheck_margin, 6),
            "rechecked_fraction": round(self.rechecked_fraction, 4),
            "max_abs_probability_diff": round(self.max_abs_probability_diff, 6),
            "passed": self.passed,
        }

    def summary(self) -> str:
        verdict = "PASS" if self.passed else "FAIL: " + "; ".join(self.failures)
        called = (
            ""
            if self.as_called_agreement is None
            else f", calls as made {self.as_called_agreement:.4f}"
        )
        return (
            f"{self.path.name} as the runtime runs it, on {self.frames} scans: top-1 agreement "
            f"{self.top1_agreement:.4f} with the FP32 recheck ({self.alone_top1_agreement:.4f} "
            f"alone){called}, {self.rechecked_fraction:.1%} rechecked (top-1 margin "
            f"{self.recheck_margin:.3f}): {verdict}"
        )


def int8_agreement(
    fp32: np.ndarray,
    int8: np.ndarray,
    margin: float,
    *,
    min_agreement: float = MIN_TOP1_AGREEMENT,
    max_recheck_fraction: float = MAX_RECHECK_FRACTION,
) -> tuple[float, float, tuple[str, ...]]:
    """Top-1 agreement of the runtime's answers (``int8`` ``[N, K]`` rerun as ``fp32`` where its
    lead is below ``margin``) with ``fp32``, the share rerun, and the gate's failures.

    Raises:
        ValueError: the arrays differ in shape or are empty.
    """
    if fp32.shape != int8.shape or len(fp32) == 0:
        raise ValueError(
            f"need two non-empty probability arrays of one shape. Got {fp32.shape} and "
            f"{int8.shape} instead."
        )
    answers, redo = with_recheck(int8, fp32, margin)
    agreement = float(np.mean(answers.argmax(1) == fp32.argmax(1)))
    rechecked = float(redo.mean())
    failures = []
    if agreement < min_agreement:
        failures.append(
            f"top-1 agreement with its FP32 partner {agreement:.4f} < {min_agreement:.2f}"
        )
    too_many = recheck_failure(rechecked, max_recheck_fraction)
    return agreement, rechecked, (*failures, *([too_many] if too_many else []))


def recheck_failure(rechecked: float, max_recheck_fraction: float = MAX_RECHECK_FRACTION) -> str:
    """The INT8 gate's failure when a share ``rechecked`` of the scans was rerun in FP32 beyond
    ``max_recheck_fraction``; "" within it."""
    if rechecked <= max_recheck_fraction:
        return ""
    return f"FP32 recheck of {rechecked:.1%} of scans > {max_recheck_fraction:.0%}"


def verify_model_file(
    path: Path,
    squares: np.ndarray,
    *,
    reference: np.ndarray | None = None,
    batch_size: int = 16,
    min_agreement: float = MIN_TOP1_AGREEMENT,
    max_recheck_fraction: float = MAX_RECHECK_FRACTION,
) -> FileCheck:
    """Reload ``path`` as the runtime does and measure its answers on ``squares``.

    An INT8 file with a recheck partner is measured against that partner (the FP32 file its
    metadata names, run by the runtime too, at the INT8 file's operating point), twice: the
    top-1 of the probabilities, and the calls as the runtime makes them (operating point,
    lesion rule: :meth:`~edge_runtime.classifier.Classifier.call_squares`). Any file is also
    measured against ``reference`` where given (the probabilities the command meant it to give,
    e.g. the Keras model's or a fitted layer's), which an FP32 file must match in top-1 on every
    scan.

    Args:
        path: the written model file, beside its recheck partner when it names one.
        squares: uint8 ``[N, S, S]`` or ``[N, S, S, 1]``, the model's input squares.
        reference: optional ``[N, K]`` probabilities (uncalibrated, as the graph outputs them).
        batch_size: scans per run.
        min_agreement: the INT8 gate's agreement, of the top-1 and of the calls.
        max_recheck_fraction: the INT8 gate's share of scans rerun in FP32.

    Returns:
        The :class:`FileCheck`; ``passed`` is False when any gate failed.

    Raises:
        FileNotFoundError / ContractError: the file, or its recheck partner, does not load as
            the runtime loads it (a failure of the file: the caller refuses it).
        ValueError: no squares.
    """
    from edge_runtime.classifier import Classifier

    images = np.asarray(squares)
    images = images[..., None] if images.ndim == 3 else images
    if not len(images):
        raise ValueError(f"{path}: verifying a model file needs scans. Got none.")
    with Classifier.from_path(path, provider=Provider.CPU, threads=1, recheck=True) as runtime:
        calls = _calls(runtime, images, batch_size)
        spec, partner = runtime.spec, runtime.recheck_model_path
        operating_point = runtime.malignant_threshold
    answers = calls.probabilities
    session = open_model(path, provider=Provider.CPU, threads=1).session
    alone = _batched(lambda b: session.run([PROBABILITIES], {INPUT_NAME: b})[0], images, batch_size)
    failures: list[str] = []
    if not np.all(np.isfinite(answers)):
        failures.append("probabilities that are not finite")
    rechecked = float(calls.rechecked.mean())
    as_called = None
    target = reference
    if spec.precision is not Precision.FP32 and partner is not None:
        with Classifier.from_path(
            partner, provider=Provider.CPU, threads=1, malignant_threshold=operating_point
        ) as fp32:
            partner_calls = _calls(fp32, images, batch_size)
        target = partner_calls.probabilities
        top1 = float(np.mean(answers.argmax(1) == target.argmax(1)))
        as_called = float(np.mean(calls.called == partner_calls.called))
        if top1 < min_agreement:
            failures.append(
                f"top-1 agreement with its FP32 partner {top1:.4f} < {min_agreement:.2f}"
            )
        if as_called < min_agreement:
            failures.append(
                f"calls (operating point and lesion rule applied) agree with its FP32 partner's "
                f"on {as_called:.4f} < {min_agreement:.2f}"
            )
        too_many = recheck_failure(rechecked, max_recheck_fraction)
        failures += [too_many] if too_many else []
        change = unfamiliar_score_change(calls.unfamiliar_scores, partner_calls.unfamiliar_scores)
        if change > MAX_UNFAMILIAR_SCORE_CHANGE:
            failures.append(
                f"unfamiliar-scan scores differ from its FP32 partner's by a median "
                f"{change:.1%} > {MAX_UNFAMILIAR_SCORE_CHANGE:.0%} (its pooled features are "
                "not the FP32 model's)"
            )
        redo = calls.rechecked
        if not np.allclose(answers[redo], target[redo], atol=1e-6):
            failures.append("the runtime's FP32 recheck did not give its partner's answers")
    if target is None:
        target = answers
    agreement = float(np.mean(answers.argmax(1) == target.argmax(1)))
    if reference is not None:
        top1 = float(np.mean(answers.argmax(1) == reference.argmax(1)))
        needed = 1.0 if spec.precision is Precision.FP32 else min_agreement
        if top1 < needed:
            failures.append(f"top-1 agreement with the intended model {top1:.4f} < {needed:.2f}")
    return FileCheck(
        path=Path(path),
        precision=spec.precision.value,
        frames=len(images),
        top1_agreement=agreement,
        alone_top1_agreement=float(np.mean(alone.argmax(1) == target.argmax(1))),
        as_called_agreement=as_called,
        rechecked_fraction=rechecked,
        recheck_margin=spec.recheck_margin if partner is not None else 0.0,
        max_abs_probability_diff=float(np.abs(alone - target).max()),
        failures=tuple(failures),
    )


def unfamiliar_score_change(scores: np.ndarray, reference: np.ndarray) -> float:
    """Median relative difference of unfamiliar-scan ``scores`` ``[N]`` from ``reference``
    ``[N]``; 0 for a model without the score (both all zeros)."""
    return float(np.median(np.abs(scores - reference) / np.maximum(np.abs(reference), 1e-6)))


def _calls(runtime, images: np.ndarray, batch_size: int):
    """:meth:`Classifier.call_squares` over ``images`` in batches, joined."""
    from edge_runtime.classifier import SquareCalls

    parts = [
        runtime.call_squares(images[i : i + batch_size]) for i in range(0, len(images), batch_size)
    ]
    return SquareCalls(*(np.concatenate(column) for column in zip(*parts, strict=True)))


def _batched(run, images: np.ndarray, batch_size: int) -> np.ndarray:
    return np.concatenate(
        [run(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
    )
