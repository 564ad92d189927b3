"""relay.identity.linkcerts and certscell: TLS certificates as tor makes them, CERTS bodies for
both sides of a link, and their verification (bindings, signatures, expiry) with refusals."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import Encoding

from relay.identity.certscell import CertsError, encode_certs_body, parse_certs_cell
from relay.identity.curve_ed import ExpandedEd25519Key
from relay.identity.edcert import (
    CERT_TYPE_SIGNING_AUTH,
    make_ed_cert,
    make_rsa_crosscert,
)
from relay.identity.keys import RelayIdentity
from relay.identity.linkcerts import (
    make_tls_link_certs,
    make_x509,
    pick_tls_cert_lifetime,
    random_hostname,
)
from relay.identity.periods import DAY

NOW = 1_800_000_000


@pytest.fixture(scope="module")
def identity(tmp_path_factory: pytest.TempPathFactory) -> RelayIdentity:
    path: Path = tmp_path_factory.mktemp("relay")
    return RelayIdentity.load_or_create(path, "CertsTest", now=NOW)


def _entries(body: bytes) -> list[tuple[int, bytes]]:
    certs = parse_certs_cell(body).certs
    return list(certs.items())


def _replace(body: bytes, cert_type: int, raw: bytes | None) -> bytes:
    entries = [(t, raw if t == cert_type else c) for t, c in _entries(body)]
    return encode_certs_body([(t, c) for t, c in entries if c is not None])


def test_tls_certificates_look_like_tors(identity: RelayIdentity) -> None:
    tls = make_tls_link_certs(identity.identity_key, NOW)
    link, ident = tls.link_cert, tls.identity_cert
    link_cn = link.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value
    issuer_cn = link.issuer.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value
    assert re.fullmatch(r"www\.[a-z2-7]{8,20}\.net", str(link_cn))
    assert re.fullmatch(r"www\.[a-z2-7]{8,20}\.com", str(issuer_cn))
    assert ident.subject == ident.issuer == link.issuer
    assert link.version == x509.Version.v3 and len(link.extensions) == 0
    assert 0 < link.serial_number < 2**64
    assert isinstance(link.signature_hash_algorithm, hashes.SHA256)
    link_key = link.public_key()
    assert isinstance(link_key, rsa.RSAPublicKey) and link_key.key_size == 2048
    ident_key = ident.public_key()
    assert isinstance(ident_key, rsa.RSAPublicKey)
    assert ident_key.public_numbers() == identity.identity_key.public_key().public_numbers()
    link.verify_directly_issued_by(ident)
    ident.verify_directly_issued_by(ident)
    for cert, lifetime in ((ident, 365 * DAY), (link, None)):
        start = cert.not_valid_before_utc.timestamp()
        end = cert.not_valid_after_utc.timestamp()
        assert start % DAY == 0 and start <= NOW and end >= NOW + DAY
        if lifetime is not None:
            assert end - start == lifetime
    assert tls.link_cert_der == link.public_bytes(Encoding.DER)
    assert tls.link_key.public_key().public_numbers() == link_key.public_numbers()


def test_random_names_and_lifetimes_stay_in_tors_ranges() -> None:
    lifetimes = {pick_tls_cert_lifetime() for _ in range(200)}
    assert all(5 * DAY - 1 <= t < 365 * DAY and t % DAY in (0, DAY - 1) for t in lifetimes)
    assert any(t % DAY == 0 for t in lifetimes) and any(t % DAY == DAY - 1 for t in lifetimes)
    names = {random_hostname("www.", ".net") for _ in range(200)}
    assert len(names) == 200
    assert {len(n) - 8 for n in names} <= set(range(8, 21))


def test_responder_certs_body_verifies_with_both_bindings(identity: RelayIdentity) -> None:
    body = identity.responder_certs_body()
    assert [t for t, _ in _entries(body)] == [1, 2, 4, 5, 7]
    certs = parse_certs_cell(body)
    assert certs.fingerprint == identity.fingerprint
    assert certs.ed25519_identity == identity.ed25519_identity
    assert certs.verify(identity.tls.link_cert_der, now=NOW) == ["rsa-link", "ed25519-link"]
    assert certs.verify(None, now=NOW) == []
    other = make_tls_link_certs(identity.identity_key, NOW)
    with pytest.raises(CertsError, match="differs from the TLS"):
        certs.verify(other.link_cert_der, now=NOW)


def test_responder_certs_expiry_refused_with_clear_errors(identity: RelayIdentity) -> None:
    certs = parse_certs_cell(identity.responder_certs_body())
    tls = identity.tls.link_cert_der
    link_end = identity.link_cert.expires_at
    with pytest.raises(CertsError, match=r"cert type 5 expired at \d+ .*now is"):
        certs.verify(tls, now=link_end + 1)
    key = identity.identity_key
    ident = make_x509(key.public_key(), key, "www.i.com", "www.i.com", NOW - DAY, NOW + 400 * DAY)
    link = make_x509(identity.tls.link_key.public_key(), key, "www.l.net", "www.i.com",
                     NOW - DAY, NOW + DAY)
    link_der = link.public_bytes(Encoding.DER)
    rsa_only = parse_certs_cell(encode_certs_body([(1, link_der),
                                                   (2, ident.public_bytes(Encoding.DER))]))
    assert rsa_only.verify(link_der, now=NOW + DAY + 2 * DAY) == ["rsa-link"]  # tor's slack
    with pytest.raises(CertsError, match=r"link certificate \(type 1\) expired at \d+"):
        rsa_only.verify(link_der, now=NOW + DAY + 2 * DAY + 1)
    early = identity.tls.identity_cert.not_valid_before_utc.timestamp() - 30 * DAY - 1
    with pytest.raises(CertsError, match=r"RSA identity certificate \(type 2\) is not valid"):
        certs.verify(tls, now=early)
    expired_cross = make_rsa_crosscert(identity.ed25519_identity, identity.identity_key, NOW)
    body = _replace(identity.responder_certs_body(), 7, expired_cross)
    with pytest.raises(CertsError, match="cert type 7: RSA->Ed25519 cross-certificate expired"):
        parse_certs_cell(body).verify(tls, now=NOW + 3601)


def test_initiator_certs_body_verifies(identity: RelayIdentity) -> None:
    body = identity.initiator_certs_body()
    assert [t for t, _ in _entries(body)] == [2, 4, 6, 7]
    who = parse_certs_cell(body).verify_initiator(now=NOW)
    assert who.identity_digest == identity.identity_digest
    assert who.identity_digest256 == identity.identity_digest256
    assert who.ed25519_identity == identity.ed25519_identity
    assert who.auth_key == identity.auth_key.public


def test_initiator_certs_refusals(identity: RelayIdentity) -> None:
    body = identity.initiator_certs_body()
    with pytest.raises(CertsError, match="no Ed25519 signing->link authentication"):
        parse_certs_cell(_replace(body, 6, None)).verify_initiator(now=NOW)
    with pytest.raises(CertsError, match="no RSA->Ed25519 cross-certificate"):
        parse_certs_cell(_replace(body, 7, None)).verify_initiator(now=NOW)
    with pytest.raises(CertsError, match="no Ed25519 identity->signing"):
        parse_certs_cell(_replace(body, 4, None)).verify_initiator(now=NOW)
    stranger = ExpandedEd25519Key.generate()
    foreign = make_ed_cert(stranger, CERT_TYPE_SIGNING_AUTH, identity.auth_key.public, NOW + DAY)
    with pytest.raises(CertsError, match="cert type 6: bad Ed25519 signature"):
        parse_certs_cell(_replace(body, 6, foreign.encoded)).verify_initiator(now=NOW)
    with pytest.raises(CertsError, match="cert type 6 expired"):
        parse_certs_cell(body).verify_initiator(now=identity.auth_cert.expires_at + 1)
    wrong_cross = make_rsa_crosscert(stranger.public, identity.identity_key, NOW + DAY)
    with pytest.raises(CertsError, match="another Ed25519 identity"):
        parse_certs_cell(_replace(body, 7, wrong_cross)).verify_initiator(now=NOW)
    tampered = bytearray(identity.signing_cert.encoded)
    tampered[20] ^= 1
    with pytest.raises(CertsError, match="cert type 4"):
        parse_certs_cell(_replace(body, 4, bytes(tampered))).verify_initiator(now=NOW)
    big = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    big_id = make_x509(big.public_key(), big, "www.a.com", "www.a.com", NOW - DAY, NOW + DAY)
    with pytest.raises(CertsError, match="2048 bits, not 1024"):
        parse_certs_cell(_replace(body, 2, big_id.public_bytes(Encoding.DER))).verify_initiator(
            now=NOW)
    swapped = encode_certs_body([(t, c) for t, c in _entries(body) if t != 6]
                                + [(6, identity.link_cert.encoded)])
    with pytest.raises(CertsError, match="carries cert type 5"):
        parse_certs_cell(swapped).verify_initiator(now=NOW)
