"""What an exit answers besides TCP streams: BEGIN_DIR (the relay's own descriptor, over HTTP),
RESOLVE, and BEGIN to a host name, from a TLS peer on a one-hop circuit (``RawPeer``)."""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_relay_policies import begin_answer, make_node, run_peer

from examples.echo import EchoServer
from reactor import Reactor
from relay.cells import CellCommand, RelayCommand
from relay.circuits import END_REASON_DONE, END_REASON_RESOLVEFAILED, pack_relay, relay_body
from relay.identity.descparse import parse_server_descriptor
from relay.identity.keys import RelayIdentity

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def identity(tmp_path_factory: pytest.TempPathFactory) -> RelayIdentity:
    return RelayIdentity.load_or_create(tmp_path_factory.mktemp("exit") / "r", "exitstreams")


@pytest.fixture
def reactor() -> Iterator[Reactor]:
    with Reactor() as loop:
        yield loop


def _stream_exchange(peer: object, first: bytes, command: int, request: bytes | None
                     ) -> list[tuple[int, bytes]]:
    """One-hop circuit; send ``command`` with ``first`` on stream 3 (and ``request`` as DATA);
    collect ``(relay command, data)`` of every answer on that stream until END or RESOLVED."""
    crypto = peer.create_fast(0x80000001)  # type: ignore[attr-defined]
    peer.send_cell(0x80000001, CellCommand.RELAY,  # type: ignore[attr-defined]
                   crypto.encrypt(pack_relay(command, 3, first), 0))
    if request is not None:
        peer.send_cell(0x80000001, CellCommand.RELAY,  # type: ignore[attr-defined]
                       crypto.encrypt(pack_relay(RelayCommand.DATA, 3, request), 0))
    answers: list[tuple[int, bytes]] = []
    while True:
        _, cell_command, payload = peer.recv_cell()  # type: ignore[attr-defined]
        assert cell_command == CellCommand.RELAY, cell_command
        relay_command, stream_id, data = relay_body(crypto.decrypt(payload)[1])
        assert stream_id == 3
        answers.append((relay_command, data))
        if relay_command in (RelayCommand.END, RelayCommand.RESOLVED):
            return answers


def test_begin_dir_serves_the_relays_own_signed_descriptor(
    reactor: Reactor, identity: RelayIdentity
) -> None:
    node = make_node(reactor, identity)  # not an exit: BEGIN_DIR is served all the same
    try:
        request = b"GET /tor/server/authority HTTP/1.0\r\n\r\n"
        answers = run_peer(reactor, node, lambda p: _stream_exchange(
            p, b"", RelayCommand.BEGIN_DIR, request))
        commands = [c for c, _ in answers]  # type: ignore[union-attr]
        assert commands[0] == RelayCommand.CONNECTED and commands[-1] == RelayCommand.END
        assert answers[-1][1][:1] == bytes((END_REASON_DONE,))  # type: ignore[index]
        http = b"".join(d for c, d in answers if c == RelayCommand.DATA)  # type: ignore[union-attr]
        head, _, body = http.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.0 200 OK")
        descriptor = parse_server_descriptor(body.decode())
        assert descriptor.fingerprint == identity.fingerprint
        assert descriptor.or_port == node.address[1]
        assert descriptor.exit_policy == ("reject *:*",)
        assert node.directory.dir_requests == 1
    finally:
        node.close()


def _resolved(data: bytes) -> list[tuple[int, bytes]]:
    out, offset = [], 0
    while offset < len(data):
        kind, length = data[offset], data[offset + 1]
        out.append((kind, data[offset + 2 : offset + 2 + length]))
        offset += 2 + length + 4
    return out


def test_resolve_at_an_exit_and_refused_at_a_non_exit(
    reactor: Reactor, identity: RelayIdentity
) -> None:
    exit_node = make_node(reactor, identity, testing_network=True,
                          exit_policy=("accept 127.0.0.1:*", "reject *:*"))
    try:
        answers = run_peer(reactor, exit_node, lambda p: _stream_exchange(
            p, b"localhost\0", RelayCommand.RESOLVE, None))
        (command, data), = answers  # type: ignore[misc]
        assert command == RelayCommand.RESOLVED
        addresses = {str(ipaddress.ip_address(v)) for k, v in _resolved(data) if k in (4, 6)}
        assert "127.0.0.1" in addresses
        ttl = struct.unpack_from(">I", data, 2 + data[1])[0]
        assert ttl == 300
    finally:
        exit_node.close()
    plain = make_node(reactor, identity)
    try:
        answers = run_peer(reactor, plain, lambda p: _stream_exchange(
            p, b"localhost\0", RelayCommand.RESOLVE, None))
        (command, data), = answers  # type: ignore[misc]
        assert command == RelayCommand.RESOLVED and _resolved(data) == [(0xF1, b"")]
    finally:
        plain.close()


def test_begin_to_a_name_is_resolved_then_checked_by_the_exit_policy(
    reactor: Reactor, identity: RelayIdentity, tmp_path: Path
) -> None:
    node = make_node(reactor, identity, testing_network=True,
                     exit_policy=("accept 127.0.0.1:*", "reject *:*"))
    echo = EchoServer(reactor)
    try:
        command, _ = run_peer(reactor, node, lambda p: begin_answer(
            p, f"localhost:{echo.address[1]}"))  # type: ignore[misc]
        assert command == RelayCommand.CONNECTED and echo.connections == 1
        command, data = run_peer(reactor, node, lambda p: begin_answer(
            p, "no-such-host.invalid:80"))  # type: ignore[misc]
        assert (command, data[:1]) == (RelayCommand.END, bytes((END_REASON_RESOLVEFAILED,)))
    finally:
        node.close()
        echo.close()
