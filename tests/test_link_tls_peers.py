"""relay.link over TLS against scripted TLS peers on loopback (no tor needed).

Each peer is a blocking ``ssl`` server in a thread that writes the bytes a test wants: a
tor-like responder whose CERTS bind its TLS certificate (the link opens, with the identity's
fingerprint), one whose CERTS name another certificate (AUTH_FAILED), one that skips CERTS,
and a TLS server that is not Tor at all (NOT_TOR). The real tor is tests/test_tor_interop.py.
"""

from __future__ import annotations

import datetime
import hashlib
import socket
import ssl
import struct
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from support_loop import run_until

from reactor import Reactor
from relay.cells import CellCommand, VarCell, encode_versions
from relay.link import CloseKind, Link, NetInfo, encode_netinfo

pytestmark = pytest.mark.timeout(60)


def _cert(subject: str, key: rsa.RSAPrivateKey, issuer: str,
          signer: rsa.RSAPrivateKey) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(signer, hashes.SHA256())
    )


class Identity:
    """A relay-like RSA identity and a TLS certificate signed by it."""

    def __init__(self, directory: Path) -> None:
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
        link_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.id_cert = _cert("www.id.net", self.key, "www.id.net", self.key)
        self.tls_cert = _cert("www.link.net", link_key, "www.id.net", self.key)
        self.cert_path = directory / "tls.pem"
        self.key_path = directory / "tls.key"
        self.cert_path.write_bytes(self.tls_cert.public_bytes(serialization.Encoding.PEM))
        self.key_path.write_bytes(link_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption()))
        der = self.key.public_key().public_bytes(serialization.Encoding.DER,
                                                 serialization.PublicFormat.PKCS1)
        self.fingerprint = hashlib.sha1(der).hexdigest().upper()

    def certs_cell(self, link_cert: x509.Certificate | None = None) -> bytes:
        certs = [(1, (link_cert or self.tls_cert).public_bytes(serialization.Encoding.DER)),
                 (2, self.id_cert.public_bytes(serialization.Encoding.DER))]
        body = bytes((len(certs),)) + b"".join(struct.pack(">BH", t, len(c)) + c
                                               for t, c in certs)
        return VarCell(0, CellCommand.CERTS, body).encode(5)


def fixed_cell(command: int, payload: bytes) -> bytes:
    return struct.pack(">IB", 0, command) + payload.ljust(509, b"\0")


@pytest.fixture
def identity(tmp_path: Path) -> Identity:
    return Identity(tmp_path)


@pytest.fixture
def reactor() -> Iterator[Reactor]:
    r = Reactor()
    yield r
    r.close()


def recv_exact(tls: ssl.SSLSocket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = tls.recv(size - len(data))
        if not chunk:
            raise EOFError(f"peer closed after {len(data)} of {size} bytes")
        data += chunk
    return data


def tls_peer(identity: Identity, script: Callable[[ssl.SSLSocket], None],
             hold: threading.Event | None = None) -> tuple[int, list[Any]]:
    """Serve one TLS connection with ``script`` in a thread; return the port and a list that
    receives the fixed cell the client sent after the script (or the exception hit). With
    ``hold``, the connection stays open until that event is set."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(identity.cert_path, identity.key_path)
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    seen: list[Any] = []

    def serve() -> None:
        server.settimeout(20)
        try:
            conn, _ = server.accept()
            with context.wrap_socket(conn, server_side=True) as tls:
                tls.settimeout(20)
                script(tls)
                seen.append(recv_exact(tls, 514))
                if hold is not None:
                    hold.wait(20)
        except Exception as exc:  # reported through `seen`
            seen.append(exc)
        finally:
            server.close()

    threading.Thread(target=serve, daemon=True).start()
    return server.getsockname()[1], seen


def responder(identity: Identity, certs: bytes | None) -> Callable[[ssl.SSLSocket], None]:
    def script(tls: ssl.SSLSocket) -> None:
        header = recv_exact(tls, 5)  # the client's VERSIONS comes first
        assert header[:3] == b"\x00\x00\x07"
        assert recv_exact(tls, header[4]) == b"\x00\x04\x00\x05"
        out = encode_versions([3, 4, 5])
        if certs is not None:
            out += certs
        out += VarCell(0, CellCommand.AUTH_CHALLENGE, bytes(32) + b"\x00\x01\x00\x03").encode(5)
        out += fixed_cell(CellCommand.NETINFO, encode_netinfo(
            NetInfo(1_700_000_000, "127.0.0.1", ("127.0.0.1",))))
        tls.sendall(out)
    return script


def test_tor_like_responder_opens_with_its_fingerprint(reactor: Reactor,
                                                       identity: Identity) -> None:
    hold = threading.Event()
    port, seen = tls_peer(identity, responder(identity, identity.certs_cell()), hold)
    link = Link.connect(reactor, "127.0.0.1", port, tls=True)
    run_until(reactor, lambda: bool(seen) or link.closed)
    assert link.is_open, link.close_reason
    assert link.link_version == 5
    assert link.tls_version in ("TLSv1.2", "TLSv1.3")
    assert link.peer_fingerprint == identity.fingerprint
    assert link.peer_cert_bindings == ("rsa-link",)
    assert link.auth_challenge_seen
    assert link.peer_netinfo == NetInfo(1_700_000_000, "127.0.0.1", ("127.0.0.1",))
    # What reached the peer after VERSIONS: our NETINFO (a client sends time 0), in v5 format.
    assert seen[0] == fixed_cell(CellCommand.NETINFO, encode_netinfo(NetInfo(0, "127.0.0.1")))
    hold.set()
    run_until(reactor, lambda: link.closed)
    assert link.close_kind is CloseKind.PEER_CLOSED


def test_certs_for_another_certificate_fail_authentication(reactor: Reactor,
                                                           identity: Identity,
                                                           tmp_path: Path) -> None:
    (tmp_path / "other").mkdir()
    other = Identity(tmp_path / "other")
    port, _ = tls_peer(identity, responder(identity, identity.certs_cell(other.tls_cert)))
    link = Link.connect(reactor, "127.0.0.1", port, tls=True)
    run_until(reactor, lambda: link.closed)
    assert link.close_kind is CloseKind.AUTH_FAILED
    assert "differs from the TLS certificate" in (link.close_reason or "")


def test_netinfo_without_certs_over_tls_is_refused(reactor: Reactor,
                                                   identity: Identity) -> None:
    port, _ = tls_peer(identity, responder(identity, None))
    link = Link.connect(reactor, "127.0.0.1", port, tls=True)
    run_until(reactor, lambda: link.closed)
    assert link.close_kind is CloseKind.AUTH_FAILED
    assert "without a CERTS cell" in (link.close_reason or "")


def test_tls_server_that_is_not_tor(reactor: Reactor, identity: Identity) -> None:
    def http(tls: ssl.SSLSocket) -> None:
        recv_exact(tls, 9)
        tls.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")

    port, _ = tls_peer(identity, http)
    link = Link.connect(reactor, "127.0.0.1", port, tls=True)
    run_until(reactor, lambda: link.closed)
    assert link.close_kind is CloseKind.NOT_TOR
    assert "not a Tor relay" in (link.close_reason or "")
