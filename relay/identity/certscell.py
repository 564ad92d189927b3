"""The CERTS cell (tor-spec 4.2): encode, parse, and verify either side's certificates.

A CERTS cell body is ``N(1)`` then N times ``CertType(1) CLEN(2) Cert(CLEN)``.

====  ================================================================  =========  =========
type  certificate                                                       responder  initiator
====  ================================================================  =========  =========
1     TLS link certificate (X.509, signed by the RSA identity key)      yes
2     RSA identity certificate (X.509, self-signed, RSA-1024)           yes        yes
4     Ed25519 identity -> Ed25519 signing key (cert-spec 2.1)           yes        yes
5     Ed25519 signing key -> SHA-256 of the TLS link certificate        yes
6     Ed25519 signing key -> Ed25519 link authentication key                       yes
7     RSA identity -> Ed25519 identity cross-certificate (cert-spec 2.3)  yes        yes
====  ================================================================  =========  =========

What holds after a check, following tor's ``or_handshake_certs_check_both``:

* :meth:`RelayCerts.verify` (an initiator checking the responder): the identity certificate is
  self-signed and within its validity; and the TLS certificate the peer presented is bound to
  that identity through type 1 (byte-for-byte the TLS certificate, signed by the identity key,
  within its validity) and/or through the Ed25519 chain 4 -> 5 (5 certifies SHA-256 of the TLS
  certificate) with 7 binding the RSA identity to 4's Ed25519 identity; no certificate of the
  chain has expired.
* :meth:`RelayCerts.verify_initiator` (a responder checking the initiator, auth method 3): the
  RSA-1024 identity certificate (2) is self-signed and valid, 4 is signed by the Ed25519
  identity it names, 6 is signed by 4's signing key, 7 binds the RSA identity to that Ed25519
  identity, and nothing has expired. The result names the key (6's) that must have signed the
  AUTHENTICATE cell (:mod:`relay.identity.authenticate`).

X.509 validity uses tor's slack: a certificate counts as valid from ``notBefore - 30 days`` to
``notAfter + 2 days`` (``TOR_X509_FUTURE_SLOP`` / ``TOR_X509_PAST_SLOP``). Ed25519 and cross
certificates get none. Every refusal raises :class:`CertsError` whose message names the
certificate type and what failed ("cert type 5 ... expired at ...").

Threads: pure functions over bytes; any thread.
"""

from __future__ import annotations

import hmac
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass
from hashlib import sha256

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import rsa

from relay.identity.edcert import (
    CERT_TYPE_ID_SIGNING,
    CERT_TYPE_SIGNING_AUTH,
    CERT_TYPE_SIGNING_LINK,
    KEY_TYPE_ED25519,
    KEY_TYPE_SHA256_OF_X509,
    CertError,
    Ed25519Cert,
    parse_ed_cert,
    parse_rsa_crosscert,
)
from relay.identity.rsaraw import RSA_KEY_BITS, rsa_digest, rsa_digest256

__all__ = [
    "CERT_LINK",
    "CERT_RSA_AUTH",
    "CERT_RSA_ED_CROSS",
    "CERT_RSA_ID",
    "X509_FUTURE_SLOP",
    "X509_PAST_SLOP",
    "CertsError",
    "InitiatorIdentity",
    "RelayCerts",
    "encode_certs_body",
    "parse_certs_cell",
    "rsa_fingerprint",
]

CERT_LINK = 1
CERT_RSA_ID = 2
CERT_RSA_AUTH = 3
CERT_RSA_ED_CROSS = 7

X509_PAST_SLOP = 2 * 24 * 3600
X509_FUTURE_SLOP = 30 * 24 * 3600

#: The old name of :func:`relay.identity.rsaraw.rsa_digest`, kept for existing imports.
rsa_fingerprint = rsa_digest


class CertsError(ValueError):
    """The CERTS cell is malformed, lacks a certificate, a signature or binding fails, or a
    certificate has expired (the message says which)."""


def encode_certs_body(entries: Sequence[tuple[int, bytes]]) -> bytes:
    """A CERTS cell body holding ``(cert_type, encoded)`` pairs in the given order.
    Any thread (pure)."""
    if len(entries) > 255:
        raise ValueError("a CERTS cell holds at most 255 certificates")
    out = bytearray((len(entries),))
    for cert_type, encoded in entries:
        if len(encoded) > 0xFFFF:
            raise ValueError(f"certificate type {cert_type} is {len(encoded)} bytes")
        out += struct.pack(">BH", cert_type, len(encoded)) + encoded
    return bytes(out)


