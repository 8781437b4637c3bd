"""The worker: answers received instances from the spool, off the association threads.

A pipeline of named steps per batch: take (from the spool, woken by each arrival) -> classify
(the runtime's own :meth:`~edge_runtime.classifier.Classifier.iter_classify` over the whole
batch, masks on, cine summaries from :func:`~edge_runtime.postprocess.summary.with_summaries`) ->
choose (the result the SR reports, :attr:`_Job.answer`: a cine's summary's frame; of a dual
view's tissue regions the most severe, chosen by
:func:`~edge_runtime.postprocess.summary.summarize` as a cine's frame is) -> answer (SR and SEG
encoded by :func:`~edge_runtime.app.node.templates.encode_answers` in worker processes, from
templates after a layout's first instance, while the batch is still being classified, and
written there into ``--output``, each file fsynced: :func:`encode_and_write`) ->
stage (the answer files hard-linked into the forward queue, one fsync of each folder per
batch) -> record (the batch's JSON lines in one fsynced append, :mod:`.journal`) -> commit (the
spool's ``done`` marker, per instance, in the journal's order) -> release (the staged answers
become sendable, one folder fsync). Stage to release run on a commit thread while the next batch
is classified. A crash at any step leaves an instance in
``received/`` without a marker; it is answered again on restart, to the very same files and UIDs.

An instance's failure is transient (:func:`transient`: a file or the disk, an answer process
lost) or permanent (anything else: the instance itself cannot be answered, and would fail the
same way every time). A transient one is logged and the instance waits in ``received/`` for the
next start; a permanent one gets an error record in the JSON lines (its UIDs and the reason, no
SR) and is moved to the spool's ``failed/`` with the reason and traceback (:meth:`Spool.fail`),
never tried again.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import (
    BrokenExecutor,
    CancelledError,
    Executor,
    Future,
    ProcessPoolExecutor,
    ThreadPoolExecutor,
)
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime.app.node.answers import (
    AnswerFile,
    AnswerInputs,
    EncodedAnswers,
    ModelIdentity,
    build_from_inputs,
    fill_type2,
    header_uids,
)
from edge_runtime.app.node.forward import Outbox
from edge_runtime.app.node.journal import UID_FIELD, Journal
from edge_runtime.app.node.spool import Received, Spool, fsync_dir, write_atomic
from edge_runtime.app.node.templates import encode_answers, encoded
from edge_runtime.app.output import result_record
from edge_runtime.classifier import Classification, Classifier, Failure, Result
from edge_runtime.postprocess.summary import FileSummary, summarize, with_summaries

log = logging.getLogger(__name__)

RESULTS_NAME = "results.jsonl"
MAX_ANSWER_PROCESSES = 4


def model_identity(classifier: Classifier) -> ModelIdentity:
    """The name, version and SHA-256 of the classifier's model (with its external-data files
    where it has them: :attr:`~edge_runtime.classifier.Classifier.model_sha256`, hashed as it
    was loaded)."""
    return ModelIdentity(
        classifier.model_path.name,
        str(classifier.spec.model_version),
        classifier.model_sha256,
    )


def encode_and_write(
    source_path: str, answer: Classification, model: ModelIdentity, output: str
) -> EncodedAnswers:
    """:func:`~edge_runtime.app.node.templates.encode_answers`, its files written into
    ``output`` (each fsynced, then renamed; the folder is fsynced by the commit thread, once a
    batch, before the JSON lines and the markers).

    Run in the answer processes, so that writing the files (and sending their bytes back) costs
    the node's process nothing. The files come back without their bytes (``data`` is empty).

    Raises:
        ValueError, OSError: as :func:`~edge_runtime.app.node.templates.encode_answers`, or a
            file could not be written.
    """
    answers = encode_answers(source_path, answer, model)
    for file in answers.files:
        write_atomic(Path(output) / file.name, file.data, sync_folder=False)
    return EncodedAnswers(tuple(replace(f, data=b"") for f in answers.files), answers.header)


def transient(exc: BaseException) -> bool:
    """Whether an instance's failure may pass (retried on the next start): the disk or a file
    (:class:`OSError`), memory, or an answer process lost or cancelled. Anything else is the
    instance's own and permanent: it would fail the same way every time."""
    return isinstance(exc, (OSError, MemoryError, BrokenExecutor, CancelledError))


