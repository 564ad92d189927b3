"""relay.link over real loopback TCP with the reactor: handshake, framing, circuit ids, errors.

Our own initiator and responder talk plain TCP to each other; misbehaving peers are raw
``reactor.net`` streams that write exactly the bytes a test wants. Each test runs the loop until
a condition holds (a generous deadline only stops a broken test from hanging).
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from typing import Any

import pytest
import support_loop

from reactor import Reactor, Stream, listen
from relay.cells import (
    CellCommand,
    CellFormatError,
    DestroyReason,
    VarCell,
    encode_versions,
)
from relay.link import (
    CloseKind,
    Link,
    LinkError,
    NetInfo,
    decode_netinfo,
    encode_netinfo,
)

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def reactor() -> Any:
    r = Reactor()
    yield r
    r.close()


def run_until(reactor: Reactor, done: Callable[[], bool], deadline: float = 15.0) -> None:
    """Run the loop until ``done()`` (polled every 2 ms) or the deadline (15 s here)."""
    support_loop.run_until(reactor, done, deadline)


class Pair:
    """A listening responder Link and a connecting initiator Link on loopback."""

    def __init__(self, reactor: Reactor, *, server_versions: tuple[int, ...] = (4, 5),
                 client_versions: tuple[int, ...] = (4, 5), server_on_cell: Any = None) -> None:
        self.server: Link | None = None
        self.closes: list[tuple[str, str]] = []

        def accepted(stream: Stream) -> None:
            self.server = Link.accept(
                reactor, stream, versions=server_versions, on_cell=server_on_cell,
                on_close=lambda link, why: self.closes.append(("server", why)),
            )

        self.listener = listen(reactor, "127.0.0.1", 0, accepted)
        host, port = self.listener.address
        self.client = Link.connect(
            reactor, host, port, versions=client_versions,
            on_close=lambda link, why: self.closes.append(("client", why)),
        )

    def both_open(self) -> bool:
        return self.client.is_open and self.server is not None and self.server.is_open


def raw_server(reactor: Reactor, on_stream: Callable[[Stream], None]) -> tuple[str, int]:
    listener = listen(reactor, "127.0.0.1", 0, on_stream)
    return listener.address


# --------------------------------------------------------------------------- handshake


def test_handshake_picks_highest_common_version_and_exchanges_netinfo(reactor: Reactor) -> None:
    pair = Pair(reactor)
    run_until(reactor, pair.both_open)
    assert pair.both_open()
    server = pair.server
    assert server is not None
    assert pair.client.link_version == 5 and server.link_version == 5
    assert server.peer_versions == (4, 5)
    assert pair.client.peer_netinfo is not None
    assert pair.client.peer_netinfo.other_address == "127.0.0.1"
    assert pair.client.peer_netinfo.my_addresses == ("127.0.0.1",)
    assert pair.client.peer_netinfo.timestamp > 0
    assert server.peer_netinfo == NetInfo(0, "127.0.0.1", ())
    assert pair.client.peer_fingerprint is None  # no CERTS between our own relays


def test_version_4_when_that_is_all_the_peer_speaks(reactor: Reactor) -> None:
    pair = Pair(reactor, server_versions=(4,))
    run_until(reactor, pair.both_open)
    assert pair.client.link_version == 4
    assert pair.server is not None and pair.server.link_version == 4


def test_circuit_ids_follow_the_high_bit_rule(reactor: Reactor) -> None:
    pair = Pair(reactor)
    run_until(reactor, pair.both_open)
    server = pair.server
    assert server is not None
    client_ids = {pair.client.add_circuit(lambda c, p: None) for _ in range(100)}
    server_ids = {server.add_circuit(lambda c, p: None) for _ in range(100)}
    assert len(client_ids) == 100 and len(server_ids) == 100
    assert all(i & 0x80000000 and i & 0x7FFFFFFF for i in client_ids)
    assert all(not i & 0x80000000 and i for i in server_ids)
    some_client_id = next(iter(client_ids))
    # The responder registers an id the initiator chose; its own half is refused.
    assert server.add_circuit(lambda c, p: None, some_client_id) == some_client_id
    with pytest.raises(LinkError, match="already in use"):
        server.add_circuit(lambda c, p: None, some_client_id)
    with pytest.raises(LinkError, match="our half"):
        server.add_circuit(lambda c, p: None, 5)
    with pytest.raises(LinkError, match="not a valid"):
        pair.client.add_circuit(lambda c, p: None, 0)
    assert pair.client.circuit_count == 100
    pair.client.remove_circuit(some_client_id)
    assert pair.client.circuit_handler(some_client_id) is None
    assert pair.client.circuit_count == 99


# --------------------------------------------------------------------------- data path


def test_many_cells_arrive_in_order_on_their_circuits(reactor: Reactor) -> None:
    pair = Pair(reactor)
    run_until(reactor, pair.both_open)
    server = pair.server
    assert server is not None
    received: dict[int, list[tuple[int, bytes]]] = {}
    ids = [pair.client.add_circuit(lambda c, p: None) for _ in range(3)]
    for cid in ids:
        received[cid] = []
        server.add_circuit(lambda c, p, cid=cid: received[cid].append((c, p)), cid)
    rng = random.Random(7)
    sent: dict[int, list[tuple[int, bytes]]] = {cid: [] for cid in ids}
    for i in range(3000):
        cid = ids[i % 3]
        payload = rng.randbytes(509)
        sent[cid].append((CellCommand.RELAY, payload))
        if i % 2:
            pair.client.send_cell(cid, CellCommand.RELAY, payload)
        else:  # pre-framed bytes, as a relay writes a batch
            pair.client.write_cells(cid.to_bytes(4, "big") + bytes((3,)) + payload)
        if i % 500 == 0:
            pair.client.send_var_cell(0, CellCommand.VPADDING, os.urandom(100))
    run_until(reactor, lambda: sum(len(v) for v in received.values()) >= 3000)
    assert received == sent
    assert server.cells_in >= 3000 + 6
    assert pair.client.cells_out >= 3000


def test_one_iteration_of_writes_leaves_in_one_write_and_close_sends_it_first(
        reactor: Reactor) -> None:
    pair = Pair(reactor)
    run_until(reactor, pair.both_open)
    server = pair.server
    assert server is not None
    received: list[tuple[int, bytes]] = []
    cid = pair.client.add_circuit(lambda c, p: None)
    server.add_circuit(lambda c, p: received.append((c, p)), cid)
    writes = pair.client.writes
    payloads = [bytes([i]) * 509 for i in range(30)]
    for i, payload in enumerate(payloads):  # three ways of writing, interleaved
        frame = cid.to_bytes(4, "big") + bytes((CellCommand.RELAY,)) + payload
        if i % 3 == 0:
            pair.client.send_cell(cid, CellCommand.RELAY, payload)
        elif i % 3 == 1:
            pair.client.write_cells(frame)
        else:
            pair.client.writelines([frame[:100], frame[100:]])
    assert pair.client.writes == writes  # gathered, nothing sent yet
    pair.client.close("done")  # sends what was gathered, then closes
    run_until(reactor, lambda: len(pair.closes) == 2)
    assert pair.client.writes == writes + 1
    destroy = (CellCommand.DESTROY, bytes((DestroyReason.CHANNEL_CLOSED,)))
    assert received == [(CellCommand.RELAY, p) for p in payloads] + [destroy]


def test_gathered_output_past_the_high_watermark_is_sent_at_once(reactor: Reactor) -> None:
    pair = Pair(reactor)
    run_until(reactor, pair.both_open)
    assert pair.server is not None
    pair.client.stream.set_write_watermarks(4096, 1024)
    cid = pair.client.add_circuit(lambda c, p: None)
    writes = pair.client.writes
    for _ in range(7):  # 7 x 514 bytes: still below 4096
        pair.client.send_cell(cid, CellCommand.RELAY)
    assert pair.client.writes == writes
    pair.client.send_cell(cid, CellCommand.RELAY)  # the 8th passes 4096: sent now
    assert pair.client.writes == writes + 1


def test_cells_split_at_every_byte_boundary_are_reassembled(reactor: Reactor) -> None:
    got: list[tuple[int, int, bytes]] = []
    server_links: list[Link] = []

    def on_cell(link: Link, circ_id: int, command: int, payload: bytes) -> None:
        got.append((circ_id, command, payload))

    def accepted(stream: Stream) -> None:
        server_links.append(Link.accept(reactor, stream, on_cell=on_cell))

    host, port = listen(reactor, "127.0.0.1", 0, accepted).address
    payloads = [os.urandom(509) for _ in range(40)]
    wire = encode_versions([4, 5])
    wire += (0).to_bytes(4, "big") + bytes((8,)) + encode_netinfo(NetInfo(0, "127.0.0.1")).ljust(
        509, b"\0")
    for i, p in enumerate(payloads):
        wire += (0x80000000 | (i + 1)).to_bytes(4, "big") + bytes((CellCommand.CREATE_FAST,)) + p
        if i % 7 == 0:
            wire += VarCell(0, CellCommand.VPADDING, os.urandom(i)).encode(5)
    rng = random.Random(3)

    from reactor import connect

    def connected(stream: Stream) -> None:
        stream.on_data = lambda data: None
        offset = 0
        while offset < len(wire):  # many small writes: the reader sees arbitrary splits
            step = rng.choice([1, 2, 3, 5, 200, 513, 514, 515, 1500])
            stream.write(wire[offset : offset + step])
            offset += step

    connect(reactor, host, port, connected)
    run_until(reactor, lambda: len(got) >= 40)
    assert [(c, p) for _, c, p in got] == [(CellCommand.CREATE_FAST, p) for p in payloads]
    assert [cid for cid, _, _ in got] == [0x80000000 | (i + 1) for i in range(40)]
    assert server_links[0].link_version == 5 and server_links[0].is_open


def test_pause_holds_buffered_cells_until_resume(reactor: Reactor) -> None:
    pair = Pair(reactor)
    run_until(reactor, pair.both_open)
    server = pair.server
    assert server is not None
    got: list[bytes] = []

    def handler(command: int, payload: bytes) -> None:
        got.append(payload)
        if len(got) == 1:
            server.pause_reading()

    cid = pair.client.add_circuit(lambda c, p: None)
    server.add_circuit(handler, cid)
    payloads = [bytes([i]) * 509 for i in range(50)]
    pair.client.write_cells(b"".join(cid.to_bytes(4, "big") + b"\x03" + p for p in payloads))
    run_until(reactor, lambda: False, deadline=0.3)  # give the bytes every chance to arrive
    assert got == payloads[:1]
    server.resume_reading()
    run_until(reactor, lambda: len(got) >= 50)
    assert got == payloads


# --------------------------------------------------------------------------- closing


def test_close_destroys_circuits_and_the_peer_sees_it(reactor: Reactor) -> None:
    pair = Pair(reactor)
    run_until(reactor, pair.both_open)
    server = pair.server
    assert server is not None
    client_side: list[tuple[int, bytes]] = []
    server_side: list[tuple[int, bytes]] = []
    cid = pair.client.add_circuit(lambda c, p: client_side.append((c, p)))
    server.add_circuit(lambda c, p: server_side.append((c, p)), cid)
    pair.client.close("test is done")
    run_until(reactor, lambda: len(pair.closes) == 2)
    assert ("client", "test is done") in pair.closes
    assert pair.client.close_kind is CloseKind.LOCAL
    assert server.close_kind is CloseKind.PEER_CLOSED
    destroy = (CellCommand.DESTROY, bytes((DestroyReason.CHANNEL_CLOSED,)))
    assert client_side == [destroy] and server_side == [destroy]
    with pytest.raises(LinkError, match="closed"):
        pair.client.send_cell(cid, CellCommand.RELAY)
    pair.client.close("again")  # idempotent
    assert [who for who, _ in pair.closes].count("client") == 1


def test_unknown_circuit_gets_destroy(reactor: Reactor) -> None:
    pair = Pair(reactor)
    run_until(reactor, pair.both_open)
    got: list[tuple[int, bytes]] = []
    cid = pair.client.add_circuit(lambda c, p: got.append((c, p)))
    pair.client.send_cell(cid, CellCommand.RELAY, os.urandom(509))
    run_until(reactor, lambda: bool(got))
    assert got == [(CellCommand.DESTROY, bytes((DestroyReason.PROTOCOL,)) + bytes(508))]


def test_handler_that_raises_closes_the_link_with_the_reason(reactor: Reactor) -> None:
    pair = Pair(reactor)
    run_until(reactor, pair.both_open)
    server = pair.server
    assert server is not None

    def bad(command: int, payload: bytes) -> None:
        raise CellFormatError("relay length 600 exceeds 498")

    cid = pair.client.add_circuit(lambda c, p: None)
    server.add_circuit(bad, cid)
    pair.client.send_cell(cid, CellCommand.RELAY, b"x")
    run_until(reactor, lambda: server.closed and pair.client.closed)
    assert server.close_kind is CloseKind.PROTOCOL
    assert server.close_reason is not None and "exceeds 498" in server.close_reason
    assert pair.client.close_kind is CloseKind.PEER_CLOSED


def test_versions_after_the_handshake_is_a_protocol_error(reactor: Reactor) -> None:
    pair = Pair(reactor)
    run_until(reactor, pair.both_open)
    pair.client.write_cells(VarCell(0, CellCommand.VERSIONS, b"\x00\x04").encode(5))
    run_until(reactor, lambda: pair.server is not None and pair.server.closed)
    assert pair.server is not None and pair.server.close_kind is CloseKind.PROTOCOL
    assert "VERSIONS cell after the handshake" in (pair.server.close_reason or "")


# --------------------------------------------------------------------------- bad peers


def _client(reactor: Reactor, address: tuple[str, int], **kwargs: Any) -> Link:
    return Link.connect(reactor, address[0], address[1], **kwargs)


def test_peer_that_is_not_tor(reactor: Reactor) -> None:
    def http(stream: Stream) -> None:
        stream.on_data = lambda data: None
        stream.write(b"HTTP/1.0 400 Bad Request\r\n\r\n")

    link = _client(reactor, raw_server(reactor, http))
    run_until(reactor, lambda: link.closed)
    assert link.close_kind is CloseKind.NOT_TOR
    assert "not a Tor relay" in (link.close_reason or "")


def test_peer_with_no_common_version(reactor: Reactor) -> None:
    def old_tor(stream: Stream) -> None:
        stream.on_data = lambda data: None
        stream.write(encode_versions([1, 2, 3]))

    link = _client(reactor, raw_server(reactor, old_tor))
    run_until(reactor, lambda: link.closed)
    assert link.close_kind is CloseKind.UNSUPPORTED_VERSION
    assert "we speak [4, 5], the peer speaks [1, 2, 3]" in (link.close_reason or "")


def test_responder_refuses_an_initiator_with_no_common_version(reactor: Reactor) -> None:
    pair = Pair(reactor, server_versions=(5,), client_versions=(4,))
    run_until(reactor, lambda: pair.client.closed and pair.server is not None
              and pair.server.closed)
    assert pair.server is not None
    assert pair.server.close_kind is CloseKind.UNSUPPORTED_VERSION
    assert pair.client.close_kind is CloseKind.NOT_TOR  # it only sees the connection end


def test_malformed_netinfo_closes_the_link(reactor: Reactor) -> None:
    def broken(stream: Stream) -> None:
        stream.on_data = lambda data: None
        # NETINFO whose second "my address" claims 255 bytes past the end of the payload.
        netinfo = bytes(4) + b"\x04\x04\x7f\x00\x00\x01\xff" + b"\xff" * 498
        stream.write(encode_versions([5]) + bytes(4) + b"\x08" + netinfo)

    link = _client(reactor, raw_server(reactor, broken), require_certs=False)
    run_until(reactor, lambda: link.closed)
    assert link.close_kind is CloseKind.PROTOCOL
    assert "malformed NETINFO cell: NETINFO truncated" in (link.close_reason or "")


def test_tls_to_a_plain_tcp_peer_fails_clearly(reactor: Reactor) -> None:
    def plain(stream: Stream) -> None:
        stream.on_data = lambda data: stream.write(b"this is not TLS at all\r\n" * 10)

    link = _client(reactor, raw_server(reactor, plain), tls=True)
    run_until(reactor, lambda: link.closed)
    assert link.close_kind is CloseKind.TLS_FAILED
    assert "TLS" in (link.close_reason or "")


def test_silent_peer_times_out(reactor: Reactor) -> None:
    def silent(stream: Stream) -> None:
        stream.on_data = lambda data: None

    link = _client(reactor, raw_server(reactor, silent), handshake_timeout=0.2)
    run_until(reactor, lambda: link.closed)
    assert link.close_kind is CloseKind.TIMEOUT
    assert "awaiting-versions" in (link.close_reason or "")


def test_connect_to_a_closed_port(reactor: Reactor) -> None:
    listener = listen(reactor, "127.0.0.1", 0, lambda s: None)
    address = listener.address
    listener.close()
    link = _client(reactor, address)
    run_until(reactor, lambda: link.closed)
    assert link.close_kind is CloseKind.CONNECT_FAILED
    assert "REFUSED" in (link.close_reason or "")


# --------------------------------------------------------------------------- NETINFO codec


def test_netinfo_round_trip_and_known_bytes() -> None:
    info = NetInfo(0x01020304, "127.0.0.1", ("10.0.0.1", "::1"))
    raw = encode_netinfo(info)
    assert raw[:11] == bytes.fromhex("01020304 04 04 7f000001 02".replace(" ", ""))
    assert decode_netinfo(raw + bytes(100)) == info
    assert decode_netinfo(bytes.fromhex("00000000 07 02 aaaa 00".replace(" ", ""))) == NetInfo(
        0, None, ())
    for bad in (b"", b"\0\0\0\0", b"\0\0\0\0\x04\x04\x7f", b"\0\0\0\0\x04\x04\x7f\0\0\x01"):
        with pytest.raises(CellFormatError, match="NETINFO"):
            decode_netinfo(bad)
