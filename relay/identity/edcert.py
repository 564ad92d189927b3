"""tor's own certificate formats (cert-spec 2.1 and 2.3): Ed25519 certificates and the
RSA -> Ed25519 cross-certificate.

Ed25519 certificate (cert-spec 2.1)::

    VERSION(1)=1  CERT_TYPE(1)  EXPIRATION_DATE(4, hours since the epoch)  CERT_KEY_TYPE(1)
    CERTIFIED_KEY(32)  N_EXTENSIONS(1)  N x [ExtLength(2) ExtType(1) ExtFlags(1) ExtData]
    SIGNATURE(64, Ed25519 over everything before it)

The types tor uses between relays: 4 (Ed25519 identity -> signing key), 5 (signing key -> SHA-256
of the TLS link certificate, key type 3), 6 (signing key -> link authentication key) and 0x0A
(the ntor onion key's Ed25519 form -> the Ed25519 identity, in descriptors). Extension 4
(signed-with-ed25519-key) carries the signer's public key; tor puts it in type 4 only. A
certificate expires when ``now > EXPIRATION_DATE * 3600``; tor computes the field as
``ceil((now + lifetime) / 3600)`` and so does :func:`make_ed_cert`. Like tor's
``tor_cert_parse``, :func:`parse_ed_cert` refuses a second signed-with-key extension and any
unknown extension whose flags say it affects validation (flag 1).

RSA -> Ed25519 cross-certificate (cert-spec 2.3, CERTS type 7)::

    ED25519_KEY(32)  EXPIRATION(4, hours)  SIGLEN(1)  SIGNATURE(SIGLEN)

signed with the RSA identity key, tor-style (:mod:`relay.identity.rsaraw`), over
``SHA-256("Tor TLS RSA/Ed25519 cross-certificate" | ED25519_KEY | EXPIRATION)``.

Threads: pure functions and immutable values; any thread.
"""

from __future__ import annotations

import hmac
import math
import struct
from dataclasses import dataclass
from hashlib import sha256

from cryptography.hazmat.primitives.asymmetric import rsa

from relay.identity.curve_ed import (
    ED25519_KEY_LEN,
    ED25519_SIG_LEN,
    ExpandedEd25519Key,
    ed25519_verify,
)
from relay.identity.rsaraw import rsa_recover_raw, rsa_sign_raw

__all__ = [
    "CERT_TYPE_ID_SIGNING",
    "CERT_TYPE_NTOR_ONION_ID",
    "CERT_TYPE_SIGNING_AUTH",
    "CERT_TYPE_SIGNING_LINK",
    "EXT_FLAG_AFFECTS_VALIDATION",
    "EXT_SIGNED_WITH_KEY",
    "KEY_TYPE_ED25519",
    "KEY_TYPE_SHA256_OF_RSA",
    "KEY_TYPE_SHA256_OF_X509",
    "RSA_CROSSCERT_PREFIX",
    "CertError",
    "CertExtension",
    "Ed25519Cert",
    "RsaCrosscert",
    "expiration_hours",
    "make_ed_cert",
    "make_rsa_crosscert",
    "parse_ed_cert",
    "parse_rsa_crosscert",
]

CERT_TYPE_ID_SIGNING = 0x04
CERT_TYPE_SIGNING_LINK = 0x05
CERT_TYPE_SIGNING_AUTH = 0x06
CERT_TYPE_NTOR_ONION_ID = 0x0A  # tor's CERT_TYPE_ONION_ID: ntor key (as Ed25519) -> identity

KEY_TYPE_ED25519 = 0x01
KEY_TYPE_SHA256_OF_RSA = 0x02
KEY_TYPE_SHA256_OF_X509 = 0x03

EXT_SIGNED_WITH_KEY = 0x04
EXT_FLAG_AFFECTS_VALIDATION = 0x01

RSA_CROSSCERT_PREFIX = b"Tor TLS RSA/Ed25519 cross-certificate"

_VERSION = 1
# version, type, expiration, key type, key, n_extensions
_HEADER = struct.Struct(f">BBIB{ED25519_KEY_LEN}sB")
_EXT_HEADER = struct.Struct(">HBB")  # length, type, flags
_CROSS_HEADER = struct.Struct(f">{ED25519_KEY_LEN}sIB")  # Ed25519 key, expiration, signature length


class CertError(ValueError):
    """A certificate is malformed, badly signed, signed by the wrong key, or expired."""


