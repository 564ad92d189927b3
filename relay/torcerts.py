"""The responder's CERTS cell: who the relay at the other end of a TLS link is.

A CERTS cell body is ``N(1)`` then N times ``CertType(1) CLEN(2) Cert(CLEN)`` (tor-spec 4.2).
A tor relay (0.4.x) sends, as the responder of a link handshake:

====  =====================================================================================
type  certificate
====  =====================================================================================
1     link certificate: X.509, the TLS certificate itself, signed by the RSA identity key
2     RSA identity certificate: self-signed X.509 over the relay's RSA-1024 identity key
4     Ed25519 identity -> signing key (Tor's own certificate format, cert-spec 2.1)
5     Ed25519 signing key -> SHA-256 of the TLS certificate
7     RSA identity -> Ed25519 identity cross-certificate (cert-spec 2.3)
====  =====================================================================================

What a client needs is the relay's **RSA identity fingerprint**: SHA-1 of the DER encoding of
the identity public key as a PKCS#1 ``RSAPublicKey`` (the 40-hex-digit name that descriptors,
consensuses and EXTEND2 legacy-id link specifiers use). :func:`parse_certs_cell` decodes the
cell and :meth:`RelayCerts.verify` checks, with ``cryptography``:

* the identity certificate (type 2) is self-signed by its key;
* the TLS certificate the peer presented is bound to that identity: the type 1 certificate is
  byte-for-byte the TLS certificate and is signed by the identity key, and/or (when types 4, 5
  and 7 are present) the Ed25519 chain holds: 4 is signed by the Ed25519 identity key it
  carries, 5 is signed by 4's signing key and certifies SHA-256 of the TLS certificate, and 7 is
  the RSA identity's signature over that Ed25519 identity.

Expiration dates are not checked (a test relay's certificates are deliberately back-dated);
this is a test client's check, not a full implementation of tor's path building.

Threads: pure functions over bytes; any thread.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

__all__ = [
    "CERT_ED_ID_SIGNING",
    "CERT_ED_SIGNING_LINK",
    "CERT_LINK",
    "CERT_RSA_ED_CROSS",
    "CERT_RSA_ID",
    "CertsError",
    "RelayCerts",
    "parse_certs_cell",
    "rsa_fingerprint",
]

CERT_LINK = 1
CERT_RSA_ID = 2
CERT_RSA_AUTH = 3
CERT_ED_ID_SIGNING = 4
CERT_ED_SIGNING_LINK = 5
CERT_ED_SIGNING_AUTH = 6
CERT_RSA_ED_CROSS = 7

_ED_CERT_VERSION = 1
_ED_KEY_TYPE_ED25519 = 1
_ED_KEY_TYPE_SHA256_X509 = 3
_ED_EXT_SIGNED_WITH_KEY = 4
_ED_SIG_LEN = 64
_ED_KEY_LEN = 32
_CROSS_CERT_PREFIX = b"Tor TLS RSA/Ed25519 cross-certificate"


class CertsError(ValueError):
    """The CERTS cell is malformed, lacks a certificate, or a signature / binding fails."""


def rsa_fingerprint(public_key: rsa.RSAPublicKey) -> bytes:
    """SHA-1 of the PKCS#1 DER of an RSA public key: a relay's 20-byte identity digest.
    Any thread."""
    return hashlib.sha1(public_key.public_bytes(Encoding.DER, PublicFormat.PKCS1)).digest()


@dataclass(frozen=True)
class _EdCert:
    """A decoded Ed25519 certificate (cert-spec 2.1)."""

    cert_type: int
    key_type: int
    certified_key: bytes
    signed_with: bytes | None
    signed_part: bytes
    signature: bytes


def _parse_ed_cert(raw: bytes, what: str) -> _EdCert:
    if len(raw) < 40 + _ED_SIG_LEN or raw[0] != _ED_CERT_VERSION:
        raise CertsError(f"{what}: not a version-1 Ed25519 certificate")
    cert_type, key_type = raw[1], raw[6]
    certified = raw[7:39]
    n_ext = raw[39]
    offset = 40
    signed_with: bytes | None = None
    for _ in range(n_ext):
        if offset + 4 > len(raw) - _ED_SIG_LEN:
            raise CertsError(f"{what}: truncated extension")
        ext_len, ext_type = struct.unpack_from(">HB", raw, offset)
        data = raw[offset + 4 : offset + 4 + ext_len]
        if offset + 4 + ext_len > len(raw) - _ED_SIG_LEN:
            raise CertsError(f"{what}: truncated extension")
        if ext_type == _ED_EXT_SIGNED_WITH_KEY and ext_len == _ED_KEY_LEN:
            signed_with = bytes(data)
        offset += 4 + ext_len
    if offset != len(raw) - _ED_SIG_LEN:
        raise CertsError(f"{what}: {len(raw) - _ED_SIG_LEN - offset} stray bytes")
    return _EdCert(cert_type, key_type, bytes(certified), signed_with, bytes(raw[:offset]),
                   bytes(raw[offset:]))


def _ed_verify(key: bytes, cert: _EdCert, what: str) -> None:
    try:
        Ed25519PublicKey.from_public_bytes(key).verify(cert.signature, cert.signed_part)
    except (InvalidSignature, ValueError) as exc:
        raise CertsError(f"{what}: bad Ed25519 signature") from exc


@dataclass(frozen=True)
class RelayCerts:
    """A parsed CERTS cell: raw certificates by type, and the relay's RSA identity."""

    certs: dict[int, bytes]
    identity_cert: x509.Certificate
    identity_digest: bytes

    @property
    def fingerprint(self) -> str:
        """The RSA identity fingerprint as 40 upper-case hex digits. Any thread."""
        return self.identity_digest.hex().upper()

    @property
    def ed25519_identity(self) -> bytes | None:
        """The relay's Ed25519 identity key (from the type 4 certificate), if present.
        Any thread."""
        raw = self.certs.get(CERT_ED_ID_SIGNING)
        if raw is None:
            return None
        return _parse_ed_cert(raw, "Ed25519 identity->signing cert").signed_with

    def verify(self, tls_cert_der: bytes | None) -> list[str]:
        """Check the identity self-signature and that the TLS certificate ``tls_cert_der`` is
        bound to the identity (skipped when None). Returns the names of the bindings that held
        (``"rsa-link"``, ``"ed25519-link"``); raises :class:`CertsError` if any present binding
        is broken or, with a TLS certificate, none holds. Any thread."""
        identity_key = self.identity_cert.public_key()
        if not isinstance(identity_key, rsa.RSAPublicKey):
            raise CertsError("identity certificate does not hold an RSA key")
        try:
            self.identity_cert.verify_directly_issued_by(self.identity_cert)
        except (InvalidSignature, ValueError, TypeError) as exc:
            raise CertsError("RSA identity certificate is not self-signed") from exc
        if tls_cert_der is None:
            return []
        held: list[str] = []
        link_raw = self.certs.get(CERT_LINK)
        if link_raw is not None:
            if not hmac.compare_digest(link_raw, tls_cert_der):
                raise CertsError("link certificate (type 1) differs from the TLS certificate")
            try:
                link = x509.load_der_x509_certificate(link_raw)
                link.verify_directly_issued_by(self.identity_cert)
            except (InvalidSignature, ValueError, TypeError) as exc:
                raise CertsError("link certificate is not signed by the RSA identity") from exc
            held.append("rsa-link")
        if all(t in self.certs for t in (CERT_ED_ID_SIGNING, CERT_ED_SIGNING_LINK,
                                         CERT_RSA_ED_CROSS)):
            self._verify_ed25519_chain(identity_key, tls_cert_der)
            held.append("ed25519-link")
        if not held:
            raise CertsError("no certificate binds the TLS certificate to the relay's identity")
        return held

    def _verify_ed25519_chain(self, identity_key: rsa.RSAPublicKey, tls_der: bytes) -> None:
        id_signing = _parse_ed_cert(self.certs[CERT_ED_ID_SIGNING], "cert type 4")
        signing_link = _parse_ed_cert(self.certs[CERT_ED_SIGNING_LINK], "cert type 5")
        if id_signing.signed_with is None:
            raise CertsError("cert type 4 lacks the signed-with-ed25519-key extension")
        ed_identity = id_signing.signed_with
        _ed_verify(ed_identity, id_signing, "cert type 4")
        _ed_verify(id_signing.certified_key, signing_link, "cert type 5")
        if signing_link.key_type != _ED_KEY_TYPE_SHA256_X509 or not hmac.compare_digest(
            signing_link.certified_key, hashlib.sha256(tls_der).digest()
        ):
            raise CertsError("cert type 5 does not certify the TLS certificate")
        cross = self.certs[CERT_RSA_ED_CROSS]
        if len(cross) < _ED_KEY_LEN + 5 or cross[_ED_KEY_LEN + 4] != len(cross) - _ED_KEY_LEN - 5:
            raise CertsError("cert type 7 is malformed")
        signed = cross[: _ED_KEY_LEN + 4]
        try:
            recovered = identity_key.recover_data_from_signature(
                cross[_ED_KEY_LEN + 5 :], padding.PKCS1v15(), None
            )
        except (InvalidSignature, ValueError) as exc:
            raise CertsError("cert type 7: bad RSA signature") from exc
        if not hmac.compare_digest(recovered, hashlib.sha256(_CROSS_CERT_PREFIX + signed).digest()):
            raise CertsError("cert type 7: RSA signature does not cover this Ed25519 key")
        if not hmac.compare_digest(cross[:_ED_KEY_LEN], ed_identity):
            raise CertsError("cert type 7 names another Ed25519 identity than cert type 4")


