"""The worker: answers received instances from the spool, off the association threads.

A pipeline of named steps per batch: take (from the spool) -> classify (the runtime's own
:meth:`~edge_runtime.classifier.Classifier.iter_classify`, masks on, cine summaries from
:func:`~edge_runtime.summary.with_summaries`) -> answer (SR and SEG, :mod:`.answers`) -> write
(answer files into ``--output``, staged in the forward queue) -> record (JSON lines,
:mod:`.journal`) -> commit (the spool's ``done`` marker) -> release (the staged answers become
sendable). A crash at any step leaves the instance in ``received/`` without a marker; it is
answered again on restart, to the very same files and UIDs.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_runtime.classifier import Classification, Classifier, Result
from edge_runtime.node.answers import Answers, ModelIdentity, build_answers
from edge_runtime.node.forward import Outbox
from edge_runtime.node.journal import UID_FIELD, Journal
from edge_runtime.node.spool import Received, Spool, write_atomic
from edge_runtime.output import result_record
from edge_runtime.summary import FileSummary, with_summaries

log = logging.getLogger(__name__)

RESULTS_NAME = "results.jsonl"


def model_identity(classifier: Classifier) -> ModelIdentity:
    """The name, version and SHA-256 of the classifier's model file."""
    digest = hashlib.sha256()
    with open(classifier.model_path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return ModelIdentity(
        classifier.model_path.name, str(classifier.spec.model_version), digest.hexdigest()
    )


@dataclass
class WorkerStats:
    """What the worker did, and when each instance was answered (for the benchmark)."""

    answered: int = 0
    failed: int = 0
    answered_at: dict[str, float] = field(default_factory=dict)  # uid -> time.time()


class Worker:
    """Answers the spool's instances in batches (see the module docstring)."""

    def __init__(
        self,
        classifier: Classifier,
        spool: Spool,
        output: Path,
        *,
        outbox: Outbox | None = None,
        batch_files: int = 32,
        on_answered: Callable[[str], None] | None = None,
    ) -> None:
        self.classifier, self.spool, self.output = classifier, spool, Path(output)
        self.output.mkdir(parents=True, exist_ok=True)
        self.outbox, self.batch_files, self._on_answered = outbox, batch_files, on_answered
        self.model = model_identity(classifier)
        self.journal = Journal(self.output / RESULTS_NAME, is_done=spool.is_done)
        self.stats = WorkerStats()
        self._recover()

    def _recover(self) -> None:
        """Finish what a crash interrupted after a commit: staged answers become sendable."""
        if self.outbox is None:
            return
        for name, owner in self.outbox.staged():
            if self.spool.is_done(owner):
                self.outbox.promote([name], owner)

    def run(self, stop: threading.Event) -> None:
        """Answer batches until ``stop`` is set (the batch in hand finishes first)."""
        while not stop.is_set():
            items = self.spool.take(self.batch_files, timeout_s=0.2)
            if items:
                self.answer(items)

    def answer(self, items: list[Received]) -> None:
        """Classify a batch and answer each instance as its results complete."""
        by_path = {str(item.path): item for item in items}
        answered: set[str] = set()
        try:
            for path, results, summary in self._per_file(by_path):
                item = by_path[path]
                try:
                    self._answer_one(item, results, summary)
                except Exception as exc:  # one instance's failure never stops the node
                    log.error(
                        "%s: could not be answered (%s: %s); retried on restart",
                        item.uid,
                        type(exc).__name__,
                        exc,
                    )
                    self.stats.failed += 1
                answered.add(path)
        finally:
            for path, item in by_path.items():
                if path not in answered:
                    self.spool.release(item.uid)

    def _per_file(
        self, by_path: dict[str, Received]
    ) -> Iterator[tuple[str, list[Result], FileSummary | None]]:
        """(path, its results, its summary or None) per file, as each file completes."""
        stream = with_summaries(self.classifier.iter_classify(list(by_path), masks=self._masks))
        current: str | None = None
        results: list[Result] = []
        summary: FileSummary | None = None
        for result in stream:
            if isinstance(result, FileSummary):
                summary = result
                continue
            if result.source != current and current is not None:
                yield current, results, summary
                results, summary = [], None
            current = result.source
            results.append(result)
        if current is not None:
            yield current, results, summary

    @property
    def _masks(self) -> bool:
        return self.classifier.spec.has_lesion

    def _answer_one(
        self, item: Received, results: list[Result], summary: FileSummary | None
    ) -> None:
        """answer -> write -> record -> commit -> release, for one instance."""
        from pydicom import dcmread

        source = dcmread(item.path, stop_before_pixels=True)
        frames = int(source.get("NumberOfFrames", 1) or 1)
        answer = summary.most_suspicious if summary is not None else results[0]
        answers = None
        if isinstance(answer, Classification):
            answers = build_answers(source, answer, self.model, frames=frames)
        written = self._write(answers, item.uid)
        self.journal.append(self._records(source, results, summary, answers))
        self.spool.commit(
            item.uid,
            {"answers": [p.name for p in written], "forward": self._staged_names(written)},
        )
        if self.outbox is not None and written:
            self.outbox.promote(self._staged_names(written), item.uid)
        self.stats.answered += 1
        self.stats.answered_at[item.uid] = time.time()
        if answers is None:
            log.warning(
                "%s: not classified (%s): JSON record only, no SR",
                item.uid,
                (summary or results[0]).error,
            )
        if self._on_answered is not None:
            self._on_answered(item.uid)

    def _write(self, answers: Answers | None, owner: str) -> list[Path]:
        """Answer files into ``--output`` (and staged for forwarding), SEG first."""
        if answers is None:
            return []
        written = []
        for prefix, dataset in (("SEG", answers.seg), ("SR", answers.sr)):
            if dataset is None:
                continue
            data = _encoded(dataset)
            path = self.output / f"{prefix}_{dataset.SOPInstanceUID}.dcm"
            write_atomic(path, data)
            if self.outbox is not None:
                self.outbox.stage(path.name, data, owner)
            written.append(path)
        return written

    def _staged_names(self, written: list[Path]) -> list[str]:
        return [path.name for path in written] if self.outbox is not None else []

    def _records(
        self,
        source: Any,
        results: list[Result],
        summary: FileSummary | None,
        answers: Answers | None,
    ) -> list[dict[str, Any]]:
        """The CLI's JSON-lines records, with the DICOM UIDs added."""
        uids = {
            UID_FIELD: str(source.SOPInstanceUID),
            "sop_class_uid": str(source.get("SOPClassUID", "")),
            "study_instance_uid": str(source.get("StudyInstanceUID", "")),
            "series_instance_uid": str(source.get("SeriesInstanceUID", "")),
            "sr_sop_instance_uid": None if answers is None else str(answers.sr.SOPInstanceUID),
            "seg_sop_instance_uid": (
                None if answers is None or answers.seg is None else str(answers.seg.SOPInstanceUID)
            ),
        }
        records = [{**result_record(result), **uids} for result in results]
        if summary is not None:
            records.append({**result_record(summary), **uids})
        return records


def _encoded(dataset: Any) -> bytes:
    """A dataset as a Part 10 file in memory."""
    from io import BytesIO

    buffer = BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()
