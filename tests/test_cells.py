"""Tests for relay.cells: framing round trips, stream decoding, relay payloads, rejects, fuzz."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.cells import (
    Cell,
    CellCommand,
    CellFormatError,
    CircIdRangeError,
    DestroyReason,
    FieldRangeError,
    LinkVersionError,
    PayloadSizeError,
    RelayCommand,
    RelayLengthError,
    RelayPayload,
    TrailingBytesError,
    TruncatedCellError,
    VarCell,
    VersionsFormatError,
    circ_id_len,
    decode_cell,
    encode_versions,
    highest_common_version,
    is_var_length,
    parse_cell,
    parse_cells,
    parse_versions,
)
from tor1 import CELL_PAYLOAD_LEN, RELAY_DATA_MAX

link_versions = st.sampled_from([3, 4, 5])


def fixed_cells(link_version: int) -> st.SearchStrategy[Cell]:
    circ_max = 0xFFFF if link_version < 4 else 0xFFFFFFFF
    return st.builds(
        Cell,
        st.integers(0, circ_max),
        st.integers(0, 127).filter(lambda c: c != CellCommand.VERSIONS),
        st.binary(max_size=CELL_PAYLOAD_LEN),
    )


def var_cells(link_version: int) -> st.SearchStrategy[VarCell]:
    circ_max = 0xFFFF if link_version < 4 else 0xFFFFFFFF
    return st.builds(
        VarCell,
        st.integers(0, circ_max),
        st.one_of(st.just(int(CellCommand.VERSIONS)), st.integers(128, 255)),
        st.binary(max_size=600),
    )


def any_cells(link_version: int) -> st.SearchStrategy[Cell | VarCell]:
    return st.one_of(fixed_cells(link_version), var_cells(link_version))


def padded(cell: Cell | VarCell) -> Cell | VarCell:
    if isinstance(cell, Cell):
        return Cell(cell.circ_id, cell.command, cell.payload.ljust(CELL_PAYLOAD_LEN, b"\0"))
    return cell


# --------------------------------------------------------------------------- constants


def test_command_constants() -> None:
    assert [int(c) for c in (CellCommand.PADDING, CellCommand.RELAY, CellCommand.DESTROY,
                             CellCommand.VERSIONS, CellCommand.NETINFO, CellCommand.RELAY_EARLY,
                             CellCommand.CREATE2, CellCommand.CREATED2, CellCommand.VPADDING,
                             CellCommand.CERTS, CellCommand.AUTHENTICATE)] == [
        0, 3, 4, 7, 8, 9, 10, 11, 128, 129, 131]
    assert [int(c) for c in RelayCommand] == list(range(1, 16))
    assert RelayCommand.EXTEND2 == 14 and RelayCommand.EXTENDED2 == 15
    assert DestroyReason.NONE == 0 and DestroyReason.FINISHED == 9
    assert DestroyReason.NOSUCHSERVICE == 12


def test_var_length_rules_follow_tor() -> None:
    assert not is_var_length(CellCommand.VERSIONS, 1)
    assert is_var_length(CellCommand.VERSIONS, 2) and not is_var_length(129, 2)
    for v in (0, 3, 4, 5):
        assert is_var_length(CellCommand.VERSIONS, v) and is_var_length(128, v)
        assert not is_var_length(CellCommand.RELAY, v) and not is_var_length(127, v)
    assert [circ_id_len(v) for v in (0, 1, 2, 3, 4, 5)] == [2, 2, 2, 2, 4, 4]
    with pytest.raises(LinkVersionError):
        circ_id_len(-1)


# --------------------------------------------------------------------------- known bytes


def test_fixed_cell_bytes_v3_and_v4() -> None:
    v4 = Cell(0x01020304, CellCommand.DESTROY, bytes([DestroyReason.FINISHED])).encode(4)
    assert len(v4) == 514
    assert v4[:7] == bytes.fromhex("01020304" "04" "09" "00") and v4[7:] == bytes(507)
    v3 = Cell(0x0102, CellCommand.RELAY, b"\xaa" * CELL_PAYLOAD_LEN).encode(3)
    assert len(v3) == 512 and v3[:3] == bytes.fromhex("010203") and v3[3:] == b"\xaa" * 509


def test_var_cell_and_versions_bytes() -> None:
    assert encode_versions([3, 4, 5]) == bytes.fromhex("0000" "07" "0006" "000300040005")
    assert VarCell(7, CellCommand.CERTS, b"xy").encode(4) == bytes.fromhex("00000007810002") + b"xy"
    cell, end = parse_cell(encode_versions([4]), 0, 0) or (None, 0)
    assert cell == VarCell(0, CellCommand.VERSIONS, b"\x00\x04") and end == 7
    assert parse_versions(b"\x00\x03\x00\x04\x00\x05") == [3, 4, 5]
    assert highest_common_version([3, 4, 5], [2, 3, 4]) == 4
    assert highest_common_version([5], [3, 4]) is None


# --------------------------------------------------------------------------- round trips


@settings(max_examples=150, deadline=None)
@given(data=st.data(), link_version=link_versions)
def test_cell_round_trip(data: st.DataObject, link_version: int) -> None:
    cell = data.draw(any_cells(link_version))
    wire = cell.encode(link_version)
    assert decode_cell(wire, link_version) == padded(cell)
    framed = parse_cell(b"junk" + wire + b"more", 4, link_version)
    assert framed is not None and framed == (padded(cell), 4 + len(wire))


@settings(max_examples=100, deadline=None)
@given(data=st.data(), link_version=link_versions, cut_seed=st.integers(0, 2**32))
def test_stream_decoder_reassembles_any_chunking(
    data: st.DataObject, link_version: int, cut_seed: int
) -> None:
    cells = data.draw(st.lists(any_cells(link_version), max_size=8))
    stream = b"".join(c.encode(link_version) for c in cells)
    rng = random.Random(cut_seed)
    buffer = bytearray()
    out: list[Cell | VarCell] = []
    position = 0
    while position < len(stream):
        step = rng.randint(1, 700)
        buffer += stream[position : position + step]
        position += step
        framed, consumed = parse_cells(buffer, 0, link_version)
        out.extend(framed)
        del buffer[:consumed]
    assert out == [padded(c) for c in cells]
    assert buffer == b""


def test_parse_cell_needs_more_at_every_short_length() -> None:
    for link_version in (3, 4):
        for cell in (Cell(1, CellCommand.RELAY, b"x"), VarCell(1, CellCommand.VPADDING, b"abc")):
            wire = cell.encode(link_version)
            for n in range(len(wire)):
                assert parse_cell(wire[:n], 0, link_version) is None
                assert parse_cell(memoryview(wire)[:n], 0, link_version) is None
            assert parse_cell(wire, len(wire), link_version) is None
            assert parse_cell(wire, len(wire) + 10, link_version) is None


@settings(max_examples=150, deadline=None)
@given(
    command=st.integers(0, 255),
    stream_id=st.integers(0, 0xFFFF),
    digest=st.binary(min_size=4, max_size=4),
    data=st.binary(max_size=RELAY_DATA_MAX),
    seed=st.integers(0, 2**32),
)
def test_relay_payload_round_trip_and_padding(
    command: int, stream_id: int, digest: bytes, data: bytes, seed: int
) -> None:
    payload = RelayPayload(command, 0, stream_id, digest, len(data), data)
    wire = payload.pack(random.Random(seed).randbytes)
    assert len(wire) == CELL_PAYLOAD_LEN
    assert RelayPayload.unpack(wire) == payload
    used = 11 + len(data)
    assert wire[used : used + 4] == bytes(min(4, CELL_PAYLOAD_LEN - used))
    assert wire[used + 4 :] == random.Random(seed).randbytes(max(0, CELL_PAYLOAD_LEN - used - 4))
    assert wire == payload.pack(random.Random(seed).randbytes)


def test_relay_payload_header_bytes() -> None:
    wire = RelayPayload(RelayCommand.DATA, stream_id=0x1234, data=b"hello").pack(lambda n: b"R" * n)
    assert wire[:16] == bytes.fromhex("02" "0000" "1234" "00000000" "0005") + b"hello"
    assert wire[16:20] == bytes(4) and wire[20:] == b"R" * (509 - 20)
    full = RelayPayload(RelayCommand.DATA, data=b"d" * RELAY_DATA_MAX).pack()
    assert full[9:11] == b"\x01\xf2" and full[11:] == b"d" * 498
    assert RelayPayload(RelayCommand.END, data=b"e" * 495).pack()[506:] == bytes(3)


# --------------------------------------------------------------------------- rejects


def test_rejects_in_construction_and_encoding() -> None:
    with pytest.raises(PayloadSizeError, match="509"):
        Cell(1, CellCommand.RELAY, bytes(510))
    with pytest.raises(PayloadSizeError):
        VarCell(1, CellCommand.CERTS, bytes(65536))
    with pytest.raises(FieldRangeError):
        Cell(1, 256)
    with pytest.raises(CircIdRangeError):
        Cell(2**32, CellCommand.RELAY)
    with pytest.raises(CircIdRangeError, match="v3"):
        Cell(0x10000, CellCommand.RELAY).encode(3)
    with pytest.raises(CellFormatError, match="VarCell"):
        Cell(0, CellCommand.VERSIONS).encode(4)
    with pytest.raises(CellFormatError, match="use Cell"):
        VarCell(0, CellCommand.RELAY).encode(4)
    with pytest.raises(FieldRangeError):
        encode_versions([70000])
    with pytest.raises(LinkVersionError):
        parse_cell(b"", 0, -1)
    with pytest.raises(ValueError, match="offset"):
        parse_cell(b"", -1, 4)


def test_rejects_in_decoding() -> None:
    with pytest.raises(TruncatedCellError):
        decode_cell(VarCell(1, CellCommand.CERTS, b"abcdef").encode(4)[:-1], 4)
    with pytest.raises(TruncatedCellError):
        decode_cell(Cell(1, CellCommand.RELAY).encode(4)[:513], 4)
    with pytest.raises(TrailingBytesError):
        decode_cell(Cell(1, CellCommand.RELAY).encode(3) + b"\0", 3)
    with pytest.raises(VersionsFormatError):
        parse_versions(b"\x00\x03\x00")
    with pytest.raises(PayloadSizeError, match="509"):
        RelayPayload.unpack(bytes(508))
    too_long = bytearray(509)
    too_long[9:11] = (499).to_bytes(2, "big")
    with pytest.raises(RelayLengthError, match="499"):
        RelayPayload.unpack(bytes(too_long))


def test_rejects_relay_payload_fields() -> None:
    with pytest.raises(RelayLengthError):
        RelayPayload(RelayCommand.DATA, data=bytes(499))
    with pytest.raises(RelayLengthError, match="match"):
        RelayPayload(RelayCommand.DATA, length=3, data=b"ab")
    for kwargs in ({"stream_id": 70000}, {"recognized": -1}, {"digest": b"abc"}):
        with pytest.raises(FieldRangeError):
            RelayPayload(RelayCommand.DATA, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(FieldRangeError):
        RelayPayload(300)
    with pytest.raises(ValueError, match="padding"):
        RelayPayload(RelayCommand.DATA).pack(lambda n: b"")


# --------------------------------------------------------------------------- fuzz


@settings(max_examples=300, deadline=None)
@given(blob=st.binary(max_size=1200), link_version=st.integers(0, 6),
       offset=st.integers(0, 40))
def test_decoders_raise_only_codec_errors_on_arbitrary_bytes(
    blob: bytes, link_version: int, offset: int
) -> None:
    cells, end = parse_cells(blob, offset, link_version)
    assert end >= offset
    assert b"".join(c.encode(link_version) for c in cells) == blob[offset:end]
    for decode in (
        lambda: decode_cell(blob, link_version),
        lambda: RelayPayload.unpack(blob[:CELL_PAYLOAD_LEN]),
        lambda: parse_versions(blob),
    ):
        try:
            decode()
        except CellFormatError:
            pass
