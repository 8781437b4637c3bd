"""Watch a folder and classify scans as they arrive, exactly once each, across restarts.

A file is *ready* once its size and modification time have not changed for ``settle`` seconds
(a file whose mtime is already that old is ready when first seen). Ready files are classified in
batches; each batch's JSON-lines records are appended to the output in one write, flushed and
fsync'ed, and only then is the state file (processed ``path, size, mtime_ns``) replaced
atomically. On start both the state file and the output itself are read, so a crash between the
two writes neither duplicates nor loses a record; a half-written last line is cut off and its
file classified again.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from edge_runtime.classifier import Classifier
from edge_runtime.decode import DICOM_SUFFIXES, IMAGE_SUFFIXES
from edge_runtime.output import result_record

log = logging.getLogger(__name__)

WATCH_SUFFIXES = IMAGE_SUFFIXES | DICOM_SUFFIXES
STATE_VERSION = 1


@dataclass(frozen=True)
class WatchOptions:
    """How to watch. ``state`` None means ``<output>.state.json``."""

    directory: Path
    output: Path
    state: Path | None = None
    interval_s: float = 2.0
    settle_s: float = 2.0
    max_batch_files: int = 64
    once: bool = False

    def __post_init__(self) -> None:
        if self.interval_s <= 0:
            raise ValueError(f"interval must be > 0 seconds. Got {self.interval_s} instead.")
        if self.settle_s < 0:
            raise ValueError(f"settle must be >= 0 seconds. Got {self.settle_s} instead.")
        if self.max_batch_files < 1:
            raise ValueError(f"max_batch_files must be >= 1. Got {self.max_batch_files} instead.")

    @property
    def state_path(self) -> Path:
        return self.state or self.output.with_name(self.output.name + ".state.json")


@dataclass(frozen=True)
class WatchSummary:
    """What one watch session did."""

    files: int  # files classified in this session
    records: int  # records appended (one per image or DICOM frame)
    failed: int  # records with an error
    abstained: int
    skipped: int  # files already processed before this session started
    stopped_by_signal: bool


@dataclass(frozen=True)
class _Stat:
    size: int
    mtime_ns: int


def scan(directory: Path) -> Iterator[tuple[str, _Stat]]:
    """Every scan file under ``directory`` (recursively, hidden entries skipped), with its stat."""
    stack = [str(directory)]
    while stack:
        folder = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError as exc:  # vanished or unreadable sub-folder: try again next poll
            log.debug("%s: cannot list: %s", folder, exc)
            continue
        for entry in sorted(entries, key=lambda e: e.name):
            if entry.name.startswith("."):
                continue
            try:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
                elif entry.is_file() and Path(entry.name).suffix.lower() in WATCH_SUFFIXES:
                    st = entry.stat()
                    yield entry.path, _Stat(st.st_size, st.st_mtime_ns)
            except OSError:  # deleted between listing and stat
                continue


class Watcher:
    """Polls a folder and appends one record per new scan (or DICOM frame) to a JSON-lines file.

    Example:
        >>> with Classifier.from_path("model.onnx") as clf:  # doctest: +SKIP
        ...     with Watcher(clf, WatchOptions(Path("incoming"), Path("out.jsonl"))) as watcher:
        ...         summary = watcher.run(stop_event)
    """

    def __init__(
        self,
        classifier: Classifier,
        options: WatchOptions,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not options.directory.is_dir():
            raise FileNotFoundError(
                f"{options.directory}: not a folder. Pass the folder the scans arrive in."
            )
        if not options.output.parent.is_dir():
            raise FileNotFoundError(
                f"{options.output}: its folder {options.output.parent} does not exist. "
                "Create it first."
            )
        self._classifier = classifier
        self._options = options
        self._directory = Path(os.path.abspath(options.directory))
        self._clock = clock
        self._lock = _lock(options.state_path)
        self._processed: dict[str, _Stat | None] = {}
        self._pending: dict[str, tuple[_Stat, float]] = {}  # path -> (stat, first seen)
        try:
            self._load()
        except BaseException:
            self.close()
            raise
        self._skipped_at_start = 0
        self._counts = {"files": 0, "records": 0, "failed": 0, "abstained": 0}

    def close(self) -> None:
        """Release the lock on the state file (another watcher may then take over)."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def __enter__(self) -> Watcher:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    @property
    def processed(self) -> frozenset[str]:
        return frozenset(self._processed)

    def run(self, stop: threading.Event | None = None) -> WatchSummary:
        """Poll until ``stop`` is set (or, with ``once``, until nothing is left to settle)."""
        stop = stop or threading.Event()
        first = True
        while True:
            ready, waiting = self._poll(count_skipped=first)
            first = False
            for start in range(0, len(ready), self._options.max_batch_files):
                self._process(ready[start : start + self._options.max_batch_files])
                if stop.is_set():
                    break
            if stop.is_set() or (self._options.once and not waiting):
                break
            delay = self._options.interval_s
            if self._options.once:
                delay = min(delay, max(self._options.settle_s / 4, 0.05))
            if stop.wait(delay):
                break
        return WatchSummary(
            files=self._counts["files"],
            records=self._counts["records"],
            failed=self._counts["failed"],
            abstained=self._counts["abstained"],
            skipped=self._skipped_at_start,
            stopped_by_signal=stop.is_set(),
        )

    def _poll(self, count_skipped: bool) -> tuple[list[tuple[str, _Stat]], int]:
        now, settle = self._clock(), self._options.settle_s
        ready, seen = [], set()
        for path, stat in scan(self._directory):
            seen.add(path)
            if path in self._processed:
                known = self._processed[path]
                if known is None or known == stat:
                    self._skipped_at_start += int(count_skipped)
                    continue
            previous = self._pending.get(path)
            if previous is None or previous[0] != stat:
                self._pending[path] = (stat, now)
                previous = self._pending[path]
            stable_since = min(previous[1], stat.mtime_ns / 1e9)
            if now - stable_since >= settle:
                ready.append((path, stat))
        for path in list(self._pending):
            if path not in seen:  # deleted before it settled
                del self._pending[path]
        waiting = len(self._pending) - len(ready)
        return sorted(ready), waiting

    def _process(self, batch: list[tuple[str, _Stat]]) -> None:
        lines = []
        for result in self._classifier.iter_classify([path for path, _ in batch]):
            lines.append(json.dumps(result_record(result)) + "\n")
            self._counts["records"] += 1
            self._counts["failed"] += int(not result.ok)
            self._counts["abstained"] += int(result.abstained)
        data = "".join(lines).encode()
        with open(self._options.output, "ab", buffering=0) as out:
            view = memoryview(data)
            while view:
                view = view[out.write(view) :]
            os.fsync(out.fileno())
        for path, stat in batch:
            self._processed[path] = stat
            self._pending.pop(path, None)
        self._counts["files"] += len(batch)
        self._save()
        log.info("%d files classified (%d in this session)", len(batch), self._counts["files"])

    def _load(self) -> None:
        state_path = self._options.state_path
        if state_path.exists():
            try:
                state = json.loads(state_path.read_text())
                for entry in state["processed"]:
                    self._processed[entry["path"]] = _Stat(entry["size"], entry["mtime_ns"])
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(
                    f"{state_path}: not a watch state file ({exc}). Delete it to start over; "
                    "files already in the output are still skipped."
                ) from exc
        for path in _recorded_paths(self._options.output):
            if path not in self._processed:
                self._processed[path] = _stat_or_none(path)
        if self._processed:
            self._save()

    def _save(self) -> None:
        state_path = self._options.state_path
        state = {
            "version": STATE_VERSION,
            "directory": str(self._directory),
            "output": str(self._options.output),
            "processed": [
                {"path": path, "size": stat.size, "mtime_ns": stat.mtime_ns}
                for path, stat in sorted(self._processed.items())
                if stat is not None
            ],
        }
        tmp = state_path.with_name(state_path.name + ".tmp")
        with open(tmp, "w") as handle:
            json.dump(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, state_path)


def _lock(state_path: Path):
    """An exclusive lock beside the state file, so two watchers never share one output."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        return None
    handle = open(state_path.with_name(state_path.name + ".lock"), "a")  # noqa: SIM115
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise ValueError(
            f"{state_path}: another edge-classify watch is using this state file. Stop it "
            "first, or pass a different --output / --state."
        ) from None
    return handle


def _recorded_paths(output: Path) -> set[str]:
    """Paths already in the output; a torn last line (a crash mid-write) is cut off first."""
    if not output.exists():
        return set()
    with open(output, "rb+") as handle:
        data = handle.read()
        end = data.rfind(b"\n") + 1
        if end < len(data):
            log.warning(
                "%s: cutting off an incomplete last record (%d bytes)", output, len(data) - end
            )
            handle.truncate(end)
            data = data[:end]
    paths = set()
    for number, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        try:
            paths.add(json.loads(line)["path"])
        except (ValueError, KeyError, TypeError):
            log.warning("%s:%d: not a result record; ignored", output, number)
    return paths


def _stat_or_none(path: str) -> _Stat | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return _Stat(st.st_size, st.st_mtime_ns)
