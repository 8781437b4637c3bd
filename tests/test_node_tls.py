"""`edge-classify serve --tls-cert/--tls-key`: DICOM over TLS on loopback (pynetdicom's ssl
support), with a self-signed certificate the test makes with openssl. A TLS client is answered and
its instance stored; a client that does not speak TLS gets no association."""

from __future__ import annotations

import contextlib
import shutil
import socket
import ssl
import subprocess
import time
from pathlib import Path

import pytest

pynetdicom = pytest.importorskip("pynetdicom", reason="the node extra is not installed")

from tests.test_node import (  # noqa: E402  (after the skip: the node extra)
    NODE_AE,
    classifier,  # noqa: F401  (a fixture)
    running_node,
    scans,  # noqa: F401  (a fixture)
    wait_for,
)


@pytest.fixture(scope="module")
def certificate(tmp_path_factory) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed: no certificate to test TLS with")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "node.pem", folder / "node.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return cert, key


def _client():
    from pynetdicom import AE
    from pynetdicom.sop_class import UltrasoundImageStorage, Verification

    ae = AE(ae_title="US-ROOM1")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(Verification)
    ae.add_requested_context(UltrasoundImageStorage)
    return ae


def test_a_tls_client_is_answered_and_a_plain_one_gets_no_association(
    classifier,  # noqa: F811
    scans,  # noqa: F811
    certificate,
    tmp_path,
):
    from pydicom import dcmread

    cert, key = certificate
    client_context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(cert))
    with running_node(classifier, tmp_path / "out", tls_cert=cert, tls_key=key) as node:
        port = node.scp.port
        ae = _client()
        assoc = ae.associate(
            "127.0.0.1", port, ae_title=NODE_AE, tls_args=(client_context, "127.0.0.1")
        )
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0x0000
        status = assoc.send_c_store(dcmread(scans["native"]))
        assert status.Status == 0x0000
        assoc.release()
        wait_for(lambda: any((tmp_path / "out").glob("SR_*.dcm")), 60, "the SR of the TLS instance")
        plain = _client().associate("127.0.0.1", port, ae_title=NODE_AE)
        assert not plain.is_established
        assert node.scp.port == port  # still listening after the failed handshake
        again = _client().associate(
            "127.0.0.1", port, ae_title=NODE_AE, tls_args=(client_context, "127.0.0.1")
        )
        assert again.is_established and again.send_c_echo().Status == 0x0000
        again.release()


def test_a_silent_connection_does_not_stop_a_tls_node_and_is_dropped_after_the_timeout(
    classifier,  # noqa: F811
    certificate,
    tmp_path,
    caplog,
):
    """pynetdicom runs the TLS handshake on the thread that accepts connections: one connection
    that sent nothing stopped the node accepting any other, for as long as it stayed open. The
    handshake now runs on the connection's own thread, within the associate timeout (2 s here),
    after which the silent connection is closed and logged."""
    cert, key = certificate
    client_context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(cert))
    with (
        caplog.at_level("WARNING", logger="edge_runtime"),
        running_node(
            classifier,
            tmp_path / "out",
            tls_cert=cert,
            tls_key=key,
            answer_processes=0,
            associate_timeout_s=2.0,
        ) as node,
        contextlib.closing(socket.create_connection(("127.0.0.1", node.scp.port))) as silent,
    ):
        time.sleep(0.3)  # accepted by now: its handshake is under way
        ae = _client()
        ae.acse_timeout = ae.connection_timeout = 5  # connecting includes the handshake
        started = time.monotonic()
        assoc = ae.associate(
            "127.0.0.1", node.scp.port, ae_title=NODE_AE, tls_args=(client_context, "127.0.0.1")
        )
        assert assoc.is_established and time.monotonic() - started < 1.5
        assert assoc.send_c_echo().Status == 0x0000
        assoc.release()
        silent.settimeout(5)
        with contextlib.suppress(ConnectionResetError):
            assert silent.recv(1) == b""  # closed by the node
        number = silent.getsockname()[1]
    assert any(
        f"TLS handshake with 127.0.0.1:{number} failed (no TLS handshake within 2 s)" in m
        for m in caplog.messages
    ), caplog.messages
