"""The node's JSON-lines results: ``edge-classify --format jsonl`` records plus DICOM UIDs.

Every record of one instance (one per image or frame, and a cine's summary) is appended in one
write and fsynced before the instance's ``done`` marker is written (:mod:`.spool`). So on start
only the last instance in the file can lack its marker (a crash between the two): its lines are
cut off here, and it is answered again, which writes them once.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

UID_FIELD = "sop_instance_uid"


class Journal:
    """Appends records to a JSON-lines file, grouped by SOP Instance UID (see the module)."""

    def __init__(self, path: Path, *, is_done: Callable[[str], bool]) -> None:
        """Open ``path`` (created if missing) and cut off a trailing instance not marked done.

        Args:
            path: the JSON-lines file.
            is_done: whether an instance's ``done`` marker exists.

        Raises:
            OSError: the file cannot be read or written, naming it.
        """
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._repair(is_done)

    def _repair(self, is_done: Callable[[str], bool]) -> None:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            self.path.touch()
            return
        keep = data.rfind(b"\n") + 1  # a half-written last line goes
        lines = data[:keep].splitlines(keepends=True)
        cut = keep
        for line in reversed(lines):
            try:
                uid = json.loads(line).get(UID_FIELD)
            except ValueError:
                uid = None
            if uid is None or is_done(uid):
                break
            cut -= len(line)
        if cut != len(data):
            log.warning(
                "%s: cut %d bytes of records whose instance was not committed before the node "
                "stopped; it is answered again",
                self.path,
                len(data) - cut,
            )
            with open(self.path, "r+b") as handle:
                handle.truncate(cut)
                handle.flush()
                os.fsync(handle.fileno())

    def append(self, records: Iterable[Mapping[str, Any]]) -> None:
        """Append one instance's records in one write, flushed and fsynced.

        Raises:
            OSError: naming the file.
        """
        text = "".join(json.dumps(dict(record)) + "\n" for record in records)
        with self._lock:
            try:
                with open(self.path, "a", encoding="utf-8") as handle:
                    handle.write(text)
                    handle.flush()
                    os.fsync(handle.fileno())
            except OSError as exc:
                raise OSError(f"{self.path}: could not append ({exc.strerror or exc})") from exc
