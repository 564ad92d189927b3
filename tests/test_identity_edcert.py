"""relay.identity.edcert and rsaraw: tor's Ed25519 certificates, RSA->Ed25519 cross-certificates
and raw RSA signatures -- round trips, a certificate tor 0.4.9.11 made, and refusals."""

from __future__ import annotations

import base64
import os
import struct

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from relay.identity.curve_ed import ExpandedEd25519Key
from relay.identity.edcert import (
    CERT_TYPE_ID_SIGNING,
    CERT_TYPE_SIGNING_LINK,
    EXT_SIGNED_WITH_KEY,
    KEY_TYPE_SHA256_OF_X509,
    CertError,
    expiration_hours,
    make_ed_cert,
    make_rsa_crosscert,
    parse_ed_cert,
    parse_rsa_crosscert,
)
from relay.identity.rsaraw import rsa_recover_raw, rsa_sign_raw

NOW = 1_800_000_000.0

# A type 4 certificate and the master key it names, from the descriptor a tor 0.4.9.11
# authority published (identity-ed25519 / master-key-ed25519 lines).
TOR_TYPE4 = base64.b64decode(
    "AQQAB5/cAY6mipBywr8fgr/ju9zJMVYEex1JPOr+7yItykK6qi+RAQAgBAAM4g13"
    "qJ9E+7Zb1odaPqL0yTYW2zR8W0sLv/hRgiprCvj8K+X8hJ49UhHbtab8Dk8PgsYO"
    "7mG4ZBY1tXw+D693ZBeyB7ZD+ERyJLoZKcKWPI4VMK7GOP0zQ/nJE9nD8gc=")
TOR_MASTER = base64.b64decode("DOINd6ifRPu2W9aHWj6i9Mk2Fts0fFtLC7/4UYIqawo=")


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=1024)


def test_a_certificate_tor_made_parses_and_verifies() -> None:
    cert = parse_ed_cert(TOR_TYPE4)
    assert cert.cert_type == CERT_TYPE_ID_SIGNING and cert.signing_key == TOR_MASTER
    assert cert.expiration == 0x00079FDC and cert.expires_at == 0x00079FDC * 3600
    assert cert.check(None, now=cert.expires_at - 1) == TOR_MASTER
    with pytest.raises(CertError, match="expired"):
        cert.check(None, now=cert.expires_at + 1)
    tampered = bytearray(TOR_TYPE4)
    tampered[10] ^= 1  # inside the certified key
    with pytest.raises(CertError, match="bad Ed25519 signature"):
        parse_ed_cert(bytes(tampered)).check(None, now=None)


