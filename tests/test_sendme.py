"""``relay.sendme``: the SENDME v1 body, byte for byte as tor's trunnel ``sendme_cell``, which
DATA cells a sender marks, and the sender's check of each SENDME against the tags it kept.

The expected bytes are written out by hand from tor's ``sendme_cell.trunnel`` (``u8 version``,
``u16 data_len`` big-endian, then ``data_len`` bytes) and ``build_cell_payload_v1``; the tags
come from the real crypto (both backends), and the last test runs a whole exchange: a sender's
marked DATA cells, the receiver's tags of the cells that trigger its SENDMEs, and the check.
"""

from __future__ import annotations

import hashlib
import random

import pytest

from relay.cells import RelayCommand
from relay.circuits import CIRCWINDOW_INCREMENT, pack_data_cells, pack_relay, relay_body
from relay.sendme import (
    SENDME_ACCEPT_MIN_VERSION,
    SENDME_EMIT_VERSION,
    SendmeError,
    SendmeTags,
    decode_sendme,
    encode_sendme_v1,
    mark_cell,
    sendme_due,
)
from tor1 import CELL_PAYLOAD_LEN, SENDME_TAG_LEN
from tor1.backend import ReferenceOriginCrypto, ReferenceRelayCrypto, kernel_available
from tor1.reference import HopKeys

TAG = bytes(range(1, 21))


# --------------------------------------------------------------------------- the body


def test_v1_body_bytes() -> None:
    body = encode_sendme_v1(TAG)
    assert body == b"\x01" + b"\x00\x14" + TAG
    assert len(body) == 23
    # in a relay cell: command SENDME, stream 0, length field 23, then the body
    payload = pack_relay(RelayCommand.SENDME, 0, body)
    assert payload[0] == RelayCommand.SENDME
    assert payload[3:5] == b"\x00\x00"
    assert payload[9:11] == b"\x00\x17"
    assert payload[11:34] == body
    assert relay_body(payload) == (RelayCommand.SENDME, 0, body)


def test_encoder_takes_only_a_tor1_tag() -> None:
    with pytest.raises(ValueError, match="20 bytes"):
        encode_sendme_v1(TAG[:16])
    with pytest.raises(ValueError, match="20 bytes"):
        encode_sendme_v1(TAG + b"x")


def test_decode_what_tor_emits_and_accepts() -> None:
    assert decode_sendme(b"") == (0, b"")  # v0: an empty body, no parsing
    assert decode_sendme(b"\x01\x00\x14" + TAG) == (1, TAG)
    # trailing bytes after data_len are not part of the cell (sendme_cell_parse stops there)
    assert decode_sendme(b"\x01\x00\x14" + TAG + b"\xff" * 7) == (1, TAG)
    # a 16-byte (CGO) tag parses; the tag-length check against tor1 comes later
    assert decode_sendme(b"\x01\x00\x10" + TAG[:16]) == (1, TAG[:16])
    # version 0 with a body parses (data ignored), as trunnel's union does
    assert decode_sendme(b"\x00\x00\x14" + TAG) == (0, b"")


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (b"\x01", "shorter than its header"),
        (b"\x01\x00", "shorter than its header"),
        (b"\x02\x00\x14" + TAG, "version 2 is unknown"),
        (b"\xff\x00\x14" + TAG, "version 255 is unknown"),
        (b"\x01\x00\x13" + TAG, "data_len 19"),
        (b"\x01\x00\x15" + TAG + b"x", "data_len 21"),
        (b"\x01\x00\x00", "data_len 0"),
        (b"\x01\x14\x00" + TAG, "data_len 5120"),  # little-endian length: wrong
        (b"\x01\x00\x14" + TAG[:19], "shorter than data_len"),
        (b"\x00\x00\x14", "shorter than data_len"),
    ],
)
def test_decode_refuses_what_trunnel_refuses(body: bytes, why: str) -> None:
    with pytest.raises(SendmeError, match=why):
        decode_sendme(body)


def test_versions_are_tor_049_with_the_live_consensus() -> None:
    assert SENDME_EMIT_VERSION == 1
    assert SENDME_ACCEPT_MIN_VERSION == 1


# --------------------------------------------------------------------------- marks


def test_due_cells_are_every_hundredth_data_cell_of_the_circuit() -> None:
    """Over any split of a stream of DATA cells into batches, exactly cells 100, 200, ... are
    due (tor's circuit_sent_cell_for_sendme on the package window, for windows refilled by
    100 per SENDME)."""
    rng = random.Random(1)
    for _ in range(200):
        sent = 0
        due: list[int] = []
        total = rng.randint(0, 1200)
        while sent < total:
            count = min(rng.choice([1, 2, 7, 99, 100, 101, 250]), total - sent)
            due.extend(sent + index + 1 for index in sendme_due(sent, count))
            sent += count
        assert due == list(range(CIRCWINDOW_INCREMENT, total + 1, CIRCWINDOW_INCREMENT))


