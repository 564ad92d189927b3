"""The relay network's building blocks, one by one: fast relay payloads against the readable
codec, wire cells against ``Cell.encode``, BEGIN parsing and the exit policy, read gates on real
streams, and the directory file."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from support_loop import run_until

from reactor import Reactor, Stream, connect, listen
from relay.cells import Cell, CellCommand, RelayCommand, RelayPayload, parse_cells
from relay.circuits import ReadGate, pack_data_cells, pack_relay, relay_body, wire_cells
from relay.directory import (
    DirectoryError,
    RelayDescriptor,
    read_directory,
    write_directory,
)
from relay.exit import parse_begin
from tor1 import CELL_PAYLOAD_LEN, RELAY_DATA_MAX


@pytest.mark.parametrize("size", [0, 1, 100, RELAY_DATA_MAX - 4, RELAY_DATA_MAX - 1,
                                  RELAY_DATA_MAX])
def test_pack_relay_matches_the_readable_codec(size: int) -> None:
    data = bytes(range(256)) * 2
    payload = pack_relay(RelayCommand.DATA, 0x1234, data[:size])
    assert len(payload) == CELL_PAYLOAD_LEN
    parsed = RelayPayload.unpack(payload)
    assert (parsed.command, parsed.recognized, parsed.stream_id, parsed.digest, parsed.data) == (
        RelayCommand.DATA, 0, 0x1234, bytes(4), data[:size])
    gap = min(4, CELL_PAYLOAD_LEN - 11 - size)
    assert payload[11 + size : 11 + size + gap] == bytes(gap)  # tor-spec: 4 zero bytes first
    assert relay_body(payload) == (RelayCommand.DATA, 0x1234, data[:size])


def test_pack_relay_rejects_oversized_data() -> None:
    with pytest.raises(ValueError, match="at most 498"):
        pack_relay(RelayCommand.DATA, 1, bytes(RELAY_DATA_MAX + 1))


@pytest.mark.parametrize("size", [0, 1, RELAY_DATA_MAX, RELAY_DATA_MAX + 1, 5 * RELAY_DATA_MAX,
                                  5 * RELAY_DATA_MAX + 17])
def test_pack_data_cells_cuts_in_order(size: int) -> None:
    data = bytes(i * 7 % 251 for i in range(size))
    for source in (data, bytearray(data), memoryview(data)):
        cells = pack_data_cells(9, source)
        assert len(cells) == -(-size // RELAY_DATA_MAX)
        assert all(len(c) == CELL_PAYLOAD_LEN for c in cells)
        assert b"".join(relay_body(c)[2] for c in cells) == data
        assert {relay_body(c)[:2] for c in cells} <= {(RelayCommand.DATA, 9)}


def test_relay_body_rejects_a_bad_length_field() -> None:
    payload = bytearray(pack_relay(RelayCommand.DATA, 1, b"x"))
    payload[9:11] = (RELAY_DATA_MAX + 1).to_bytes(2, "big")
    with pytest.raises(ValueError, match="exceeds 498"):
        relay_body(bytes(payload))


def test_wire_cells_equals_one_encode_per_cell() -> None:
    payloads = [bytes([i]) * CELL_PAYLOAD_LEN for i in range(5)]
    wire = wire_cells(0x80000005, CellCommand.RELAY, b"".join(payloads))
    expected = b"".join(Cell(0x80000005, CellCommand.RELAY, p).encode(4) for p in payloads)
    assert wire == expected
    cells, end = parse_cells(wire, 0, 4)
    assert end == len(wire) and [c.payload for c in cells] == payloads


def test_parse_begin() -> None:
    assert parse_begin(b"127.0.0.1:8080\x00") == ("127.0.0.1", 8080)
    assert parse_begin(b"127.0.0.1:80\x00\x00\x00\x00\x01") == ("127.0.0.1", 80)
    assert parse_begin(b"[::1]:443\x00") == ("::1", 443)
    for bad in (b"127.0.0.1:80", b"127.0.0.1\x00", b"127.0.0.1:http\x00", b":\x00"):
        with pytest.raises(ValueError):
            parse_begin(bad)


def test_read_gate_pauses_while_any_reason_holds() -> None:
    with Reactor() as reactor:
        accepted: list[Stream] = []
        listener = listen(reactor, "127.0.0.1", 0, accepted.append)
        client = connect(reactor, *listener.address, lambda s: None)
        run_until(reactor, lambda: bool(accepted), 10, poll=0.01)
        stream = accepted[0]
        stream.on_data = lambda data: None
        assert stream.reading
        gate = ReadGate(stream)
        gate.hold("pool")
        gate.hold("pool")  # idempotent
        gate.hold(("write", 1))
        assert not stream.reading and gate.paused
        gate.release("pool")
        assert not stream.reading  # the other reason still holds it
        gate.release("pool")
        gate.release(("write", 1))
        assert stream.reading and not gate.paused
        gate.release("never held")
        assert stream.reading
        client.close()
        stream.close()
        listener.close()


def _entry(nickname: str, port: int) -> RelayDescriptor:
    return RelayDescriptor(nickname, "127.0.0.1", port, os.urandom(20), os.urandom(32))


def test_directory_round_trip(tmp_path: Path) -> None:
    descriptors = [_entry("r0", 5000), _entry("r1", 5001)]
    path = tmp_path / "directory.json"
    write_directory(path, descriptors)
    assert read_directory(path) == descriptors
    entry = json.loads(path.read_text())["relays"][0]
    assert entry["identity"] == descriptors[0].identity_digest.hex().upper()


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.update(version=2), "not a version 1"),
        (lambda d: d["relays"][0].pop("port"), "lacks 'port'"),
        (lambda d: d["relays"][0].update(port="80"), "port must be an integer"),
        (lambda d: d["relays"][0].update(identity="zz"), "relay entry"),
        (lambda d: d["relays"][0].update(ntor_onion_key="AAAA"), "32 bytes"),
        (lambda d: d["relays"].append(dict(d["relays"][0])), "duplicate nicknames"),
        (lambda d: d["relays"][0].update(nickname="has space"), "nickname"),
    ],
)
def test_directory_rejects_malformed_entries(
    tmp_path: Path, mutate: Callable[[dict[str, Any]], object], message: str
) -> None:
    path = tmp_path / "directory.json"
    write_directory(path, [_entry("r0", 5000)])
    document = json.loads(path.read_text())
    mutate(document)
    path.write_text(json.dumps(document))
    with pytest.raises(DirectoryError, match=message):
        read_directory(path)


def test_descriptor_validates_fields() -> None:
    with pytest.raises(DirectoryError, match="port"):
        RelayDescriptor("r0", "127.0.0.1", 0, bytes(20), bytes(32))
    with pytest.raises(DirectoryError, match="identity digest"):
        RelayDescriptor("r0", "127.0.0.1", 1, bytes(19), bytes(32))
