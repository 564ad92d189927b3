"""relay.identity.authenticate: AUTH_CHALLENGE, and AUTHENTICATE (method 3) between two relays'
real identities -- each side computes the inputs from its own view of the handshake (its
HandshakeDigests, the CERTS it verified), the initiator signs, the responder verifies; then
every field, the signature and the header are tampered with in turn."""

from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import pytest

from relay.identity.authenticate import (
    AUTH_METHOD_ED25519_SHA256_RFC5705,
    AUTHENTICATE_AUTH_LEN,
    AuthenticateError,
    AuthInputs,
    HandshakeDigests,
    build_auth_challenge,
    build_authenticate,
    parse_auth_challenge,
    verify_authenticate,
)
from relay.identity.certscell import parse_certs_cell
from relay.identity.curve_ed import ExpandedEd25519Key
from relay.identity.keys import RelayIdentity

NOW = 1_800_000_000


@dataclass
class _Handshake:
    initiator: RelayIdentity
    responder: RelayIdentity
    initiator_view: AuthInputs
    responder_view: AuthInputs
    auth_key_seen_by_responder: bytes


def _cell(command: int, body: bytes) -> bytes:
    """A variable-length cell as on the wire with 4-byte circuit ids (link protocol 4+)."""
    return struct.pack(">IBH", 0, command, len(body)) + body


@pytest.fixture(scope="module")
def handshake(tmp_path_factory: pytest.TempPathFactory) -> _Handshake:
    base: Path = tmp_path_factory.mktemp("auth")
    initiator = RelayIdentity.load_or_create(base / "a", "Initiator", now=NOW)
    responder = RelayIdentity.load_or_create(base / "b", "Responder", now=NOW)
    mine, theirs = HandshakeDigests(initiator=True), HandshakeDigests(initiator=False)

    def send(sender: HandshakeDigests, receiver: HandshakeDigests, data: bytes) -> None:
        sender.sent(data)
        receiver.received(data)

    versions = b"\x00\x00\x07\x00\x04\x00\x04\x00\x05"
    send(mine, theirs, versions)
    send(theirs, mine, versions)
    responder_certs = responder.responder_certs_body()
    send(theirs, mine, _cell(129, responder_certs))
    challenge = build_auth_challenge()
    send(theirs, mine, _cell(130, challenge))
    assert parse_auth_challenge(challenge).methods == (AUTH_METHOD_ED25519_SHA256_RFC5705,)
    initiator_certs = initiator.initiator_certs_body()
    send(mine, theirs, _cell(129, initiator_certs))

    # The initiator's view: what it verified of the responder, and its own keys.
    seen = parse_certs_cell(responder_certs)
    seen.verify(responder.tls.link_cert_der, now=NOW)
    exporter = os.urandom(32)  # both ends of one TLS session get the same exporter output
    initiator_view = AuthInputs(
        cid=initiator.identity_digest256, sid=seen.identity_digest256,
        cid_ed=initiator.ed25519_identity, sid_ed=seen.ed25519_identity or bytes(32),
        slog=mine.slog(), clog=mine.clog(),
        scert=hashlib.sha256(responder.tls.link_cert_der).digest(), tlssecrets=exporter)
    # The responder's view: what it verified of the initiator, and its own TLS certificate.
    who = parse_certs_cell(initiator_certs).verify_initiator(now=NOW)
    responder_view = AuthInputs(
        cid=who.identity_digest256, sid=responder.identity_digest256,
        cid_ed=who.ed25519_identity, sid_ed=responder.ed25519_identity,
        slog=theirs.slog(), clog=theirs.clog(),
        scert=responder.tls.link_cert_sha256, tlssecrets=exporter)
    return _Handshake(initiator, responder, initiator_view, responder_view, who.auth_key)


def test_both_sides_compute_the_same_inputs(handshake: _Handshake) -> None:
    assert handshake.initiator_view == handshake.responder_view
    assert handshake.auth_key_seen_by_responder == handshake.initiator.auth_key.public


