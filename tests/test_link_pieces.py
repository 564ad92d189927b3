"""The link's pieces without sockets: the handshake state machine and the open-link framer.

``relay.linkhandshake.LinkHandshake`` does no I/O of its own, so two of them (initiator and
responder) are wired to each other in memory; ``relay.framing.CellFramer`` is fed a byte
stream cut at random points. The socket-level behaviour is in tests/test_link*.py.
"""

from __future__ import annotations

import random

import pytest

from relay.cells import CellCommand, CellFormatError, encode_versions
from relay.framing import FIXED_CELL_LEN, CellFramer, fixed_cell, var_cell
from relay.linkerrors import CloseKind
from relay.linkhandshake import (
    AWAITING_NETINFO,
    AWAITING_VERSIONS,
    DONE,
    HandshakeFailed,
    LinkHandshake,
)
from relay.netinfo import NetInfo, decode_netinfo, encode_netinfo

_ADDRS = {True: (("10.0.0.2", 9001), ("10.0.0.1", 5555)),
          False: (("10.0.0.1", 5555), ("10.0.0.2", 9001))}


class Side:
    """One handshake plus what it sent (bytes and counted cells)."""

    def __init__(self, initiator: bool, versions: tuple[int, ...] = (4, 5)) -> None:
        self.sent = bytearray()
        self.counted = 0
        self.hs = LinkHandshake(initiator=initiator, versions=versions, require_certs=False,
                                send=self._send, addresses=lambda: _ADDRS[initiator])

    def _send(self, data: bytes, cells: int) -> None:
        self.sent += data
        self.counted += cells

    def take(self) -> bytes:
        data, self.sent = bytes(self.sent), bytearray()
        return data

    def feed(self, data: bytes) -> tuple[bool, int]:
        """Handle every complete handshake cell of ``data``; (done, bytes consumed)."""
        offset = 0
        done = False
        while not done:
            framed = self.hs.next_cell(data, offset)
            if framed is None:
                break
            cell, offset = framed
            done = self.hs.handle(cell.circ_id, cell.command, cell.payload)
        return done, offset


def test_initiator_and_responder_complete_in_memory() -> None:
    client, server = Side(True), Side(False, versions=(4,))
    client.hs.begin()
    server.hs.begin()
    assert server.sent == b"" and client.counted == 0  # VERSIONS is not counted
    assert server.feed(client.take()) == (False, 9)  # VERSIONS with versions 4 and 5
    assert server.hs.phase == AWAITING_NETINFO and server.hs.link_version == 4
    assert server.counted == 1  # its NETINFO
    done, _ = client.feed(server.take())  # VERSIONS + NETINFO: the initiator is done
    assert done and client.hs.done and client.hs.phase == DONE
    assert client.hs.link_version == 4 and client.hs.peer_versions == (4,)
    assert client.hs.peer_netinfo is not None
    assert client.hs.peer_netinfo.other_address == "10.0.0.1"
    assert client.hs.peer_netinfo.my_addresses == ("10.0.0.2",)
    assert server.feed(client.take()) == (True, FIXED_CELL_LEN)  # the initiator's NETINFO
    assert server.hs.peer_netinfo == NetInfo(0, "10.0.0.2", ())


def test_first_bytes_that_are_not_versions_mean_not_tor() -> None:
    server = Side(False)
    with pytest.raises(HandshakeFailed) as failed:
        server.feed(b"GET / HTTP/1.1\r\n")
    assert failed.value.kind is CloseKind.NOT_TOR
    assert server.hs.phase == AWAITING_VERSIONS


def test_no_common_version_and_malformed_cells() -> None:
    server = Side(False, versions=(4,))
    with pytest.raises(HandshakeFailed) as failed:
        server.feed(encode_versions([3, 5]))
    assert failed.value.kind is CloseKind.UNSUPPORTED_VERSION
    odd = Side(False)
    with pytest.raises(HandshakeFailed) as failed:
        odd.feed(b"\x00\x00\x07\x00\x03\x00\x04\x00")  # a 3-byte versions list
    assert failed.value.kind is CloseKind.PROTOCOL
    early = Side(False)
    early.feed(encode_versions([4]))
    with pytest.raises(HandshakeFailed) as failed:
        early.feed(fixed_cell(5, CellCommand.CREATE_FAST, bytes(20)))
    assert failed.value.kind is CloseKind.PROTOCOL and "during the link handshake" in str(
        failed.value)


def test_certs_required_before_netinfo() -> None:
    side = Side(True)
    side.hs = LinkHandshake(initiator=True, versions=(4,), require_certs=True,
                            send=lambda data, cells: None, addresses=lambda: (None, None))
    side.feed(encode_versions([4]))
    with pytest.raises(HandshakeFailed) as failed:
        side.feed(fixed_cell(0, CellCommand.NETINFO, encode_netinfo(NetInfo(1, None))))
    assert failed.value.kind is CloseKind.AUTH_FAILED


def test_netinfo_codec_round_trip_and_truncation() -> None:
    info = NetInfo(1_700_000_000, "127.0.0.1", ("::1", "10.1.2.3"))
    assert decode_netinfo(encode_netinfo(info) + bytes(40)) == info
    with pytest.raises(CellFormatError):
        decode_netinfo(encode_netinfo(info)[:-3])


def _stream(rng: random.Random) -> tuple[bytes, list[tuple[int, int, bytes]]]:
    cells: list[tuple[int, int, bytes]] = []
    parts: list[bytes] = []
    for _ in range(60):
        circ_id = rng.choice((0, 1, 0x80000001, 7))
        if rng.random() < 0.2:
            payload = rng.randbytes(rng.randint(0, 700))
            parts.append(var_cell(circ_id, CellCommand.VPADDING, payload))
            cells.append((circ_id, int(CellCommand.VPADDING), payload))
        else:
            payload = rng.randbytes(509)
            parts.append(fixed_cell(circ_id, CellCommand.RELAY, payload))
            cells.append((circ_id, int(CellCommand.RELAY), payload))
    return b"".join(parts), cells


@pytest.mark.parametrize("seed", range(8))
def test_framer_delivers_the_same_cells_wherever_the_stream_is_cut(seed: int) -> None:
    rng = random.Random(seed)
    data, expected = _stream(rng)
    got: list[tuple[int, int, bytes]] = []
    circuits = {1: lambda command, payload: got.append((1, command, payload))}
    framer = CellFramer(circuits, lambda c, command, payload: got.append((c, command, payload)))
    framer.version, framer.running = 4, True
    offset = 0
    while offset < len(data):
        step = rng.randint(1, 3000)
        buf = framer.take(data[offset : offset + step])
        framer.keep(buf, framer.dispatch(buf, 0))
        offset += step
    assert got == expected and framer.pending == b"" and framer.cells == len(expected)


def test_framer_stops_after_the_cell_that_cleared_running() -> None:
    data = b"".join(fixed_cell(1, CellCommand.RELAY, bytes([i])) for i in range(5))
    got: list[int] = []
    framer = CellFramer({}, lambda c, command, payload: None)

    def handler(command: int, payload: bytes) -> None:
        got.append(payload[0])
        if payload[0] == 1:
            framer.running = False  # what Link.pause_reading does

    framer.circuits[1] = handler
    framer.version, framer.running = 4, True
    end = framer.dispatch(data, 0)
    assert got == [0, 1] and end == 2 * FIXED_CELL_LEN
    framer.running = True
    assert framer.dispatch(data, end) == len(data) and got == [0, 1, 2, 3, 4]

