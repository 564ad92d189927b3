"""relay.identity.keys and keyfiles: a relay's keys in tor's files, reloaded, renewed, rotated.

Times are explicit (``now`` arguments), so rotation is tested by stepping a clock, not by
waiting. Certificate expirations are whole hours (tor's format), so the short testing periods
here are whole hours too. That tor itself reads these files is tests/test_identity_tor.py.
"""

from __future__ import annotations

import base64
import os
import stat
from pathlib import Path

import pytest

from relay.identity import keyfiles
from relay.identity.certscell import parse_certs_cell
from relay.identity.keys import (
    ROTATE_AUTH_KEY,
    ROTATE_LINK_CERT,
    ROTATE_OLD_ONION_KEYS,
    ROTATE_ONION_KEYS,
    ROTATE_RSA_CROSSCERT,
    ROTATE_SIGNING_KEY,
    ROTATE_TLS,
    KeyPeriods,
    RelayIdentity,
)

HOUR = 3600
T0 = 1_800_000_000 - 1_800_000_000 % HOUR  # on an hour boundary
SHORT = KeyPeriods(
    signing_key_lifetime=10 * HOUR, signing_key_slop=2 * HOUR,
    link_cert_lifetime=4 * HOUR, link_key_slop=HOUR,
    auth_key_lifetime=6 * HOUR, auth_key_slop=HOUR,
    rsa_crosscert_lifetime=20 * HOUR, rsa_crosscert_slop=5 * HOUR,
    onion_key_lifetime=8 * HOUR, onion_key_grace_period=3 * HOUR,
    tls_rotation_interval=2 * HOUR, tls_cert_lifetime=10 * 24 * HOUR)
TOR_FILES = {
    "secret_id_key": b"-----BEGIN RSA PRIVATE KEY-----\n",
    "secret_onion_key": b"-----BEGIN RSA PRIVATE KEY-----\n",
    "secret_onion_key_ntor": b"== c25519v1: onion ==",
    "ed25519_master_id_secret_key": b"== ed25519v1-secret: type0 ==",
    "ed25519_master_id_public_key": b"== ed25519v1-public: type0 ==",
    "ed25519_signing_secret_key": b"== ed25519v1-secret: type4 ==",
    "ed25519_signing_cert": b"== ed25519v1-cert: type4 ==",
}


@pytest.fixture()
def datadir(tmp_path: Path) -> Path:
    return tmp_path / "relay"


def test_creates_tors_files_with_tors_formats_and_modes(datadir: Path) -> None:
    identity = RelayIdentity.load_or_create(datadir, "Relay1", now=T0)
    keys = datadir / "keys"
    assert sorted(p.name for p in keys.iterdir()) == sorted(TOR_FILES)
    for name, start in TOR_FILES.items():
        content = (keys / name).read_bytes()
        assert content.startswith(start), name
        if start.startswith(b"=="):
            assert content[len(start):32] == bytes(32 - len(start)), name
        assert stat.S_IMODE((keys / name).stat().st_mode) == 0o600, name
    assert {len((keys / n).read_bytes()) for n in TOR_FILES if n.startswith("ed25519_")
            and "cert" not in n} == {64, 96}
    for directory in (datadir, keys):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert (datadir / "fingerprint").read_text() == f"Relay1 {identity.fingerprint}\n"
    ed = base64.b64encode(identity.ed25519_identity).decode().rstrip("=")
    assert (datadir / "fingerprint-ed25519").read_text() == f"Relay1 {ed}\n"
    assert len(identity.fingerprint) == 40 and identity.identity_key.key_size == 1024
    assert identity.onion.tap.key_size == 1024
    assert identity.signing_cert.signing_key == identity.ed25519_identity
    assert identity.signing_cert.expires_at >= T0 + 30 * 24 * HOUR
    identity.check_consistency(T0)