def _x509_check(cert: x509.Certificate, issuer: x509.Certificate, now: float,
                what: str, unsigned: str) -> None:
    """tor's ``tor_tls_cert_is_valid`` without the key-size rule: signed by ``issuer``'s key
    (else ``what unsigned``) and within the validity period widened by tor's slack."""
    try:
        cert.verify_directly_issued_by(issuer)
    except (InvalidSignature, ValueError, TypeError) as exc:
        raise CertsError(f"{what} {unsigned}") from exc
    not_before = cert.not_valid_before_utc.timestamp()
    not_after = cert.not_valid_after_utc.timestamp()
    if not_before > now + X509_FUTURE_SLOP:
        raise CertsError(f"{what} is not valid before {int(not_before)}; now is {int(now)}")
    if not_after < now - X509_PAST_SLOP:
        raise CertsError(f"{what} expired at {int(not_after)}; now is {int(now)}")


def _ed(raw: bytes, cert_type: int) -> Ed25519Cert:
    try:
        cert = parse_ed_cert(raw, f"cert type {cert_type}")
    except CertError as exc:
        raise CertsError(str(exc)) from exc
    if cert.cert_type != cert_type:
        raise CertsError(f"cert type {cert_type} carries cert type {cert.cert_type}")
    return cert


def _ed_check(cert: Ed25519Cert, signer: bytes | None, now: float) -> bytes:
    try:
        return cert.check(signer, now=now, what=f"cert type {cert.cert_type}")
    except CertError as exc:
        raise CertsError(str(exc)) from exc


@dataclass(frozen=True)
class InitiatorIdentity:
    """Who the initiator of a link proved to be with its CERTS cell (before AUTHENTICATE)."""

    identity_key: rsa.RSAPublicKey
    identity_digest: bytes
    identity_digest256: bytes
    ed25519_identity: bytes
    auth_key: bytes


