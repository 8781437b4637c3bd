"""Multi-worker data-parallel training (``edge-train ... --distributed``).

Every worker runs the same ``edge-train`` command under
``tf.distribute.MultiWorkerMirroredStrategy``: each holds a replica of the model, works on its
share of every global batch and averages gradients with the others after each step, so N
workers train one model as if on batches N times as large per unit of time.

- The cluster comes from ``TF_CONFIG`` (what Kubernetes operators and cluster schedulers set) or
  from ``--worker-hosts host:port,...`` with ``--worker-index`` (which writes ``TF_CONFIG``).
- Data: every worker reads and prepares the same scans (so every worker computes the same
  split) and builds the same shuffled ``tf.data`` pipeline; ``tf.distribute`` shards it by worker
  (auto-shard policy AUTO falls back to DATA for in-memory arrays: each worker keeps its own slice
  of each global batch; ``--batch-size`` is the global batch). Batch norms use the statistics of
  the global batch (:func:`synchronize_batch_norm`), so the replicas together compute each step
  as one worker would on the whole batch.
- Writes: the chief (worker 0, or the ``chief`` task of ``TF_CONFIG``) alone writes the run
  folder; the others write theirs into a scratch folder that is deleted at the end.
- Resume: each stage of training backs up the model and optimizer after every epoch
  (``keras.callbacks.BackupAndRestore``) into ``<backup-dir>/worker-<i>/<n>-<stage>``. When a
  worker dies the others stop with an error; start every worker again with the same command and
  each resumes from its last finished epoch (finished stages are skipped). The backups are deleted
  when the run completes.

The training code calls :func:`in_scope` around building and fitting the model,
:func:`synchronize_batch_norm` before fitting and :func:`local_copy` afterwards; they do nothing
unless :func:`start` has been called.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import ParamSpec, TypeVar

log = logging.getLogger(__name__)
P = ParamSpec("P")
R = TypeVar("R")


@dataclass(frozen=True)
class Cluster:
    """The workers of one training job and which one this process is.

    Attributes:
        workers: ``host:port`` of every worker, the same list and order on every worker.
        index: this worker's position in ``workers``.
        chief: the ``host:port`` of a separate ``chief`` task of ``TF_CONFIG``, if it has one.
        task_type: ``worker`` or ``chief``: what this process is.
    """

    workers: tuple[str, ...]
    index: int
    chief: str | None = None
    task_type: str = "worker"

    @property
    def is_chief(self) -> bool:
        """Whether this process writes the run folder: the chief task, else worker 0."""
        return self.task_type == "chief" or (self.chief is None and self.index == 0)

    @property
    def name(self) -> str:
        return f"{self.task_type}-{self.index}"

    @property
    def size(self) -> int:
        return len(self.workers) + (self.chief is not None)

    def tf_config(self) -> str:
        """The ``TF_CONFIG`` JSON that describes this cluster to TensorFlow."""
        cluster: dict[str, list[str]] = {"worker": list(self.workers)}
        if self.chief is not None:
            cluster["chief"] = [self.chief]
        return json.dumps(
            {"cluster": cluster, "task": {"type": self.task_type, "index": self.index}}
        )


def cluster_from(
    workers: str | None, worker_index: int | None, environ: Mapping[str, str] = os.environ
) -> Cluster:
    """The cluster from ``--worker-hosts``/``--worker-index``, or else from ``TF_CONFIG``.

    Args:
        workers: ``host:port,host:port,...`` (every worker, in the same order everywhere).
        worker_index: this worker's position in ``workers``.
        environ: where ``TF_CONFIG`` is read.

    Raises:
        ValueError: neither is given, or what is given is malformed; the message says how.
    """
    if workers is not None:
        addresses = tuple(part.strip() for part in workers.split(",") if part.strip())
        for address in addresses:
            host, _, port = address.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(
                    f"--worker-hosts must list host:port addresses separated by commas, like "
                    f"10.0.0.1:12345,10.0.0.2:12345. Got {address!r} in {workers!r} instead."
                )
        if len(set(addresses)) != len(addresses):
            raise ValueError(f"--worker-hosts lists an address twice: {workers!r}.")
        if worker_index is None or not 0 <= worker_index < len(addresses):
            raise ValueError(
                f"--worker-index must be this worker's position in --worker-hosts, 0 to "
                f"{len(addresses) - 1}. Got {worker_index} instead."
            )
        return Cluster(workers=addresses, index=worker_index)
    if worker_index is not None:
        raise ValueError(
            "--worker-index needs --worker-hosts host:port,... (or use TF_CONFIG alone)."
        )
    text = environ.get("TF_CONFIG")
    if not text:
        raise ValueError(
            "--distributed needs the cluster: set TF_CONFIG (JSON with 'cluster' and 'task'), or "
            "pass --worker-hosts host:port,... and --worker-index I on every worker."
        )
    try:
        config = json.loads(text)
        cluster, task = config["cluster"], config["task"]
        task_type, index = str(task["type"]), int(task["index"])
        chiefs = list(cluster.get("chief", []))
        found = Cluster(
            workers=tuple(cluster.get("worker", [])),
            index=index,
            chief=chiefs[0] if chiefs else None,
            task_type=task_type,
        )
    except (ValueError, TypeError, KeyError, IndexError) as exc:
        raise ValueError(
            f"TF_CONFIG must be JSON like {Cluster(('h1:1', 'h2:1'), 0).tf_config()}. "
            f"Got {text!r} instead ({type(exc).__name__}: {exc})."
        ) from None
    if task_type not in ("worker", "chief") or len(chiefs) > 1:
        raise ValueError(
            f"TF_CONFIG: this job knows 'worker' tasks and at most one 'chief'. Got task type "
            f"{task_type!r} and {len(chiefs)} chief(s) instead."
        )
    members = len(found.workers) if task_type == "worker" else 1
    if not 0 <= index < members:
        raise ValueError(
            f"TF_CONFIG: task index {index} is outside the {members} {task_type} task(s)."
        )
    return found


@dataclass
class _Session:
    cluster: Cluster
    strategy: object  # tf.distribute.MultiWorkerMirroredStrategy
    backup_dir: Path
    stages: int = 0


_ACTIVE: _Session | None = None


@contextlib.contextmanager
def start(cluster: Cluster, output: Path, backup_dir: Path | None = None) -> Iterator[Path]:
    """Join the cluster for the block; yields the folder this worker writes its run to.

    Creates the ``MultiWorkerMirroredStrategy`` (it must come before any other TensorFlow work
    in the process), which waits until every worker has joined. The chief gets ``output``; the
    other workers get a scratch folder, deleted on leaving the block. When the block completes,
    this worker's backups are deleted; after an error they stay for the restart.

    Args:
        cluster: from :func:`cluster_from`.
        output: the run folder (written by the chief alone).
        backup_dir: where each worker keeps its per-epoch backups (``worker-<i>`` inside);
            default ``<output>.backup``. On a shared disk the workers' folders stay apart.
    """
    global _ACTIVE
    if _ACTIVE is not None:
        raise RuntimeError("distributed training is already started in this process")
    os.environ["TF_CONFIG"] = cluster.tf_config()
    import tensorflow as tf

    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    _build_from_a_local_batch()
    _average_scalar_logs_across_workers()
    log.info(
        "%s of %d: %d replicas in sync%s",
        cluster.name,
        cluster.size,
        strategy.num_replicas_in_sync,
        " (chief: writes the run folder)" if cluster.is_chief else "",
    )
    backups = Path(backup_dir or output.with_name(output.name + ".backup")) / cluster.name
    scratch = None if cluster.is_chief else Path(tempfile.mkdtemp(prefix="edge-train-worker-"))
    _ACTIVE = _Session(cluster, strategy, backups)
    try:
        yield output if scratch is None else scratch
        shutil.rmtree(backups, ignore_errors=True)
        with contextlib.suppress(OSError):
            backups.parent.rmdir()  # the last worker to finish removes the shared parent
    finally:
        _ACTIVE = None
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


def scope() -> contextlib.AbstractContextManager:
    """The strategy's scope: build and fit the model in it (a no-op when not distributed)."""
    return contextlib.nullcontext() if _ACTIVE is None else _ACTIVE.strategy.scope()


