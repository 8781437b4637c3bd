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

import contextlib
import json
import logging
import os
import re
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_runtime.app.node.spool import fsync_dir, write_atomic

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
    linger_s: float = 1.0  # an idle association is released after this
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
        self._promoted = 0  # promotions so far: a wait never misses one that came before it

    def stage(self, name: str, data: bytes, owner: str) -> Path:
        """Write ``<name>.<owner>.pending`` durably; not sent until :meth:`promote`.

        ``owner`` is the source instance's UID, so that a restart can tell whether the staged
        file's instance was committed.
        """
        path = self.root / f"{name}.{owner}.pending"
        write_atomic(path, data)
        return path

    def stage_link(self, source: Path, name: str, owner: str) -> Path:
        """Stage the fsynced file ``source`` as ``<name>.<owner>.pending`` by a hard link (a
        copy where the queue is on another file system); durable once :meth:`sync` returns.

        Raises:
            OSError: naming the staged file.
        """
        path = self.root / f"{name}.{owner}.pending"
        path.unlink(missing_ok=True)  # left by a crash before the commit
        try:
            os.link(source, path)
        except OSError:
            write_atomic(path, Path(source).read_bytes())
        return path

    def sync(self) -> None:
        """fsync the queue folder (after :meth:`stage_link`)."""
        fsync_dir(self.root)

    def promote(self, names: list[str], owner: str) -> None:
        """Make ``owner``'s staged files sendable (idempotent)."""
        self.promote_many([(names, owner)])

    def promote_many(self, staged: list[tuple[list[str], str]]) -> None:
        """:meth:`promote` for several owners, with one folder fsync."""
        for names, owner in staged:
            for name in names:
                pending = self.root / f"{name}.{owner}.pending"
                if pending.exists():
                    pending.replace(self.root / name)
        fsync_dir(self.root)
        with self._ready:
            self._promoted += 1
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

    def promotions(self) -> int:
        """How many promotions so far (pass it to :meth:`wait`)."""
        with self._ready:
            return self._promoted

    def wait(self, timeout_s: float, seen: int | None = None) -> bool:
        """Wait until a promotion after the ``seen`` th (default: after now), or ``timeout_s``;
        True when one came."""
        with self._ready:
            after = self._promoted if seen is None else seen
            return self._ready.wait_for(lambda: self._promoted > after, timeout_s)

    def reject(self, path: Path, status: int, peer: str) -> None:
        """Move a file the PACS refused to ``rejected/``, with why beside it."""
        reason = {"status": f"0x{status:04X}", "meaning": status_meaning(status), "peer": peer}
        write_atomic(self.rejected / f"{path.name}.json", json.dumps(reason).encode())
        path.replace(self.rejected / path.name)
        fsync_dir(self.rejected)


def _no_delay(assoc: Any) -> None:
    """Turn Nagle's algorithm off on an association's socket: a C-STORE is written as a command
    PDU then data PDUs, and the last small write would otherwise wait for the peer's delayed
    acknowledgement (40 ms on Linux) before the response can come."""
    sock = getattr(getattr(getattr(assoc, "dul", None), "socket", None), "socket", None)
    if sock is None:
        return
    with contextlib.suppress(OSError):  # not TCP (a test double), or already closed
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def responses_to_caller_only(assoc: Any) -> None:
    """Leave every DIMSE message of a requestor association to the call waiting for it.

    pynetdicom's association thread polls the DIMSE queue (non-blocking) between pauses, and a
    ``send_c_store`` pauses it by clearing a checkpoint, then waiting until it reads "paused".
    Under CPU contention the thread can be preempted after passing the checkpoint and before it
    reads "not paused": the caller sends, the thread takes the response off the queue ("Received
    unexpected C-STORE service message") and the caller waits out the whole DIMSE timeout (30 s;
    seen on a 2-core host with a training alongside). A C-STORE SCU is sent no requests, so the
    association's own polling is answered "nothing", and blocking reads (the caller's) go on.
    """
    dimse = getattr(assoc, "dimse", None)
    if dimse is None or not assoc.is_established:
        return
    take = dimse.get_msg

    def get_msg(block: bool = False) -> Any:
        return take(block=True) if block else (None, None)

    dimse.get_msg = get_msg


