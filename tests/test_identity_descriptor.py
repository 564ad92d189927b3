"""relay.identity.descriptor and descparse: building, signing and parsing server descriptors.

A descriptor tor 0.4.9.11 made (tests/data/tor-0.4.9.11-authority-descriptor.txt: the
descriptor a private authority published about itself) checks the parser against tor's
signatures; descriptors built here are checked line by line against tor's layout, then
tampered with and re-signed so that each signature and cross-certificate fails on its own.
That a real authority accepts them is tests/test_identity_tor.py.
"""

from __future__ import annotations

import re
from hashlib import sha1, sha256
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from relay.identity.descparse import DescriptorError, parse_server_descriptor
from relay.identity.descriptor import (
    ED_SIGNATURE_PREFIX,
    RELAYCRYPT_PROTOCOLS,
    RouterInfo,
    b64_multiline,
    b64_nopad,
    check_policy_line,
    tap_crosscert,
)
from relay.identity.keys import RelayIdentity
from relay.identity.rsaraw import rsa_sign_raw

NOW = 1_800_000_000
TOR_DESCRIPTOR = (Path(__file__).parent / "data" /
                  "tor-0.4.9.11-authority-descriptor.txt").read_text()
INFO = RouterInfo("DescTest", "127.0.0.1", 9001, dir_port=0, contact="ops <ops@example.org>",
                  exit_policy=("accept 127.0.0.0/8:*", "accept 10.0.0.1:80-443", "reject *:*"),
                  family=("$" + "A" * 40,), tunnelled_dir_server=True, uptime=42,
                  bandwidth_rate=1000, bandwidth_burst=2000, bandwidth_observed=500)
TOR_ORDER = ["router", "identity-ed25519", "master-key-ed25519", "platform", "proto",
             "published", "fingerprint", "uptime", "bandwidth", "onion-key", "signing-key",
             "onion-key-crosscert", "ntor-onion-key-crosscert", "family", "contact",
             "ntor-onion-key", "accept", "accept", "reject", "tunnelled-dir-server",
             "router-sig-ed25519", "router-signature"]


@pytest.fixture(scope="module")
def identity(tmp_path_factory: pytest.TempPathFactory) -> RelayIdentity:
    return RelayIdentity.load_or_create(tmp_path_factory.mktemp("desc"), "DescTest", now=NOW)


@pytest.fixture(scope="module")
def text(identity: RelayIdentity) -> str:
    return identity.server_descriptor(INFO, NOW)


def _keywords(text: str) -> list[str]:
    return [line.split()[0] for line in text.splitlines()
            if line and not line.startswith("-----") and re.match(r"^[a-z][a-z0-9-]*( |$)", line)]


def _resign(text: str, identity: RelayIdentity, ed: bool = True) -> str:
    """Re-sign a (tampered) descriptor: Ed25519 too when ``ed``, RSA always."""
    head, _, rest = text.partition("\nrouter-sig-ed25519 ")
    head += "\nrouter-sig-ed25519 "
    old_sig = rest.split("\n", 1)[0]
    new_sig = b64_nopad(identity.signing_key.sign(
        sha256(ED_SIGNATURE_PREFIX + head.encode()).digest())) if ed else old_sig
    body = f"{head}{new_sig}\nrouter-signature\n"
    signature = rsa_sign_raw(identity.identity_key, sha1(body.encode()).digest())
    return f"{body}-----BEGIN SIGNATURE-----\n{b64_multiline(signature)}-----END SIGNATURE-----\n"


