"""TLS link certificates as tor makes them, and the CERTS cell bodies that carry them.

What tor 0.4.9 presents on a TLS link (``tor_tls_context_init_certificates``, checked against
a running tor 0.4.9.11):

* a fresh **RSA-2048 link key** for each TLS context, and an X.509 v3 **link certificate** for
  it: subject ``CN=www.<random>.net``, issuer ``CN=www.<random>.com``, signed by the RSA
  identity key with SHA-256, an 8-byte random serial, no extensions;
* the **identity certificate** (CERTS type 2): the RSA-1024 identity key self-signed, subject
  and issuer both the ``.com`` name, valid for a year;
* ``<random>`` is 8 to 20 characters of lower-case base32 (``crypto_random_hostname``);
* lifetimes: the link certificate's is drawn between 5 and 365 days, rounded to a day, one
  second less half the time; each certificate starts on a day boundary, at a random time up to
  ``lifetime - 2 days`` in the past (``tor_tls_pick_certificate_lifetime``), so a certificate
  does not reveal when the relay made it.

tor replaces the whole TLS context (link key, both certificates) every two hours and signs a
new Ed25519 type 5 certificate for the new link certificate (:mod:`relay.identity.keys` does
the rotation). :func:`make_tls_link_certs` returns the certificates as ``cryptography`` objects
plus their DER, ready for ``relay.tlscontext.TlsServerContext`` (which takes either).

CERTS bodies: :func:`responder_certs_body` (types 1, 2, 4, 5, 7: what a tor responder sends)
and :func:`initiator_certs_body` (types 2, 4, 6, 7: what a tor relay sends as initiator for
authentication method 3). tor initiators present no TLS certificate.

Threads: pure (randomness from the OS); any thread.
"""

from __future__ import annotations

import base64
import datetime
import os
import secrets
from dataclasses import dataclass
from hashlib import sha256

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from relay.identity.certscell import (
    CERT_LINK,
    CERT_RSA_ED_CROSS,
    CERT_RSA_ID,
    encode_certs_body,
)
from relay.identity.edcert import (
    CERT_TYPE_ID_SIGNING,
    CERT_TYPE_SIGNING_AUTH,
    CERT_TYPE_SIGNING_LINK,
    Ed25519Cert,
)
from relay.identity.periods import DAY

__all__ = [
    "IDENTITY_CERT_LIFETIME",
    "LINK_KEY_BITS",
    "MAX_TLS_CERT_LIFETIME",
    "MIN_TLS_CERT_LIFETIME",
    "TlsLinkCerts",
    "initiator_certs_body",
    "make_tls_link_certs",
    "make_x509",
    "pick_cert_validity",
    "pick_tls_cert_lifetime",
    "random_hostname",
    "responder_certs_body",
]

LINK_KEY_BITS = 2048
IDENTITY_CERT_LIFETIME = 365 * DAY
MIN_TLS_CERT_LIFETIME = 5 * DAY
MAX_TLS_CERT_LIFETIME = 365 * DAY
_SERIAL_BYTES = 8


def random_hostname(prefix: str, suffix: str, min_len: int = 8, max_len: int = 20) -> str:
    """``prefix`` + ``min_len``..``max_len`` random lower-case base32 characters + ``suffix``,
    as tor's ``crypto_random_hostname``. Any thread."""
    length = min_len + secrets.randbelow(max_len - min_len + 1)
    raw = os.urandom((length * 5 + 7) // 8 + 5)
    return prefix + base64.b32encode(raw).decode("ascii").lower()[:length] + suffix


def pick_tls_cert_lifetime() -> int:
    """A link certificate lifetime as tor picks one when ``SSLKeyLifetime`` is 0: uniform in
    [5 days, 365 days), rounded down to a day, and one second shorter half the time.
    Any thread."""
    span = MAX_TLS_CERT_LIFETIME - MIN_TLS_CERT_LIFETIME
    lifetime = MIN_TLS_CERT_LIFETIME + secrets.randbelow(span)
    lifetime -= lifetime % DAY
    return lifetime - secrets.randbelow(2)


def pick_cert_validity(now: float, lifetime: int) -> tuple[int, int]:
    """``(not_before, not_after)`` for a certificate of ``lifetime`` seconds made at ``now``:
    the start lies on a day boundary, at least a day of real lifetime is left, and the start
    is never in the future (tor's ``tor_tls_pick_certificate_lifetime``). Any thread."""
    now_i = int(now)
    min_real_lifetime = granularity = DAY
    if lifetime <= min_real_lifetime + granularity:
        earliest = now_i - 1
    else:
        earliest = now_i + min_real_lifetime + granularity - lifetime
    start = earliest + secrets.randbelow(now_i - earliest)
    start -= start % granularity
    return start, start + lifetime


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _utc(seconds: int) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC)