def test_reload_gives_the_same_keys_and_rewrites_nothing(datadir: Path) -> None:
    first = RelayIdentity.load_or_create(datadir, "Relay1", now=T0)
    before = {p.name: p.read_bytes() for p in (datadir / "keys").iterdir()}
    again = RelayIdentity.load_or_create(datadir, "Relay1", now=T0 + HOUR)
    assert {p.name: p.read_bytes() for p in (datadir / "keys").iterdir()} == before
    assert again.fingerprint == first.fingerprint
    assert again.ed25519_identity == first.ed25519_identity
    assert again.signing_key == first.signing_key
    assert again.signing_cert.encoded == first.signing_cert.encoded
    assert again.ntor_onion_key == first.ntor_onion_key
    assert again.onion.set_at == first.onion.set_at == T0
    assert again.tls.link_cert_der != first.tls.link_cert_der  # TLS lives in memory only


def test_signing_key_renewed_on_load_when_it_expires_within_the_slop(datadir: Path) -> None:
    first = RelayIdentity.load_or_create(datadir, "Relay1", now=T0, periods=SHORT)
    late = first.signing_cert.expires_at - SHORT.signing_key_slop + 1
    second = RelayIdentity.load_or_create(datadir, "Relay1", now=late, periods=SHORT)
    assert second.signing_key != first.signing_key
    assert second.ed25519_identity == first.ed25519_identity
    assert second.signing_cert.expires_at >= late + SHORT.signing_key_lifetime
    third = RelayIdentity.load_or_create(datadir, "Relay1", now=late, periods=SHORT)
    assert third.signing_key == second.signing_key


def test_rotation_of_signing_auth_tls_and_crosscert(datadir: Path) -> None:
    identity = RelayIdentity.load_or_create(datadir, "Relay1", now=T0, periods=SHORT)
    assert identity.needs_rotation(T0) == frozenset()
    tls_at = T0 + SHORT.tls_rotation_interval
    assert identity.needs_rotation(tls_at - 1) == frozenset()
    old_tls, old_link = identity.tls, identity.link_cert
    assert identity.rotate(tls_at) == {ROTATE_TLS, ROTATE_LINK_CERT}
    assert identity.tls.link_cert_der != old_tls.link_cert_der
    assert identity.link_cert.certified_key == identity.tls.link_cert_sha256
    assert identity.link_cert.certified_key != old_link.certified_key
    certs = parse_certs_cell(identity.responder_certs_body())
    assert certs.verify(identity.tls.link_cert_der, now=tls_at) == ["rsa-link", "ed25519-link"]

    auth_at = identity.auth_cert.expires_at - SHORT.auth_key_slop
    assert ROTATE_AUTH_KEY in identity.needs_rotation(auth_at)
    old_auth = identity.auth_key
    assert ROTATE_AUTH_KEY in identity.rotate(auth_at)
    assert identity.auth_key != old_auth
    assert parse_certs_cell(identity.initiator_certs_body()).verify_initiator(
        now=auth_at).auth_key == identity.auth_key.public

    signing_at = identity.signing_cert.expires_at - SHORT.signing_key_slop
    assert ROTATE_SIGNING_KEY in identity.needs_rotation(signing_at)
    old_signing, old_auth = identity.signing_key, identity.auth_key
    done = identity.rotate(signing_at)
    assert {ROTATE_SIGNING_KEY, ROTATE_AUTH_KEY, ROTATE_LINK_CERT} <= done
    assert identity.signing_key != old_signing and identity.auth_key != old_auth
    identity.check_consistency(signing_at)
    reloaded = RelayIdentity.load_or_create(datadir, "Relay1", now=signing_at, periods=SHORT)
    assert reloaded.signing_key == identity.signing_key

    cross_at = identity.rsa_crosscert_expires - SHORT.rsa_crosscert_slop
    old_cross = identity.rsa_crosscert
    assert ROTATE_RSA_CROSSCERT in identity.rotate(cross_at)
    assert identity.rsa_crosscert != old_cross
    assert parse_certs_cell(identity.responder_certs_body()).verify(
        identity.tls.link_cert_der, now=cross_at) == ["rsa-link", "ed25519-link"]


