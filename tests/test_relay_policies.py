"""A relay's exit and EXTEND2 policies against a client that asks for what tor refuses.

An in-process ``RelayNode`` on loopback and a blocking peer (``benchmarks.rawpeer.RawPeer``,
TLS) on a thread: the peer builds a one-hop CREATE_FAST circuit and sends BEGINs and EXTEND2s;
the answers (END reason, DESTROY reason) must be tor's. Before this, the relay's exit was a
hard-wired "loopback only", so a peer could read a loopback-only service, reach 127.0.0.2 and
[::1] and tunnel into the relay's own ORPort; and EXTEND2 dialed any address, including the
relay itself.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from support_loop import run_until_met

from benchmarks.rawpeer import RawPeer
from examples.echo import EchoServer
from reactor import Reactor
from relay.cells import CellCommand, DestroyReason, RelayCommand
from relay.circuits import END_REASON_EXITPOLICY, pack_relay, relay_body
from relay.config import RelayConfig
from relay.handshakes import HTYPE_NTOR, Extend2Body, LinkSpecifier, NtorClient
from relay.identity.keys import RelayIdentity
from relay.node import RelayNode
from tor1.reference import OriginCrypto

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def identities(tmp_path_factory: pytest.TempPathFactory) -> list[RelayIdentity]:
    base = tmp_path_factory.mktemp("ids")
    return [RelayIdentity.load_or_create(base / f"r{i}", f"r{i}") for i in range(2)]


@pytest.fixture
def reactor() -> Iterator[Reactor]:
    with Reactor() as loop:
        yield loop


def run_peer(reactor: Reactor, node: RelayNode, script: Callable[[RawPeer], object]) -> object:
    """Run ``script(peer)`` on a thread against ``node`` while the loop runs; its result."""
    out: dict[str, object] = {}

    def body() -> None:
        peer = RawPeer(node.address[1])
        try:
            peer.handshake()
            out["result"] = script(peer)
        except BaseException as exc:
            out["error"] = exc
        finally:
            peer.close()

    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    run_until_met(reactor, lambda: not thread.is_alive(), 60)
    if "error" in out:
        raise out["error"]  # type: ignore[misc]
    return out["result"]


def begin_answer(peer: RawPeer, target: str) -> tuple[int, bytes]:
    """One-hop circuit, BEGIN ``target``: ``(relay command, data)`` of the answer."""
    crypto = peer.create_fast(0x80000001)
    peer.send_cell(0x80000001, CellCommand.RELAY,
                   crypto.encrypt(pack_relay(RelayCommand.BEGIN, 7, target.encode() + b"\0"), 0))
    _, command, payload = peer.recv_cell()
    assert command == CellCommand.RELAY, command
    relay_command, stream_id, data = relay_body(crypto.decrypt(payload)[1])
    assert stream_id == 7
    return relay_command, data


def extend_answer(peer: RawPeer, specifiers: tuple[LinkSpecifier, ...],
                  onion: tuple[bytes, bytes]) -> tuple[int, bytes]:
    """One-hop circuit, EXTEND2 in RELAY_EARLY: ``(cell command, payload)`` of the answer (a
    DESTROY, or a RELAY with EXTENDED2)."""
    crypto: OriginCrypto = peer.create_fast(0x80000001)
    skin = NtorClient(*onion).onionskin
    body = Extend2Body(specifiers, HTYPE_NTOR, skin).encode()
    peer.send_cell(0x80000001, CellCommand.RELAY_EARLY,
                   crypto.encrypt(pack_relay(RelayCommand.EXTEND2, 0, body), 0))
    _, command, payload = peer.recv_cell()
    return command, payload


def make_node(reactor: Reactor, identity: RelayIdentity, **config: object) -> RelayNode:
    node = RelayNode(reactor, identity, RelayConfig(nickname="policy", **config))  # type: ignore[arg-type]
    node.start()
    return node


# --------------------------------------------------------------------------- exit policy


def test_a_relay_without_an_exit_policy_is_not_an_exit(
    reactor: Reactor, identities: list[RelayIdentity]
) -> None:
    node = make_node(reactor, identities[0])
    echo = EchoServer(reactor)
    try:
        command, data = run_peer(reactor, node, lambda p: begin_answer(
            p, f"127.0.0.1:{echo.address[1]}"))  # type: ignore[misc]
        assert (command, data[:1]) == (RelayCommand.END, bytes((END_REASON_EXITPOLICY,)))
        assert node.exit_rules is not None and not node.exit_rules.is_exit
    finally:
        node.close()
        echo.close()


@pytest.mark.parametrize("target", ["127.0.0.1", "127.0.0.2", "[::1]", "10.0.0.1",
                                    "[::ffff:127.0.0.1]"])
def test_private_and_local_targets_are_refused_by_default(
    reactor: Reactor, identities: list[RelayIdentity], target: str
) -> None:
    """An exit that accepts everything still refuses private, loopback and mapped forms
    (ExitPolicyRejectPrivate 1), including its own ORPort."""
    node = make_node(reactor, identities[0], exit_policy=("accept *:*",))
    echo = EchoServer(reactor)
    try:
        for port in (echo.address[1], node.address[1]):
            command, data = run_peer(reactor, node, lambda p, port=port: begin_answer(
                p, f"{target}:{port}"))  # type: ignore[misc]
            assert (command, data[:1]) == (RelayCommand.END, bytes((END_REASON_EXITPOLICY,)))
        assert echo.connections == 0  # never dialed
    finally:
        node.close()
        echo.close()


def test_the_explicit_loopback_exit_of_a_testing_network_connects(
    reactor: Reactor, identities: list[RelayIdentity]
) -> None:
    node = make_node(reactor, identities[0], testing_network=True,
                     exit_policy=("accept 127.0.0.1:*", "reject *:*"))
    echo = EchoServer(reactor)
    try:
        command, _ = run_peer(reactor, node, lambda p: begin_answer(
            p, f"127.0.0.1:{echo.address[1]}"))  # type: ignore[misc]
        assert command == RelayCommand.CONNECTED
        command, data = run_peer(reactor, node, lambda p: begin_answer(
            p, f"127.0.0.2:{echo.address[1]}"))  # type: ignore[misc]
        assert (command, data[:1]) == (RelayCommand.END, bytes((END_REASON_EXITPOLICY,)))
    finally:
        node.close()
        echo.close()


# --------------------------------------------------------------------------- EXTEND2


def _specs(host: str, port: int, identity: bytes) -> tuple[LinkSpecifier, ...]:
    return (LinkSpecifier.ipv4(host, port), LinkSpecifier.legacy_id(identity))


def test_extend_to_a_private_address_is_refused_outside_a_testing_network(
    reactor: Reactor, identities: list[RelayIdentity]
) -> None:
    node = make_node(reactor, identities[0])
    other = make_node(reactor, identities[1], testing_network=True)
    try:
        onion = (identities[1].identity_digest, identities[1].ntor_onion_key)
        command, payload = run_peer(reactor, node, lambda p: extend_answer(
            p, _specs("127.0.0.1", other.address[1], onion[0]), onion))  # type: ignore[misc]
        assert (command, payload[0]) == (CellCommand.DESTROY, DestroyReason.PROTOCOL)
        assert node.links_opened == 0  # never dialed
    finally:
        node.close()
        other.close()


def test_extend_to_ourselves_is_refused_and_never_dialed(
    reactor: Reactor, identities: list[RelayIdentity]
) -> None:
    node = make_node(reactor, identities[0], testing_network=True)
    try:
        onion = (identities[0].identity_digest, identities[0].ntor_onion_key)
        command, payload = run_peer(reactor, node, lambda p: extend_answer(
            p, _specs("127.0.0.1", node.address[1], onion[0]), onion))  # type: ignore[misc]
        assert (command, payload[0]) == (CellCommand.DESTROY, DestroyReason.CONNECTFAILED)
        assert node.links_opened == 0
    finally:
        node.close()


def test_extend_to_a_relay_with_another_identity_fails_with_or_identity(
    reactor: Reactor, identities: list[RelayIdentity], tmp_path: Path
) -> None:
    """The address is a real relay, but the EXTEND2 names another identity: the relay dials,
    sees the certificates, and refuses to use the link."""
    node = make_node(reactor, identities[0], testing_network=True)
    other = make_node(reactor, identities[1], testing_network=True)
    impostor = RelayIdentity.load_or_create(tmp_path / "x", "x")
    try:
        onion = (impostor.identity_digest, impostor.ntor_onion_key)
        command, payload = run_peer(reactor, node, lambda p: extend_answer(
            p, _specs("127.0.0.1", other.address[1], onion[0]), onion))  # type: ignore[misc]
        assert (command, payload[0]) == (CellCommand.DESTROY, DestroyReason.OR_IDENTITY)
        assert node.links_opened == 1 and other.circuits_created == 0
    finally:
        node.close()
        other.close()


def test_extend_with_the_right_identity_works(
    reactor: Reactor, identities: list[RelayIdentity]
) -> None:
    node = make_node(reactor, identities[0], testing_network=True)
    other = make_node(reactor, identities[1], testing_network=True)
    try:
        onion = (identities[1].identity_digest, identities[1].ntor_onion_key)
        command, _ = run_peer(reactor, node, lambda p: extend_answer(
            p, _specs("127.0.0.1", other.address[1], onion[0]), onion))  # type: ignore[misc]
        assert command == CellCommand.RELAY  # EXTENDED2 (encrypted)
        assert other.circuits_created == 1
        # The next hop saw an authenticated relay on that link.
        peers = [p for p in other._peers.values() if p.link.peer_identity is not None]
        assert [p.link.peer_identity.rsa_digest for p in peers] == [identities[0].identity_digest]
    finally:
        node.close()
        other.close()
