"""Watch a folder and classify scans as they arrive, exactly once each, across restarts.

A file is *ready* once its size and modification time have not changed for ``settle`` seconds
(a file whose mtime is already that old is ready when first seen). Ready files are classified in
batches; each batch's JSON-lines records are appended to the output in one write, flushed and
fsync'ed, and only then is the state file (processed ``path, size, mtime_ns``) replaced
atomically. On start both the state file and the output itself are read, so a crash between the
two writes neither duplicates nor loses a record; a half-written last line is cut off and its
file classified again.

Which files are scans is decided as everywhere else (:func:`edge_runtime.io.sources.is_scan_file`:
suffix, or the first bytes, so DICOM files named ``IMG0001`` or by a bare UID are seen; hidden
and temporary names such as a storage node's ``<uid>.part`` are not, until renamed), and folders
are walked as everywhere else (:func:`edge_runtime.io.sources.walk_entries`): links to folders
are followed once, a file reached under two names is classified once (said once on stderr), a
link that leads nowhere (dangling, or a loop) gets its error record, and a folder that cannot be
listed is named on stderr and gets an error record (``folder cannot be listed: permission
denied``) once it has stayed so for ``error_hold_s``, or when the watcher stops. A file left out
is named with the reason (``not taken as a scan: ...``) when it is first seen or changes.

Nothing is written to a file that is not watch's own: before anything is read or written,
:func:`check_files` refuses (``ValueError``, exit status 2) an output that is a scan, would be
taken for one (a scan's name), or is not a JSON-lines results file, and a state file that is not
a watch state file or is the output itself.

A file's records describe the whole file, once. Its size and modification time are checked again
after it was read: a file that changed during the read is not recorded, and is read again once
it settles. A file with any error record (a cine copied in with a stall longer than ``settle``
decodes its first frames, then fails) is not recorded at once either: if it changes it is tried
again, so it ends with one set of records, its final ones. Its records are written once it has
stayed unchanged for ``error_hold_s``, or when the watcher stops; a file that is deleted or
renamed meanwhile gets none (its new name is a new file).
"""

from __future__ import annotations

import json
import logging
import os
import stat as stat_mode
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from edge_runtime.app.output import result_record
from edge_runtime.classifier import Classifier, Failure, Result
from edge_runtime.io import own_images
from edge_runtime.io.decode import display_path, sniff
from edge_runtime.io.sources import (
    SCAN_SUFFIXES,
    Taken,
    file_head,
    is_scan_file,
    log_skipped,
    real_key,
    unlisted_reason,
    walk_entries,
)
from edge_runtime.io.video import sniff_video
from edge_runtime.postprocess.summary import FileSummary, with_summaries

log = logging.getLogger(__name__)

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
    error_hold_s: float | None = None  # None: 10 x settle, at least 30 s

    def __post_init__(self) -> None:
        if self.interval_s <= 0:
            raise ValueError(f"interval must be > 0 seconds. Got {self.interval_s} instead.")
        if self.settle_s < 0:
            raise ValueError(f"settle must be >= 0 seconds. Got {self.settle_s} instead.")
        if self.max_batch_files < 1:
            raise ValueError(f"max_batch_files must be >= 1. Got {self.max_batch_files} instead.")
        if self.error_hold_s is not None and self.error_hold_s < 0:
            raise ValueError(f"error_hold_s must be >= 0. Got {self.error_hold_s} instead.")
        check_files(self)  # before a model loads; the Watcher checks again before it starts

    @property
    def hold_s(self) -> float:
        """How long a file that failed must stay unchanged before its error is recorded."""
        return max(10 * self.settle_s, 30.0) if self.error_hold_s is None else self.error_hold_s

    @property
    def state_path(self) -> Path:
        return self.state or self.output.with_name(self.output.name + ".state.json")


@dataclass(frozen=True)
class WatchSummary:
    """What one watch session did."""

    files: int  # files classified in this session
    records: int  # records appended, one per image or frame (multi-frame summaries not counted)
    summaries: int  # file-summary records appended, one per multi-frame file
    failed: int  # records with an error
    abstained: int
    skipped: int  # files already processed before this session started
    stopped_by_signal: bool


@dataclass(frozen=True)
class _Stat:
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class _Held:
    """A file with an error record, waiting to change or to be written."""

    stat: _Stat
    results: list[Result]
    since: float


