"""The Storage SCP: associations in, instances into the spool, nothing else.

The handlers run inside pynetdicom's association threads, so they only check, store and enqueue:
a C-STORE is answered once its instance is fsynced and renamed into the spool
(:meth:`~edge_runtime.app.node.spool.Spool.store`), never after the model. Accepted: the SOP classes
of :data:`STORAGE_CLASSES` in every transfer syntax of :data:`TRANSFER_SYNTAXES` (what the
``dicom`` extra decodes), and Verification (C-ECHO). Any other SOP class is refused in the
association (its presentation context is rejected), never accepted and then dropped.

Associations: the calling AE title must be allowed (:mod:`.access`) and, unless
``require_called_aet`` is off, the called AE title must be the node's own; otherwise the
association is rejected ("calling AE title not recognised", "called AE title not recognised").
At most ``max_associations`` at once, counting connections that have not yet sent their
A-ASSOCIATE-RQ; each of those has ``associate_timeout_s`` (the ARTIM timeout) to send it (and as
long again before, for its TLS handshake), or it is dropped (:mod:`.connections`): idle or
half-sent connections hold a scanner's place for seconds, not for as long as their peer keeps
them open.

Statuses: 0x0000 stored (or a re-sent duplicate, not stored again); 0xA900 no pixel data, or a
Type 1 identifying UID the answers need (:data:`REQUIRED_UIDS`) is missing; 0xC000 a data set
that cannot be parsed or has no valid SOP Instance UID; 0xA700 the spool could not be written.
Each refusal, rejection and abort, and each connection dropped before it associated, is one log
line naming the peer.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from edge_runtime.app.node.access import AllowList
from edge_runtime.app.node.spool import Spool, StoreOutcome

log = logging.getLogger(__name__)

STORAGE_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.6.1": "Ultrasound Image Storage",
    "1.2.840.10008.5.1.4.1.1.3.1": "Ultrasound Multi-frame Image Storage",
    "1.2.840.10008.5.1.4.1.1.3": "Ultrasound Multi-frame Image Storage (Retired)",
    "1.2.840.10008.5.1.4.1.1.6": "Ultrasound Image Storage (Retired)",
    "1.2.840.10008.5.1.4.1.1.7": "Secondary Capture Image Storage",
    "1.2.840.10008.5.1.4.1.1.6.2": "Enhanced US Volume Storage",
}
VERIFICATION = "1.2.840.10008.1.1"
TRANSFER_SYNTAXES = (
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian (retired, still sent)
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline (8-bit)
    "1.2.840.10008.1.2.4.51",  # JPEG Extended (12-bit, 8-bit files decode)
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless, first-order prediction
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.5",  # RLE Lossless
)
# the largest P-DATA PDU a scanner may send us: an image in one or a few PDUs (pynetdicom parses
# each in Python; its default, 16 KiB, cuts a 120 KB scan into 8), yet a bounded read
MAX_PDU_BYTES = 1 << 20
# seconds a connection has to send its A-ASSOCIATE-RQ (and before it, to complete its TLS
# handshake): a scanner sends it at once; a connection that does not holds one of the
# associations' places meanwhile
ASSOCIATE_TIMEOUT_S = 10.0
MAX_ASSOCIATE_TIMEOUT_S = 600.0
MAX_ASSOCIATIONS = 16
SUCCESS, NO_PIXELS, CANNOT_UNDERSTAND, OUT_OF_RESOURCES = 0x0000, 0xA900, 0xC000, 0xA700
DOES_NOT_MATCH_SOP_CLASS = 0xA900  # "Data Set does not match SOP Class": also a missing Type 1 UID
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
# Type 1 UIDs (PS3.3 C.12.1 SOP Common, C.7.2.1 General Study, C.7.3.1 General Series) that an SR
# or SEG answering the instance must reference: without one it cannot be answered in DICOM, so it
# is refused while the scanner is still on the line (0xA900), not acknowledged and then dropped
REQUIRED_UIDS = {
    "SOPClassUID": "SOP Class UID",
    "SOPInstanceUID": "SOP Instance UID",
    "StudyInstanceUID": "Study Instance UID",
    "SeriesInstanceUID": "Series Instance UID",
}


@dataclass(frozen=True)
class ScpOptions:
    """Where and as whom to listen."""

    ae_title: str = "EDGE-CLASSIFY"
    host: str = "0.0.0.0"
    port: int = 11112
    allow: AllowList = field(default_factory=AllowList)
    ssl_context: ssl.SSLContext | None = None
    max_associations: int = MAX_ASSOCIATIONS  # connections not yet associated count too
    max_pdu_bytes: int = MAX_PDU_BYTES  # 0: unlimited
    timeout_s: float = 60.0  # DIMSE and network (idle) timeouts of an association
    require_called_aet: bool = True  # reject an association addressed to another AE title
    associate_timeout_s: float = ASSOCIATE_TIMEOUT_S  # ARTIM: connection -> A-ASSOCIATE-RQ

    def __post_init__(self) -> None:
        if not 1 <= len(self.ae_title.strip()) <= 16:
            raise ValueError(
                f"--ae-title must have 1 to 16 characters. Got {self.ae_title!r} instead."
            )
        if not 0 <= self.port <= 65535:
            raise ValueError(f"--port must be from 0 to 65535. Got {self.port} instead.")
        if self.max_pdu_bytes < 0:
            raise ValueError(
                f"max_pdu_bytes must be >= 0 (0: unlimited). Got {self.max_pdu_bytes} instead."
            )
        check_associate_timeout(self.associate_timeout_s)
        if self.max_associations < 1:
            raise ValueError(f"max_associations must be >= 1. Got {self.max_associations} instead.")


def check_associate_timeout(seconds: float) -> None:
    """Raise ValueError, saying why, unless ``seconds`` is a valid ``--associate-timeout``."""
    if not 0 < seconds <= MAX_ASSOCIATE_TIMEOUT_S:
        raise ValueError(
            f"--associate-timeout must be more than 0 and at most {MAX_ASSOCIATE_TIMEOUT_S:g} "
            f"seconds. Got {seconds:g} instead. A scanner sends its association request at "
            f"once: the default, {ASSOCIATE_TIMEOUT_S:g}, suits most."
        )


class StorageScp:
    """Listens for associations and stores what scanners send (see the module docstring).

    ``on_stored(uid, received_at)`` is called after each new instance is in the spool.
    """

    def __init__(
        self,
        spool: Spool,
        options: ScpOptions,
        on_stored: Callable[[str, float], None] | None = None,
    ) -> None:
        self.spool, self.options, self._on_stored = spool, options, on_stored
        self._server: Any = None
        self.ack_ms: list[float] = []  # receive (dataset complete) -> response, per C-STORE
        self._lock = threading.Lock()

    @property
    def port(self) -> int:
        """The port listened on (the one the system chose, for port 0)."""
        return int(self._server.server_address[1])

    def start(self) -> None:
        """Start listening (non-blocking).

        Raises:
            OSError: the address cannot be bound, naming it.
        """
        from pynetdicom import AE, evt

        from edge_runtime.app.node.connections import GuardedServer

        ae = AE(ae_title=self.options.ae_title)
        ae.maximum_associations = self.options.max_associations
        ae.maximum_pdu_size = self.options.max_pdu_bytes
        for name in ("dimse_timeout", "network_timeout"):
            setattr(ae, name, self.options.timeout_s)
        # pynetdicom's ARTIM timer and its wait for the A-ASSOCIATE-RQ (an acceptor waits for no
        # other ACSE message); the connections' sockets get the same timeout (.connections)
        ae.acse_timeout = self.options.associate_timeout_s
        for uid in STORAGE_CLASSES:
            ae.add_supported_context(uid, list(TRANSFER_SYNTAXES))
        ae.add_supported_context(VERIFICATION, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
        handlers = [
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_ABORTED, self._on_aborted),
        ]
        address = (self.options.host, self.options.port)
        try:
            self._server = ae.make_server(
                address,
                evt_handlers=handlers,
                ssl_context=self.options.ssl_context,
                server_class=GuardedServer,
                request_handler=GuardedServer.handler,
                artim_s=self.options.associate_timeout_s,
                network_timeout_s=self.options.timeout_s,
            )
        except OSError as exc:
            raise OSError(
                f"{self.options.host}:{self.options.port}: cannot listen ({exc.strerror or exc}). "
                "Is another node or service on that port? Choose another with --port."
            ) from exc
        threading.Thread(
            target=self._server.serve_forever, name="dicom-listen", daemon=True
        ).start()

    def stop(self) -> None:
        """Stop listening and end the associations."""
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    @staticmethod
    def _peer(event: Any) -> str:
        requestor = event.assoc.requestor
        ae = requestor.ae_title or "?"
        return f"{ae.strip() if isinstance(ae, str) else ae}@{requestor.address}:{requestor.port}"

    def _on_requested(self, event: Any) -> None:
        primitive = event.assoc.requestor.primitive
        calling = primitive.calling_ae_title
        calling = calling.decode(errors="replace") if isinstance(calling, bytes) else str(calling)
        address = event.assoc.requestor.address
        if not self.options.allow.allows(calling, address):
            log.warning(
                "rejected association from %s@%s: not allowed (--allow: %s)",
                calling.strip(),
                address,
                self.options.allow.describe(),
            )
            event.assoc.acse.send_reject(0x01, 0x01, 0x03)  # calling AE title not recognised
            event.assoc.kill()  # as pynetdicom does after its own rejections: the PDU goes out
            return
        called = primitive.called_ae_title
        called = called.decode(errors="replace") if isinstance(called, bytes) else str(called)
        own = self.options.ae_title.strip()
        if self.options.require_called_aet and called.strip() != own:
            log.warning(
                "rejected association from %s@%s: called AE title %r is not this node's (%s)",
                calling.strip(),
                address,
                called.strip(),
                own,
            )
            event.assoc.acse.send_reject(0x01, 0x01, 0x07)  # called AE title not recognised
            event.assoc.kill()

    def _on_accepted(self, event: Any) -> None:
        refused = [
            cx.abstract_syntax
            for cx in event.assoc.rejected_contexts
            if cx.abstract_syntax not in STORAGE_CLASSES
        ]
        if refused:  # storescu offers every storage class: a count, the list at debug level
            names = sorted(set(map(str, refused)))
            log.info(
                "association from %s: %d SOP classes refused (not ultrasound, secondary capture "
                "or verification)",
                self._peer(event),
                len(names),
            )
            log.debug("refused SOP classes: %s", ", ".join(names))
        else:
            log.info("association from %s accepted", self._peer(event))

    def _on_echo(self, event: Any) -> int:
        log.info("C-ECHO from %s", self._peer(event))
        return SUCCESS

    def _on_aborted(self, event: Any) -> None:
        log.warning("association from %s aborted", self._peer(event))

    def _on_store(self, event: Any) -> int:
        """Check, store durably, then answer: the only work done on the association's thread."""
        start = time.perf_counter()
        peer = self._peer(event)
        uid = str(event.request.AffectedSOPInstanceUID or "")
        try:
            dataset = event.dataset
            has_pixels = any(keyword in dataset for keyword in _PIXEL_KEYWORDS)
            uid = str(dataset.get("SOPInstanceUID", uid) or uid)
            missing = _missing_uids(dataset)
        except Exception as exc:  # pydicom raises many types for a corrupt data set
            log.warning("C-STORE %s from %s: cannot be parsed (%s): 0xC000", uid, peer, exc)
            return CANNOT_UNDERSTAND
        if not has_pixels:
            log.warning("C-STORE %s from %s: no pixel data: refused with 0xA900", uid, peer)
            return NO_PIXELS
        if missing:
            log.warning(
                "C-STORE %s from %s: missing %s (Type 1, needed to answer it): refused with 0xA900",
                uid,
                peer,
                ", ".join(missing),
            )
            return DOES_NOT_MATCH_SOP_CLASS
        try:
            outcome = self.spool.store(uid, event.encoded_dataset(include_meta=True))
        except ValueError as exc:
            log.warning("C-STORE from %s: %s: 0xC000", peer, exc)
            return CANNOT_UNDERSTAND
        except OSError as exc:
            log.error("C-STORE %s from %s: %s: 0xA700", uid, peer, exc)
            return OUT_OF_RESOURCES
        if outcome == StoreOutcome.DUPLICATE:
            log.info(
                "C-STORE %s from %s: already received; acknowledged, not stored again", uid, peer
            )
        elif self._on_stored is not None:
            self._on_stored(uid, time.time())
        with self._lock:
            self.ack_ms.append((time.perf_counter() - start) * 1000.0)
            del self.ack_ms[:-10_000]
        return SUCCESS


def _missing_uids(dataset: Any) -> list[str]:
    """The names of the :data:`REQUIRED_UIDS` that ``dataset`` lacks or leaves empty."""
    return [
        name
        for keyword, name in REQUIRED_UIDS.items()
        if not str(dataset.get(keyword, "") or "").strip().rstrip("\x00")
    ]
