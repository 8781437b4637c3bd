"""Connections before they are associations: each has the ARTIM timeout to send its request.

pynetdicom gives every TCP connection an association thread at once, and counts it against the
association limit (``AE.maximum_associations``: a scanner beyond it is rejected, "Local Limit
Exceeded") before it has sent a byte. Its own guards do not bound how long such a connection
holds its place: the accepted socket has no timeout, so a connection that sends the first bytes
of a PDU and then nothing keeps its reader blocked, and the association thread that gave up
waiting waits for that reader, for as long as the peer keeps the socket open; with TLS the
handshake runs on the thread that accepts connections, so one silent connection stops the node
accepting any. A handful of idle sockets locked every scanner out, and nothing was logged.

:class:`GuardedServer` (pynetdicom's server, made by ``AE.make_server``) bounds that time. A
connection must complete its TLS handshake (on its own thread) within ``artim_s`` seconds of being
accepted, and then send its A-ASSOCIATE-RQ within ``artim_s`` seconds (the ARTIM timer of PS3.8
9.1.5, which pynetdicom also runs, as ``AE.acse_timeout``): its socket reads time out after
``artim_s`` until the request has arrived (``network_timeout_s`` from then on), and a watcher
closes it if it still has not associated :data:`GRACE_S` later (a peer that sends a byte now and
then). A connection that ends without a request (timed out; garbage, a malformed PDU, or closed
by its peer) costs one log line naming the peer. pynetdicom's association thread after garbage
waits out ``artim_s`` before it ends, so such a connection holds its place that long, closed. An
association rejected because the limit is reached is logged too.

Imports pynetdicom (the ``node`` extra): imported by :meth:`.scp.StorageScp.start` only.
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import socketserver
import ssl
import time
from typing import Any

from pynetdicom import evt
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

log = logging.getLogger(__name__)

# how long after ``artim_s`` the watcher waits for pynetdicom to end a connection that has not
# associated, before it closes the socket itself (pynetdicom ends idle ones within milliseconds)
GRACE_S = 1.0
_POLL_S = 0.02
_ARTIM_SLACK_S = 0.25  # see GuardedServer.watch


class _GuardedHandler(RequestHandler):
    """pynetdicom's request handler, then the watch on the new association (on the connection's
    own thread, which would otherwise end at once)."""

    def handle(self) -> None:
        # RequestHandler.handle, with the association kept for the watch
        assoc = self._create_association()
        evt.trigger(assoc, evt.EVT_CONN_OPEN, {"address": self.client_address})
        started = time.monotonic()
        assoc.start()
        self.server.watch(assoc, self.request, self.client_address, started)


class GuardedServer(ThreadedAssociationServer):
    """pynetdicom's threaded server, with the ARTIM timeout on every connection (see the module
    docstring). Make it with ``AE.make_server(..., server_class=GuardedServer,
    request_handler=GuardedServer.handler, artim_s=..., network_timeout_s=...)``, run
    :meth:`serve_forever` on a thread, and stop it with :meth:`shutdown`."""

    handler = _GuardedHandler
    daemon_threads = True  # a connection's thread never delays shutdown

    def __init__(self, *args: Any, artim_s: float, network_timeout_s: float, **kwargs: Any):
        self.artim_s, self.network_timeout_s = artim_s, network_timeout_s
        super().__init__(*args, **kwargs)
        self.bind(evt.EVT_REJECTED, self._on_rejected)

    def get_request(self) -> tuple[socket.socket, Any]:
        """Accept a connection; its TLS handshake is left to its own thread
        (:meth:`finish_request`), where a silent peer stops nobody else."""
        client, address = self.socket.accept()
        client.settimeout(self.artim_s)
        return client, address

    def finish_request(self, request: Any, client_address: Any) -> None:
        """On the connection's thread: the TLS handshake (within ``artim_s``), then the
        association (:class:`_GuardedHandler`)."""
        if self.ssl_context is not None:
            request = self._handshake(request, client_address)
            if request is None:
                return
        super().finish_request(request, client_address)

    def shutdown(self) -> None:
        """Stop accepting and close the listening socket (pynetdicom's ``shutdown``, for a server
        that ``AE.start_server`` did not start and so did not list in its AE)."""
        socketserver.BaseServer.shutdown(self)
        self.server_close()

    def _handshake(self, raw: socket.socket, address: Any) -> ssl.SSLSocket | None:
        """The TLS handshake, done by ``artim_s`` after the connection or given up (one log
        line, the socket closed): None."""
        deadline = time.monotonic() + self.artim_s
        try:
            tls = self.ssl_context.wrap_socket(raw, server_side=True, do_handshake_on_connect=False)
        except (OSError, ValueError) as exc:
            log.warning("TLS connection from %s failed (%s): closed", _address(address), exc)
            raw.close()
            return None
        tls.setblocking(False)
        try:
            while True:
                try:
                    tls.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    waiting = ([tls], [])
                except ssl.SSLWantWriteError:
                    waiting = ([], [tls])
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not any(select.select(*waiting, [], remaining)[:2]):
                    raise TimeoutError(f"no TLS handshake within {self.artim_s:g} s")
        except (OSError, ValueError) as exc:  # ssl.SSLError and TimeoutError are OSErrors
            log.warning(
                "TLS handshake with %s failed (%s): connection closed", _address(address), exc
            )
            tls.close()
            return None
        tls.settimeout(self.artim_s)
        return tls

    def watch(self, assoc: Any, sock: socket.socket, address: Any, started: float) -> None:
        """Wait (on the connection's thread) for the association's A-ASSOCIATE-RQ: once it has
        arrived, give the socket the network timeout and return; if the association ends
        without one, or has none ``artim_s`` + :data:`GRACE_S` after the connection, close it
        and log one line naming the peer."""
        deadline = started + self.artim_s + GRACE_S
        while assoc.requestor.primitive is None and not _ended(assoc):
            if time.monotonic() >= deadline:
                _close(sock)  # wakes a reader blocked in the middle of a PDU
                assoc.join(GRACE_S)
                break
            time.sleep(_POLL_S)
        if assoc.requestor.primitive is not None:
            # a request in hand: the association's pace from now (a socket already closed:
            # rejected, and logged, or gone)
            with contextlib.suppress(OSError):
                sock.settimeout(self.network_timeout_s)
            return
        _close(sock)
        held_s = time.monotonic() - started
        # pynetdicom's own ARTIM timer starts a moment before ``started`` and may end the
        # association first, a few ms short of ``artim_s`` as measured here
        if held_s >= self.artim_s - _ARTIM_SLACK_S:
            log.warning(
                "connection from %s dropped: no A-ASSOCIATE-RQ within %g s (the ARTIM timeout)",
                _address(address),
                self.artim_s,
            )
        else:
            log.warning(
                "connection from %s closed after %.1f s without an association: no valid "
                "A-ASSOCIATE-RQ (not DICOM, a malformed PDU, or the peer hung up)",
                _address(address),
                held_s,
            )

    def _on_rejected(self, event: Any) -> None:
        """pynetdicom's own rejection: with this node's settings, the association limit."""
        requestor = event.assoc.requestor
        calling = str(requestor.ae_title or "?").strip()
        ae = event.assoc.ae
        log.warning(
            "rejected association from %s@%s:%s: the node has %d associations and connections "
            "open, at most %d (local limit exceeded); a connection that does not associate is "
            "dropped after %g s",
            calling,
            requestor.address,
            requestor.port,
            len([a for a in ae.active_associations if a.is_acceptor]) - 1,
            ae.maximum_associations,
            self.artim_s,
        )


def _ended(assoc: Any) -> bool:
    """Whether the connection is over: the association's thread has ended, or pynetdicom has
    closed its transport (its association thread waits out the ACSE timeout after garbage,
    though the connection is gone)."""
    dul = assoc.dul
    return not assoc.is_alive() or (dul.ident is not None and not dul.is_alive())


def _close(sock: socket.socket) -> None:
    """Shut the socket down both ways (a blocked reader wakes) and close it; already closed is
    fine."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()


def _address(address: Any) -> str:
    """``host:port`` of a peer's socket address."""
    if isinstance(address, tuple) and len(address) >= 2:
        return f"{address[0]}:{address[1]}"
    return str(address)
