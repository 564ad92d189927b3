"""The C TLS kernel against other TLS implementations: pyOpenSSL (its own bundled OpenSSL) in
memory, and OpenSSL's command-line tools over loopback sockets driven the way a worker would
drive a link (handshake with ``feed``, then ``decrypt`` / ``encrypt``).

Byte-exactness cannot hold across implementations (random keys, nonces, record sizes), so the
evidence is interoperability: bytes both ways, equal RFC 5705 exporter values on both ends, the
certificate each end saw, and the settings a peer can observe (no session tickets, no
renegotiation, a TLS 1.3 KeyUpdate answered in order). Python's ``ssl`` against the kernel is
in tests/test_tls_sessions.py and tests/test_link_tls.py; a real tor in
tests/test_tls_tor_client.py, tests/test_tor_interop.py and tests/test_link_auth_tor.py.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import IO

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from OpenSSL import SSL
from support_tls import credentials, write_pem

from relay._tls import SERVER_TLS12_CIPHERS
from relay.tls import TlsClientSession, TlsError, TlsServerContext, TlsServerSession

pytestmark = pytest.mark.timeout(120)

AUTH_LABEL = b"EXPORTER FOR TOR TLS CLIENT BINDING AUTH0003"
OPENSSL = shutil.which("openssl")
needs_openssl = pytest.mark.skipif(OPENSSL is None, reason="the openssl command is not installed")
VERSIONS = {"TLSv1.3": SSL.TLS1_3_VERSION, "TLSv1.2": SSL.TLS1_2_VERSION}


Credentials = tuple[x509.Certificate, rsa.RSAPrivateKey]


@pytest.fixture(scope="module")
def creds() -> Credentials:
    return credentials("www.kernel-interop.net")


@pytest.fixture(scope="module")
def server_context(creds: Credentials) -> TlsServerContext:
    return TlsServerContext(*creds)


def records_of(stream: bytes) -> list[tuple[int, int]]:
    """The (content type, length) of each whole TLS record in ``stream``."""
    out, i = [], 0
    while i + 5 <= len(stream):
        length = int.from_bytes(stream[i + 3 : i + 5], "big")
        out.append((stream[i], length))
        i += 5 + length
    assert i == len(stream), "the stream does not end on a record boundary"
    return out


# ------------------------------------------------------------------ pyOpenSSL, in memory

def _py_context(server: bool, version: str, creds: Credentials) -> SSL.Context:
    context = SSL.Context(SSL.TLS_METHOD)
    context.set_min_proto_version(SSL.TLS1_2_VERSION)
    context.set_max_proto_version(VERSIONS[version])
    context.set_verify(SSL.VERIFY_NONE)
    if server:
        context.set_cipher_list(SERVER_TLS12_CIPHERS.encode())
        context.use_certificate(creds[0])
        context.use_privatekey(creds[1])
    return context


def _py_drain(conn: SSL.Connection) -> bytes:
    chunks = []
    while True:
        try:
            chunks.append(conn.bio_read(1 << 17))
        except SSL.WantReadError:
            return b"".join(chunks)


def _py_read(conn: SSL.Connection, records: bytes) -> bytes:
    conn.bio_write(records)
    chunks = []
    while True:
        try:
            chunks.append(conn.recv(1 << 14))
        except SSL.WantReadError:
            return b"".join(chunks)


def _py_handshake_step(conn: SSL.Connection) -> None:
    try:
        conn.do_handshake()
    except SSL.WantReadError:
        pass


@pytest.mark.parametrize("version", ["TLSv1.3", "TLSv1.2"])
def test_c_client_with_pyopenssl_server(creds: Credentials, version: str) -> None:
    py = SSL.Connection(_py_context(True, version, creds), None)
    py.set_accept_state()
    ours = TlsClientSession("www.pyopenssl-server.net")
    to_py = ours.start()
    for _ in range(6):
        py.bio_write(to_py)
        _py_handshake_step(py)
        plain, to_py = ours.feed(_py_drain(py))
        assert plain == b""
        if ours.handshake_done and not to_py:
            break
    assert ours.handshake_done and not to_py
    assert ours.version() == py.get_protocol_version_name() == version
    assert ours.cipher() == py.get_cipher_name()
    assert py.get_servername() == b"www.pyopenssl-server.net"
    assert ours.peer_certificate_der() == creds[0].public_bytes(serialization.Encoding.DER)
    up, down = os.urandom((1 << 20) + 3), os.urandom((1 << 20) + 5)
    assert _py_read(py, ours.encrypt(up)) == up
    py.sendall(down)
    assert ours.decrypt(_py_drain(py)) == down
    for context in (None, b"", os.urandom(32)):
        assert ours.export_keying_material(AUTH_LABEL, 32, context) == \
            py.export_keying_material(AUTH_LABEL, 32, context)
    py.shutdown()
    assert ours.decrypt(_py_drain(py)) == b"" and ours.peer_closed


@pytest.mark.parametrize("version", ["TLSv1.3", "TLSv1.2"])
def test_pyopenssl_client_with_c_server(creds: Credentials, server_context: TlsServerContext,
                                        version: str) -> None:
    py = SSL.Connection(_py_context(False, version, creds), None)
    py.set_connect_state()
    py.set_tlsext_host_name(b"www.pyopenssl-client.net")
    ours = TlsServerSession(server_context)
    for _ in range(6):
        _py_handshake_step(py)
        plain, to_py = ours.feed(_py_drain(py))
        assert plain == b""
        if to_py:
            py.bio_write(to_py)
        if ours.handshake_done:
            break
    _py_handshake_step(py)
    assert ours.handshake_done
    assert ours.version() == py.get_protocol_version_name() == version
    assert ours.cipher() == py.get_cipher_name()
    assert ours.server_name() == "www.pyopenssl-client.net"
    cert = py.get_peer_certificate(as_cryptography=True)
    assert cert is not None
    assert cert.public_bytes(serialization.Encoding.DER) == server_context.certificate_der
    assert ours.peer_certificate_der() is None  # a Tor client sends no certificate
    up, down = os.urandom((1 << 20) + 7), os.urandom((1 << 20) + 11)
    py.sendall(up)
    assert ours.decrypt(_py_drain(py)) == up
    assert _py_read(py, ours.encrypt(down)) == down
    for context in (None, b"", os.urandom(32)):
        assert ours.export_keying_material(AUTH_LABEL, 48, context) == \
            py.export_keying_material(AUTH_LABEL, 48, context)
    with pytest.raises(SSL.ZeroReturnError):
        _py_read(py, ours.close())


# ------------------------------------------------------------------ OpenSSL's tools, sockets

Script = Callable[[TlsServerSession, bytes], bytes | None]
"""Called with each plaintext the server decrypted; returns plaintext to send back (b"" for
nothing) or None to close."""


class RecordServer:
    """One loopback TLS connection served in a thread by a C server session the way a worker
    would drive a link: ``feed`` until the handshake is done, then ``decrypt`` for every read
    and ``encrypt`` for every reply; TLS bytes made while reading (``wants_write``) are sent
    with ``encrypt(b"")``. What happened is kept in ``log``."""

    def __init__(self, context: TlsServerContext, script: Script) -> None:
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(1)
        self.port: int = self.listener.getsockname()[1]
        self.session = TlsServerSession(context)
        self.handshake_done = threading.Event()
        self.log: list[tuple[str, object]] = []
        self._script = script
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        self.listener.settimeout(30)
        try:
            conn, _ = self.listener.accept()
        finally:
            self.listener.close()
        session = self.session
        with conn:
            conn.settimeout(30)
            try:
                while data := conn.recv(1 << 16):
                    if not session.handshake_done:
                        plain, to_write = session.feed(data)
                        conn.sendall(to_write)
                        if session.handshake_done:
                            self.handshake_done.set()
                    else:
                        plain = session.decrypt(data)
                        if session.wants_write:
                            flushed = session.encrypt(b"")
                            self.log.append(("flushed", flushed))
                            conn.sendall(flushed)
                    if session.peer_closed:
                        self.log.append(("peer closed", b""))
                        break
                    if not plain:
                        continue
                    reply = self._script(session, plain)
                    if reply is None:
                        conn.sendall(session.close())
                        break
                    if reply:
                        out = session.encrypt(reply)
                        self.log.append(("sent", out))
                        conn.sendall(out)
            except TlsError as exc:
                self.log.append(("error", str(exc)))
            except OSError as exc:
                self.log.append(("socket", str(exc)))

    def join(self) -> None:
        self._thread.join(40)
        assert not self._thread.is_alive(), "the TLS server thread did not finish"


def _s_client(port: int, *extra: str) -> subprocess.Popen[bytes]:
    assert OPENSSL is not None
    return subprocess.Popen([OPENSSL, "s_client", "-connect", f"127.0.0.1:{port}", *extra],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)


def _wait_for_line(stream: IO[bytes] | None, marker: bytes) -> bytes:
    """Lines read from ``stream`` up to the one holding ``marker``."""
    assert stream is not None
    seen = b""
    while marker not in seen:
        line = stream.readline()
        assert line, b"s_client ended before printing " + marker + b":\n" + seen
        seen += line
    return seen


TICKET = re.compile(r"session ticket", re.IGNORECASE)


@needs_openssl
@pytest.mark.parametrize("version", ["-tls1_3", "-tls1_2"])
def test_no_session_tickets(server_context: TlsServerContext, creds: Credentials,
                            tmp_path: Path, version: str) -> None:
    """s_client reports no ticket from our server, where it reports one from a stock
    ``openssl s_server`` (so the check can see tickets at all)."""
    assert OPENSSL is not None
    request = b"GET / HTTP/1.0\r\n\r\n"
    server = RecordServer(server_context, lambda session, plain: None if b"\r\n\r\n" in plain
                          else b"")
    ours = subprocess.run([OPENSSL, "s_client", "-connect", f"127.0.0.1:{server.port}", version,
                           "-ign_eof"], input=request, capture_output=True, timeout=30)
    server.join()
    assert ("peer closed", b"") not in server.log and not any(k == "error" for k, _ in server.log)
    assert b"Cipher is" in ours.stdout  # s_client got through and printed its summary
    assert not TICKET.search(ours.stdout.decode(errors="replace"))

    cert_path, key_path = write_pem(tmp_path, *creds)
    stock = subprocess.Popen([OPENSSL, "s_server", "-accept", "127.0.0.1:0", "-naccept", "1",
                              "-www", "-cert", str(cert_path), "-key", str(key_path)],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert stock.stdout is not None
    try:
        port = re.match(rb"ACCEPT 127\.0\.0\.1:(\d+)", _wait_for_line(stock.stdout,
                                                                      b"ACCEPT").splitlines()[-1])
        assert port is not None
        control = subprocess.run([OPENSSL, "s_client", "-connect",
                                  f"127.0.0.1:{int(port.group(1))}", version, "-ign_eof"],
                                 input=request, capture_output=True, timeout=30)
    finally:
        stock.kill()
        stock.wait()
    assert TICKET.search(control.stdout.decode(errors="replace"))


@needs_openssl
def test_key_update_is_answered_in_order(server_context: TlsServerContext) -> None:
    """s_client sends a TLS 1.3 KeyUpdate asking for ours; OpenSSL keeps our answer until our
    next write, so our next encrypt() carries it first (two records: the KeyUpdate, then the
    data under the new key), and s_client reads the data."""
    server = RecordServer(server_context, lambda session, plain: b"done\n"
                          if b"after" in plain else b"")
    client = _s_client(server.port, "-tls1_3")
    assert client.stdin is not None and client.stderr is not None
    try:
        assert server.handshake_done.wait(30)
        client.stdin.write(b"K\n")
        client.stdin.flush()
        _wait_for_line(client.stderr, b"KEYUPDATE")
        client.stdin.write(b"after\n")
        client.stdin.flush()
        out = _wait_for_line(client.stdout, b"done")  # stdin stays open: EOF would close
    finally:
        client.kill()
        client.wait()
    server.join()
    sent = [value for kind, value in server.log if kind == "sent"]
    assert len(sent) == 1, server.log
    assert isinstance(sent[0], bytes)
    assert [t for t, _ in records_of(sent[0])] == [0x17, 0x17]  # TLS 1.3 hides the types
    assert b"done" in out


@needs_openssl
def test_renegotiation_is_refused(server_context: TlsServerContext) -> None:
    """A TLS 1.2 client's renegotiation: our server decrypts its ClientHello, holds a
    no_renegotiation alert (wants_write) that encrypt(b"") hands out, and s_client gives up."""
    server = RecordServer(server_context, lambda session, plain: b"")
    client = _s_client(server.port, "-tls1_2")
    assert client.stdin is not None and client.stderr is not None
    try:
        assert server.handshake_done.wait(30)
        client.stdin.write(b"R\n")
        client.stdin.flush()
        err = _wait_for_line(client.stderr, b"RENEGOTIATING")
        client.stdin.close()
        err += client.stderr.read()
    finally:
        client.kill()
        client.wait()
    server.join()
    flushed = [value for kind, value in server.log if kind == "flushed"]
    assert len(flushed) == 1 and isinstance(flushed[0], bytes)
    assert records_of(flushed[0]) == [(0x15, len(flushed[0]) - 5)]  # one alert record
    assert b"no renegotiation" in err
    assert server.session.version() == "TLSv1.2"