def default_answer_processes() -> int:
    """Processes that build SR and SEG: one per core, at most :data:`MAX_ANSWER_PROCESSES`."""
    return max(1, min(MAX_ANSWER_PROCESSES, os.cpu_count() or 1))


@dataclass
class WorkerStats:
    """What the worker did, and when each instance was answered (for the benchmark)."""

    answered: int = 0
    failed: int = 0  # transient failures (retried on restart) and permanent ones (failed/)
    answered_at: dict[str, float] = field(default_factory=dict)  # uid -> time.time()


@dataclass
class _Job:
    """One instance of a batch on its way: its results, then its answer files."""

    item: Received
    results: list[Result]
    summary: FileSummary | None
    files: Future[EncodedAnswers] | None  # None: not classified, a JSON record only

    @property
    def answer(self) -> Result | None:
        """The result the SR reports, for the instance as a whole (None: nothing classified).

        A cine's summary's frame. An image with several tissue regions (a dual view) gives one
        result per region and no summary (``with_summaries`` summarizes frames): its regions
        are summarized here as a cine's frames are, so the most severe call that did not abstain
        decides (malignant, then benign, then normal); an abstained or failed region never hides
        another region's finding, and a normal or milder region never reassures beside one
        that shows tissue and abstained (that one is reported, abstained). Otherwise the
        image's only result.
        """
        if self.summary is not None:
            return self.summary.most_suspicious
        if len(self.results) > 1:
            return summarize(self.results).most_suspicious
        return self.results[0]


