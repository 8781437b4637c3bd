"""Forwarding answers to a PACS by C-STORE, from a queue on disk that loses nothing.

The queue is a folder: ``<name>.dcm.<source uid>.pending`` while its instance is being committed,
``<name>.dcm``
once it may be sent (:meth:`Outbox.promote`), removed when the PACS answered success (or a
warning). One association carries every queued file it can (a batch), so a burst costs one
association, not one per answer. Told apart:

- **down**: no association (connection refused, timed out, association rejected or aborted): the
  files stay queued and the next try waits, doubling from ``retry_min_s`` up to ``retry_max_s``.
- **rejected**: the PACS answered a failure status (0xA7xx out of resources, 0xA9xx data set does
  not match the SOP class, 0xC2xx cannot understand, or another): retrying cannot help, so the
  file moves to ``rejected/`` with the status beside it (``<uid>.dcm.json``), and is logged; move
  it back into the queue to send it again.

Files that are sent can be sent again after a crash between the PACS's answer and the removal:
their UIDs are derived from the source's (:mod:`.answers`), so the PACS receives the same
instance, which it stores once.
"""

from __future__ import annotations

import json
import logging
import re
import ssl
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_runtime.node.spool import fsync_dir, write_atomic

log = logging.getLogger(__name__)

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.33"  # Comprehensive SR
SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"  # Segmentation
_DESTINATION = re.compile(r"^(?P<ae>[^@]{1,16})@(?P<host>[^:@]+|\[[0-9a-fA-F:]+\]):(?P<port>\d+)$")


@dataclass(frozen=True)
class Destination:
    """A PACS to send to: ``AE@HOST:PORT``."""

    ae_title: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Destination:
        """``AE@HOST:PORT`` -> a destination.

        Raises:
            ValueError: not of that form, or a port outside 1..65535.
        """
        match = _DESTINATION.match(text.strip())
        port = int(match["port"]) if match else 0
        if match is None or not 1 <= port <= 65535:
            raise ValueError(
                f"--forward must be AE@HOST:PORT (an AE title of at most 16 characters, a port "
                f"from 1 to 65535), e.g. PACS@10.0.0.5:104. Got {text!r} instead."
            )
        return cls(match["ae"].strip(), match["host"].strip("[]"), port)

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


@dataclass(frozen=True)
class ForwardOptions:
    """How to forward. Seconds throughout."""

    destination: Destination
    calling_ae_title: str = "EDGE-CLASSIFY"
    batch_size: int = 100  # files per association at most
    retry_min_s: float = 1.0
    retry_max_s: float = 60.0
    timeout_s: float = 30.0  # association, DIMSE and network timeouts
    ssl_context: ssl.SSLContext | None = None

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1. Got {self.batch_size} instead.")
        if not 0 < self.retry_min_s <= self.retry_max_s:
            raise ValueError(
                "retry_min_s must be > 0 and <= retry_max_s. Got "
                f"{self.retry_min_s} and {self.retry_max_s} instead."
            )


def status_meaning(status: int) -> str:
    """A short reading of a C-STORE status, for logs."""
    if status == 0:
        return "success"
    if 0xB000 <= status <= 0xBFFF:
        return "warning"
    if 0xA700 <= status <= 0xA7FF:
        return "refused: out of resources"
    if 0xA900 <= status <= 0xA9FF:
        return "error: data set does not match SOP class"
    if 0xC000 <= status <= 0xCFFF:
        return "error: cannot understand"
    return "failure"


class Outbox:
    """The queue folder of answers to forward (see the module docstring)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.rejected = self.root / "rejected"
        self.rejected.mkdir(parents=True, exist_ok=True)
        self._ready = threading.Condition()

    def stage(self, name: str, data: bytes, owner: str) -> Path:
        """Write ``<name>.<owner>.pending`` durably; not sent until :meth:`promote`.

        ``owner`` is the source instance's UID, so that a restart can tell whether the staged
        file's instance was committed.
        """
        path = self.root / f"{name}.{owner}.pending"
        write_atomic(path, data)
        return path

    def promote(self, names: list[str], owner: str) -> None:
        """Make ``owner``'s staged files sendable (idempotent)."""
        for name in names:
            pending = self.root / f"{name}.{owner}.pending"
            if pending.exists():
                pending.replace(self.root / name)
        fsync_dir(self.root)
        with self._ready:
            self._ready.notify_all()

    def staged(self) -> list[tuple[str, str]]:
        """``(name, owner)`` of every staged file (after a crash)."""
        found = []
        for path in self.root.glob("*.pending"):
            name, _, owner = path.name.removesuffix(".pending").partition(".dcm.")
            if owner:
                found.append((name + ".dcm", owner))
        return found

    def queued(self) -> list[Path]:
        """Sendable files, oldest first."""
        paths = []
        for path in self.root.glob("*.dcm"):
            try:
                paths.append((path.stat().st_mtime, path.name, path))
            except FileNotFoundError:
                continue
        return [path for *_, path in sorted(paths)]

    def wait(self, timeout_s: float) -> None:
        """Wait until something is promoted, or ``timeout_s``."""
        with self._ready:
            self._ready.wait(timeout_s)

    def reject(self, path: Path, status: int, peer: str) -> None:
        """Move a file the PACS refused to ``rejected/``, with why beside it."""
        reason = {"status": f"0x{status:04X}", "meaning": status_meaning(status), "peer": peer}
        write_atomic(self.rejected / f"{path.name}.json", json.dumps(reason).encode())
        path.replace(self.rejected / path.name)
        fsync_dir(self.rejected)