def expiration_hours(expires_at: float) -> int:
    """The hours-since-the-epoch field for a certificate valid until ``expires_at`` (seconds),
    rounded up as tor does. Any thread (pure)."""
    hours = math.ceil(expires_at / 3600)
    if not 0 <= hours <= 0xFFFFFFFF:
        raise ValueError(f"expiration {expires_at!r} does not fit a 32-bit hour count")
    return hours


def _check_not_expired(what: str, hours: int, now: float | None) -> None:
    if now is not None and now > hours * 3600:
        raise CertError(f"{what} expired at {hours * 3600} (hour {hours}); now is {int(now)}")


@dataclass(frozen=True)
class CertExtension:
    """One extension of an Ed25519 certificate."""

    ext_type: int
    flags: int
    data: bytes


@dataclass(frozen=True)
class Ed25519Cert:
    """A decoded Ed25519 certificate; ``encoded`` is the exact bytes (signature included)."""

    cert_type: int
    expiration: int
    key_type: int
    certified_key: bytes
    signing_key: bytes | None
    extensions: tuple[CertExtension, ...]
    encoded: bytes

    @property
    def expires_at(self) -> int:
        """When the certificate stops being valid, in seconds since the epoch. Any thread."""
        return self.expiration * 3600

    @property
    def signed_part(self) -> bytes:
        """The bytes the signature covers. Any thread."""
        return self.encoded[:-ED25519_SIG_LEN]

    @property
    def signature(self) -> bytes:
        """The 64-byte Ed25519 signature. Any thread."""
        return self.encoded[-ED25519_SIG_LEN:]

    def is_expired(self, now: float) -> bool:
        """Whether ``now`` is past the expiration (tor's ``now > valid_until``). Any thread."""
        return now > self.expires_at

    def check(self, signer: bytes | None = None, *, now: float | None,
              what: str | None = None) -> bytes:
        """Check the signature with ``signer`` (or, when None, the key the signed-with-key
        extension names) and, when ``now`` is given, the expiration. Returns the key that
        verified. Raises :class:`CertError` naming ``what`` (default: the cert type).
        Any thread (pure)."""
        label = what or f"Ed25519 certificate type {self.cert_type}"
        if signer is None:
            if self.signing_key is None:
                raise CertError(f"{label}: no signing key given and none included")
            signer = self.signing_key
        elif self.signing_key is not None and not hmac.compare_digest(signer, self.signing_key):
            raise CertError(f"{label}: signed-with-key extension names another key")
        _check_not_expired(label, self.expiration, now)
        if not ed25519_verify(signer, self.signature, self.signed_part):
            raise CertError(f"{label}: bad Ed25519 signature")
        return signer


def make_ed_cert(signer: ExpandedEd25519Key, cert_type: int, certified_key: bytes,
                 expires_at: float, *, key_type: int = KEY_TYPE_ED25519,
                 include_signing_key: bool = False) -> Ed25519Cert:
    """Build and sign an Ed25519 certificate valid until ``expires_at`` (seconds; rounded up to
    the hour). ``include_signing_key`` adds the signed-with-ed25519-key extension (flags 0, as
    tor). Any thread (pure)."""
    if len(certified_key) != ED25519_KEY_LEN:
        raise ValueError(f"certified key must be {ED25519_KEY_LEN} bytes, got {len(certified_key)}")
    extensions: tuple[CertExtension, ...] = ()
    if include_signing_key:
        extensions = (CertExtension(EXT_SIGNED_WITH_KEY, 0, signer.public),)
    body = _HEADER.pack(_VERSION, cert_type, expiration_hours(expires_at), key_type,
                        certified_key, len(extensions))
    for ext in extensions:
        body += _EXT_HEADER.pack(len(ext.data), ext.ext_type, ext.flags) + ext.data
    return parse_ed_cert(body + signer.sign(body))