class Worker:
    """Answers the spool's instances in batches (see the module docstring); a context manager
    (:meth:`close` stops its answer processes)."""

    def __init__(
        self,
        classifier: Classifier,
        spool: Spool,
        output: Path,
        *,
        outbox: Outbox | None = None,
        batch_files: int = 32,
        answer_processes: int | None = None,
        on_answered: Callable[[str], None] | None = None,
    ) -> None:
        """
        Args:
            classifier: the runtime's classifier (masks on where the model has them).
            spool: where instances wait.
            output: answer files and ``results.jsonl`` go here.
            outbox: the forward queue, or None.
            batch_files: instances taken and classified at once.
            answer_processes: processes building SR and SEG (None: one per core, at most
                :data:`MAX_ANSWER_PROCESSES`; 0: on this thread).
            on_answered: called with each answered SOP Instance UID.
        """
        self.classifier, self.spool, self.output = classifier, spool, Path(output)
        self.output.mkdir(parents=True, exist_ok=True)
        self.outbox, self.batch_files, self._on_answered = outbox, batch_files, on_answered
        self.model = model_identity(classifier)
        self.journal = Journal(self.output / RESULTS_NAME, is_done=spool.is_done)
        self.stats = WorkerStats()
        processes = default_answer_processes() if answer_processes is None else answer_processes
        self._pool = _AnswerProcesses(processes) if processes > 0 else None
        self._recover()

    def close(self) -> None:
        """Stop the answer processes (after what they have in hand)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> Worker:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _recover(self) -> None:
        """Finish what a crash interrupted after a commit: staged answers become sendable."""
        if self.outbox is None:
            return
        for name, owner in self.outbox.staged():
            if self.spool.is_done(owner):
                self.outbox.promote([name], owner)

    def run(self, stop: threading.Event) -> None:
        """Answer batches until ``stop`` is set (the batches in hand finish first).

        A batch is written and committed on a second thread while the next one is classified
        (its writes wait on the disk, its classification on the model): one batch in each.
        """
        committing: Future[None] | None = None
        with ThreadPoolExecutor(1, thread_name_prefix="commit") as committer:
            try:
                while not stop.is_set():
                    items = self.spool.take(self.batch_files, timeout_s=0.2)
                    if not items:
                        continue
                    jobs = self._start(items)
                    if committing is not None:
                        committing.result()  # batches commit in order, one at a time
                    committing = committer.submit(self._finish, items, jobs)
            finally:
                if committing is not None:
                    committing.result()

    def answer(self, items: list[Received]) -> None:
        """Classify a batch, build its answers meanwhile, then write and commit them."""
        self._finish(items, self._start(items))

    def _start(self, items: list[Received]) -> list[_Job]:
        """Classify a batch and start building its answers (all handed back on an error)."""
        by_path = {str(item.path): item for item in items}
        try:
            return [self._job(by_path[path], *rest) for path, *rest in self._per_file(by_path)]
        except BaseException:
            for item in items:
                self.spool.release(item.uid)
            raise

    def _finish(self, items: list[Received], jobs: list[_Job]) -> None:
        """Write and commit a started batch; what is not handled is handed back."""
        handled: set[str] = set()
        try:
            for job in self._commit(jobs):
                handled.add(job.item.uid)
        finally:
            for item in items:
                if item.uid not in handled:
                    self.spool.release(item.uid)

    def _job(self, item: Received, results: list[Result], summary: FileSummary | None) -> _Job:
        """Start building one instance's answers (in a worker process) as its results arrive."""
        job = _Job(item, results, summary, None)
        answer = job.answer
        if isinstance(answer, Classification):
            if self._pool is not None:
                try:
                    job.files = self._pool.submit(answer, str(item.path), self.model, self.output)
                except Exception as exc:  # a broken pool: reported with the instance, in _commit
                    job.files = Future()
                    job.files.set_exception(exc)
            else:
                job.files = Future()
                try:
                    job.files.set_result(
                        encode_and_write(str(item.path), answer, self.model, str(self.output))
                    )
                except Exception as exc:  # reported with the instance, in _commit
                    job.files.set_exception(exc)
        return job

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

    def _commit(self, jobs: list[_Job]) -> list[_Job]:
        """stage -> record -> commit -> release, for a batch; returns the jobs handled (answered;
        failed for good, with an error record; or failed transiently and logged: those wait for
        a restart)."""
        written: list[tuple[_Job, list[AnswerFile], list[dict[str, Any]], BaseException | None]]
        written = []
        handled = []
        for job in jobs:
            try:
                encoded = None if job.files is None else job.files.result()
                files = [] if encoded is None else list(encoded.files)
                records = self._records(job, files, None if encoded is None else encoded.header)
                self._stage(files, job.item.uid)
            except Exception as exc:  # one instance's failure never stops the node
                error_records = None if transient(exc) else self._error_records(job, exc)
                if error_records is None:
                    self._failed(job, exc)
                    handled.append(job)
                else:
                    written.append((job, [], error_records, exc))
                continue
            written.append((job, files, records, None))
        if not written:
            return handled
        fsync_dir(self.output)
        if self.outbox is not None:
            self.outbox.sync()
        try:
            self.journal.append(record for _, _, records, _ in written for record in records)
        except OSError as exc:
            for job, *_ in written:
                self._failed(job, exc)
            return handled + [job for job, *_ in written]
        committed = []
        for job, files, records, error in written:  # in the journal's order: each marker in turn
            names = [f.name for f in files]
            staged = names if self.outbox is not None else []
            try:
                if error is None:
                    self.spool.commit(job.item.uid, {"answers": names, "forward": staged})
                else:
                    self.spool.fail(job.item.uid, _failure_reason(records[0], error))
            except OSError as exc:
                self._failed(job, exc)
                handled.append(job)
                continue
            if error is not None:
                self._gave_up(job, records[0]["error"])
                handled.append(job)
                continue
            committed.append((job, staged))
        if self.outbox is not None:
            self.outbox.promote_many([(staged, job.item.uid) for job, staged in committed])
        for job, _ in committed:
            self._answered(job)
            handled.append(job)
        return handled

    def _failed(self, job: _Job, exc: BaseException) -> None:
        log.error(
            "%s: could not be answered (%s: %s); retried on restart",
            job.item.uid,
            type(exc).__name__,
            exc,
        )
        self.stats.failed += 1

    def _gave_up(self, job: _Job, error: str) -> None:
        log.error(
            "%s: cannot be answered (%s): error record written, instance moved to %s; not retried",
            job.item.uid,
            error,
            self.spool.failed / f"{job.item.uid}.dcm",
        )
        self.stats.failed += 1

    def _error_records(self, job: _Job, exc: BaseException) -> list[dict[str, Any]] | None:
        """The one JSON record of an instance that cannot be answered: no label, no SR, its
        ``error``, and the UIDs its header has (its SOP Instance UID: the spool's). None where
        even that record cannot be made (the instance then waits for a restart, as after a
        transient failure)."""
        error = f"cannot be answered: {type(exc).__name__}: {exc}"
        try:
            from pydicom import dcmread

            header = header_uids(dcmread(job.item.path, stop_before_pixels=True), job.item.uid)
        except Exception:  # the header itself is what fails: the UID the spool knows it by
            header = dict.fromkeys(_HEADER_FIELDS, "")
            header["sop_instance_uid"] = job.item.uid
        kept = self.spool.failed / f"{job.item.uid}.dcm"  # where Spool.fail moves it
        try:
            failure = Failure(source=str(kept), error=error, **self.classifier.model_fields)
            return [{**result_record(failure), **self._uid_fields(header, {})}]
        except Exception:
            log.exception("%s: no error record could be made", job.item.uid)
            return None

    def _answered(self, job: _Job) -> None:
        self.stats.answered += 1
        self.stats.answered_at[job.item.uid] = time.time()
        if job.files is None:
            log.warning(
                "%s: not classified (%s): JSON record only, no SR",
                job.item.uid,
                (job.summary or job.results[0]).error,
            )
        if self._on_answered is not None:
            self._on_answered(job.item.uid)

    def _stage(self, files: list[AnswerFile], owner: str) -> None:
        """Hard-link answer files (written and fsynced by :func:`encode_and_write`; their folder
        is fsynced once per batch) into the forward queue."""
        for answer in files:
            path = self.output / answer.name
            if self.outbox is not None:
                self.outbox.stage_link(path, answer.name, owner)

    def _records(
        self, job: _Job, files: list[AnswerFile], header: dict[str, str] | None
    ) -> list[dict[str, Any]]:
        """The CLI's JSON-lines records, with the DICOM UIDs added (``header``: the source's,
        as its answer process read them; None: read here)."""
        if header is None:
            from pydicom import dcmread

            header = header_uids(dcmread(job.item.path, stop_before_pixels=True), job.item.uid)
        added = self._uid_fields(header, {f.prefix: f.sop_instance_uid for f in files})
        records = [{**result_record(result), **added} for result in job.results]
        if job.summary is not None:
            records.append({**result_record(job.summary), **added})
        return records

    @staticmethod
    def _uid_fields(header: dict[str, str], answers: dict[str, str]) -> dict[str, Any]:
        """The DICOM fields added to each record: the source's UIDs and its answers'."""
        return {
            UID_FIELD: header["sop_instance_uid"],
            "sop_class_uid": header["sop_class_uid"],
            "study_instance_uid": header["study_instance_uid"],
            "series_instance_uid": header["series_instance_uid"],
            "sr_sop_instance_uid": answers.get("SR"),
            "seg_sop_instance_uid": answers.get("SEG"),
        }