def parse_certs_cell(body: bytes) -> RelayCerts:
    """Decode a CERTS cell body; it must hold exactly one RSA identity certificate (type 2)
    and no certificate type twice. Raises :class:`CertsError`. Any thread."""
    if not body:
        raise CertsError("CERTS cell is empty")
    count = body[0]
    offset = 1
    certs: dict[int, bytes] = {}
    for _ in range(count):
        if offset + 3 > len(body):
            raise CertsError("CERTS cell truncated in a certificate header")
        cert_type, clen = struct.unpack_from(">BH", body, offset)
        if offset + 3 + clen > len(body):
            raise CertsError(f"CERTS cell truncated in certificate type {cert_type}")
        if cert_type in certs:
            raise CertsError(f"CERTS cell holds certificate type {cert_type} twice")
        certs[cert_type] = bytes(body[offset + 3 : offset + 3 + clen])
        offset += 3 + clen
    raw_id = certs.get(CERT_RSA_ID)
    if raw_id is None:
        raise CertsError("CERTS cell has no RSA identity certificate (type 2)")
    try:
        identity_cert = x509.load_der_x509_certificate(raw_id)
        key = identity_cert.public_key()
    except ValueError as exc:
        raise CertsError("RSA identity certificate is not valid DER X.509") from exc
    if not isinstance(key, rsa.RSAPublicKey):
        raise CertsError("RSA identity certificate does not hold an RSA key")
    return RelayCerts(certs, identity_cert, rsa_fingerprint(key))