def scan(
    directory: Path,
    known: dict[str, tuple[_Stat, bool]] | None = None,
    *,
    unlisted: dict[str, str] | None = None,
    said: set[str] | None = None,
) -> Iterator[tuple[str, _Stat]]:
    """Every scan file under ``directory`` with its stat: recursive, sorted, hidden folders
    skipped, links to folders followed once, each real file once (its first name), as
    :func:`edge_runtime.io.sources.walk_entries` walks folders for ``edge-classify PATH...``.

    A link that leads nowhere (dangling, or a loop) is a scan whatever its name, with the link's
    own stat, so that its record says what it is.

    Args:
        directory: the folder.
        known: path -> (stat, is a scan) from earlier polls, updated here, so that a file whose
            name says nothing is read (sniffed) again, and a file left out is named on stderr
            again, only when it changes.
        unlisted: filled with folder -> reason for each folder that cannot be listed.
        said: names already reported as another name of a file taken (kept across polls, so
            that each is said once).
    """
    known = {} if known is None else known
    taken = Taken(said)

    def note_unlisted(folder: str, exc: OSError) -> None:
        if unlisted is None:
            log.warning("%s: %s", display_path(folder), unlisted_reason(exc))
        else:
            unlisted[folder] = unlisted_reason(exc)

    for entry in walk_entries(directory, note_unlisted):
        st = _entry_stat(entry)
        if st is None:  # deleted between listing and stat
            continue
        stat = _Stat(st.st_size, st.st_mtime_ns)
        seen = known.get(entry.path)
        if seen is None or seen[0] != stat:
            seen = known[entry.path] = (stat, is_scan_file(entry.path))
            if not seen[1]:
                log_skipped(entry.path)
        if seen[1] and taken.add(entry.path):
            yield entry.path, stat


def _entry_stat(entry: os.DirEntry) -> os.stat_result | None:
    """The stat of the file an entry leads to; a link that leads nowhere, its own."""
    try:
        return entry.stat()
    except OSError:
        pass
    try:
        return entry.stat(follow_symlinks=False) if entry.is_symlink() else None
    except OSError:
        return None


def check_files(options: WatchOptions) -> None:
    """Refuse, before anything is read or written, the files watch would write when they are not
    its own: an output that is a scan (or anything the watcher would take as input), or an
    existing file that is not a JSON-lines results file; a state file that is a scan, is not a
    watch state file, or is the output itself.

    Raises:
        ValueError: which file, and why (``edge-classify watch`` exits 2 with it).
    """
    output, state = options.output, options.state_path
    state_flag = "--state" if options.state is not None else "the state file"
    for flag, path, instead in (
        ("--output", output, "another file, such as results.jsonl"),
        (state_flag, state, "another --state, such as results.jsonl.state.json"),
    ):
        if not _taken_as_scan(path):
            continue
        if os.path.exists(path):
            what = _looks_like(path) or f"named {os.path.splitext(path)[1]}"
            why = f"is a scan ({what}); writing there would change it"
        else:
            why = (
                f"a scan's name ({os.path.splitext(path)[1]}); edge-classify and watch would "
                "take the file for a scan"
            )
        raise ValueError(
            f"{flag} {display_path(path)}: {why}. Nothing was read or written. Give {instead}."
        )
    if real_key(state) == real_key(output):
        raise ValueError(
            f"{state_flag} {display_path(state)}: the same file as --output; the state would "
            "replace the records. Nothing was read or written. Give each its own file."
        )
    if why := _not_results_file(output):
        raise ValueError(
            f"--output {display_path(output)}: not a results file of edge-classify ({why}); "
            "watch appends its records and cuts off an unfinished last line, which would change "
            "it. Nothing was read or written. Give a new file or a JSON-lines results file, "
            "such as results.jsonl."
        )
    if why := _not_state_file(state):
        raise ValueError(
            f"{state_flag} {display_path(state)}: not a watch state file ({why}); watch replaces "
            "its state file. Nothing was read or written. Give another --state."
        )
    temporary = state.with_name(state.name + ".tmp")  # written, then renamed over the state
    if kind := _looks_like(temporary):
        raise ValueError(
            f"{display_path(temporary)}: is {kind}; watch writes its state there first. Nothing "
            "was read or written. Move it, or give another --state."
        )


_FIRST_LINE_BYTES = 1 << 16
_RECORD_KEYS = frozenset({"path", "label", "error"})


