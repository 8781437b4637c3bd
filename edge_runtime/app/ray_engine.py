"""Classify an archive on a Ray cluster: Ray Data reads the files, a pool of actors classifies.

``edge-classify PATH... --engine ray`` (the optional ``ray`` extra). The pipeline:

1. The driver lists the files with :func:`edge_runtime.io.sources.expand_sources` (as the local
   engine does) and opens the model once, which checks its contract before any cluster work.
2. The model file (with its FP32 recheck partner and model card, where it has them) is put in
   Ray's object store once; each actor writes it to its own temporary folder, so no node needs
   the model on a shared disk.
3. ``ray.data.read_binary_files`` reads the files as bytes in Ray tasks (every node must see the
   paths: a shared file system or the same mount on each node).
4. ``map_batches`` hands batches of files to a pool of actors, each holding one
   :class:`~edge_runtime.classifier.Classifier`. An actor decodes the bytes with the runtime's
   decode functions and classifies the frames; a file that cannot be decoded becomes its error
   record, it never fails the actor. With heatmaps or lesion masks asked for, the results carry
   them (and heatmaps the decoded frame) back to the driver.
5. The driver receives the results in input order (Ray Data's ``preserve_order``, plus a small
   reorder buffer keyed by path) and writes them as the local engine does: records, and
   heatmap and mask PNGs under the same file names.

An actor that dies (its process killed, its node lost) is restarted by Ray and its unfinished
batches are run again (``max_restarts=-1``, ``max_task_retries=-1``); a batch's output is kept
only when the batch completes, so each input still gives exactly one record.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import shutil
import tempfile
from collections import defaultdict, deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime.classifier import Classifier, ClassifierOptions, Failure, Result
from edge_runtime.extras import install_hint
from edge_runtime.io.decode import InputError, decode_gray, is_dicom
from edge_runtime.io.frames import MAX_FILE_BYTES
from edge_runtime.model.card import card_path_for
from edge_runtime.model.external_data import external_data_files
from edge_runtime.postprocess.lesion import require_lesion_output

log = logging.getLogger(__name__)

RAY_EXTRA_HINT = f"the Ray engine needs the ray extra: {install_hint('ray')}"


@dataclass(frozen=True)
class RayOptions:
    """Where and how wide to run.

    Attributes:
        address: a running cluster to join (``ray start --head`` prints it, e.g.
            ``10.0.0.5:6379``, or ``auto``); None starts a local cluster for this run and shuts
            it down at the end.
        workers: classifying actors, one CPU each; None: one per CPU of the cluster (of this
            machine, for a local one).
        files_per_call: files an actor classifies per call (Ray Data's ``batch_size``); a killed
            actor redoes at most this many files per call in flight.
        quiet: Ray logs errors only, and its workers' output is not forwarded to this process
            (``edge-classify --quiet``).
    """

    address: str | None = None
    workers: int | None = None
    files_per_call: int = 16
    quiet: bool = False

    def __post_init__(self) -> None:
        if self.workers is not None and self.workers < 1:
            raise ValueError(
                f"The number of Ray workers must be >= 1. Got {self.workers} instead; pass "
                "--workers N with N >= 1, or leave it out for one per CPU."
            )
        if self.files_per_call < 1:
            raise ValueError(f"files_per_call must be >= 1. Got {self.files_per_call} instead.")


def _import_ray():
    try:
        import ray
    except ImportError as exc:
        raise ImportError(f"--engine ray: Ray is not installed; {RAY_EXTRA_HINT}") from exc
    return ray


@contextlib.contextmanager
def ray_cluster(options: RayOptions) -> Iterator[int]:
    """Connect to Ray for the duration of the block; yields the number of workers to run.

    Joins ``options.address`` when given, else starts a local cluster with ``options.workers``
    CPUs (all of this machine's by default). If this process is already connected (a caller
    that ran ``ray.init`` itself), that connection is used and left open. A cluster started
    here is shut down on leaving the block, also on Ctrl-C or an error.

    Raises:
        ImportError: Ray is not installed.
        ConnectionError: no cluster answers at ``options.address``.
    """
    ray = _import_ray()
    started = False
    if not ray.is_initialized():
        level = logging.ERROR if options.quiet else logging.WARNING
        settings: dict[str, Any] = {"include_dashboard": False, "logging_level": level}
        if options.quiet:
            settings["log_to_driver"] = False
        if options.address is None:
            settings["num_cpus"] = options.workers or os.cpu_count() or 1
        else:
            settings["address"] = options.address
        ray.init(**settings)
        started = True
    try:
        cpus = int(ray.cluster_resources().get("CPU", 1))
        yield options.workers or max(1, cpus)
    finally:
        if started:
            ray.shutdown()


def classify_on_ray(
    classifier: Classifier,
    files: Sequence[str | os.PathLike[str]],
    options: ClassifierOptions,
    ray_options: RayOptions,
    *,
    workers: int,
    heatmaps: bool = False,
    masks: bool = False,
) -> Iterator[Result]:
    """Classify ``files`` on the connected Ray cluster (see :func:`ray_cluster`).

    Args:
        classifier: the model opened on the driver; its files (model, recheck partner, card)
            are shipped to the actors.
        files: the inputs, as :func:`~edge_runtime.io.sources.expand_sources` lists them.
        options: the actors' classifier options (``model_path`` is replaced by the shipped
            copy; ``threads`` None means one inference thread per actor).
        ray_options: batch size per call.
        workers: actors in the pool.
        heatmaps: compute heatmaps (the original frames travel back with the results).
        masks: attach each scan's ``lesion_mask`` (the model needs a lesion output).

    Yields:
        One result per image or DICOM frame, in the order of ``files`` (frames in file order),
        exactly as :meth:`Classifier.iter_classify` would give them.

    Raises:
        ValueError: ``masks`` with a model that has no lesion output; raised here, before any
            input is read or sent to the cluster.
        ImportError: Ray is not installed.
    """
    if masks:
        require_lesion_output(classifier.spec, str(classifier.model_path), "leave out masks=True")
    ray = _import_ray()
    outputs = {"heatmaps": heatmaps, "masks": masks}
    return _in_input_order(ray, classifier, files, options, ray_options, workers, outputs)


def _in_input_order(
    ray, classifier, files, options, ray_options, workers, outputs
) -> Iterator[Result]:
    names = [str(path) for path in files]
    readable = {name: _readable(name) for name in names}
    to_read = [os.path.abspath(name) for name in names if readable[name]]
    stream = iter(())
    if to_read:
        bundle = [ray.put(_model_files(classifier))]  # a list: the actor resolves it itself
        stream = _ray_results(
            ray, to_read, bundle, classifier, options, ray_options, workers, outputs
        )
    pending: dict[str, deque[list[Result]]] = defaultdict(deque)
    for name in names:
        if not readable[name]:  # unreadable here: the runtime's own reader says why
            yield from classifier.iter_classify([name], **outputs)
            continue
        key = os.path.abspath(name)
        while not pending[key]:
            got = next(stream, None)
            if got is None:
                reason = "was not returned by the Ray workers (it vanished before it was read?)"
                failure = Failure(source=name, error=reason, **classifier.model_fields)
                pending[key].append([failure])
                break
            pending[got[0]].append(got[1])
        for result in pending[key].popleft():  # one entry per input: exactly one record each
            yield replace(result, source=name)


def _ray_results(
    ray, paths, bundle, classifier, options, ray_options, workers, outputs
) -> Iterator[tuple[str, list[Result]]]:
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True
    context.enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.ERROR if ray_options.quiet else logging.WARNING)
    worker_options = replace(options, threads=options.threads or 1, decode_workers=1)
    # Reading is I/O: no CPU reserved, but a bounded number of readers (each task is a Python
    # worker process; unbounded zero-CPU tasks start dozens of them at once).
    dataset = ray.data.read_binary_files(
        paths,
        include_paths=True,
        num_cpus=0,
        concurrency=workers,
        override_num_blocks=max(1, -(-len(paths) // ray_options.files_per_call)),
    )
    classified = dataset.map_batches(
        _ClassifyWorker,
        batch_size=ray_options.files_per_call,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=workers),
        num_cpus=1,
        fn_constructor_kwargs={
            "bundle": bundle,
            "model_name": classifier.model_path.name,
            "options": worker_options,
            "outputs": outputs,
        },
    )  # Ray Data's actor defaults: max_restarts=-1, max_task_retries=-1 (see the module doc)
    for batch in classified.iter_batches(batch_size=None, batch_format="numpy"):
        for path, blob in zip(batch["path"], batch["results"], strict=True):
            yield str(path), pickle.loads(blob)


class _ClassifyWorker:
    """A Ray Data actor: one Classifier on a private copy of the shipped model files.

    ``outputs``: the keyword arguments of :meth:`Classifier.classify` that choose the extra
    outputs (``heatmaps``, ``masks``).
    """

    def __init__(
        self, bundle: list, model_name: str, options: ClassifierOptions, outputs: dict[str, bool]
    ) -> None:
        import ray

        self._folder = Path(tempfile.mkdtemp(prefix="edge-classify-model-"))
        for name, data in ray.get(bundle[0]).items():
            (self._folder / name).write_bytes(data)
        self._classifier = Classifier.from_options(
            replace(options, model_path=self._folder / model_name)
        )
        self._outputs = outputs

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``{"path", "bytes"}`` rows in, ``{"path", "results"}`` out (results pickled)."""
        paths = [str(p) for p in batch["path"]]
        decoded = [
            _frames(path, bytes(data)) for path, data in zip(paths, batch["bytes"], strict=True)
        ]
        frames = [frame for item in decoded if not isinstance(item, Failure) for frame in item]
        done = iter(self._classifier.classify(frames, **self._outputs))
        out = []
        for path, item in zip(paths, decoded, strict=True):
            if isinstance(item, Failure):
                out.append([replace(item, **self._classifier.model_fields)])
                continue
            multi = len(item) > 1
            out.append(
                [
                    replace(next(done), source=path, frame=i if multi else None)
                    for i in range(len(item))
                ]
            )
        return {
            "path": np.array(paths, dtype=object),
            "results": np.array([pickle.dumps(r) for r in out], dtype=object),
        }

    def __del__(self) -> None:
        shutil.rmtree(getattr(self, "_folder", ""), ignore_errors=True)


