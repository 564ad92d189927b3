"""Property tests for tor1.reference: whole circuits of 1 to 8 hops, both directions.

Each circuit is one OriginCrypto plus one RelayCrypto per hop, built from the same random key
material; cells are moved through the relays by hand the way a network would.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tor1 import CELL_PAYLOAD_LEN
from tor1.reference import HopKeys, OriginCrypto, RelayCrypto, UnrecognizedCell, kdf_tor

# Hop keys come from KDF-TOR of distinct seeds, as a handshake would give: hops with equal keys
# are degenerate (two equal CTR layers at the same position cancel out), never a real circuit.
circuits = st.lists(st.binary(max_size=16), min_size=1, max_size=8, unique=True).map(
    lambda seeds: [HopKeys.from_material(kdf_tor(seed, 72)) for seed in seeds]
)
# A plaintext relay payload: any bytes with recognized (bytes 1..2) zero.
payloads = st.binary(min_size=CELL_PAYLOAD_LEN, max_size=CELL_PAYLOAD_LEN).map(
    lambda b: b[:1] + b"\x00\x00" + b[3:]
)


class Circuit:
    """An origin and its relays, with helpers that carry cells hop by hop."""

    def __init__(self, keys: list[HopKeys]) -> None:
        self.origin = OriginCrypto(keys)
        self.relays = [RelayCrypto(k) for k in keys]

    def send_forward(self, wire: bytes, target: int) -> bytes:
        """Carry a forward cell; assert that exactly relay ``target`` recognizes it."""
        for k, relay in enumerate(self.relays):
            ok, wire = relay.forward(wire)
            if ok:
                assert k == target, f"relay {k} recognized a cell meant for hop {target}"
                return wire
        raise AssertionError(f"no relay recognized a cell meant for hop {target}")

    def carry_backward(self, wire: bytes, source: int) -> bytes:
        for k in range(source - 1, -1, -1):
            wire = self.relays[k].backward(wire)
        return wire

    def send_backward(self, payload: bytes, source: int) -> bytes:
        return self.carry_backward(self.relays[source].originate(payload), source)


def same_except_digest(plain: bytes, payload: bytes) -> bool:
    return len(plain) == CELL_PAYLOAD_LEN and plain[:5] == payload[:5] and plain[9:] == payload[9:]


@settings(max_examples=150, deadline=None)
@given(keys=circuits, data=st.data())
def test_forward_cell_recognized_by_its_hop_only(keys: list[HopKeys], data: st.DataObject) -> None:
    circuit = Circuit(keys)
    for _ in range(3):
        hop = data.draw(st.integers(0, len(keys) - 1))
        payload = data.draw(payloads)
        plain = circuit.send_forward(circuit.origin.encrypt(payload, hop), hop)
        assert same_except_digest(plain, payload)


@settings(max_examples=150, deadline=None)
@given(keys=circuits, data=st.data())
def test_backward_cell_decrypted_as_its_source(keys: list[HopKeys], data: st.DataObject) -> None:
    circuit = Circuit(keys)
    for _ in range(3):
        source = data.draw(st.integers(0, len(keys) - 1))
        payload = data.draw(payloads)
        hop, plain = circuit.origin.decrypt(circuit.send_backward(payload, source))
        assert hop == source
        assert same_except_digest(plain, payload)


operations = st.lists(
    st.tuples(st.sampled_from(["fwd", "back", "fwd_many", "back_many"]), st.integers(0, 7),
              st.integers(0, 4)),
    min_size=1,
    max_size=40,
)


@settings(max_examples=100, deadline=None)
@given(keys=circuits, ops=operations, payload=payloads)
def test_long_interleavings_stay_in_sync(
    keys: list[HopKeys], ops: list[tuple[str, int, int]], payload: bytes
) -> None:
    circuit = Circuit(keys)
    n = len(keys)
    for step, (kind, hop_choice, batch) in enumerate(ops):
        hop = hop_choice % n
        cells = [
            bytes([step % 256]) + payload[1:5] + bytes([i]) + payload[6:] for i in range(batch)
        ]
        if kind == "fwd":
            cells = cells[:1] or [payload]
            assert same_except_digest(
                circuit.send_forward(circuit.origin.encrypt(cells[0], hop), hop), cells[0]
            )
        elif kind == "back":
            cells = cells[:1] or [payload]
            assert circuit.origin.decrypt(circuit.send_backward(cells[0], hop))[0] == hop
        elif kind == "fwd_many":
            wires = circuit.origin.encrypt_many(cells, hop)
            for k in range(hop + 1):
                results = circuit.relays[k].forward_many(wires)
                assert [ok for ok, _ in results] == [k == hop] * len(cells)
                wires = [w for _, w in results]
            assert all(same_except_digest(w, c) for w, c in zip(wires, cells, strict=True))
        else:
            wires = circuit.relays[hop].originate_many(cells)
            for k in range(hop - 1, -1, -1):
                wires = circuit.relays[k].backward_many(wires)
            results = circuit.origin.decrypt_many(wires)
            assert [h for h, _ in results] == [hop] * len(cells)
            assert all(same_except_digest(p, c) for (_, p), c in zip(results, cells, strict=True))


@settings(max_examples=150, deadline=None)
@given(keys=circuits, data=st.data())
def test_flipped_bit_backward_is_unrecognized_and_state_restored(
    keys: list[HopKeys], data: st.DataObject
) -> None:
    circuit = Circuit(keys)
    source = data.draw(st.integers(0, len(keys) - 1))
    bit = data.draw(st.integers(0, CELL_PAYLOAD_LEN * 8 - 1))
    first, second = data.draw(payloads), data.draw(payloads)
    wire = circuit.send_backward(first, source)
    corrupted = bytearray(wire)
    corrupted[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(UnrecognizedCell):
        circuit.origin.decrypt(bytes(corrupted))
    # Nothing was consumed: the good cell, then the next one, are still recognized.
    assert circuit.origin.decrypt(wire)[0] == source
    hop, plain = circuit.origin.decrypt(circuit.send_backward(second, source))
    assert hop == source and same_except_digest(plain, second)


@settings(max_examples=150, deadline=None)
@given(keys=circuits, data=st.data())
def test_flipped_bit_forward_is_unrecognized_and_passed_on(
    keys: list[HopKeys], data: st.DataObject
) -> None:
    """Every relay up to the target passes the corrupted cell on (the target does not claim it),
    and what comes out is the plaintext with exactly that bit flipped (CTR is a stream)."""
    circuit = Circuit(keys)
    target = data.draw(st.integers(0, len(keys) - 1))
    bit = data.draw(st.integers(0, CELL_PAYLOAD_LEN * 8 - 1))
    payload = data.draw(payloads)
    wire = bytearray(circuit.origin.encrypt(payload, target))
    wire[bit // 8] ^= 1 << (bit % 8)
    out = bytes(wire)
    for relay in circuit.relays[: target + 1]:
        ok, out = relay.forward(out)
        assert not ok
    flipped = bytearray(out)
    flipped[bit // 8] ^= 1 << (bit % 8)
    assert same_except_digest(bytes(flipped), payload)
    # A cell that is not for a relay leaves its digest alone: later cells to the other hops,
    # and cells back from any hop, are still fine.
    if len(keys) > 1:
        again = data.draw(payloads)
        hop = data.draw(st.integers(0, len(keys) - 1).filter(lambda h: h != target))
        assert same_except_digest(circuit.send_forward(circuit.origin.encrypt(again, hop), hop),
                                  again)
    assert circuit.origin.decrypt(circuit.send_backward(payload, target))[0] == target


@settings(max_examples=100, deadline=None)
@given(keys=circuits, data=st.data())
def test_batch_forms_equal_sequential_calls(keys: list[HopKeys], data: st.DataObject) -> None:
    single, batch = Circuit(keys), Circuit(keys)
    n = len(keys)
    targets = data.draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=12))
    cells = [data.draw(payloads) for _ in targets]

    # Origin -> relay 0: cells for mixed hops, so relay 0's batch mixes recognized and not.
    wires_single = [single.origin.encrypt(c, t) for c, t in zip(cells, targets, strict=True)]
    wires_batch: list[bytes] = []
    start = 0
    while start < len(cells):  # one encrypt_many per run of cells for the same hop
        end = start
        while end < len(cells) and targets[end] == targets[start]:
            end += 1
        wires_batch.extend(batch.origin.encrypt_many(cells[start:end], targets[start]))
        start = end
    assert wires_single == wires_batch
    fwd_single = [single.relays[0].forward(w) for w in wires_single]
    assert batch.relays[0].forward_many(wires_batch) == fwd_single

    # Same hop, several cells: encrypt_many == encrypt in a loop.
    hop = data.draw(st.integers(0, n - 1))
    assert batch.origin.encrypt_many(cells, hop) == [single.origin.encrypt(c, hop) for c in cells]

    # Backward: originate_many / backward_many / decrypt_many.
    source = data.draw(st.integers(0, n - 1))
    orig_single = [single.relays[source].originate(c) for c in cells]
    orig_batch = batch.relays[source].originate_many(cells)
    assert orig_batch == orig_single
    for k in range(source - 1, -1, -1):
        orig_single = [single.relays[k].backward(w) for w in orig_single]
        orig_batch = batch.relays[k].backward_many(orig_batch)
        assert orig_batch == orig_single
    assert batch.origin.decrypt_many(orig_batch) == [single.origin.decrypt(w) for w in orig_single]


def test_empty_batches() -> None:
    keys = [HopKeys.from_material(bytes(range(72)))]
    circuit = Circuit(keys)
    assert circuit.origin.encrypt_many([], 0) == []
    assert circuit.origin.decrypt_many([]) == []
    relay = circuit.relays[0]
    assert relay.forward_many([]) == relay.backward_many([]) == relay.originate_many([]) == []


@settings(max_examples=30, deadline=None)
@given(keys=circuits, data=st.data())
def test_decrypt_many_reports_the_bad_cell(keys: list[HopKeys], data: st.DataObject) -> None:
    circuit = Circuit(keys)
    n = len(keys)
    sources = data.draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=6))
    wires = [circuit.send_backward(data.draw(payloads), s) for s in sources]
    bad = data.draw(st.integers(0, len(wires) - 1))
    corrupted = list(wires)
    corrupted[bad] = bytes([wires[bad][0] ^ 0x80]) + wires[bad][1:]
    with pytest.raises(UnrecognizedCell) as info:
        circuit.origin.decrypt_many(corrupted)
    assert info.value.index == bad
    assert [h for h, _ in info.value.results] == sources[:bad]
    # The state is as after the last good cell: the rest decrypts from the bad index on.
    rest = circuit.origin.decrypt_many(wires[bad:])
    assert [h for h, _ in rest] == sources[bad:]