def parse_ed_cert(raw: bytes, what: str = "Ed25519 certificate") -> Ed25519Cert:
    """Decode an Ed25519 certificate (no signature check: see :meth:`Ed25519Cert.check`).
    Raises :class:`CertError` on anything tor's parser refuses. Any thread (pure)."""
    raw = bytes(raw)
    if len(raw) < _HEADER.size + ED25519_SIG_LEN:
        raise CertError(f"{what}: {len(raw)} bytes is too short")
    version, cert_type, expiration, key_type, certified, n_ext = _HEADER.unpack_from(raw)
    if version != _VERSION:
        raise CertError(f"{what}: version {version}, expected {_VERSION}")
    offset = _HEADER.size
    end = len(raw) - ED25519_SIG_LEN
    extensions: list[CertExtension] = []
    signing_key: bytes | None = None
    for _ in range(n_ext):
        if offset + _EXT_HEADER.size > end:
            raise CertError(f"{what}: truncated extension header")
        length, ext_type, flags = _EXT_HEADER.unpack_from(raw, offset)
        offset += _EXT_HEADER.size
        if offset + length > end:
            raise CertError(f"{what}: extension type {ext_type} runs past the signature")
        data = raw[offset : offset + length]
        offset += length
        if ext_type == EXT_SIGNED_WITH_KEY:
            if length != ED25519_KEY_LEN:
                raise CertError(f"{what}: signed-with-key extension of {length} bytes")
            if signing_key is not None:
                raise CertError(f"{what}: two signed-with-key extensions")
            signing_key = data
        elif flags & EXT_FLAG_AFFECTS_VALIDATION:
            raise CertError(f"{what}: unknown extension type {ext_type} affects validation")
        extensions.append(CertExtension(ext_type, flags, data))
    if offset != end:
        raise CertError(f"{what}: {end - offset} stray bytes before the signature")
    return Ed25519Cert(cert_type, expiration, key_type, certified, signing_key,
                       tuple(extensions), raw)


@dataclass(frozen=True)
class RsaCrosscert:
    """A decoded RSA -> Ed25519 cross-certificate (CERTS type 7)."""

    ed25519_key: bytes
    expiration: int
    signature: bytes
    encoded: bytes

    @property
    def expires_at(self) -> int:
        """When it stops being valid, in seconds since the epoch. Any thread."""
        return self.expiration * 3600

    def check(self, rsa_identity: rsa.RSAPublicKey, ed25519_identity: bytes, *,
              now: float | None) -> None:
        """Check that it names ``ed25519_identity``, has not expired at ``now`` (when given) and
        is signed by ``rsa_identity``, as tor's ``rsa_ed25519_crosscert_check``. Raises
        :class:`CertError`. Any thread (pure)."""
        if not hmac.compare_digest(self.ed25519_key, ed25519_identity):
            raise CertError("RSA->Ed25519 cross-certificate names another Ed25519 identity")
        if now is not None and self.expires_at < now:
            raise CertError(f"RSA->Ed25519 cross-certificate expired at {self.expires_at}; "
                            f"now is {int(now)}")
        try:
            recovered = rsa_recover_raw(rsa_identity, self.signature)
        except ValueError as exc:
            raise CertError("RSA->Ed25519 cross-certificate: bad RSA signature") from exc
        digest = sha256(RSA_CROSSCERT_PREFIX + self.encoded[: ED25519_KEY_LEN + 4]).digest()
        if len(recovered) < len(digest) or not hmac.compare_digest(recovered[:32], digest):
            raise CertError("RSA->Ed25519 cross-certificate: signature covers other data")


def make_rsa_crosscert(ed25519_identity: bytes, rsa_identity: rsa.RSAPrivateKey,
                       expires_at: float) -> bytes:
    """The encoded cross-certificate by which ``rsa_identity`` vouches for
    ``ed25519_identity`` until ``expires_at`` (rounded up to the hour). Any thread (pure)."""
    if len(ed25519_identity) != ED25519_KEY_LEN:
        raise ValueError(f"Ed25519 identity must be {ED25519_KEY_LEN} bytes")
    signed = ed25519_identity + struct.pack(">I", expiration_hours(expires_at))
    signature = rsa_sign_raw(rsa_identity, sha256(RSA_CROSSCERT_PREFIX + signed).digest())
    if len(signature) > 255:
        raise ValueError("RSA identity key too large for a cross-certificate")
    return signed + bytes((len(signature),)) + signature


def parse_rsa_crosscert(raw: bytes) -> RsaCrosscert:
    """Decode a cross-certificate (no signature check: see :meth:`RsaCrosscert.check`).
    Raises :class:`CertError`. Any thread (pure)."""
    raw = bytes(raw)
    if len(raw) < _CROSS_HEADER.size:
        raise CertError(f"RSA->Ed25519 cross-certificate: {len(raw)} bytes is too short")
    ed_key, expiration, sig_len = _CROSS_HEADER.unpack_from(raw)
    if len(raw) != _CROSS_HEADER.size + sig_len:
        raise CertError(f"RSA->Ed25519 cross-certificate: {len(raw)} bytes, but its signature "
                        f"length says {_CROSS_HEADER.size + sig_len}")
    return RsaCrosscert(ed_key, expiration, raw[_CROSS_HEADER.size :], raw)