def test_a_mark_changes_no_byte_on_the_wire_and_brings_the_tag() -> None:
    keys = HopKeys.from_material(bytes(range(72)))
    cells = pack_data_cells(7, random.Random(2).randbytes(3000))
    marked = list(cells)
    marked[2] = mark_cell(cells[2])
    assert marked[2] != cells[2] and marked[2][:5] == cells[2][:5] == marked[2][:5]
    assert marked[2][9:] == cells[2][9:]
    relay = ReferenceRelayCrypto(keys)
    plain_out = ReferenceRelayCrypto(keys).originate_buf(b"".join(cells))
    out, tags = relay.originate_tagged_buf(b"".join(marked))
    assert out == plain_out
    running = hashlib.sha1(keys.db)
    for cell in cells[:3]:
        running.update(cell[:5] + bytes(4) + cell[9:])
    assert tags == running.digest()


# --------------------------------------------------------------------------- the check


def test_check_pops_the_oldest_tag_and_compares_it() -> None:
    record = SendmeTags()
    tags = [bytes([i]) * SENDME_TAG_LEN for i in range(1, 5)]
    record.record(b"".join(tags[:2]))
    record.record(tags[2])
    assert record.pending == 3 and record.recorded == 3
    assert record.check(encode_sendme_v1(tags[0])) is None
    # the second SENDME carries the third tag: refused, and the second tag is consumed
    assert "does not match" in (record.check(encode_sendme_v1(tags[2])) or "")
    assert record.pending == 1
    assert record.check(encode_sendme_v1(tags[2])) is None
    assert record.accepted == 2 and record.pending == 0
    assert "unexpected SENDME" in (record.check(encode_sendme_v1(tags[3])) or "")


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (b"", "version 0 refused"),
        (b"\x00\x00\x14" + TAG, "version 0 refused"),
        (b"\x01\x00\x10" + TAG[:16], "tag of 16 bytes"),
        (b"\x07\x00\x14" + TAG, "unparseable SENDME"),
        (b"\x01\x00\x14" + TAG[:10], "unparseable SENDME"),
    ],
)
def test_check_refuses_v0_bad_bodies_and_wrong_lengths(body: bytes, why: str) -> None:
    record = SendmeTags()
    record.record(TAG)
    assert why in (record.check(body) or "")
    assert record.accepted == 0


def test_a_refused_version_does_not_consume_a_tag_but_a_bad_tag_does() -> None:
    """tor checks the version before it pops (sendme_is_valid); either way the circuit is
    closed, so this only fixes which reason is reported."""
    record = SendmeTags()
    record.record(TAG)
    assert record.check(b"") is not None and record.pending == 1
    assert record.check(encode_sendme_v1(bytes(20))) is not None and record.pending == 0


@pytest.mark.parametrize("backend", ["reference", "kernel"])
def test_a_whole_exchange_both_ways(backend: str) -> None:
    """A client sends 1234 DATA cells to the exit, marking the due ones; the exit's tags of the
    cells that take its deliver window to 900 are exactly the client's recorded tags, and
    back: SENDMEs built from them all pass the check, in order, and one more is unexpected."""
    if backend == "kernel" and not kernel_available():
        pytest.skip("the C kernel is not built")
    rng = random.Random(3)
    keys = HopKeys.from_material(rng.randbytes(72))
    if backend == "kernel":
        from tor1.fast import FastOriginCrypto, FastRelayCrypto
        origin, exit_ = FastOriginCrypto([keys]), FastRelayCrypto(keys)
    else:
        origin, exit_ = ReferenceOriginCrypto([keys]), ReferenceRelayCrypto(keys)
    client_record = SendmeTags()
    sendmes: list[bytes] = []
    sent = 0
    deliver_window = 1000
    while sent < 1234:
        count = min(rng.randint(1, 180), 1234 - sent)
        cells = pack_data_cells(1, rng.randbytes(count * 498))
        for index in sendme_due(sent, count):
            cells[index] = mark_cell(cells[index])
        wire, tags = origin.encrypt_tagged_buf(cells, 0)
        client_record.record(tags)
        sent += count
        plain, flags, exit_tags = exit_.forward_tagged_buf(wire)
        assert flags == b"\x01" * count and len(plain) == count * CELL_PAYLOAD_LEN
        for index in range(count):  # the exit's per-DATA-cell rule
            deliver_window -= 1
            if deliver_window <= 900:
                deliver_window += 100
                sendmes.append(encode_sendme_v1(exit_tags[index * 20 : index * 20 + 20]))
    assert client_record.recorded == len(sendmes) == 12
    for body in sendmes:
        assert client_record.check(body) is None
    assert client_record.accepted == 12
    assert "unexpected" in (client_record.check(sendmes[-1]) or "")