@dataclass(frozen=True)
class RelayCerts:
    """A parsed CERTS cell: raw certificates by type, and the peer's RSA identity."""

    certs: dict[int, bytes]
    identity_cert: x509.Certificate
    identity_digest: bytes

    @property
    def fingerprint(self) -> str:
        """The RSA identity fingerprint as 40 upper-case hex digits. Any thread."""
        return self.identity_digest.hex().upper()

    @property
    def identity_key(self) -> rsa.RSAPublicKey:
        """The RSA identity key (checked to be RSA when parsed). Any thread."""
        key = self.identity_cert.public_key()
        assert isinstance(key, rsa.RSAPublicKey)
        return key

    @property
    def identity_digest256(self) -> bytes:
        """SHA-256 of the identity key's PKCS#1 DER (AUTHENTICATE's CID/SID). Any thread."""
        return rsa_digest256(self.identity_key)

    @property
    def ed25519_identity(self) -> bytes | None:
        """The Ed25519 identity key named by the type 4 certificate, if present (unchecked).
        Any thread."""
        raw = self.certs.get(CERT_TYPE_ID_SIGNING)
        if raw is None:
            return None
        return _ed(raw, CERT_TYPE_ID_SIGNING).signing_key

    def _check_identity(self, now: float) -> rsa.RSAPublicKey:
        _x509_check(self.identity_cert, self.identity_cert, now,
                    f"RSA identity certificate (type {CERT_RSA_ID})", "is not self-signed")
        return self.identity_key

    def _check_crosscert(self, ed_identity: bytes, now: float) -> None:
        raw = self.certs.get(CERT_RSA_ED_CROSS)
        if raw is None:
            raise CertsError(f"no RSA->Ed25519 cross-certificate (type {CERT_RSA_ED_CROSS})")
        try:
            parse_rsa_crosscert(raw).check(self.identity_key, ed_identity, now=now)
        except CertError as exc:
            raise CertsError(f"cert type {CERT_RSA_ED_CROSS}: {exc}") from exc

    def _check_id_signing(self, now: float) -> Ed25519Cert:
        raw = self.certs.get(CERT_TYPE_ID_SIGNING)
        if raw is None:
            raise CertsError(f"no Ed25519 identity->signing certificate "
                             f"(type {CERT_TYPE_ID_SIGNING})")
        id_signing = _ed(raw, CERT_TYPE_ID_SIGNING)
        if id_signing.signing_key is None:
            raise CertsError(f"cert type {CERT_TYPE_ID_SIGNING} lacks the "
                             "signed-with-ed25519-key extension")
        if id_signing.key_type != KEY_TYPE_ED25519:
            raise CertsError(f"cert type {CERT_TYPE_ID_SIGNING} certifies key type "
                             f"{id_signing.key_type}, not an Ed25519 key")
        _ed_check(id_signing, None, now)
        return id_signing

    def verify(self, tls_cert_der: bytes | None, now: float | None = None) -> list[str]:
        """Check a responder's certificates as its initiator: the identity certificate and,
        with a TLS certificate, that it is bound to the identity. ``now`` (seconds since the
        epoch; default: the current time) decides expiry. Returns the names of the bindings
        that held (``"rsa-link"``, ``"ed25519-link"``); raises :class:`CertsError` if any
        present binding is broken or expired or, with a TLS certificate, none holds.
        Any thread."""
        when = time.time() if now is None else now
        self._check_identity(when)
        if tls_cert_der is None:
            return []
        held: list[str] = []
        link_raw = self.certs.get(CERT_LINK)
        if link_raw is not None:
            if not hmac.compare_digest(link_raw, tls_cert_der):
                raise CertsError("link certificate (type 1) differs from the TLS certificate")
            try:
                link = x509.load_der_x509_certificate(link_raw)
            except ValueError as exc:
                raise CertsError("link certificate (type 1) is not valid DER X.509") from exc
            _x509_check(link, self.identity_cert, when, f"link certificate (type {CERT_LINK})",
                        "is not signed by the RSA identity key")
            held.append("rsa-link")
        if all(t in self.certs for t in (CERT_TYPE_ID_SIGNING, CERT_TYPE_SIGNING_LINK,
                                         CERT_RSA_ED_CROSS)):
            id_signing = self._check_id_signing(when)
            signing_link = _ed(self.certs[CERT_TYPE_SIGNING_LINK], CERT_TYPE_SIGNING_LINK)
            if signing_link.key_type != KEY_TYPE_SHA256_OF_X509 or not hmac.compare_digest(
                signing_link.certified_key, sha256(tls_cert_der).digest()
            ):
                raise CertsError("cert type 5 does not certify the TLS certificate")
            _ed_check(signing_link, id_signing.certified_key, when)
            assert id_signing.signing_key is not None
            self._check_crosscert(id_signing.signing_key, when)
            held.append("ed25519-link")
        if not held:
            raise CertsError("no certificate binds the TLS certificate to the relay's identity")
        return held

    def verify_initiator(self, now: float | None = None) -> InitiatorIdentity:
        """Check an initiator's certificates as the responder, for authentication method 3
        (Ed25519-SHA256-RFC5705): types 2, 4, 6 and 7 must all be present, signed, bound and
        unexpired at ``now`` (default: the current time). Returns who the initiator claims to
        be and the key its AUTHENTICATE must be signed with. Raises :class:`CertsError`.
        Any thread."""
        when = time.time() if now is None else now
        identity_key = self._check_identity(when)
        if identity_key.key_size != RSA_KEY_BITS:
            raise CertsError(f"RSA identity key is {identity_key.key_size} bits, "
                             f"not {RSA_KEY_BITS}")
        id_signing = self._check_id_signing(when)
        raw_auth = self.certs.get(CERT_TYPE_SIGNING_AUTH)
        if raw_auth is None:
            raise CertsError(f"no Ed25519 signing->link authentication certificate "
                             f"(type {CERT_TYPE_SIGNING_AUTH})")
        signing_auth = _ed(raw_auth, CERT_TYPE_SIGNING_AUTH)
        if signing_auth.key_type != KEY_TYPE_ED25519:
            raise CertsError(f"cert type {CERT_TYPE_SIGNING_AUTH} certifies key type "
                             f"{signing_auth.key_type}, not an Ed25519 key")
        _ed_check(signing_auth, id_signing.certified_key, when)
        assert id_signing.signing_key is not None
        self._check_crosscert(id_signing.signing_key, when)
        return InitiatorIdentity(identity_key, self.identity_digest,
                                 rsa_digest256(identity_key), id_signing.signing_key,
                                 signing_auth.certified_key)


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
    return RelayCerts(certs, identity_cert, rsa_digest(key))
