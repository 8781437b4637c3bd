"""One summary per multi-frame file (a cine, a video, a multi-page TIFF): its most severe frame.

A cine gives one result per frame; a reader wants one answer per file as well. The summary names
one frame and takes its label, probabilities and flags, and counts the file's frames and failed
frames. The frame it names carries the most severe call (malignant, then any other lesion class,
then normal) among the frames that did not abstain, and among those the highest P(malignant) (the
highest confidence, for a model without a ``malignant`` class). Abstained frames (blank pages,
frames that are not scans, unfamiliar ones) never decide a lesion finding: a file whose every
classified frame abstained gets the most severe of them, abstained, so the summary abstains too.
Nor does an abstained frame that shows tissue (unfamiliar, or unsure) go unseen: where the
answered frames' call is normal, or milder than its own (benign beside an unsure malignant
frame), it may hold the lesion or the cancer the others do not show, so the most severe such
frame answers, abstained. Frames that are not scans (blank, noise) show no tissue and never
count here; when every frame abstained, the most severe that shows tissue answers (any, if none
does).
:func:`with_summaries` adds a summary after each multi-frame file's results in a stream, which is
how ``edge-classify`` and ``edge-classify watch`` write them.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from edge_runtime.classifier import Classification, Result, Timing

SUSPICIOUS_CLASS = "malignant"
NORMAL_CLASS = "normal"


@dataclass(frozen=True, kw_only=True)
class FileSummary:
    """The answer for one multi-frame file.

    Attributes:
        source: the file.
        frames: its frame records (a decoding that stopped midway is one failed record for the
            frames it could not read).
        failed_frames: how many of those are failures.
        most_suspicious: the frame whose answer is the file's: the most severe call among the
            frames that did not abstain (malignant, then other lesion classes, then normal), the
            highest P(malignant) among those, the earliest on a tie; the most severe abstained
            frame that shows tissue (not :attr:`~Classification.not_a_scan`) where that call is
            normal or milder than its own, or where every classified frame abstained (then any
            abstained frame when none shows tissue). None when no frame could be classified.
        timing: the sum of the frames' timings.
        model_version: the model that answered the frames.
        model_sha256: its hex SHA-256.
    """

    source: str
    frames: int
    failed_frames: int
    most_suspicious: Classification | None
    timing: Timing
    model_version: str | None = None
    model_sha256: str | None = None

    @property
    def ok(self) -> bool:
        """Whether some frame was classified."""
        return self.most_suspicious is not None

    @property
    def error(self) -> str | None:
        """Why the file has no answer, when no frame was classified."""
        if self.most_suspicious is not None:
            return None
        return f"none of its {self.frames} frame records could be classified"


def summarize(results: Sequence[Result]) -> FileSummary:
    """The summary of one file's frame results.

    Args:
        results: the results of one file's frames, as :meth:`Classifier.classify` gives them.

    Raises:
        ValueError: ``results`` is empty or holds more than one file.
    """
    if not results:
        raise ValueError("summarize needs the results of one file. Got no results instead.")
    sources = {result.source for result in results}
    if len(sources) > 1:
        raise ValueError(
            f"summarize needs the results of one file. Got {len(sources)} files instead: "
            f"{sorted(sources)[:3]}. Pass each file's results separately, or use with_summaries."
        )
    classified = [result for result in results if isinstance(result, Classification)]
    return FileSummary(
        source=results[0].source,
        frames=len(results),
        failed_frames=len(results) - len(classified),
        most_suspicious=_answer(classified),
        timing=Timing(
            sum(r.timing.decode_ms for r in results),
            sum(r.timing.preprocess_ms for r in results),
            sum(r.timing.inference_ms for r in results),
            sum(r.timing.postprocess_ms for r in results),
        ),
        model_version=next((r.model_version for r in results if r.model_version), None),
        model_sha256=next((r.model_sha256 for r in results if r.model_sha256), None),
    )


def with_summaries(results: Iterable[Result]) -> Iterator[Result | FileSummary]:
    """Each result, in order, with a :class:`FileSummary` after each multi-frame file's frames.

    A multi-frame file's results are those in a row with its ``source`` and a ``frame`` index
    (the classifier gives a file's frames together, in order: frame 0's regions of a dual view,
    then frame 1's...); single images get no summary. The same file listed again starts a new
    summary: its first record's (frame, region) does not come after the previous record's.
    """
    group: list[Result] = []
    for result in results:
        if group and not _same_file(group[-1], result):
            yield summarize(group)
            group = []
        if result.frame is not None:
            group.append(result)
        yield result
    if group:
        yield summarize(group)


def _same_file(previous: Result, result: Result) -> bool:
    return (
        result.frame is not None
        and result.source == previous.source
        and _position(result) > _position(previous)
    )


def _position(result: Result) -> tuple[int, int]:
    """Where a record lies in its file: (frame, region), a whole frame before its regions."""
    return result.frame, -1 if result.region is None else result.region


def _answer(classified: Sequence[Classification]) -> Classification | None:
    """The frame whose answer is the file's (see :class:`FileSummary`'s ``most_suspicious``)."""
    answered = [result for result in classified if not result.abstained]
    finding = max(answered, key=_suspicion, default=None)
    unsure = [result for result in classified if result.abstained and not result.not_a_scan]
    worst_unsure = max(unsure, key=_suspicion, default=None)
    if finding is None:
        return worst_unsure or max(classified, key=_suspicion, default=None)
    if worst_unsure is not None and (
        finding.label == NORMAL_CLASS or _suspicion(worst_unsure)[0] > _suspicion(finding)[0]
    ):
        return worst_unsure
    return finding


def _suspicion(result: Classification) -> tuple[int, float]:
    """The call's severity (malignant 2, normal 0, any other class 1), then P(malignant), or the
    confidence for a model without that class (max keeps the first)."""
    if result.label == SUSPICIOUS_CLASS:
        severity = 2
    elif result.label == NORMAL_CLASS:
        severity = 0
    else:
        severity = 1
    return severity, result.probabilities.get(SUSPICIOUS_CLASS, result.confidence)