class Forwarder:
    """Sends the outbox to one PACS from its own thread, with back-off while it is down."""

    def __init__(self, outbox: Outbox, options: ForwardOptions) -> None:
        self.outbox, self.options = outbox, options
        self._delay_s = 0.0
        self._down_since: float | None = None
        self.sent = 0
        self.rejected = 0

    def run(self, stop: threading.Event) -> None:
        """Forward until ``stop`` is set (the file being sent finishes first)."""
        while not stop.is_set():
            queued = self.outbox.queued()
            if not queued:
                self.outbox.wait(0.5)
                continue
            if self._send(queued[: self.options.batch_size], stop):
                self._delay_s = 0.0
                continue
            self._delay_s = min(
                self.options.retry_max_s, max(self.options.retry_min_s, 2 * self._delay_s)
            )
            stop.wait(self._delay_s)

    def _association(self) -> Any:
        from pynetdicom import AE
        from pynetdicom.sop_class import ComprehensiveSRStorage, SegmentationStorage

        ae = AE(ae_title=self.options.calling_ae_title)
        for context in (ComprehensiveSRStorage, SegmentationStorage):
            ae.add_requested_context(context)
        for name in ("acse_timeout", "dimse_timeout", "network_timeout"):
            setattr(ae, name, self.options.timeout_s)
        ae.connection_timeout = self.options.timeout_s
        target = self.options.destination
        tls = None if self.options.ssl_context is None else (self.options.ssl_context, target.host)
        return ae.associate(target.host, target.port, ae_title=target.ae_title, tls_args=tls)

    def _send(self, paths: list[Path], stop: threading.Event) -> bool:
        """Send ``paths`` over one association; False when the PACS is down."""
        from pydicom import dcmread

        peer = str(self.options.destination)
        try:
            assoc = self._association()
        except OSError as exc:
            return self._down(f"could not connect ({exc})", len(paths))
        if not assoc.is_established:
            why = "rejected the association" if assoc.is_rejected else "did not answer"
            return self._down(why, len(paths))
        if self._down_since is not None:
            log.warning(
                "PACS %s is up again after %.0f s", peer, time.monotonic() - self._down_since
            )
            self._down_since = None
        try:
            for path in paths:
                if stop.is_set():
                    break
                try:
                    dataset = dcmread(path)
                except FileNotFoundError:
                    continue
                except Exception as exc:  # a queued file we cannot read: keep it, say so
                    log.error("%s: queued answer cannot be read (%s); left in the queue", path, exc)
                    continue
                response = assoc.send_c_store(dataset)
                status = None if response is None else response.get("Status")
                if status is None:
                    return self._down("aborted or timed out during C-STORE", len(paths))
                if status == 0 or 0xB000 <= status <= 0xBFFF:
                    path.unlink(missing_ok=True)
                    self.sent += 1
                    continue
                self.rejected += 1
                self.outbox.reject(path, status, peer)
                log.error(
                    "PACS %s rejected %s: status 0x%04X (%s); kept in %s",
                    peer,
                    path.name,
                    status,
                    status_meaning(status),
                    self.outbox.rejected,
                )
            return True
        finally:
            if assoc.is_established:
                assoc.release()

    def _down(self, why: str, queued: int) -> bool:
        peer = str(self.options.destination)
        if self._down_since is None:
            self._down_since = time.monotonic()
            log.warning("PACS %s is down: %s; %d answers stay queued", peer, why, queued)
        else:
            log.info("PACS %s still down: %s", peer, why)
        return False