def test_round_trip_with_and_without_the_signer_extension() -> None:
    master, signing = ExpandedEd25519Key.generate(), ExpandedEd25519Key.generate()
    cert = make_ed_cert(master, CERT_TYPE_ID_SIGNING, signing.public, NOW + 86400,
                        include_signing_key=True)
    assert len(cert.encoded) == 40 + 36 + 64
    assert cert.extensions[0].ext_type == EXT_SIGNED_WITH_KEY and cert.signing_key == master.public
    assert parse_ed_cert(cert.encoded) == cert
    assert cert.check(None, now=NOW) == master.public
    assert cert.expiration == expiration_hours(NOW + 86400) == -(-(NOW + 86400) // 3600)
    digest = os.urandom(32)
    link = make_ed_cert(signing, CERT_TYPE_SIGNING_LINK, digest, NOW + 3600,
                        key_type=KEY_TYPE_SHA256_OF_X509)
    assert link.signing_key is None and link.certified_key == digest and len(link.encoded) == 104
    assert link.check(signing.public, now=NOW) == signing.public
    with pytest.raises(CertError, match="no signing key"):
        link.check(None, now=NOW)
    with pytest.raises(CertError, match="bad Ed25519 signature"):
        link.check(master.public, now=NOW)
    with pytest.raises(CertError, match="names another key"):
        cert.check(signing.public, now=NOW)


def test_expiry_is_tors_now_greater_than_expiration() -> None:
    key = ExpandedEd25519Key.generate()
    cert = make_ed_cert(key, CERT_TYPE_SIGNING_LINK, bytes(32), 7200.0)
    assert cert.expires_at == 7200
    cert.check(key.public, now=7200)
    assert not cert.is_expired(7200) and cert.is_expired(7201)
    with pytest.raises(CertError, match=r"expired at 7200 .*now is 7201"):
        cert.check(key.public, now=7201)


def _raw_cert(extensions: bytes, n_ext: int) -> tuple[bytes, ExpandedEd25519Key]:
    key = ExpandedEd25519Key.generate()
    body = struct.pack(">BBIB32sB", 1, 5, 500_000, 1, bytes(32), n_ext) + extensions
    return body + key.sign(body), key


def test_extensions_as_tor_parses_them() -> None:
    ignorable = struct.pack(">HBB", 3, 9, 0) + b"abc"
    raw, key = _raw_cert(ignorable, 1)
    cert = parse_ed_cert(raw)
    assert cert.extensions[0].data == b"abc" and cert.check(key.public, now=None)
    critical = struct.pack(">HBB", 3, 9, 1) + b"abc"
    with pytest.raises(CertError, match="affects validation"):
        parse_ed_cert(_raw_cert(critical, 1)[0])
    signer = struct.pack(">HBB", 32, 4, 0) + bytes(32)
    with pytest.raises(CertError, match="two signed-with-key"):
        parse_ed_cert(_raw_cert(signer + signer, 2)[0])
    with pytest.raises(CertError, match="signed-with-key extension of 3 bytes"):
        parse_ed_cert(_raw_cert(struct.pack(">HBB", 3, 4, 0) + b"abc", 1)[0])


@pytest.mark.parametrize("mutate, message", [
    (lambda raw: raw[:100], "too short"),
    (lambda raw: b"\x02" + raw[1:], "version 2"),
    (lambda raw: raw[:39] + b"\x01" + raw[40:], "runs past the signature|truncated"),
    (lambda raw: raw[:104] + b"x" + raw[104:], "stray bytes"),
])
def test_malformed_certificates_refused(mutate, message: str) -> None:
    key = ExpandedEd25519Key.generate()
    raw = make_ed_cert(key, CERT_TYPE_SIGNING_LINK, bytes(32), NOW).encoded
    assert len(raw) == 104
    with pytest.raises(CertError, match=message):
        parse_ed_cert(mutate(raw))


def test_raw_rsa_signature_matches_openssl_and_recovers(rsa_key: rsa.RSAPrivateKey) -> None:
    digest = os.urandom(20)
    sha1_digest_info = bytes.fromhex("3021300906052b0e03021a05000414")
    ours = rsa_sign_raw(rsa_key, sha1_digest_info + digest)
    theirs = rsa_key.sign(digest, padding.PKCS1v15(), Prehashed(hashes.SHA1()))
    assert ours == theirs
    data = os.urandom(52)
    signature = rsa_sign_raw(rsa_key, data)
    assert len(signature) == 128 and rsa_recover_raw(rsa_key.public_key(), signature) == data
    other = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with pytest.raises(ValueError, match="does not verify"):
        rsa_recover_raw(other.public_key(), signature)
    with pytest.raises(ValueError, match="do not fit"):
        rsa_sign_raw(rsa_key, bytes(118))


def test_rsa_crosscert_round_trip_and_refusals(rsa_key: rsa.RSAPrivateKey) -> None:
    ed = os.urandom(32)
    raw = make_rsa_crosscert(ed, rsa_key, NOW + 3600)
    cross = parse_rsa_crosscert(raw)
    assert cross.ed25519_key == ed and cross.expires_at == expiration_hours(NOW + 3600) * 3600
    assert len(raw) == 32 + 4 + 1 + 128 and raw[36] == 128
    cross.check(rsa_key.public_key(), ed, now=NOW)
    with pytest.raises(CertError, match="another Ed25519 identity"):
        cross.check(rsa_key.public_key(), os.urandom(32), now=NOW)
    with pytest.raises(CertError, match="expired"):
        cross.check(rsa_key.public_key(), ed, now=cross.expires_at + 1)
    other = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with pytest.raises(CertError, match="bad RSA signature"):
        cross.check(other.public_key(), ed, now=NOW)
    later = bytearray(raw)
    later[35] ^= 1  # the expiration: signed, so the signature no longer covers it
    with pytest.raises(CertError, match="covers other data"):
        parse_rsa_crosscert(bytes(later)).check(rsa_key.public_key(), ed, now=NOW)
    with pytest.raises(CertError, match="signature length"):
        parse_rsa_crosscert(raw + b"x")
    with pytest.raises(CertError, match="too short"):
        parse_rsa_crosscert(raw[:30])
