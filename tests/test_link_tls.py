"""The sans-IO TLS client (relay.tls) against a real OpenSSL server session.

The server side is an ``ssl.SSLObject`` over memory BIOs with a freshly generated self-signed
certificate (like a tor relay's); bytes are shuttled between the two by hand, which is exactly
what the link layer does with a Stream's reads and writes.
"""

from __future__ import annotations

import datetime
import os
import ssl
import tempfile

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from relay.tls import TlsClientSession, TlsError

pytestmark = pytest.mark.timeout(60)


def _self_signed() -> tuple[bytes, bytes]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "www.example-relay.net")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


class _Server:
    """An OpenSSL server session over memory BIOs."""

    def __init__(self) -> None:
        cert_pem, key_pem = _self_signed()
        self.cert_der = ssl.PEM_cert_to_DER_cert(cert_pem.decode())
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        with tempfile.TemporaryDirectory() as tmp:
            cert_path, key_path = os.path.join(tmp, "c.pem"), os.path.join(tmp, "k.pem")
            with open(cert_path, "wb") as f:
                f.write(cert_pem)
            with open(key_path, "wb") as f:
                f.write(key_pem)
            context.load_cert_chain(cert_path, key_path)
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = context.wrap_bio(self.incoming, self.outgoing, server_side=True)
        self.received = bytearray()

    def feed(self, data: bytes) -> bytes:
        self.incoming.write(data)
        try:
            self.obj.do_handshake()
            while chunk := self.obj.read(65536):
                self.received += chunk
        except (ssl.SSLWantReadError, ssl.SSLZeroReturnError):
            pass
        return self.outgoing.read()

    def send(self, data: bytes) -> bytes:
        self.obj.write(data)
        return self.outgoing.read()


def _handshake(client: TlsClientSession, server: _Server) -> bytes:
    """Run the handshake to completion; return any plaintext the client received."""
    to_server = client.start()
    plaintext = b""
    for _ in range(10):
        to_client = server.feed(to_server)
        got, to_server = client.feed(to_client)
        plaintext += got
        if client.handshake_done and not to_server:
            break
    return plaintext


def test_handshake_then_bytes_both_ways_and_peer_certificate() -> None:
    server, client = _Server(), TlsClientSession()
    assert client.peer_certificate_der() is None
    with pytest.raises(TlsError, match="before the TLS handshake"):
        client.encrypt(b"too early")
    _handshake(client, server)
    assert client.handshake_done
    assert client.version() in ("TLSv1.2", "TLSv1.3")
    assert client.cipher()
    assert client.peer_certificate_der() == server.cert_der

    message = os.urandom(200_000)
    server.feed(client.encrypt(message))
    assert bytes(server.received) == message

    reply = os.urandom(150_000)
    records = server.send(reply)
    got = bytearray()
    # Feed in awkward pieces, as TCP would deliver them.
    for i in range(0, len(records), 1000):
        plaintext, to_write = client.feed(records[i : i + 1000])
        got += plaintext
        assert to_write == b""
    assert bytes(got) == reply


def test_close_sends_close_notify_and_peer_close_is_seen() -> None:
    server, client = _Server(), TlsClientSession()
    _handshake(client, server)
    alert = client.close()
    assert alert  # a close_notify record
    server.feed(alert)
    assert server.obj.read(10) == b""  # EOF by close_notify (no data would raise WantRead)
    with pytest.raises(TlsError, match="closed"):
        client.encrypt(b"x")
    assert client.close() == b""

    server2, client2 = _Server(), TlsClientSession()
    _handshake(client2, server2)
    try:
        server2.obj.unwrap()
    except ssl.SSLWantReadError:
        pass
    plaintext, _ = client2.feed(server2.outgoing.read())
    assert plaintext == b""
    assert client2.peer_closed


def test_peer_that_is_not_tls_fails_the_handshake() -> None:
    client = TlsClientSession()
    assert client.start()  # a ClientHello
    with pytest.raises(TlsError, match="handshake failed"):
        client.feed(b"HTTP/1.0 400 Bad Request\r\nContent-Length: 0\r\n\r\n" * 4)
    with pytest.raises(TlsError, match="closed"):
        client.feed(b"more")


def test_corrupt_record_after_handshake_is_a_tls_error() -> None:
    server, client = _Server(), TlsClientSession()
    _handshake(client, server)
    records = bytearray(server.send(b"hello tor"))
    records[-3] ^= 0xFF
    with pytest.raises(TlsError, match="record"):
        client.feed(bytes(records))