def make_x509(subject_key: rsa.RSAPublicKey, signer: rsa.RSAPrivateKey, subject_cn: str,
              issuer_cn: str, not_before: int, not_after: int) -> x509.Certificate:
    """An X.509 v3 certificate as tor makes them: one-CN names, a random 64-bit serial,
    no extensions, signed with SHA-256. Any thread."""
    serial = 0
    while serial == 0:
        serial = int.from_bytes(os.urandom(_SERIAL_BYTES), "big")
    return (
        x509.CertificateBuilder()
        .subject_name(_name(subject_cn))
        .issuer_name(_name(issuer_cn))
        .public_key(subject_key)
        .serial_number(serial)
        .not_valid_before(_utc(not_before))
        .not_valid_after(_utc(not_after))
        .sign(signer, hashes.SHA256())
    )


@dataclass(frozen=True)
class TlsLinkCerts:
    """One TLS context's credentials: link key and certificate, and the identity certificate."""

    link_key: rsa.RSAPrivateKey
    link_cert: x509.Certificate
    link_cert_der: bytes
    identity_cert: x509.Certificate
    identity_cert_der: bytes
    created_at: float

    @property
    def link_cert_sha256(self) -> bytes:
        """SHA-256 of the link certificate's DER: what the type 5 certificate certifies and
        AUTHENTICATE's SCERT is. Any thread."""
        return sha256(self.link_cert_der).digest()


def make_tls_link_certs(identity_key: rsa.RSAPrivateKey, now: float,
                        link_lifetime: int | None = None) -> TlsLinkCerts:
    """A new TLS context's credentials, as tor makes them (see the module docstring).
    ``link_lifetime`` overrides the random link certificate lifetime. Any thread."""
    link_key = rsa.generate_private_key(public_exponent=65537, key_size=LINK_KEY_BITS)
    link_name = random_hostname("www.", ".net")
    identity_name = random_hostname("www.", ".com")
    lifetime = pick_tls_cert_lifetime() if link_lifetime is None else link_lifetime
    link_cert = make_x509(link_key.public_key(), identity_key, link_name, identity_name,
                          *pick_cert_validity(now, lifetime))
    identity_cert = make_x509(identity_key.public_key(), identity_key, identity_name,
                              identity_name, *pick_cert_validity(now, IDENTITY_CERT_LIFETIME))
    return TlsLinkCerts(link_key, link_cert, link_cert.public_bytes(Encoding.DER),
                        identity_cert, identity_cert.public_bytes(Encoding.DER), now)


def responder_certs_body(tls: TlsLinkCerts, signing_cert: Ed25519Cert,
                         link_cert: Ed25519Cert, rsa_crosscert: bytes) -> bytes:
    """The responder's CERTS body: link (1), identity (2), identity->signing (4),
    signing->link (5) and the RSA->Ed25519 cross-certificate (7), in tor's order.
    Any thread (pure)."""
    return encode_certs_body([
        (CERT_LINK, tls.link_cert_der),
        (CERT_RSA_ID, tls.identity_cert_der),
        (CERT_TYPE_ID_SIGNING, signing_cert.encoded),
        (CERT_TYPE_SIGNING_LINK, link_cert.encoded),
        (CERT_RSA_ED_CROSS, rsa_crosscert),
    ])


def initiator_certs_body(identity_cert_der: bytes, signing_cert: Ed25519Cert,
                         auth_cert: Ed25519Cert, rsa_crosscert: bytes) -> bytes:
    """The initiator's CERTS body for authentication method 3: identity (2),
    identity->signing (4), signing->link authentication key (6) and the cross-certificate (7).
    Any thread (pure)."""
    return encode_certs_body([
        (CERT_RSA_ID, identity_cert_der),
        (CERT_TYPE_ID_SIGNING, signing_cert.encoded),
        (CERT_TYPE_SIGNING_AUTH, auth_cert.encoded),
        (CERT_RSA_ED_CROSS, rsa_crosscert),
    ])