class Forwarder:
    """Sends the outbox to one PACS from its own thread, with back-off while it is down."""

    def __init__(self, outbox: Outbox, options: ForwardOptions) -> None:
        self.outbox, self.options = outbox, options
        self._delay_s = 0.0
        self._down_since: float | None = None
        self.sent = 0
        self.rejected = 0

    def run(self, stop: threading.Event) -> None:
        """Forward until ``stop`` is set (the file being sent finishes first).

        An association stays open while answers keep coming (up to ``linger_s`` idle), so a
        burst costs one association, not one per batch.
        """
        assoc: Any = None
        try:
            while not stop.is_set():
                seen = self.outbox.promotions()
                queued = self.outbox.queued()
                if not queued:
                    if assoc is None:
                        self.outbox.wait(0.5, seen)
                    elif not self.outbox.wait(self.options.linger_s, seen):
                        assoc = self._release(assoc)
                    continue
                reused = assoc is not None
                assoc, sent = self._send(assoc, queued[: self.options.batch_size], stop)
                if sent:
                    self._delay_s = 0.0
                    continue
                if reused:  # the PACS may have dropped an idle association: try a fresh one now
                    continue
                self._delay_s = min(
                    self.options.retry_max_s, max(self.options.retry_min_s, 2 * self._delay_s)
                )
                stop.wait(self._delay_s)
        finally:
            self._release(assoc)

    @staticmethod
    def _release(assoc: Any) -> None:
        if assoc is not None and assoc.is_established:
            assoc.release()

    def _association(self) -> Any:
        from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
        from pynetdicom import AE, _config
        from pynetdicom.sop_class import ComprehensiveSRStorage, SegmentationStorage

        # send queued files as they are on disk (Explicit VR Little Endian, as written), not
        # decoded and encoded again; a Dataset (the fallback below) is sent as before
        _config.STORE_SEND_CHUNKED_DATASET = True
        ae = AE(ae_title=self.options.calling_ae_title)
        for context in (ComprehensiveSRStorage, SegmentationStorage):
            ae.add_requested_context(context, ExplicitVRLittleEndian)
            ae.add_requested_context(context, ImplicitVRLittleEndian)
        for name in ("acse_timeout", "dimse_timeout", "network_timeout"):
            setattr(ae, name, self.options.timeout_s)
        ae.connection_timeout = self.options.timeout_s
        target = self.options.destination
        tls = None if self.options.ssl_context is None else (self.options.ssl_context, target.host)
        assoc = ae.associate(target.host, target.port, ae_title=target.ae_title, tls_args=tls)
        _no_delay(assoc)
        responses_to_caller_only(assoc)
        return assoc

    def _send(self, assoc: Any, paths: list[Path], stop: threading.Event) -> tuple[Any, bool]:
        """Send ``paths`` over ``assoc`` (or a new association); returns the association to
        reuse (None when there is none) and False when the PACS is down."""
        peer = str(self.options.destination)
        if assoc is None or not assoc.is_established:
            try:
                assoc = self._association()
            except OSError as exc:
                return None, self._down(f"could not connect ({exc})", len(paths))
            if not assoc.is_established:
                why = "rejected the association" if assoc.is_rejected else "did not answer"
                return None, self._down(why, len(paths))
            if self._down_since is not None:
                log.warning(
                    "PACS %s is up again after %.0f s", peer, time.monotonic() - self._down_since
                )
                self._down_since = None
        for path in paths:
            if stop.is_set():
                break
            try:
                response = self._store(assoc, path)
            except FileNotFoundError:
                continue
            except Exception as exc:  # a queued file we cannot read: keep it, say so
                log.error("%s: queued answer cannot be read (%s); left in the queue", path, exc)
                continue
            status = None if response is None else response.get("Status")
            if status is None:
                self._release(assoc)
                return None, self._down("aborted or timed out during C-STORE", len(paths))
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
        return assoc, True

    @staticmethod
    def _store(assoc: Any, path: Path) -> Any:
        """C-STORE one queued file, streamed from disk; decoded first only where the PACS
        accepted no context in the file's transfer syntax."""
        from pydicom import dcmread

        try:
            return assoc.send_c_store(path)
        except ValueError:  # no presentation context for Explicit VR Little Endian
            return assoc.send_c_store(dcmread(path))

    def _down(self, why: str, queued: int) -> bool:
        peer = str(self.options.destination)
        if self._down_since is None:
            self._down_since = time.monotonic()
            log.warning("PACS %s is down: %s; %d answers stay queued", peer, why, queued)
        else:
            log.info("PACS %s still down: %s", peer, why)
        return False
