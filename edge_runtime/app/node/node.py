"""``edge-classify serve``: the DICOM node, as a pipeline of parts on their own threads.

receive (:mod:`.scp`, pynetdicom's association threads) -> spool (:mod:`.spool`, fsync + rename,
then the C-STORE response) -> answer (:mod:`.worker`, one thread, the runtime's classifier in
batches, SR and SEG built in worker processes) -> forward (:mod:`.forward`, one thread, one
association per burst). The parts share nothing but
the folders on disk and a wake-up call, so a slow model never delays an acknowledgement and a
down PACS never delays the model.
"""

from __future__ import annotations

import logging
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edge_runtime.app.node.access import AllowList
from edge_runtime.app.node.forward import Destination, Forwarder, ForwardOptions, Outbox
from edge_runtime.app.node.scp import (
    ASSOCIATE_TIMEOUT_S,
    ScpOptions,
    StorageScp,
    check_associate_timeout,
)
from edge_runtime.app.node.spool import Spool
from edge_runtime.app.node.worker import Worker
from edge_runtime.classifier import Classifier

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NodeOptions:
    """How to run the node.

    Attributes:
        output: answers (``SR_<uid>.dcm``, ``SEG_<uid>.dcm``) and ``results.jsonl`` go here.
        spool: received instances, answered markers and the forward queue (default:
            ``<output>/.spool``).
        ae_title, host, port: where and as whom to listen (port 0: the system picks).
        require_called_aet: reject an association whose called AE title is not ``ae_title``
            ("called AE title not recognised"); False: answer to any called AE title.
        allow: who may associate (:mod:`.access`; empty: this machine only).
        forward: the PACS to send answers to, or None.
        tls_cert, tls_key: PEM files: listen with TLS (both or neither).
        batch_files: instances the worker takes at once.
        answer_processes: processes that build SR and SEG (None: one per core, at most 4; 0: on
            the worker thread).
        retry_min_s, retry_max_s: the forwarder's back-off while the PACS is down.
        timeout_s: an association's DIMSE and network (idle) timeout.
        associate_timeout_s: seconds a connection has to send its A-ASSOCIATE-RQ (the ARTIM
            timeout; as long again before it for a TLS handshake) before it is dropped
            (:mod:`.connections`).
    """

    output: Path
    spool: Path | None = None
    ae_title: str = "EDGE-CLASSIFY"
    host: str = "0.0.0.0"
    port: int = 11112
    require_called_aet: bool = True
    allow: tuple[str, ...] = ()
    forward: str | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    batch_files: int = 32
    answer_processes: int | None = None
    retry_min_s: float = 1.0
    retry_max_s: float = 60.0
    timeout_s: float = 60.0
    associate_timeout_s: float = ASSOCIATE_TIMEOUT_S

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError(
                "--tls-cert and --tls-key go together: give both PEM files, or neither."
            )
        if self.batch_files < 1:
            raise ValueError(f"batch_files must be >= 1. Got {self.batch_files} instead.")
        if self.answer_processes is not None and self.answer_processes < 0:
            raise ValueError(
                f"answer_processes must be >= 0 or None. Got {self.answer_processes} instead."
            )
        check_associate_timeout(self.associate_timeout_s)  # before a model loads

    @property
    def spool_path(self) -> Path:
        return self.spool or Path(self.output) / ".spool"


def server_ssl_context(cert: Path, key: Path) -> ssl.SSLContext:
    """A TLS server context (TLS 1.2 or newer) from PEM files.

    Raises:
        OSError: a file cannot be read or does not hold a matching certificate and key.
    """
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(certfile=str(cert), keyfile=str(key))
    except (OSError, ssl.SSLError) as exc:
        raise OSError(
            f"{cert}: cannot load the TLS certificate with the key {key} ({exc}). Give PEM files "
            "of one certificate and its private key."
        ) from exc
    return context


class Node:
    """The running node; a context manager (see the module docstring).

    Example:
        >>> with Classifier.default() as clf, Node(clf, NodeOptions(Path("out"))) as node:
        ...     node.wait(stop)  # doctest: +SKIP
    """

    def __init__(
        self,
        classifier: Classifier,
        options: NodeOptions,
        *,
        on_stored: Callable[[str, float], None] | None = None,
    ) -> None:
        """
        Args:
            classifier: the runtime's classifier.
            options: how to run.
            on_stored: called with each new instance's SOP Instance UID and ``time.time()``
                once it is in the spool, just before its C-STORE response (for measurements).
        """
        self.options = options
        self.spool = Spool(options.spool_path)
        self.outbox = None
        self.forwarder = None
        if options.forward:
            destination = Destination.parse(options.forward)
            self.outbox = Outbox(options.spool_path / "outbox")
            self.forwarder = Forwarder(
                self.outbox,
                ForwardOptions(
                    destination,
                    calling_ae_title=options.ae_title,
                    retry_min_s=options.retry_min_s,
                    retry_max_s=options.retry_max_s,
                ),
            )
        self.worker = Worker(
            classifier,
            self.spool,
            options.output,
            outbox=self.outbox,
            batch_files=options.batch_files,
            answer_processes=options.answer_processes,
        )
        try:
            self.scp = StorageScp(self.spool, self._scp_options(options), on_stored)
        except BaseException:
            self.worker.close()
            raise
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    @staticmethod
    def _scp_options(options: NodeOptions) -> ScpOptions:
        context = None
        if options.tls_cert is not None and options.tls_key is not None:
            context = server_ssl_context(options.tls_cert, options.tls_key)
        return ScpOptions(
            ae_title=options.ae_title,
            host=options.host,
            port=options.port,
            require_called_aet=options.require_called_aet,
            allow=AllowList.parse(options.allow),
            ssl_context=context,
            timeout_s=options.timeout_s,
            associate_timeout_s=options.associate_timeout_s,
        )

    def start(self) -> None:
        """Start answering and forwarding, then listen.

        Raises:
            OSError: the port cannot be bound.
        """
        parts = [("answer", self.worker.run)]
        if self.forwarder is not None:
            parts.append(("forward", self.forwarder.run))
        for name, run in parts:
            thread = threading.Thread(target=run, args=(self._stop,), name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        self.scp.start()

    def close(self) -> None:
        """Stop listening, then let the worker and forwarder finish what is in hand."""
        self.scp.stop()
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)
        self.worker.close()

    def __enter__(self) -> Node:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