def test_parses_and_verifies_a_descriptor_tor_signed() -> None:
    parsed = parse_server_descriptor(TOR_DESCRIPTOR)
    assert parsed.nickname == "auth" and parsed.or_port == 7000 and parsed.dir_port == 7001
    assert parsed.fingerprint == "32251C1ABA0D478223EDC6B31E3073286A83E064"
    assert b64_nopad(parsed.ed25519_identity) == "DOINd6ifRPu2W9aHWj6i9Mk2Fts0fFtLC7/4UYIqawo"
    assert parsed.platform == "Tor 0.4.9.11 on Linux"
    assert parsed.protocols.startswith("Conflux=1 Cons=1-2") and parsed.hidden_service_dir
    assert parsed.exit_policy == ("reject *:*",) and parsed.tunnelled_dir_server
    assert parsed.ntor_sign_bit == 0 and parsed.onion_key is not None
    assert parsed.certs_expire_at == min(parsed.signing_cert.expires_at,
                                         parsed.ntor_crosscert.expires_at)
    tampered = TOR_DESCRIPTOR.replace("uptime 0", "uptime 1")
    with pytest.raises(DescriptorError, match="router-signature signs another text"):
        parse_server_descriptor(tampered)


def test_layout_is_tors(identity: RelayIdentity, text: str) -> None:
    assert _keywords(text) == TOR_ORDER
    lines = text.splitlines()
    assert lines[0] == "router DescTest 127.0.0.1 9001 0 0"
    assert "published 2027-01-15 08:00:00" in lines
    spaced = " ".join(identity.fingerprint[i:i + 4] for i in range(0, 40, 4))
    assert f"fingerprint {spaced}" in lines
    assert "bandwidth 1000 2000 500" in lines and "uptime 42" in lines
    ntor = next(line for line in lines if line.startswith("ntor-onion-key "))
    assert len(ntor.split()[1]) == 43 and "=" not in ntor
    assert f"ntor-onion-key {b64_nopad(identity.ntor_onion_key)}" in lines
    assert "-----BEGIN RSA PUBLIC KEY-----" in lines and "hidden-service-dir" not in lines
    assert text.endswith("-----END SIGNATURE-----\n") and "\n\n" not in text
    assert lines[lines.index("identity-ed25519") + 2].startswith(("AQQA", "AQQB"))


def test_round_trip(identity: RelayIdentity, text: str) -> None:
    parsed = parse_server_descriptor(text, now=NOW)
    assert parsed.fingerprint == identity.fingerprint
    assert parsed.identity_key.public_numbers() == (
        identity.identity_key.public_key().public_numbers())
    assert parsed.ed25519_identity == identity.ed25519_identity
    assert parsed.signing_key == identity.signing_key.public
    assert parsed.ntor_onion_key == identity.ntor_onion_key
    assert parsed.onion_key is not None
    assert parsed.onion_key.public_numbers() == identity.onion.tap.public_key().public_numbers()
    assert parsed.published == NOW and parsed.bandwidth == (1000, 2000, 500)
    assert parsed.exit_policy == INFO.exit_policy and parsed.family == INFO.family
    assert parsed.contact == INFO.contact and parsed.platform == INFO.platform
    assert parsed.protocols == RELAYCRYPT_PROTOCOLS
    assert parsed.ntor_crosscert.expires_at >= NOW + identity.periods.onion_key_lifetime
    assert parsed.tap_crosscert == tap_crosscert(identity.onion.tap, identity.identity_digest,
                                                 identity.ed25519_identity)
    assert _resign(text, identity) == text  # the test's re-signing is the builder's signing


