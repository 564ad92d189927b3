"""A real tor relay treats our authenticated link as a relay's, and our unauthenticated one as
a client's.

tor answers a BEGIN on a one-hop circuit differently by who opened the link: a client's link
gets END reason TORPROTOCOL ("Attempt by ... to open a stream on first hop of circuit"); an
authenticated relay's gets END reason MISC, and tor logs "... to open a stream from unknown
relay" (we are a relay it has no descriptor of). So the END reason and tor's log show whether
tor accepted our CERTS and AUTHENTICATE, sent through ``relay.link.Link`` as the relay node
sends them.

Skipped only when tor is missing and ``CI`` is unset (tests/test_tor_interop.py explains).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import support_loop

from reactor import Reactor
from relay.cells import CellCommand, DestroyReason, RelayCommand
from relay.circuits import pack_relay, relay_body
from relay.handshakes import CreateFastClient
from relay.identity.keys import RelayIdentity
from relay.link import Link
from relay.linkauth import LinkCredentials
from relay.torpeer import TorPeer, find_tor, start_tor
from tor1.reference import HopKeys, OriginCrypto

pytestmark = pytest.mark.timeout(120)

END_REASON_MISC = 1
END_REASON_TORPROTOCOL = 13


@pytest.fixture(scope="module")
def tor() -> Iterator[TorPeer]:
    if find_tor() is None:
        if os.environ.get("CI"):
            pytest.fail("tor is not installed, and CI must run this test")
        pytest.skip("tor is not installed (tools/install_tor.sh installs it)")
    peer = start_tor()
    yield peer
    peer.stop()


def _end_reason_for_a_begin(tor: TorPeer, credentials: LinkCredentials | None) -> tuple[int, Link]:
    """Open a link (as a relay with ``credentials``), CREATE_FAST, BEGIN; return the END
    reason tor answers with."""
    reactor = Reactor()
    got: dict[str, object] = {}
    client = CreateFastClient()
    crypto: list[OriginCrypto] = []

    def on_cell(command: int, payload: bytes) -> None:
        if command == CellCommand.CREATED_FAST:
            crypto.append(OriginCrypto([HopKeys.from_material(client.complete(payload))]))
            begin = pack_relay(RelayCommand.BEGIN, 1, b"127.0.0.1:80\x00")
            link.send_cell(circ_id, CellCommand.RELAY, crypto[0].encrypt(begin, 0))
        elif command == CellCommand.RELAY:
            _, plain = crypto[0].decrypt(payload)
            got["reply"] = relay_body(plain)
        elif command == CellCommand.DESTROY:
            got["destroy"] = payload[0] if payload else DestroyReason.NONE

    def opened(_: Link) -> None:
        nonlocal circ_id
        circ_id = link.add_circuit(on_cell)
        link.send_cell(circ_id, CellCommand.CREATE_FAST, client.onionskin)

    circ_id = 0
    link = Link.connect(reactor, tor.host, tor.orport, tls=True, credentials=credentials,
                        on_open=opened, on_close=lambda _, why: got.setdefault("closed", why))
    support_loop.run_until_met(reactor, lambda: bool(got), 60.0)
    link.close()
    reactor.close()
    assert "reply" in got, got
    command, _, data = got["reply"]  # type: ignore[misc]
    assert command == RelayCommand.END, got
    return data[0], link


def test_tor_accepts_our_authenticate_and_treats_the_link_as_a_relays(
    tor: TorPeer, tmp_path: Path
) -> None:
    identity = RelayIdentity.load_or_create(tmp_path / "relay", "relaycrypt")
    reason, link = _end_reason_for_a_begin(tor, LinkCredentials.of(identity))
    assert link.authenticate_sent
    assert link.peer_identity is not None and link.peer_identity.authenticated
    assert reason == END_REASON_MISC
    log = tor.log_text()
    assert "to open a stream from unknown relay" in log  # tor: an authenticated relay
    assert "AUTHENTICATE" not in log and "first hop" not in log


def test_without_credentials_tor_sees_a_client(tor: TorPeer) -> None:
    reason, link = _end_reason_for_a_begin(tor, None)
    assert not link.authenticate_sent
    assert reason == END_REASON_TORPROTOCOL
    assert "to open a stream on first hop of circuit" in tor.log_text()