_HEADER_FIELDS = ("sop_instance_uid", "sop_class_uid", "study_instance_uid", "series_instance_uid")


def _failure_reason(record: dict[str, Any], exc: BaseException) -> dict[str, Any]:
    """What ``failed/<uid>.json`` keeps: the error record and the traceback (an answer
    process's included), for a report."""
    return {
        "error": record["error"],
        "record": record,
        "traceback": "".join(traceback.format_exception(exc)),
        "failed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


class _AnswerProcesses:
    """Processes for :func:`encode_and_write`, started and warmed
    (highdicom imported) before the node listens.

    Each keeps the templates of the answers it built (:mod:`.templates`), so an answer goes to
    the process that answered its kind before (label, flags, lesion, measurements, frame): each
    template is made once, not once per process.
    """

    def __init__(self, processes: int) -> None:
        self._pools: list[Executor] = [
            ProcessPoolExecutor(
                1,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_pool_process_start,
                initargs=(os.getpid(),),
            )
            for _ in range(processes)
        ]
        for warmed in [pool.submit(_warm) for pool in self._pools]:
            warmed.result()
        self._routes: dict[tuple, int] = {}

    def submit(
        self, answer: Classification, path: str, model: ModelIdentity, output: Path
    ) -> Future[EncodedAnswers]:
        """Encode and write ``answer``'s files into ``output`` (:func:`encode_and_write`) in the
        process that answered its kind before."""
        kind = (
            answer.label,
            bool(answer.abstained),
            bool(answer.unfamiliar),
            answer.lesion is None,
            answer.lesion is None or answer.lesion.area_mm2 is None,
            answer.lesion is None or answer.lesion.diameter_mm is None,
            answer.frame is None,
            answer.region,
        )
        index = self._routes.setdefault(kind, len(self._routes) % len(self._pools))
        return self._pools[index].submit(encode_and_write, path, answer, model, str(output))

    def shutdown(self, *, wait: bool = True, cancel_futures: bool = False) -> None:
        for pool in self._pools:
            pool.shutdown(wait=wait, cancel_futures=cancel_futures)


def _warm() -> None:
    """Build and encode one synthetic answer (SR and SEG) in a fresh answer process: highdicom's
    first build in a process reads the standard's tables (~0.3 s of CPU), paid here, before the
    node listens, instead of on the first scan of each process. No template is kept."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    source = Dataset()
    source.file_meta = FileMetaDataset()
    source.SOPClassUID = "1.2.840.10008.5.1.4.1.1.6.1"  # Ultrasound Image
    source.SOPInstanceUID, source.StudyInstanceUID = generate_uid(), generate_uid()
    source.SeriesInstanceUID, source.Modality = generate_uid(), "US"
    source.file_meta.MediaStorageSOPClassUID = source.SOPClassUID
    source.file_meta.MediaStorageSOPInstanceUID = source.SOPInstanceUID
    source.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    source.Rows = source.Columns = 8
    source.SamplesPerPixel, source.PhotometricInterpretation = 1, "MONOCHROME2"
    source.BitsAllocated, source.BitsStored, source.HighBit, source.PixelRepresentation = 8, 8, 7, 0
    source.PixelSpacing = [0.1, 0.1]
    fill_type2(source)
    mask = np.zeros((8, 8), dtype=bool)
    mask[2:5, 2:5] = True
    probabilities = (("normal", 0.1), ("benign", 0.1), ("malignant", 0.8))
    inputs = AnswerInputs("malignant", False, False, probabilities, True, 0.09, 0.4, None, mask)
    answers = build_from_inputs(source, inputs, ModelIdentity("warm-up.onnx", "0", "0" * 64))
    for ds in (answers.sr, answers.seg):
        encoded(ds)


def _pool_process_start(parent: int) -> None:
    """In each answer process: ignore SIGINT, import the builders, and leave when the node is
    gone (a node killed with SIGKILL cannot stop its pool).

    Ctrl-C in a terminal reaches the whole process group: the node stops after the batch in hand
    and then shuts these processes down itself, so they must not die first (a KeyboardInterrupt
    traceback each, and the batch in hand failed by a broken pool). SIGTERM keeps its default:
    the pool itself terminates its processes with it when it breaks."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    import highdicom  # noqa: F401

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()