def _frames(path: str, data: bytes) -> list[np.ndarray] | Failure:
    """Frames decoded from a file's bytes by the runtime's decoders, or its failure."""
    try:
        if not data:
            raise InputError(path, "file is empty (0 bytes)")
        if is_dicom(path, data):
            from edge_runtime.io.dicom import load_dicom_frames

            return load_dicom_frames(path, data)
        return [decode_gray(data, path)]
    except InputError as exc:
        return Failure(source=path, error=exc.reason)
    except Exception as exc:  # a decoder bug must cost one input, never the actor
        return Failure(source=path, error=f"could not be decoded ({type(exc).__name__}: {exc})")


def _model_files(classifier: Classifier) -> dict[str, bytes]:
    """The files an actor needs to open the same model: model, recheck partner, their
    external-data files, model card."""
    models = [classifier.model_path]
    if classifier.recheck_model_path is not None:
        models.append(classifier.recheck_model_path)
    paths = [*models, card_path_for(classifier.model_path)]
    paths += [piece for model in models for piece in external_data_files(model)]
    return {path.name: path.read_bytes() for path in paths if path.is_file()}


def _readable(name: str) -> bool:
    """Whether Ray's reader can take the file (else the runtime's reader reports on it)."""
    try:
        return (
            os.path.isfile(name)
            and os.access(name, os.R_OK)
            and os.path.getsize(name) <= MAX_FILE_BYTES
        )
    except OSError:
        return False
