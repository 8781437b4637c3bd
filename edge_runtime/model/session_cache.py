"""Optimized graphs kept on disk, so that a cold start does not optimize the model again.

onnxruntime's full graph optimizations (``ORT_ENABLE_ALL``: constant folding, fusions, and the
NCHWc layouts chosen for this CPU) cost most of opening a session: 50-80 ms for the bundled INT8
model on a 2-core host, against 13-18 ms to load the graph they produce with optimizations off.
The first session on a host saves that graph (onnxruntime's ``optimized_model_filepath``); later
ones load it. It is saved in onnxruntime's own ORT format (a flatbuffer) and loaded memory-mapped,
its weights used where they lie in the mapped file: for the bundled two-backbone INT8 model that
opens in 34 ms against 54 ms for the same graph as ONNX protobuf, which is parsed and copied
(medians of 25 fresh processes each, interleaved; outputs identical to the bit). A cached file is
only ever replaced whole (a new file renamed over it), never rewritten in place, so a session that
has it mapped keeps reading the bytes it loaded.

onnxruntime warns that such a graph "may contain hardware specific optimizations, and should
only be used in the same environment the model was optimized in", so the file's name
is a digest of everything it depends on: the model's SHA-256 (its external-data files' too:
:func:`~edge_runtime.model.card.model_digest`), onnxruntime's version, the
CPU's model and feature flags, and the session options that change the graph. A changed model,
onnxruntime or CPU gets a file of its own; nothing is ever read across.

Only CPU sessions are cached (CUDA and TensorRT partition the graph at load, and TensorRT keeps
its own engine cache). The folder is ``$EDGE_CLASSIFY_CACHE`` (``off`` turns caching off), else
``$XDG_CACHE_HOME/edge-classify/sessions``, else ``~/.cache/edge-classify/sessions``. A folder
that cannot be written, or a cached file that does not load, costs one optimization, never the
session.

The folder stays bounded: each time a graph is saved, only the ``MAX_GRAPHS`` most recently used
are kept (a load marks its file used), and the graphs earlier versions kept as ``.onnx``, and
staged files a killed process left, are removed. On a device host that runs a few models this
never removes one in use; one that cycles through many (``adapt`` again and again) pays one
optimization when it comes back to an old one. Only this package's own names are touched, so
``$EDGE_CLASSIFY_CACHE`` may name a folder shared with other files.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import platform
import re
import time
from pathlib import Path

import onnxruntime as ort

log = logging.getLogger(__name__)

CACHE_ENV = "EDGE_CLASSIFY_CACHE"
CACHE_OFF = ("off", "0", "")
CPUINFO = Path("/proc/cpuinfo")
CPU_ONLY = ["CPUExecutionProvider"]
MAX_GRAPHS = 16  # the bundled pair at 1 and at all threads, with room for a dozen more
STALE_PART_S = 3600.0  # a staged file this old was left by a process that died while saving
GRAPH_NAME = re.compile(r"[0-9a-f]{32}\.ort")
OLD_GRAPH_NAME = re.compile(r"[0-9a-f]{32}\.onnx")  # before ORT format
PART_NAME = re.compile(r"tmp\w+\.(ort|onnx)\.part")  # tempfile.mkstemp's names
SAVE_ORT_FORMAT = {"session.save_model_format": "ORT"}
LOAD_MAPPED_ORT_FORMAT = {
    "session.load_model_format": "ORT",
    "session.use_memory_mapped_ort_model": "1",
    "session.use_ort_model_bytes_directly": "1",
    "session.use_ort_model_bytes_for_initializers": "1",
}


def cache_dir() -> Path | None:
    """The folder optimized graphs are kept in; None when ``$EDGE_CLASSIFY_CACHE`` is ``off``."""
    chosen = os.environ.get(CACHE_ENV)
    if chosen is not None:
        return None if chosen.strip().lower() in CACHE_OFF else Path(chosen)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "edge-classify" / "sessions"


@functools.cache
def host_identity(cpuinfo: Path = CPUINFO) -> str:
    """This CPU as the optimized graph depends on it: its model name and feature flags (from
    ``/proc/cpuinfo`` where there is one), the machine type, and onnxruntime's version."""
    try:
        lines = cpuinfo.read_text().splitlines()
    except OSError:
        lines = []
    wanted = ("model name", "flags", "Features", "CPU part")  # x86, then ARM's names
    cpu = sorted({line for line in lines if line.split(":")[0].strip() in wanted})
    return "\n".join([ort.__version__, platform.machine(), *cpu])  # (processor() may fork)


def cached_graph_path(directory: Path, model_sha256: str, options: ort.SessionOptions) -> Path:
    """Where the optimized graph of this model, host and options is kept."""
    key = "\n".join(
        [
            model_sha256,
            host_identity(),
            str(options.graph_optimization_level),
            str(options.intra_op_num_threads),
        ]
    )
    return directory / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.ort"


