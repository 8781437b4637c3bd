"""The node's spool: received instances on disk, keyed by SOP Instance UID, processed exactly once.

Layout under the spool folder::

    tmp/                      files being written (never read; cleared at start)
    received/<uid>.dcm        acknowledged, not yet answered
    done/<uid>.json           answered: the commit point of one instance (its answer files)
    failed/<uid>.dcm, .json   could not be answered, for good (the instance, and why)

:meth:`Spool.store` writes an instance with its file meta to ``tmp/``, fsyncs it, renames it into
``received/`` and fsyncs the folder: only then may the C-STORE response say success. An instance
whose UID is already received or done is a re-sent duplicate: it is acknowledged and not stored
again. The worker answers an instance, then :meth:`Spool.commit` writes its ``done`` marker
(fsync + rename) and removes it from ``received/``; after a crash, what is still in ``received/``
without a marker is answered again, and nothing with one is. An instance that can never be
answered (a permanent error, recorded in the JSON lines) is moved to ``failed/`` by
:meth:`Spool.fail`, beside the reason, and marked done: it is not tried again.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

UID_PATTERN = re.compile(r"^[0-9]+(\.[0-9]+)*$")
MAX_UID_CHARS = 64


class StoreOutcome:
    """What :meth:`Spool.store` did with an instance."""

    STORED = "stored"
    DUPLICATE = "duplicate"


def check_uid(uid: str) -> str:
    """Return ``uid`` when it is a valid DICOM UID (digits and dots, at most 64 characters).

    Raises:
        ValueError: it is not; the message names the value.
    """
    uid = str(uid).strip().rstrip("\x00")
    if not (uid and len(uid) <= MAX_UID_CHARS and UID_PATTERN.match(uid)):
        raise ValueError(
            f"SOP Instance UID must be digits and dots, at most {MAX_UID_CHARS} characters. "
            f"Got {uid[:80]!r} instead."
        )
    return uid


def write_atomic(
    path: Path, data: bytes, *, staging: Path | None = None, sync_folder: bool = True
) -> None:
    """Write ``data`` to ``path`` durably: a temporary file (beside it, or in ``staging`` on the
    same file system), fsync, rename, and fsync the folder unless the caller does that once for a
    batch (``sync_folder=False``). A reader sees the old file or the whole new one, never a part.

    Raises:
        OSError: naming ``path``.
    """
    temporary = (staging or path.parent) / f".{path.name}.{uuid.uuid4().hex}.tmp"
    try:
        with open(temporary, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
        if sync_folder:
            fsync_dir(path.parent)
    except OSError as exc:
        temporary.unlink(missing_ok=True)
        raise OSError(f"{path}: could not be written ({exc.strerror or exc})") from exc


def fsync_dir(folder: Path) -> None:
    """fsync a folder, so that a rename in it survives a power cut."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


@dataclass(frozen=True)
class Received:
    """An acknowledged instance waiting for its answers."""

    uid: str
    path: Path
    received_at: float  # time.time() when it was stored (its file's mtime after a restart)