def test_round_trip(handshake: _Handshake) -> None:
    body = build_authenticate(handshake.initiator_view, handshake.initiator.auth_key)
    assert len(body) == 4 + AUTHENTICATE_AUTH_LEN == 356
    assert body[:4] == struct.pack(">HH", 3, 352) and body[4:12] == b"AUTH0003"
    verify_authenticate(body, handshake.responder_view, handshake.auth_key_seen_by_responder)
    verify_authenticate(body + bytes(100), handshake.responder_view,
                        handshake.auth_key_seen_by_responder)  # trailing bytes are ignored
    rand = bytes(range(24))
    fixed = build_authenticate(handshake.initiator_view, handshake.initiator.auth_key, rand)
    assert fixed[4 + 264 : 4 + 288] == rand
    assert fixed == build_authenticate(handshake.initiator_view, handshake.initiator.auth_key,
                                       rand)  # Ed25519 is deterministic


@pytest.mark.parametrize("field, offset", [
    ("TYPE", 0), ("CID", 8), ("SID", 40), ("CID_ED", 72), ("SID_ED", 104), ("SLOG", 136),
    ("CLOG", 168), ("SCERT", 200), ("TLSSECRETS", 232),
])
def test_each_wrong_field_is_named(handshake: _Handshake, field: str, offset: int) -> None:
    body = bytearray(build_authenticate(handshake.initiator_view, handshake.initiator.auth_key))
    body[4 + offset + 3] ^= 0x40
    with pytest.raises(AuthenticateError, match=f"field {field} is not as expected"):
        verify_authenticate(bytes(body), handshake.responder_view,
                            handshake.auth_key_seen_by_responder)


def test_signature_and_key_refusals(handshake: _Handshake) -> None:
    body = build_authenticate(handshake.initiator_view, handshake.initiator.auth_key)
    for position in (4 + 270, len(body) - 1):  # inside RAND, inside SIG
        broken = bytearray(body)
        broken[position] ^= 1
        with pytest.raises(AuthenticateError, match="signature is not valid"):
            verify_authenticate(bytes(broken), handshake.responder_view,
                                handshake.auth_key_seen_by_responder)
    impostor = build_authenticate(handshake.initiator_view, ExpandedEd25519Key.generate())
    with pytest.raises(AuthenticateError, match="signature is not valid"):
        verify_authenticate(impostor, handshake.responder_view,
                            handshake.auth_key_seen_by_responder)


def test_header_refusals(handshake: _Handshake) -> None:
    body = build_authenticate(handshake.initiator_view, handshake.initiator.auth_key)
    view, key = handshake.responder_view, handshake.auth_key_seen_by_responder
    with pytest.raises(AuthenticateError, match="type 1 is not supported"):
        verify_authenticate(struct.pack(">H", 1) + body[2:], view, key)
    with pytest.raises(AuthenticateError, match="runs past"):
        verify_authenticate(body[:-1], view, key)
    with pytest.raises(AuthenticateError, match="AuthLen 351"):
        verify_authenticate(body[:2] + struct.pack(">H", 351) + body[4:-1], view, key)
    with pytest.raises(AuthenticateError, match="too short"):
        verify_authenticate(body[:3], view, key)


def test_auth_challenge_encoding() -> None:
    challenge = bytes(range(32))
    body = build_auth_challenge(challenge, methods=(1, 3))
    assert body == challenge + bytes.fromhex("0002" "0001" "0003")
    parsed = parse_auth_challenge(body + b"extra")
    assert parsed.challenge == challenge and parsed.methods == (1, 3)
    assert build_auth_challenge()[:32] != build_auth_challenge()[:32]
    with pytest.raises(AuthenticateError, match="truncated"):
        parse_auth_challenge(body[:-1])
    with pytest.raises(AuthenticateError, match="too short"):
        parse_auth_challenge(challenge)
    with pytest.raises(ValueError, match="32 bytes"):
        build_auth_challenge(bytes(31))
    with pytest.raises(ValueError, match="cid must be 32 bytes"):
        AuthInputs(*(bytes(31),) + (bytes(32),) * 7)