def test_each_signature_fails_on_its_own(identity: RelayIdentity, text: str) -> None:
    with pytest.raises(DescriptorError, match="router-signature signs another text"):
        parse_server_descriptor(text.replace("uptime 42", "uptime 43"))
    with pytest.raises(DescriptorError, match="router-sig-ed25519 does not verify"):
        parse_server_descriptor(_resign(text.replace("uptime 42", "uptime 43"), identity,
                                        ed=False))
    bit = "ntor-onion-key-crosscert 0" if "ntor-onion-key-crosscert 0" in text else (
        "ntor-onion-key-crosscert 1")
    flipped = bit[:-1] + str(1 - int(bit[-1]))
    with pytest.raises(DescriptorError, match="ntor-onion-key-crosscert: bad Ed25519"):
        parse_server_descriptor(_resign(text.replace(bit, flipped), identity))
    other_tap = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    wrong = b64_multiline(tap_crosscert(other_tap, identity.identity_digest,
                                        identity.ed25519_identity))
    right = b64_multiline(tap_crosscert(identity.onion.tap, identity.identity_digest,
                                        identity.ed25519_identity))
    with pytest.raises(DescriptorError, match="onion-key-crosscert does not verify"):
        parse_server_descriptor(_resign(text.replace(right, wrong), identity))
    other_id = b64_multiline(tap_crosscert(identity.onion.tap, bytes(20),
                                           identity.ed25519_identity))
    with pytest.raises(DescriptorError, match="certifies other identities"):
        parse_server_descriptor(_resign(text.replace(right, other_id), identity))
    spaced = " ".join(identity.fingerprint[i:i + 4] for i in range(0, 40, 4))
    with pytest.raises(DescriptorError, match="does not match signing-key"):
        parse_server_descriptor(_resign(text.replace(spaced, "0000" + spaced[4:]), identity))
    master = b64_nopad(identity.ed25519_identity)
    with pytest.raises(DescriptorError, match="master-key-ed25519 does not match"):
        parse_server_descriptor(_resign(text.replace(
            f"master-key-ed25519 {master}", f"master-key-ed25519 {b64_nopad(bytes(32))}"),
            identity))


def test_expired_certificates_refused_when_asked(identity: RelayIdentity, text: str) -> None:
    parsed = parse_server_descriptor(text)
    parse_server_descriptor(text, now=parsed.certs_expire_at)
    with pytest.raises(DescriptorError, match="expired"):
        parse_server_descriptor(text, now=parsed.certs_expire_at + 1)


def test_structure_refusals(identity: RelayIdentity, text: str) -> None:
    lines = text.split("\n")
    swapped = "\n".join([lines[0]] + ["uptime 42"] + [
        line for line in lines[1:] if line != "uptime 42"])
    with pytest.raises(DescriptorError, match="identity-ed25519 must come second"):
        parse_server_descriptor(_resign(swapped, identity))
    with pytest.raises(DescriptorError, match="uptime appears twice"):
        parse_server_descriptor(_resign(text.replace("uptime 42\n", "uptime 42\nuptime 1\n"),
                                        identity))
    ntor_line = next(line for line in lines if line.startswith("ntor-onion-key "))
    with pytest.raises(DescriptorError, match=r"missing ntor-onion-key$"):
        parse_server_descriptor(_resign(text.replace(ntor_line + "\n", ""), identity))
    with pytest.raises(DescriptorError, match="starts with router"):
        parse_server_descriptor("unknown-keyword x\n" + text)
    with pytest.raises(DescriptorError, match="never ends"):
        parse_server_descriptor(text.replace("-----END SIGNATURE-----", "-----END X-----"))
    with pytest.raises(DescriptorError, match="ASCII"):
        parse_server_descriptor(text.replace("contact ops", "contact öps"))


def test_router_info_and_policy_checks() -> None:
    assert check_policy_line("accept  1.2.3.0/24:1-1024") == "accept 1.2.3.0/24:1-1024"
    assert check_policy_line("reject [::1]:*") == "reject [::1]:*"
    for bad in ("accept *:0", "accept *:70000", "allow *:*", "accept 1.2.3:80",
                "reject *:10-5", "accept *"):
        with pytest.raises(ValueError, match="exit policy line"):
            check_policy_line(bad)
    with pytest.raises(ValueError, match="nickname"):
        RouterInfo("bad-name", "127.0.0.1", 1)
    with pytest.raises(ValueError, match="IPv4"):
        RouterInfo("ok", "::1", 1)
    with pytest.raises(ValueError, match="printable ASCII"):
        RouterInfo("ok", "127.0.0.1", 1, contact="a\nrouter-signature")
    with pytest.raises(ValueError, match="exit policy line"):
        RouterInfo("ok", "127.0.0.1", 1, exit_policy=("accept *:0",))