class Spool:
    """Received instances on disk, and which of them are answered (see the module docstring).

    Thread-safe: associations store from their own threads while the worker takes and commits.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.tmp, self.received, self.done, self.failed = (
            self.root / n for n in ("tmp", "received", "done", "failed")
        )
        for folder in (self.tmp, self.received, self.done, self.failed):
            folder.mkdir(parents=True, exist_ok=True)
        for stale in self.tmp.iterdir():  # half-written before a crash: never acknowledged
            stale.unlink(missing_ok=True)
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)
        self._taken: set[str] = set()
        # what waits in received/, oldest first: listed once here, then kept by store() and
        # take(), so that taking never lists the folder again
        self._waiting: dict[str, Received] = {item.uid: item for item in self._listed()}

    def store(self, uid: str, data: bytes) -> str:
        """Store one instance durably (returns before the C-STORE response is sent).

        Args:
            uid: its SOP Instance UID (checked: it names the file).
            data: the instance encoded with its file meta (Part 10).

        Returns:
            :attr:`StoreOutcome.STORED`, or :attr:`StoreOutcome.DUPLICATE` when that UID was
            already received or answered (nothing is written then).

        Raises:
            ValueError: the UID is not a valid UID.
            OSError: the spool could not be written (disk full, say), naming the file.
        """
        uid = check_uid(uid)
        final = self.received / f"{uid}.dcm"
        if final.exists() or (self.done / f"{uid}.json").exists():
            return StoreOutcome.DUPLICATE
        write_atomic(final, data, staging=self.tmp)
        with self._arrived:
            self._waiting.setdefault(uid, Received(uid, final, time.time()))
            self._arrived.notify_all()
        return StoreOutcome.STORED

    def _listed(self) -> list[Received]:
        """What ``received/`` holds, oldest first (read at start only)."""
        items = []
        for path in self.received.glob("*.dcm"):
            try:
                items.append(Received(path.stem, path, path.stat().st_mtime))
            except FileNotFoundError:
                continue
        return sorted(items, key=lambda item: (item.received_at, item.uid))

    def pending(self) -> list[Received]:
        """Received instances not yet answered nor taken, oldest first."""
        with self._lock:
            return [item for uid, item in self._waiting.items() if uid not in self._taken]

    def take(self, limit: int, timeout_s: float) -> list[Received]:
        """Up to ``limit`` instances to answer, waiting up to ``timeout_s`` for one to arrive
        (woken by :meth:`store`, never by polling the folder).

        An instance already answered (its marker written before a crash removed it from
        ``received/``) is cleaned up here, not handed out again.
        """
        deadline = time.monotonic() + timeout_s
        with self._arrived:
            while True:
                items = []
                for uid, item in list(self._waiting.items()):
                    if uid in self._taken:
                        continue
                    if self.is_done(uid):
                        item.path.unlink(missing_ok=True)
                        del self._waiting[uid]
                        continue
                    items.append(item)
                    if len(items) == limit:
                        break
                if items:
                    self._taken.update(item.uid for item in items)
                    return items
                left = deadline - time.monotonic()
                if left <= 0:
                    return []
                self._arrived.wait(left)

    def release(self, uid: str) -> None:
        """Hand an instance back (its answering failed; it stays in ``received/``)."""
        with self._lock:
            self._taken.discard(uid)

    def is_done(self, uid: str) -> bool:
        return (self.done / f"{uid}.json").exists()

    def done_record(self, uid: str) -> Mapping[str, Any] | None:
        """What :meth:`commit` recorded for ``uid``; None when it is not done."""
        try:
            return json.loads((self.done / f"{uid}.json").read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None

    def commit(self, uid: str, record: Mapping[str, Any]) -> None:
        """Mark ``uid`` answered (durably), then drop its received file.

        Raises:
            OSError: the marker could not be written (the instance stays received).
        """
        write_atomic(self.done / f"{uid}.json", json.dumps(record).encode())
        (self.received / f"{uid}.dcm").unlink(missing_ok=True)
        with self._lock:
            self._taken.discard(uid)
            self._waiting.pop(uid, None)

    def fail(self, uid: str, reason: Mapping[str, Any]) -> None:
        """Give up on ``uid`` for good (its error record is already in the JSON lines): keep
        the instance as ``failed/<uid>.dcm`` with ``reason`` beside it (``failed/<uid>.json``),
        mark it done, and drop its received file. A crash before the marker leaves it received:
        it is tried again and moved here again.

        Raises:
            OSError: a file could not be written (the instance stays received).
        """
        source = self.received / f"{uid}.dcm"
        write_atomic(
            self.failed / f"{uid}.json", json.dumps(reason, indent=1).encode(), sync_folder=False
        )
        if source.exists():
            link = self.tmp / f"{uid}.{uuid.uuid4().hex}.dcm"
            try:
                os.link(source, link)
                os.replace(link, self.failed / f"{uid}.dcm")
            except OSError as exc:
                link.unlink(missing_ok=True)
                raise OSError(f"{source}: could not be moved to {self.failed} ({exc})") from exc
        fsync_dir(self.failed)
        self.commit(uid, {"answers": [], "forward": [], "failed": reason.get("error")})

    def counts(self) -> dict[str, int]:
        """Instances received (waiting), done (answered or failed) and failed, for status lines."""
        return {
            "received": sum(1 for _ in self.received.glob("*.dcm")),
            "done": sum(1 for _ in self.done.glob("*.json")),
            "failed": sum(1 for _ in self.failed.glob("*.json")),
        }