def load_cached_session(
    path: Path,
    model_sha256: str,
    options: ort.SessionOptions,
    providers: list[str],
    create,
) -> ort.InferenceSession | None:
    """The session of ``path``'s optimized graph kept for ``model_sha256``; None where none is
    kept (or caching does not apply, or the kept file does not load). Never optimizes or saves:
    the caller may pass a SHA-256 it has not yet checked against the file (the card's), as long
    as it checks it before using the session.

    Args: as :func:`create_cached_session`.
    """
    directory = _cache_for(options, providers)
    if directory is None:
        return None
    cached = cached_graph_path(directory, model_sha256, options)
    if not cached.is_file():
        return None
    fast = _copy(options, LOAD_MAPPED_ORT_FORMAT)
    fast.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        session = create(cached, fast, providers)
    except Exception as exc:  # a damaged cache file: the caller optimizes again
        log.debug("%s: cached graph %s did not load (%s); optimizing again", path, cached, exc)
        return None
    with contextlib.suppress(OSError):  # a read-only cache still serves
        os.utime(cached)  # used now: kept the longest when the folder is pruned
    return session


def create_cached_session(
    path: Path,
    model_sha256: str,
    options: ort.SessionOptions,
    providers: list[str],
    create,
) -> ort.InferenceSession:
    """A session for ``path``, from its cached optimized graph where there is one; else
    optimized now, and the optimized graph saved for the next.

    Args:
        path: the model file.
        model_sha256: its SHA-256 (hex; :func:`~edge_runtime.model.card.model_digest` for a
            model with external-data files), checked: a graph is saved under this name.
        options: the session options (full optimizations, for caching to apply).
        providers: onnxruntime provider names; caching applies to ``["CPUExecutionProvider"]``.
        create: ``create(path, options, providers) -> InferenceSession``, how a session is made.

    Returns:
        The session; its metadata and outputs are the model's own (the optimized graph keeps
        them).
    """
    session = load_cached_session(path, model_sha256, options, providers, create)
    if session is not None:
        return session
    directory = _cache_for(options, providers)
    if directory is None:
        return create(path, options, providers)
    cached = cached_graph_path(directory, model_sha256, options)
    import tempfile  # only when a graph is saved: a shorter cold start

    try:
        directory.mkdir(parents=True, exist_ok=True)
        handle, staged = tempfile.mkstemp(dir=directory, suffix=".ort.part")
        os.close(handle)
    except OSError as exc:
        log.debug("%s: no optimized graph kept (%s: %s)", path, directory, exc)
        return create(path, options, providers)
    saving = _copy(options, SAVE_ORT_FORMAT)
    saving.optimized_model_filepath = staged
    try:
        session = create(path, saving, providers)
        os.replace(staged, cached)  # whole, or not at all: a reader never sees half a file
    except OSError as exc:
        log.debug("%s: no optimized graph kept (%s)", path, exc)
        Path(staged).unlink(missing_ok=True)
        return create(path, options, providers)
    except Exception:
        Path(staged).unlink(missing_ok=True)
        raise
    prune(directory, MAX_GRAPHS)
    return session


def prune(directory: Path, max_graphs: int = MAX_GRAPHS) -> list[Path]:
    """Remove from ``directory`` all but the ``max_graphs`` most recently used graphs, every
    graph an earlier version kept as ``.onnx``, and staged files older than ``STALE_PART_S``;
    files with other names are left alone. A removed graph that a running session has mapped
    stays readable to it (POSIX unlink). Returns the files removed; one that cannot be removed
    is skipped.
    """
    now = time.time()
    graphs, removable = [], []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return []
    for entry in entries:
        try:
            if not entry.is_file(follow_symlinks=False):
                continue
            used = entry.stat(follow_symlinks=False).st_mtime
        except OSError:
            continue
        if GRAPH_NAME.fullmatch(entry.name):
            graphs.append((used, entry.path))
        elif OLD_GRAPH_NAME.fullmatch(entry.name) or (
            PART_NAME.fullmatch(entry.name) and now - used > STALE_PART_S
        ):
            removable.append(entry.path)
    graphs.sort(reverse=True)
    removable += [path for _, path in graphs[max_graphs:]]
    removed = []
    for path in removable:
        try:
            os.unlink(path)
        except OSError as exc:
            log.debug("%s: not removed from the cache (%s)", path, exc)
            continue
        removed.append(Path(path))
    if removed:
        log.debug("%s: removed %d cached file(s)", directory, len(removed))
    return removed


def _cache_for(options: ort.SessionOptions, providers: list[str]) -> Path | None:
    """The cache folder, where caching applies to these options and providers."""
    directory = cache_dir()
    full = options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return directory if directory is not None and providers == CPU_ONLY and full else None


def _copy(options: ort.SessionOptions, config: dict[str, str]) -> ort.SessionOptions:
    """A new ``SessionOptions`` with the fields this package sets (onnxruntime's options cannot
    be copied) and the session config entries ``config``."""
    copy = ort.SessionOptions()
    for key, value in config.items():
        copy.add_session_config_entry(key, value)
    copy.graph_optimization_level = options.graph_optimization_level
    copy.intra_op_num_threads = options.intra_op_num_threads
    copy.inter_op_num_threads = options.inter_op_num_threads
    copy.log_severity_level = options.log_severity_level
    return copy