def in_scope(function: Callable[P, R]) -> Callable[P, R]:
    """``function`` run inside :func:`scope`: ``distributed.in_scope(fit)(model, ...)``."""

    @functools.wraps(function)
    def scoped(*args: P.args, **kwargs: P.kwargs) -> R:
        with scope():
            return function(*args, **kwargs)

    return scoped


def synchronize_batch_norm(model) -> int:
    """Let every batch norm of ``model`` normalize with the statistics of the global batch.

    Without this, each replica normalizes its share of the batch (``--batch-size`` divided by
    the replicas) with that share's own mean and variance, and updates its own copy of the
    moving statistics from it, so N workers train a different model from one worker's on the
    same global batches, and the chief keeps statistics of its share alone. Synchronized, the
    replicas sum their moments across workers first (Keras ``BatchNormalization(synchronized=
    True)``: three all-reduces per layer and step), which is what one worker computes on the
    whole batch. Call it before the model is trained (a no-op when not distributed).

    Returns:
        The number of batch norm layers switched.
    """
    return 0 if _ACTIVE is None else _set_synchronized(model, True)


def local_copy(model):
    """The trained model with its weights, outside the strategy (``model`` itself when not
    distributed), so that prediction and evaluation run on this worker alone: a model built in
    the scope would run ``predict`` across all workers. Its batch norms are no longer
    synchronized, so its saved configuration is the one a single worker saves."""
    if _ACTIVE is None:
        return model
    import keras

    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    _set_synchronized(copy, False)
    return copy


