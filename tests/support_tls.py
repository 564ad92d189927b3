"""TLS test support: certificates, in-memory session pumping, a one-connection socket server
driven by a sans-IO ``TlsServerSession``; no tests here.

* :func:`credentials`: a fresh self-signed certificate and its key, like a relay's link cert.
* :func:`handshake`: shuttle records between a client and a server session until both are done.
* :func:`send_through`: encrypt on one session, feed the records to the other in pieces of a
  given size, as TCP would deliver them; returns the plaintext that came out.
* :class:`SocketServer`: accepts one loopback connection in a thread and drives a
  ``TlsServerSession`` over the blocking socket with a script; what happened (plaintext, the
  ``TlsError`` hit, SNI, exporter values) is kept for the test to check.
"""

from __future__ import annotations

import datetime
import socket
import threading
from collections.abc import Callable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from relay.tls import TlsClientSession, TlsError, TlsServerContext, TlsServerSession

Session = TlsClientSession | TlsServerSession


def credentials(common_name: str = "www.example-relay.net",
                key_size: int = 2048) -> tuple[x509.Certificate, rsa.RSAPrivateKey]:
    """A self-signed RSA certificate valid from an hour ago for a day, and its key."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=key_size)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    return cert, key


def write_pem(directory: Path, cert: x509.Certificate,
              key: rsa.RSAPrivateKey) -> tuple[Path, Path]:
    """Write ``cert`` and ``key`` as PEM files for tools that want files; return the paths."""
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def handshake(client: TlsClientSession, server: TlsServerSession) -> None:
    """Run the handshake to completion in memory; no application data may come out."""
    to_server = client.start()
    assert to_server and server.start() == b""
    for _ in range(6):
        plain, to_client = server.feed(to_server)
        assert plain == b""
        plain, to_server = client.feed(to_client)
        assert plain == b""
        if client.handshake_done and server.handshake_done and not to_server:
            return
    raise AssertionError("handshake did not finish in 6 round trips")


def send_through(sender: Session, receiver: Session, data: bytes, piece: int) -> bytes:
    """Encrypt ``data`` on ``sender``, feed the records to ``receiver`` ``piece`` bytes at a
    time; return the plaintext ``receiver`` produced (nothing may need writing back)."""
    records = sender.encrypt(data)
    got = bytearray()
    for i in range(0, len(records), piece):
        plain, to_write = receiver.feed(records[i : i + piece])
        assert to_write == b""
        got += plain
    return bytes(got)


Script = Callable[[TlsServerSession, Callable[[bytes], None], bytes], bool]
"""Called after every ``feed`` with the session, a ``send(records)`` function and the plaintext
that came out; returns True to close the connection (the server then sends close_notify)."""


class SocketServer:
    """One TLS connection on 127.0.0.1, accepted and served in a thread by a
    ``TlsServerSession`` from ``context`` over the blocking socket."""

    def __init__(self, context: TlsServerContext, script: Script, timeout: float = 20) -> None:
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(1)
        self.port: int = self.listener.getsockname()[1]
        self.session = TlsServerSession(context)
        self.received = bytearray()
        self.error: TlsError | None = None
        self.peer_closed_at_end = False
        self._script = script
        self._timeout = timeout
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        self.listener.settimeout(self._timeout)
        try:
            conn, _ = self.listener.accept()
        finally:
            self.listener.close()
        with conn:
            conn.settimeout(self._timeout)
            session = self.session
            try:
                while True:
                    data = conn.recv(1 << 16)
                    if not data:
                        break
                    plain, to_write = session.feed(data)
                    if to_write:
                        conn.sendall(to_write)
                    self.received += plain
                    if session.handshake_done and self._script(session, conn.sendall, plain):
                        break
                    if session.peer_closed:
                        break
            except TlsError as exc:
                self.error = exc
            self.peer_closed_at_end = session.peer_closed
            alert = session.close()
            if alert:
                try:
                    conn.sendall(alert)
                except OSError:
                    pass  # the peer may be gone already

    def join(self) -> None:
        """Wait for the connection to end."""
        self._thread.join(self._timeout + 5)
        assert not self._thread.is_alive(), "the TLS server thread did not finish"