def _taken_as_scan(path: Path) -> bool:
    """Whether the file at ``path`` is, or once written would be, taken for a scan."""
    if os.path.lexists(path) and not os.path.exists(path):  # a link that leads nowhere
        return os.path.splitext(path)[1].lower() in SCAN_SUFFIXES  # its name decides
    return is_scan_file(path)


def _looks_like(path: Path) -> str | None:
    """What an existing file's first bytes show it is, when it is an image, DICOM or video
    file; None for anything else (and for paths that lead nowhere)."""
    head = file_head(path)
    if written := own_images.written_kind(head):
        return own_images.describe(written)
    kind = sniff(head)
    if kind == "dicom":
        return "a DICOM file"
    if kind is not None:
        return f"a {kind.upper()} image"
    if head.startswith(b"GIF8"):
        return "a GIF image"
    video = sniff_video(head)
    return None if video is None else f"a video ({video})"


def _not_regular(path: Path) -> str | None:
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return None  # missing (created when written), or unreadable: the write says so
    if stat_mode.S_ISDIR(mode):
        return "a folder"
    return None if stat_mode.S_ISREG(mode) else "not a regular file"


def _not_results_file(path: Path) -> str | None:
    """Why an existing file is not a JSON-lines results file (its first record, or the start of
    one a crash cut off, as edge-classify writes them); None for one, an empty or a missing
    file."""
    if why := _not_regular(path):
        return why
    if kind := _looks_like(path):
        return f"it is {kind}"
    head = file_head(path, _FIRST_LINE_BYTES)
    text = head.lstrip(b" \t\r\n")
    if not text:
        return None
    line, newline, _ = text.partition(b"\n")
    if not newline:  # one record, cut off by a crash as it was written
        whole = len(head) < _FIRST_LINE_BYTES and text.startswith(b'{"path": ')
        return None if whole else "its first line is not a JSON result record"
    try:
        record = json.loads(line)
    except ValueError:
        return "its first line is not a JSON result record"
    if not isinstance(record, dict) or not record.keys() >= _RECORD_KEYS:
        return "its first line is not a JSON result record"
    return None


