"""CERTS cell parsing and verification (relay.torcerts) on certificates built here.

The test builds what a tor relay sends (cert-spec): an RSA-1024 self-signed identity cert (2),
the TLS link cert signed by it (1), an Ed25519 identity->signing cert (4), a signing->TLS-cert
cert (5), and the RSA->Ed25519 cross-cert (7, a raw PKCS#1 v1.5 signature of a SHA-256). Then
it breaks each piece in turn. A real tor's CERTS cell is checked in tests/test_tor_interop.py.
"""

from __future__ import annotations

import datetime
import hashlib
import struct

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.oid import NameOID

from relay.torcerts import CertsError, RelayCerts, parse_certs_cell


def _x509(subject: str, key: rsa.RSAPrivateKey, issuer: str, signer: rsa.RSAPrivateKey) -> bytes:
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=2))
        .sign(signer, hashes.SHA256())
    )
    return cert.public_bytes(Encoding.DER)


# Ed25519 and cross-certificate expiry in hours since the epoch (year 2214): the verifier now
# refuses expired certificates, so these must outlive the test suite.
_FAR_FUTURE_HOURS = 2_140_000


def _raw_ed(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def _ed_cert(cert_type: int, key_type: int, certified: bytes, signer: Ed25519PrivateKey,
             include_signer: bool) -> bytes:
    body = (bytes((1, cert_type)) + struct.pack(">I", _FAR_FUTURE_HOURS) + bytes((key_type,))
            + certified)
    if include_signer:
        body += b"\x01" + struct.pack(">HBB", 32, 4, 0) + _raw_ed(signer)
    else:
        body += b"\x00"
    return body + signer.sign(body)


def _rsa_raw_sign(key: rsa.RSAPrivateKey, digest: bytes) -> bytes:
    """tor's RSA signature: PKCS#1 v1.5 type-1 padding around the bare digest (no DigestInfo)."""
    size = key.key_size // 8
    block = b"\x00\x01" + b"\xff" * (size - 3 - len(digest)) + b"\x00" + digest
    numbers = key.private_numbers()
    signature = pow(int.from_bytes(block, "big"), numbers.d, numbers.public_numbers.n)
    return signature.to_bytes(size, "big")


class _Relay:
    def __init__(self) -> None:
        self.identity = rsa.generate_private_key(public_exponent=65537, key_size=1024)
        link_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.identity_der = _x509("www.id.net", self.identity, "www.id.net", self.identity)
        self.tls_der = _x509("www.link.com", link_key, "www.id.net", self.identity)
        self.ed_identity = Ed25519PrivateKey.generate()
        self.ed_signing = Ed25519PrivateKey.generate()
        self.certs = {
            1: self.tls_der,
            2: self.identity_der,
            4: _ed_cert(4, 1, _raw_ed(self.ed_signing), self.ed_identity, True),
            5: _ed_cert(5, 3, hashlib.sha256(self.tls_der).digest(), self.ed_signing, False),
            7: self.cross_cert(_raw_ed(self.ed_identity)),
        }

    def cross_cert(self, ed_key: bytes) -> bytes:
        signed = ed_key + struct.pack(">I", _FAR_FUTURE_HOURS)
        digest = hashlib.sha256(b"Tor TLS RSA/Ed25519 cross-certificate" + signed).digest()
        signature = _rsa_raw_sign(self.identity, digest)
        return signed + bytes((len(signature),)) + signature

    def fingerprint(self) -> str:
        der = self.identity.public_key().public_bytes(Encoding.DER, PublicFormat.PKCS1)
        return hashlib.sha1(der).hexdigest().upper()


def _cell(certs: dict[int, bytes]) -> bytes:
    return bytes((len(certs),)) + b"".join(
        struct.pack(">BH", t, len(c)) + c for t, c in certs.items()
    )


@pytest.fixture(scope="module")
def relay() -> _Relay:
    return _Relay()


def test_full_cell_parses_and_both_bindings_hold(relay: _Relay) -> None:
    parsed = parse_certs_cell(_cell(relay.certs))
    assert isinstance(parsed, RelayCerts)
    assert parsed.fingerprint == relay.fingerprint()
    assert len(parsed.fingerprint) == 40
    assert parsed.ed25519_identity == _raw_ed(relay.ed_identity)
    assert sorted(parsed.certs) == [1, 2, 4, 5, 7]
    assert parsed.verify(relay.tls_der) == ["rsa-link", "ed25519-link"]
    assert parsed.verify(None) == []


def test_rsa_only_and_ed_only_cells(relay: _Relay) -> None:
    rsa_only = {t: relay.certs[t] for t in (1, 2)}
    assert parse_certs_cell(_cell(rsa_only)).verify(relay.tls_der) == ["rsa-link"]
    ed_only = {t: relay.certs[t] for t in (2, 4, 5, 7)}
    assert parse_certs_cell(_cell(ed_only)).verify(relay.tls_der) == ["ed25519-link"]
    with pytest.raises(CertsError, match="no certificate binds"):
        parse_certs_cell(_cell({2: relay.certs[2]})).verify(relay.tls_der)


def test_another_tls_certificate_is_refused(relay: _Relay) -> None:
    other = _Relay()
    with pytest.raises(CertsError, match="differs from the TLS"):
        parse_certs_cell(_cell(relay.certs)).verify(other.tls_der)
    ed_only = {t: relay.certs[t] for t in (2, 4, 5, 7)}
    with pytest.raises(CertsError, match="does not certify the TLS"):
        parse_certs_cell(_cell(ed_only)).verify(other.tls_der)


def test_link_cert_not_signed_by_identity_is_refused(relay: _Relay) -> None:
    other = _Relay()
    with pytest.raises(CertsError, match="not signed by the RSA identity"):
        parse_certs_cell(_cell({1: other.tls_der, 2: relay.certs[2]})).verify(other.tls_der)


@pytest.mark.parametrize("cert_type", [4, 5, 7])
def test_flipped_byte_in_an_ed25519_chain_cert_is_refused(relay: _Relay, cert_type: int) -> None:
    certs = dict(relay.certs)
    broken = bytearray(certs[cert_type])
    broken[-10] ^= 1  # inside the signature
    certs[cert_type] = bytes(broken)
    with pytest.raises(CertsError, match=f"cert type {cert_type}"):
        parse_certs_cell(_cell(certs)).verify(relay.tls_der)


def test_cross_cert_for_another_ed25519_identity_is_refused(relay: _Relay) -> None:
    certs = dict(relay.certs)
    certs[7] = relay.cross_cert(_raw_ed(Ed25519PrivateKey.generate()))
    with pytest.raises(CertsError, match="another Ed25519 identity"):
        parse_certs_cell(_cell(certs)).verify(relay.tls_der)


def test_identity_not_self_signed_is_refused(relay: _Relay) -> None:
    other = _Relay()
    forged = _x509("www.id.net", relay.identity, "www.id.net", other.identity)
    with pytest.raises(CertsError, match="not self-signed"):
        parse_certs_cell(_cell({1: relay.tls_der, 2: forged})).verify(relay.tls_der)


@pytest.mark.parametrize(
    "body, message",
    [
        (b"", "empty"),
        (b"\x01\x02\x00", "truncated in a certificate header"),
        (b"\x01\x02\x00\x10abc", "truncated in certificate type 2"),
        (b"\x01\x01\x00\x01x", "no RSA identity"),
        (b"\x01\x02\x00\x03abc", "not valid DER"),
        (b"\x02\x01\x00\x01x\x01\x00\x01y", "type 1 twice"),
    ],
)
def test_malformed_cells_raise_certs_error(body: bytes, message: str) -> None:
    with pytest.raises(CertsError, match=message):
        parse_certs_cell(body)
