"""Relay links over TLS with both sides authenticated (CERTS, AUTH_CHALLENGE, AUTHENTICATE).

Our responder (``Link.accept`` with a relay's ``ServerCredentials``) against our initiator as a
relay (``Link.connect`` with ``LinkCredentials``) and as a client (none), on real loopback
sockets with real TLS; then peers that lie: an AUTHENTICATE signed with the wrong key, a
responder whose CERTS name another TLS certificate, certificates that expired. A real tor
relay's view of our AUTHENTICATE is checked in tests/test_link_auth_tor.py.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import support_loop

from reactor import Reactor, Stream, listen
from relay.identity.keys import RelayIdentity
from relay.link import CloseKind, Link
from relay.linkauth import LinkCredentials, PeerIdentity, ServerCredentials

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def identities(tmp_path_factory: pytest.TempPathFactory) -> dict[str, RelayIdentity]:
    base = tmp_path_factory.mktemp("identities")
    return {name: RelayIdentity.load_or_create(base / name, name) for name in ("alice", "bob")}


@pytest.fixture
def reactor() -> Iterator[Reactor]:
    r = Reactor()
    yield r
    r.close()


class Pair:
    """A TLS responder Link with ``server`` credentials and an initiator Link to it."""

    def __init__(self, reactor: Reactor, server: ServerCredentials,
                 client: LinkCredentials | None) -> None:
        self.server: Link | None = None
        self.closes: dict[str, tuple[CloseKind | None, str]] = {}

        def closed(side: str) -> Any:
            return lambda link, why: self.closes.setdefault(side, (link.close_kind, why))

        def accepted(stream: Stream) -> None:
            self.server = Link.accept(reactor, stream, server=server, on_close=closed("server"))

        self.listener = listen(reactor, "127.0.0.1", 0, accepted)
        host, port = self.listener.address
        self.client = Link.connect(reactor, host, port, tls=True, credentials=client,
                                   on_close=closed("client"))

    def both_open(self) -> bool:
        return self.client.is_open and self.server is not None and self.server.is_open

    def settled(self) -> bool:
        return self.both_open() or bool(self.closes)


def _run(reactor: Reactor, pair: Pair) -> None:
    support_loop.run_until_met(reactor, pair.settled, 20.0)


def test_relay_to_relay_both_sides_know_each_other(
    reactor: Reactor, identities: dict[str, RelayIdentity]
) -> None:
    alice, bob = identities["alice"], identities["bob"]
    pair = Pair(reactor, ServerCredentials.of(alice), LinkCredentials.of(bob))
    _run(reactor, pair)
    assert pair.both_open(), pair.closes
    assert pair.server is not None
    assert pair.client.tls_version in ("TLSv1.2", "TLSv1.3")
    assert pair.client.peer_identity == PeerIdentity(alice.identity_digest,
                                                      alice.ed25519_identity, True)
    assert pair.client.peer_cert_bindings == ("rsa-link", "ed25519-link")
    assert pair.client.authenticate_sent
    assert pair.server.peer_identity == PeerIdentity(bob.identity_digest,
                                                      bob.ed25519_identity, True)
    assert pair.server.peer_fingerprint == bob.fingerprint
    assert pair.server.peer_netinfo is not None and pair.server.peer_netinfo.timestamp > 0
    assert pair.server.link_version == pair.client.link_version == 5


def test_a_client_link_stays_unauthenticated(
    reactor: Reactor, identities: dict[str, RelayIdentity]
) -> None:
    alice = identities["alice"]
    pair = Pair(reactor, ServerCredentials.of(alice), None)
    _run(reactor, pair)
    assert pair.both_open(), pair.closes
    assert pair.server is not None
    assert pair.server.peer_identity is None and pair.server.peer_certs is None
    assert not pair.client.authenticate_sent
    assert pair.client.auth_challenge_seen
    assert pair.client.peer_identity is not None and pair.client.peer_identity.authenticated
    assert pair.server.peer_netinfo is not None
    assert pair.server.peer_netinfo.timestamp == 0  # a client hides its clock


def test_authenticate_signed_with_the_wrong_key_is_refused(
    reactor: Reactor, identities: dict[str, RelayIdentity]
) -> None:
    alice, bob = identities["alice"], identities["bob"]
    liar = dataclasses.replace(LinkCredentials.of(bob), auth_key=alice.auth_key)
    pair = Pair(reactor, ServerCredentials.of(alice), liar)
    _run(reactor, pair)
    support_loop.run_until_met(reactor, lambda: "server" in pair.closes, 20.0)
    kind, why = pair.closes["server"]
    assert kind is CloseKind.AUTH_FAILED
    assert "AUTHENTICATE refused" in why and "signature" in why
    assert pair.server is not None and pair.server.peer_identity is None


def test_certs_for_another_tls_certificate_are_refused(
    reactor: Reactor, identities: dict[str, RelayIdentity]
) -> None:
    """A responder whose CERTS are bob's but whose TLS certificate is alice's."""
    alice, bob = identities["alice"], identities["bob"]
    mixed = ServerCredentials(ServerCredentials.of(alice).tls, LinkCredentials.of(bob))
    pair = Pair(reactor, mixed, None)
    _run(reactor, pair)
    support_loop.run_until_met(reactor, lambda: "client" in pair.closes, 20.0)
    kind, why = pair.closes["client"]
    assert kind is CloseKind.AUTH_FAILED
    assert "CERTS do not authenticate the peer" in why
    assert not pair.client.is_open


def test_expired_initiator_certificates_are_refused(
    reactor: Reactor, identities: dict[str, RelayIdentity], tmp_path: Path
) -> None:
    """An initiator whose keys were made 40 days ago and never rotated: its Ed25519 signing
    certificate (30 days) and link authentication certificate (2 days) have expired."""
    stale = RelayIdentity.load_or_create(tmp_path / "stale", "stale",
                                         now=time.time() - 40 * 86400)
    pair = Pair(reactor, ServerCredentials.of(identities["alice"]), LinkCredentials.of(stale))
    _run(reactor, pair)
    support_loop.run_until_met(reactor, lambda: "server" in pair.closes, 20.0)
    kind, why = pair.closes["server"]
    assert kind is CloseKind.AUTH_FAILED
    assert "initiator's CERTS are not valid" in why and "expired" in why