def test_onion_keys_rotate_and_the_old_ones_stay_valid_for_the_grace_period(
        datadir: Path) -> None:
    identity = RelayIdentity.load_or_create(datadir, "Relay1", now=T0, periods=SHORT)
    keys = datadir / "keys"
    first_ntor, first_tap = identity.onion.ntor, identity.onion.tap
    first_public = identity.ntor_onion_key
    rotate_at = T0 + SHORT.onion_key_lifetime
    assert ROTATE_ONION_KEYS not in identity.needs_rotation(rotate_at - 1)
    assert ROTATE_ONION_KEYS in identity.rotate(rotate_at)
    assert identity.ntor_onion_key != first_public
    assert (keys / "secret_onion_key_ntor.old").exists()
    assert (keys / "secret_onion_key.old").exists()
    valid = identity.ntor_onion_keys(rotate_at + 1)
    assert [k.public_key().public_bytes_raw() for k in valid] == [
        identity.ntor_onion_key, first_public]
    assert identity.ntor_key_for(first_public, rotate_at + 1) is not None
    old_tap = identity.tap_onion_keys(rotate_at + 1)[1]
    assert old_tap.private_numbers() == first_tap.private_numbers()
    assert keyfiles.read_curve25519(keys / "secret_onion_key_ntor.old") == (
        first_ntor.private_bytes_raw())

    during = rotate_at + SHORT.onion_key_grace_period - 1
    reloaded = RelayIdentity.load_or_create(datadir, "Relay1", now=during, periods=SHORT)
    assert reloaded.onion.set_at == rotate_at
    assert len(reloaded.ntor_onion_keys(during)) == 2

    after = rotate_at + SHORT.onion_key_grace_period
    assert [k.public_key().public_bytes_raw() for k in identity.ntor_onion_keys(after)] == [
        identity.ntor_onion_key]
    assert identity.ntor_key_for(first_public, after) is None
    assert identity.needs_rotation(after) >= {ROTATE_OLD_ONION_KEYS}
    assert ROTATE_OLD_ONION_KEYS in identity.rotate(after)
    assert not (keys / "secret_onion_key_ntor.old").exists()
    assert not (keys / "secret_onion_key.old").exists()
    assert identity.previous_onion is None


def test_tagged_file_checks(tmp_path: Path) -> None:
    path = tmp_path / "k"
    keyfiles.write_tagged(path, "ed25519v1-public", "type0", bytes(range(32)))
    assert path.read_bytes()[:32] == b"== ed25519v1-public: type0 ==\x00\x00\x00"
    assert keyfiles.read_tagged(path, "ed25519v1-public", 32) == ("type0", bytes(range(32)))
    with pytest.raises(keyfiles.KeyFileError, match="not of type"):
        keyfiles.read_tagged(path, "ed25519v1-secret", 32)
    with pytest.raises(keyfiles.KeyFileError, match="expected 96"):
        keyfiles.read_tagged(path, "ed25519v1-public", 64)
    path.write_bytes(b"== ed25519v1-public: type0 ==\x00x\x00" + bytes(32))
    with pytest.raises(keyfiles.KeyFileError, match="not a tagged key file"):
        keyfiles.read_tagged(path, "ed25519v1-public", 32)
    secret = bytes(32)
    keyfiles.write_curve25519(path, secret)
    broken = bytearray(path.read_bytes())
    broken[-1] ^= 1
    path.write_bytes(bytes(broken))
    with pytest.raises(keyfiles.KeyFileError, match="does not match"):
        keyfiles.read_curve25519(path)
    keyfiles.write_curve25519(path, secret, tag="other")
    with pytest.raises(keyfiles.KeyFileError, match="tag 'other'"):
        keyfiles.read_curve25519(path)


def test_refuses_key_files_tor_would_refuse(datadir: Path) -> None:
    RelayIdentity.load_or_create(datadir, "Relay1", now=T0)
    keys = datadir / "keys"
    public = keys / "ed25519_master_id_public_key"
    keyfiles.write_tagged(public, "ed25519v1-public", "type0", os.urandom(32))
    with pytest.raises(keyfiles.KeyFileError, match="does not match"):
        RelayIdentity.load_or_create(datadir, "Relay1", now=T0)
    (keys / "ed25519_master_id_secret_key").unlink()
    with pytest.raises(keyfiles.KeyFileError, match="offline master key"):
        RelayIdentity.load_or_create(datadir, "Relay1", now=T0)


def test_periods_are_checked() -> None:
    with pytest.raises(ValueError, match="slop"):
        KeyPeriods(signing_key_lifetime=HOUR, signing_key_slop=HOUR)
    with pytest.raises(ValueError, match="grace period"):
        KeyPeriods(onion_key_lifetime=HOUR, onion_key_grace_period=2 * HOUR)