def _set_synchronized(model, synchronized: bool) -> int:
    import keras

    from training.model.classifier import nested_layers

    norms = [
        layer
        for layer in nested_layers(model)
        if isinstance(layer, keras.layers.BatchNormalization)
    ]
    for layer in norms:
        layer.synchronized = synchronized
    return len(norms)


def stage_callbacks(stage: str) -> list:
    """Callbacks for one training stage: its epoch backup (empty when not distributed).

    Stages are numbered in the order they run, which is the same on every run of the same
    command, so a restarted worker finds each stage's backup again.
    """
    if _ACTIVE is None:
        return []
    _ACTIVE.stages += 1
    folder = _ACTIVE.backup_dir / f"{_ACTIVE.stages:02d}-{stage}"
    if (folder / "training_metadata.json").is_file():
        log.info("stage %s: resuming from the backup in %s", stage, folder)
    return [_stage_backup(folder)]


def _build_from_a_local_batch() -> None:
    """Let Keras 3 build a model's optimizer and metrics under MultiWorkerMirroredStrategy.

    Before training, Keras' TensorFlow trainer (``_maybe_symbolic_build``, Keras 3.15) reduces the
    first distributed batch with an eager ``strategy.reduce("MEAN", ...)`` just to learn its
    shapes; this strategy cannot reduce eagerly ("Attempt to convert a value (PerReplica...) to a
    Tensor"), nor reduce uint8 at all, so ``fit`` fails before the first step (the problem of
    keras-team/keras#20585). The shapes of this worker's own replica batch are what that build
    needs: hand it that batch instead. Applied once, only by :func:`start`.
    """
    from keras import tree
    from keras.src.backend.tensorflow.trainer import TensorFlowTrainer

    original = TensorFlowTrainer._maybe_symbolic_build
    if getattr(original, "_edge_train_local_batch", False):
        return

    def build(self, iterator=None, data_batch=None):
        if iterator is not None and self._distribute_strategy is not None:
            strategy = self._distribute_strategy
            for _, _, batches in iterator:
                data_batch = tree.map_structure(
                    lambda value: strategy.experimental_local_results(value)[0], next(batches)
                )
                break
            iterator = None
        return original(self, iterator=iterator, data_batch=data_batch)

    build._edge_train_local_batch = True
    TensorFlowTrainer._maybe_symbolic_build = build


def _average_scalar_logs_across_workers() -> None:
    """Let Keras 3 average the per-step logs (loss, metrics) across workers.

    Keras 3.15 reduces each log value with ``strategy.reduce("MEAN", value, axis=0)`` under a
    multi-worker strategy; the logs are scalars, which have no axis 0 ("Invalid reduction
    dimension 0 for input with 0 dimensions"). Averaging over the replicas alone
    (``axis=None``) is what that reduction means for a scalar. Applied once, only by
    :func:`start`; other reductions (``concat`` for ``predict``) are left as they are.
    """
    import tensorflow as tf
    from keras import tree
    from keras.src.backend.tensorflow import trainer

    original = trainer.reduce_per_replica
    if getattr(original, "_edge_train_scalar_mean", False):
        return

    def reduce_per_replica(values, strategy, reduction):
        multi_worker = isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
        if not multi_worker or reduction not in ("auto", "mean"):
            return original(values, strategy, reduction)

        def mean(value):
            if not isinstance(value, tf.distribute.DistributedValues):
                return value
            scalar = all(r.shape.rank == 0 for r in strategy.experimental_local_results(value))
            return strategy.reduce("MEAN", value, axis=None if scalar else 0)

        return tree.map_structure(mean, values)

    reduce_per_replica._edge_train_scalar_mean = True
    trainer.reduce_per_replica = reduce_per_replica


def _stage_backup(folder: Path):
    import keras

    class StageBackup(keras.callbacks.BackupAndRestore):
        """Keeps the backup of a finished stage (a restart skips it) and does not leak the
        restored epoch into the next stage's ``fit`` (Keras keeps it on the model)."""

        def on_train_end(self, logs=None) -> None:
            super().on_train_end(logs)
            self.model._initial_epoch = None

    return StageBackup(str(folder), delete_checkpoint=False)