def _not_state_file(path: Path) -> str | None:
    """Why an existing file is not a watch state file (as :meth:`Watcher._save` writes them);
    None for one, or a missing file. A damaged state file is reported when it is read."""
    if why := _not_regular(path):
        return why
    if kind := _looks_like(path):
        return f"it is {kind}"
    head = file_head(path, 64)
    if head and not head.lstrip().startswith(b'{"version": '):
        return "it does not start as one"
    return None


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
        check_files(options)  # before the lock, the state and the output are touched
        self._classifier = classifier
        self._options = options
        self._directory = Path(os.path.abspath(options.directory))
        self._clock = clock
        self._lock = _lock(options.state_path)
        # keys: display_path(path), the form records carry (names that are not UTF-8 escaped)
        self._processed: dict[str, _Stat | None] = {}
        self._pending: dict[str, tuple[_Stat, float]] = {}  # path -> (stat, first seen)
        self._failed: dict[str, _Held] = {}  # path -> records of a failure not yet written
        self._known: dict[str, tuple[_Stat, bool]] = {}  # path -> (stat, is a scan)
        self._said: set[str] = set()  # names said to be another name of a file taken
        self._unlisted: set[str] = set()  # folders that could not be listed at the last poll
        self._folders: set[str] = set()  # keys of folders with an error record held or written
        try:
            self._load()
        except BaseException:
            self.close()
            raise
        self._skipped_at_start = 0
        self._counts = {"files": 0, "records": 0, "summaries": 0, "failed": 0, "abstained": 0}

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
        self._commit_failures(list(self._failed))  # the last state of each failed file
        return WatchSummary(
            files=self._counts["files"],
            records=self._counts["records"],
            summaries=self._counts["summaries"],
            failed=self._counts["failed"],
            abstained=self._counts["abstained"],
            skipped=self._skipped_at_start,
            stopped_by_signal=stop.is_set(),
        )

    def _poll(self, count_skipped: bool) -> tuple[list[tuple[str, _Stat]], int]:
        now, settle = self._clock(), self._options.settle_s
        ready, seen, expired = [], set(), []
        seen_keys = set()
        unlisted: dict[str, str] = {}
        for path, stat in scan(self._directory, self._known, unlisted=unlisted, said=self._said):
            key = display_path(path)
            seen.add(path)
            seen_keys.add(key)
            if key in self._processed:
                known = self._processed[key]
                if known is None or known == stat:
                    self._skipped_at_start += int(count_skipped)
                    continue
            held = self._failed.get(key)
            if held is not None:
                if held.stat == stat:
                    if now - held.since >= self._options.hold_s:
                        expired.append(key)
                    continue
                del self._failed[key]  # it changed: try again once it settles
            previous = self._pending.get(path)
            if previous is None or previous[0] != stat:
                self._pending[path] = (stat, now)
                previous = self._pending[path]
            stable_since = min(previous[1], stat.mtime_ns / 1e9)
            if now - stable_since >= settle:
                ready.append((path, stat))
        for folder, reason in unlisted.items():
            key = display_path(folder)
            seen_keys.add(key)
            if folder not in self._unlisted:  # said once, until it can be listed again
                log.warning("%s: %s; its scans are not seen until it can be listed", key, reason)
            if key in self._processed:  # its error record is written
                continue
            stat = _stat_or_none(folder)
            held = self._failed.get(key)
            if held is None or held.stat != stat:
                failure = Failure(source=folder, error=reason, **self._model_fields)
                self._failed[key] = _Held(stat, [failure], now)
                self._folders.add(key)
            elif now - held.since >= self._options.hold_s:
                expired.append(key)
        self._unlisted = set(unlisted)
        for path in list(self._pending):
            if path not in seen:  # deleted before it settled
                del self._pending[path]
        for key in [key for key in self._failed if key not in seen_keys]:
            if key in self._folders:
                log.info("%s: can be listed now; no error record", key)
            else:
                log.info("%s: deleted or renamed before its error was recorded; no record", key)
            del self._failed[key]
        for path in list(self._known):
            if path not in seen and not os.path.lexists(path):
                del self._known[path]
        self._commit_failures(expired)
        waiting = len(self._pending) - len(ready)
        if not self._options.once:
            waiting += len(self._failed)
        return sorted(ready), waiting

    @property
    def _model_fields(self) -> dict[str, str]:
        """:attr:`~edge_runtime.classifier.Classifier.model_fields` (none from a stand-in
        classifier that lacks them)."""
        return getattr(self._classifier, "model_fields", {})

    def _process(self, batch: list[tuple[str, _Stat]]) -> None:
        by_path: dict[str, list[Result]] = {path: [] for path, _ in batch}
        for result in self._classifier.iter_classify(list(by_path)):
            by_path.setdefault(result.source, []).append(result)
        now, written = self._clock(), []
        for path, stat in batch:
            self._pending.pop(path, None)
            results = by_path.get(path, [])
            after = _stat_or_none(path)
            if after != stat:  # it changed while it was read: read it again once it settles
                log.info("%s: changed while it was read; read again", display_path(path))
                if after is not None:
                    self._pending[path] = (after, now)
                continue
            if not all(r.ok for r in results):  # recorded once it stops changing
                self._failed[display_path(path)] = _Held(stat, results, now)
            else:
                written.append((display_path(path), stat, results))
        self._append(written)

    def _commit_failures(self, keys: list[str]) -> None:
        held = [(key, self._failed.pop(key)) for key in keys if key in self._failed]
        self._append([(key, h.stat, h.results) for key, h in held])

    def _append(self, done: list[tuple[str, _Stat, list[Result]]]) -> None:
        """Append the records of finished files (fsync'ed), then remember them in the state."""
        if not done:
            return
        lines = []
        for _, _, results in done:
            for result in with_summaries(results):
                lines.append(json.dumps(result_record(result)) + "\n")
                if isinstance(result, FileSummary):
                    self._counts["summaries"] += 1
                    continue
                self._counts["records"] += 1
                self._counts["failed"] += int(not result.ok)
                self._counts["abstained"] += int(result.ok and result.abstained)
        data = "".join(lines).encode()
        with open(self._options.output, "ab", buffering=0) as out:
            view = memoryview(data)
            while view:
                view = view[out.write(view) :]
            os.fsync(out.fileno())
        for key, stat, _ in done:
            self._processed[key] = stat
        self._counts["files"] += sum(key not in self._folders for key, _, _ in done)
        self._save()
        log.info("%d files classified (%d in this session)", len(done), self._counts["files"])

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
    """The stat of the file ``path`` leads to; a link that leads nowhere, its own; None when
    there is nothing there."""
    try:
        st = os.stat(path)
    except OSError:
        try:
            st = os.lstat(path)
        except OSError:
            return None
        if not stat_mode.S_ISLNK(st.st_mode):
            return None
    return _Stat(st.st_size, st.st_mtime_ns)
