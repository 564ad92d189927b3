"""The C batch kernel (tor1._kernel, tor1.fast) gives the reference's exact bytes.

Layout: known answers straight from SPEC-tor1 (AES-CTR incl. the counter wrap, digest setting
and SENDME tags computed with hashlib + cryptography by hand), the hypothesis property test that
drives a reference circuit and a kernel circuit through the same random interleaving of both
directions (random hop counts, payloads, bit flips, batch sizes and splits, all API forms, the
SENDME-tagged forms with random marks) and compares every byte, every tag and every exception,
and the error cases. Thread behaviour lives in test_kernel_threads.py.
"""

from __future__ import annotations

import hashlib
import itertools
import pickle
import random
import sys
from collections.abc import Callable

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tor1 import CELL_PAYLOAD_LEN
from tor1._kernel import OP_BACKWARD, OP_FORWARD, OP_TAGS, OriginState, RelayState, crypt_group
from tor1.fast import FastOriginCrypto, FastRelayCrypto
from tor1.reference import (
    HopKeys,
    OriginCrypto,
    RelayCrypto,
    UnrecognizedCell,
    aes128_ctr_encryptor,
)

KAT_KEY = bytes.fromhex("80000000000000000000000000000000")
KAT_ZERO_IV_16 = bytes.fromhex("0edd33d3c621e546455bd8ba1418bec8")
KAT_WRAP_64 = bytes.fromhex(
    "2aed2bff0de54f9328efd070bf48f70a0edd33d3c621e546455bd8ba1418bec8"
    "93e2c5243d6839eac58503919192f7ae1908e67cafa08d508816659c2e693191"
)
ALL_ONES = b"\xff" * 16


def keys_from(rng: random.Random) -> HopKeys:
    return HopKeys.from_material(rng.randbytes(72))


def relay_payload(rng: random.Random) -> bytes:
    """A plausible plaintext relay payload: recognized zero, digest zero, random rest."""
    p = bytearray(rng.randbytes(CELL_PAYLOAD_LEN))
    p[1:3] = b"\0\0"
    p[5:9] = b"\0\0\0\0"
    return bytes(p)


def kernel_relay(keys: HopKeys, iv: bytes | None = None) -> RelayState:
    return RelayState(keys.df, keys.db, keys.kf, keys.kb, _iv=iv)


def mark(cell: bytes, rng: random.Random) -> bytes:
    """``cell`` with a random non-zero digest field: the caller asks for its SENDME tag."""
    field = rng.randbytes(4)
    while field == bytes(4):
        field = rng.randbytes(4)
    return cell[:5] + field + cell[9:]


def running_digests(seed: bytes, cells: list[bytes]) -> list[bytes]:
    """By hand: SHA-1 seeded with ``seed`` over each cell (digest field zero), the whole
    digest after each one."""
    running = hashlib.sha1(seed)
    out = []
    for cell in cells:
        running.update(cell[:5] + bytes(4) + cell[9:])
        out.append(running.copy().digest())
    return out


# --------------------------------------------------------------------------- known answers


def test_aes_ctr_known_answer_zero_iv() -> None:
    keys = HopKeys(df=bytes(20), db=bytes(20), kf=bytes(16), kb=KAT_KEY)
    out = kernel_relay(keys).backward(bytes(CELL_PAYLOAD_LEN))
    assert out[:16] == KAT_ZERO_IV_16


def test_aes_ctr_counter_wraps() -> None:
    keys = HopKeys(df=bytes(20), db=bytes(20), kf=KAT_KEY, kb=KAT_KEY)
    state = kernel_relay(keys, iv=ALL_ONES)
    assert state.backward(bytes(CELL_PAYLOAD_LEN))[:64] == KAT_WRAP_64
    out, _ = state.forward(bytes(CELL_PAYLOAD_LEN))
    assert out[:64] == KAT_WRAP_64


@pytest.mark.parametrize("start_block", [2**128 - 1, 2**128 - 40, 2**64 - 1, 2**64 - 33, 2**32 - 7])
def test_keystream_position_carries_across_calls(start_block: int) -> None:
    """Many calls of odd cell counts (509 % 16 == 13, so every offset in a block occurs) near
    counter carries and the 2**128 wrap equal one continuous stream."""
    keys = HopKeys(df=bytes(20), db=bytes(20), kf=bytes(16), kb=KAT_KEY)
    state = kernel_relay(keys, iv=start_block.to_bytes(16, "big"))
    reference = aes128_ctr_encryptor(KAT_KEY, start_block * 16)
    rng = random.Random(start_block)
    for _ in range(30):
        buf = rng.randbytes(CELL_PAYLOAD_LEN * rng.randint(0, 5))
        assert state.backward(buf) == reference(buf)


def test_originate_known_answer_by_hand() -> None:
    """Digest set and Kb encryption recomputed from the spec with hashlib and cryptography."""
    rng = random.Random(7)
    keys = keys_from(rng)
    payloads = [rng.randbytes(CELL_PAYLOAD_LEN) for _ in range(3)]
    running = hashlib.sha1(keys.db)
    expected_plain = b""
    for p in payloads:
        zeroed = p[:5] + bytes(4) + p[9:]
        running.update(zeroed)
        expected_plain += p[:5] + running.copy().digest()[:4] + p[9:]
    cipher = Cipher(algorithms.AES(keys.kb), modes.CTR(bytes(16))).encryptor()
    expected = cipher.update(expected_plain)
    assert kernel_relay(keys).originate(b"".join(payloads)) == expected


def test_forward_recognizes_by_hand_digest() -> None:
    rng = random.Random(8)
    keys = keys_from(rng)
    plain = bytearray(relay_payload(rng))
    plain[5:9] = hashlib.sha1(keys.df + bytes(plain)).digest()[:4]
    wire = Cipher(algorithms.AES(keys.kf), modes.CTR(bytes(16))).encryptor().update(bytes(plain))
    out, recognized = kernel_relay(keys).forward(wire)
    assert (out, recognized) == (bytes(plain), b"\x01")


def test_sendme_tags_known_answers_by_hand() -> None:
    """Tags are the whole running digest after the chosen cells: marked cells at a sender,
    recognized cells at a receiver, in order, hop by hop; a mark changes no output byte."""
    rng = random.Random(10)
    hops = [keys_from(rng) for _ in range(2)]
    cells = [relay_payload(rng) for _ in range(6)]
    marked = [mark(c, rng) if i in (1, 4, 5) else c for i, c in enumerate(cells)]
    forward = running_digests(hops[1].df, cells)
    backward = running_digests(hops[1].db, cells)

    origin = FastOriginCrypto(hops)
    wire, tags = origin.encrypt_tagged_buf(b"".join(marked), 1)
    assert wire == FastOriginCrypto(hops).encrypt_buf(b"".join(cells), 1)
    assert tags == forward[1] + forward[4] + forward[5]
    middle, last = FastRelayCrypto(hops[0]), FastRelayCrypto(hops[1])
    passed, flags, none = middle.forward_tagged_buf(wire)
    assert flags == bytes(6) and none == b""
    plain, flags, tags = last.forward_tagged_buf(passed)
    assert flags == b"\x01" * 6 and tags == b"".join(forward)
    # each cell's 4-byte digest field is the start of its tag
    assert [c[5:9] for c in cells_of(plain, 6)] == [t[:4] for t in forward]

    back, tags = last.originate_tagged_buf(b"".join(marked))
    assert back == FastRelayCrypto(hops[1]).originate_buf(b"".join(cells))
    assert tags == backward[1] + backward[4] + backward[5]
    out, who, tags = origin.decrypt_tagged_buf(middle.backward_buf(back))
    assert who == b"\x01" * 6 and tags == b"".join(backward)
    assert [c[5:9] for c in cells_of(out, 6)] == [t[:4] for t in backward]

    # The reference gives the same, list by list.
    ref_origin = OriginCrypto(hops)
    _, tags = ref_origin.encrypt_tagged_many(marked, 1)
    assert tags == forward[1] + forward[4] + forward[5]
    ref_last = RelayCrypto(hops[1])
    _, tags = ref_last.originate_tagged_many(marked)
    assert tags == backward[1] + backward[4] + backward[5]


def test_tagged_forms_refuse_backward_and_handle_empty_batches() -> None:
    keys = keys_from(random.Random(11))
    state = kernel_relay(keys)
    (error,) = crypt_group([(state, OP_BACKWARD | OP_TAGS, bytes(CELL_PAYLOAD_LEN))])
    assert isinstance(error, ValueError) and "no tags" in str(error)
    (error,) = crypt_group([(state, OP_TAGS | 7, b"")])
    assert isinstance(error, ValueError) and "unknown op" in str(error)
    assert state.forward_tagged(b"") == (b"", b"", b"")
    assert state.originate_tagged(b"") == (b"", b"")
    assert crypt_group([(state, OP_FORWARD | OP_TAGS, b"")]) == [(b"", b"", b"")]
    origin = OriginState([(keys.df, keys.db, keys.kf, keys.kb)])
    assert origin.encrypt_tagged(b"", 0) == (b"", b"")
    assert origin.decrypt_tagged(b"") == (b"", b"", b"")
    # A cell no hop recognizes stops the batch: no plaintext, no hop, no tag.
    assert origin.decrypt_tagged(bytes(CELL_PAYLOAD_LEN)) == (b"", b"", b"")
    with pytest.raises(UnrecognizedCell) as info:
        FastOriginCrypto([keys]).decrypt_tagged_buf(bytes(CELL_PAYLOAD_LEN))
    assert info.value.index == 0


# --------------------------------------------------------------------------- property test


class Worlds:
    """A reference circuit and a kernel circuit (origin + every relay) driven in lockstep."""

    def __init__(self, hops: list[HopKeys]) -> None:
        self.hops = hops
        self.ref_origin = OriginCrypto(hops)
        self.fast_origin = FastOriginCrypto(hops)
        self.ref_relays = [RelayCrypto(k) for k in hops]
        self.fast_relays = [FastRelayCrypto(k) for k in hops]


def split_points(rng: random.Random, n: int) -> list[tuple[int, int]]:
    """Cut range(n) into consecutive chunks (some empty) at random."""
    cuts = sorted(rng.randint(0, n) for _ in range(rng.randint(0, 3)))
    bounds = [0, *cuts, n]
    return list(itertools.pairwise(bounds))


def fast_call_list(
    rng: random.Random,
    cells: list[bytes],
    one: Callable[[bytes], object],
    many: Callable[[list[bytes]], list],
    buf: Callable[[bytes], object],
    from_buf: Callable[[object, int], list],
) -> list:
    """Run ``cells`` through one of the kernel's API forms, chunked at random."""
    form = rng.choice(["one", "many", "buf"])
    results: list = []
    for lo, hi in split_points(rng, len(cells)):
        chunk = cells[lo:hi]
        if form == "one":
            results.extend(one(c) for c in chunk)
        elif form == "many":
            results.extend(many(chunk))
        else:
            joined = b"".join(chunk)
            arg = rng.choice(
                [joined, bytearray(joined), memoryview(joined), byte_pieces(rng, joined)]
            )
            results.extend(from_buf(buf(arg), len(chunk)))  # type: ignore[arg-type]
    return results


def fast_tagged_chunks(rng: random.Random, cells: list[bytes],
                       call: Callable[[object], tuple]) -> tuple[bytes, ...]:
    """Run ``cells`` through a kernel ``*_tagged_buf`` form, chunked at random and in random
    buffer shapes; every item of the results (out, flags or hops, tags) joined across chunks."""
    parts: list[list[bytes]] = []
    for lo, hi in split_points(rng, len(cells)):
        joined = b"".join(cells[lo:hi])
        arg = rng.choice([joined, bytearray(joined), memoryview(joined), byte_pieces(rng, joined)])
        result = call(arg)
        if not parts:
            parts = [[] for _ in result]
        for items, item in zip(parts, result, strict=True):
            items.append(item)
    return tuple(b"".join(items) for items in parts)


def tags_at(tags: bytes, indices: list[int]) -> bytes:
    return b"".join(tags[i * 20 : (i + 1) * 20] for i in indices)


def byte_pieces(rng: random.Random, joined: bytes) -> list | tuple:
    """The same bytes as a list or tuple of pieces cut anywhere (not on cell boundaries)."""
    cuts = sorted(rng.randint(0, len(joined)) for _ in range(rng.randint(0, 4)))
    bounds = [0, *cuts, len(joined)]
    pieces = [rng.choice([bytes, bytearray, memoryview])(joined[a:b])
              for a, b in itertools.pairwise(bounds)]
    return pieces if rng.random() < 0.5 else tuple(pieces)


def flip_some(rng: random.Random, cells: list[bytes], damage: bool) -> list[bytes]:
    """When ``damage``, flip one bit in some cells: often in the digest field, else anywhere."""
    if not damage:
        return cells
    out = []
    for cell in cells:
        if rng.random() < 0.3:
            b = bytearray(cell)
            pos = rng.randrange(5, 9) if rng.random() < 0.5 else rng.randrange(CELL_PAYLOAD_LEN)
            b[pos] ^= 1 << rng.randrange(8)
            cell = bytes(b)
        out.append(cell)
    return out


def pairs(joined: bytes, flags: bytes) -> list:
    return [(bool(f), joined[i * CELL_PAYLOAD_LEN : (i + 1) * CELL_PAYLOAD_LEN])
            for i, f in enumerate(flags)]


def cells_of(joined: bytes, n: int) -> list[bytes]:
    return [joined[i * CELL_PAYLOAD_LEN : (i + 1) * CELL_PAYLOAD_LEN] for i in range(n)]


def send_forward(
    w: Worlds, rng: random.Random, hop: int, cells: list[bytes], damage: bool
) -> None:
    """Origin encrypts for ``hop``; some cells are damaged; relays 0..hop in turn handle them
    (as in a network: the cells stop at their hop). Half the time in the SENDME-tagged forms,
    some cells marked: tags compared too, and the sender's tag of each marked cell must be the
    receiving hop's tag of it."""
    if rng.random() < 0.5:
        send_forward_tagged(w, rng, hop, cells, damage)
        return
    ref_wire = w.ref_origin.encrypt_many(cells, hop)
    fast_wire = fast_call_list(
        rng, cells,
        lambda c: w.fast_origin.encrypt(c, hop),
        lambda cs: w.fast_origin.encrypt_many(cs, hop),
        lambda b: w.fast_origin.encrypt_buf(b, hop),
        cells_of,
    )
    assert fast_wire == ref_wire
    wire = flip_some(rng, ref_wire, damage)
    for ref_relay, fast_relay in zip(w.ref_relays[: hop + 1], w.fast_relays[: hop + 1],
                                     strict=True):
        ref_out = ref_relay.forward_many(wire)
        fast_out = fast_call_list(
            rng, wire, fast_relay.forward, fast_relay.forward_many,
            fast_relay.forward_buf, lambda r, n: pairs(*r),
        )
        assert fast_out == ref_out
        wire = [cell for _, cell in ref_out]


def send_forward_tagged(
    w: Worlds, rng: random.Random, hop: int, cells: list[bytes], damage: bool
) -> None:
    chosen = [i for i in range(len(cells)) if rng.random() < 0.3]
    marked = [mark(c, rng) if i in chosen else c for i, c in enumerate(cells)]
    ref_wire, sent_tags = w.ref_origin.encrypt_tagged_many(marked, hop)
    assert len(sent_tags) == 20 * len(chosen)
    fast = fast_tagged_chunks(rng, marked, lambda b: w.fast_origin.encrypt_tagged_buf(b, hop))
    assert fast == (b"".join(ref_wire), sent_tags)
    wire = flip_some(rng, ref_wire, damage)
    for k, (ref_relay, fast_relay) in enumerate(zip(w.ref_relays[: hop + 1],
                                                     w.fast_relays[: hop + 1], strict=True)):
        ref_out, ref_tags = ref_relay.forward_tagged_many(wire)
        fast = fast_tagged_chunks(rng, wire, fast_relay.forward_tagged_buf)
        flags = bytes(ok for ok, _ in ref_out)
        assert fast == (b"".join(c for _, c in ref_out), flags, ref_tags)
        assert len(ref_tags) == 20 * flags.count(1)
        if k == hop and not damage:  # every cell recognized here: the SENDME property
            assert flags == b"\x01" * len(cells)
            assert tags_at(ref_tags, chosen) == sent_tags
        wire = [cell for _, cell in ref_out]


def send_backward(
    w: Worlds, rng: random.Random, hop: int, cells: list[bytes], damage: bool
) -> None:
    """Relay ``hop`` originates; relays hop-1..0 pass the cells back; the origin decrypts.
    Half the time in the SENDME-tagged forms, as in :func:`send_forward`."""
    fast_relay = w.fast_relays[hop]
    sent: tuple[list[int], bytes] | None = None
    if rng.random() < 0.5:
        chosen = [i for i in range(len(cells)) if rng.random() < 0.3]
        marked = [mark(c, rng) if i in chosen else c for i, c in enumerate(cells)]
        ref_wire, sent_tags = w.ref_relays[hop].originate_tagged_many(marked)
        assert fast_tagged_chunks(rng, marked, fast_relay.originate_tagged_buf) == (
            b"".join(ref_wire), sent_tags)
        sent = (chosen, sent_tags)
    else:
        ref_wire = w.ref_relays[hop].originate_many(cells)
        fast_wire = fast_call_list(
            rng, cells, fast_relay.originate, fast_relay.originate_many,
            fast_relay.originate_buf, cells_of,
        )
        assert fast_wire == ref_wire
    for k in range(hop - 1, -1, -1):
        ref_next = w.ref_relays[k].backward_many(ref_wire)
        fast_relay = w.fast_relays[k]
        fast_next = fast_call_list(
            rng, ref_wire, fast_relay.backward, fast_relay.backward_many,
            fast_relay.backward_buf, cells_of,
        )
        assert fast_next == ref_next
        ref_wire = ref_next
    wire = flip_some(rng, ref_wire, damage)
    if sent is not None and not damage:
        origin_decrypt_tagged_both(w, rng, wire, hop, *sent)
        return
    origin_decrypt_both(w, rng, wire)


def origin_decrypt_tagged_both(w: Worlds, rng: random.Random, wire: list[bytes], hop: int,
                               chosen: list[int], sent_tags: bytes) -> None:
    """Undamaged cells from ``hop``: tagged decrypt on both sides, the same bytes and tags,
    and the sender's tags of the marked cells are the origin's tags of them."""
    results, tags = w.ref_origin.decrypt_tagged_many(wire)
    assert [h for h, _ in results] == [hop] * len(wire)
    fast = fast_tagged_chunks(rng, wire, w.fast_origin.decrypt_tagged_buf)
    assert fast == (b"".join(p for _, p in results), bytes(h for h, _ in results), tags)
    assert tags_at(tags, chosen) == sent_tags


def origin_decrypt_both(w: Worlds, rng: random.Random, wire: list[bytes]) -> None:
    """Decrypt at the origin on both sides; results and UnrecognizedCell must agree. Both
    keep going after a failure: the state is defined as after the last good cell."""
    form = rng.choice(["one", "many", "buf"])
    pos = 0
    while pos < len(wire):
        rest = wire[pos:]
        try:
            ref = w.ref_origin.decrypt_many(rest)
            ref_exc = None
        except UnrecognizedCell as exc:
            ref, ref_exc = exc.results, exc
        try:
            if form == "one":
                fast = []
                for i, cell in enumerate(rest):
                    try:
                        fast.append(w.fast_origin.decrypt(cell))
                    except UnrecognizedCell:
                        raise UnrecognizedCell(i, fast) from None
            elif form == "many":
                fast = w.fast_origin.decrypt_many(rest)
            else:
                out, hops = w.fast_origin.decrypt_buf(b"".join(rest))
                fast = list(zip(hops, cells_of(out, len(hops)), strict=True))
            fast_exc = None
        except UnrecognizedCell as exc:
            fast, fast_exc = exc.results, exc
        assert fast == ref
        assert (ref_exc is None) == (fast_exc is None)
        if ref_exc is None or fast_exc is None:
            return
        assert fast_exc.index == ref_exc.index
        pos += ref_exc.index + 1  # skip the bad cell, carry on with the rest


def junk_forward(w: Worlds, rng: random.Random, cells: list[bytes]) -> None:
    """Cells that are not for anyone (random bytes, sometimes recognized == 0 on the wire)."""
    k = rng.randrange(len(w.hops))
    ref_out = w.ref_relays[k].forward_many(cells)
    fr = w.fast_relays[k]
    assert fast_call_list(rng, cells, fr.forward, fr.forward_many, fr.forward_buf,
                          lambda r, n: pairs(*r)) == ref_out


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(min_value=0, max_value=2**64 - 1),
    n_hops=st.integers(min_value=1, max_value=8),
    n_ops=st.integers(min_value=1, max_value=12),
)
def test_kernel_equals_reference_on_random_circuits(seed: int, n_hops: int, n_ops: int) -> None:
    """Interleaved directions on one circuit. A damaged cell or junk desynchronizes the two
    ends of a real circuit (Tor closes it): every byte is still compared, including what the
    damage does, and then the test moves on to a fresh circuit."""
    rng = random.Random(seed)
    w = Worlds([keys_from(rng) for _ in range(n_hops)])
    for _ in range(n_ops):
        op = rng.choice(["forward", "forward", "backward", "backward", "junk"])
        batch = rng.choice([0, 1, 1, 2, 3, 4, 5, 9, 17, 40])
        damage = rng.random() < 0.25
        if op == "junk":
            cells = [rng.randbytes(CELL_PAYLOAD_LEN) for _ in range(batch)]
            cells = [c[:1] + b"\0\0" + c[3:] if rng.random() < 0.3 else c for c in cells]
            junk_forward(w, rng, cells)
        else:
            hop = rng.randrange(n_hops)
            cells = [relay_payload(rng) for _ in range(batch)]
            send = send_forward if op == "forward" else send_backward
            send(w, rng, hop, cells, damage)
        if op == "junk" or damage:
            w = Worlds([keys_from(rng) for _ in range(n_hops)])


def test_add_hop_matches_reference() -> None:
    rng = random.Random(3)
    first, second = keys_from(rng), keys_from(rng)
    ref, fast = OriginCrypto([first]), FastOriginCrypto([first])
    cells = [relay_payload(rng) for _ in range(5)]
    assert fast.encrypt_many(cells, 0) == ref.encrypt_many(cells, 0)
    ref.add_hop(second)
    fast.add_hop(second)
    assert fast.n_hops == ref.n_hops == 2
    assert fast.encrypt_many(cells, 1) == ref.encrypt_many(cells, 1)
    assert fast.encrypt_many(cells, 0) == ref.encrypt_many(cells, 0)


def test_unrecognized_cell_leaves_state_as_after_good_cells() -> None:
    rng = random.Random(4)
    hops = [keys_from(rng) for _ in range(3)]
    relays = [FastRelayCrypto(k) for k in hops]
    origin = FastOriginCrypto(hops)
    good = relays[2].originate_many([relay_payload(rng) for _ in range(6)])
    good = relays[0].backward_many(relays[1].backward_many(good))
    bad = bytearray(good[2])
    bad[100] ^= 0x40
    with pytest.raises(UnrecognizedCell) as info:
        origin.decrypt_buf(b"".join([good[0], good[1], bytes(bad), good[3]]))
    assert info.value.index == 2
    assert [hop for hop, _ in info.value.results] == [2, 2]
    # The state is as after cells 0 and 1: the undamaged cell 2 and the rest now decrypt.
    assert [hop for hop, _ in origin.decrypt_many(good[2:])] == [2, 2, 2, 2]


def test_zero_hop_origin_behaves_like_reference() -> None:
    with pytest.raises(UnrecognizedCell):
        OriginCrypto([]).decrypt(bytes(CELL_PAYLOAD_LEN))
    with pytest.raises(UnrecognizedCell):
        FastOriginCrypto([]).decrypt(bytes(CELL_PAYLOAD_LEN))
    with pytest.raises(ValueError, match="out of range"):
        FastOriginCrypto([]).encrypt(bytes(CELL_PAYLOAD_LEN), 0)
    assert FastOriginCrypto([]).decrypt_many([]) == []


def test_empty_batches() -> None:
    keys = keys_from(random.Random(5))
    state = kernel_relay(keys)
    assert state.forward(b"") == (b"", b"")
    assert state.backward(b"") == b""
    assert state.originate(b"") == b""
    origin = OriginState([(keys.df, keys.db, keys.kf, keys.kb)])
    assert origin.encrypt(b"", 0) == b""
    assert origin.decrypt(b"") == (b"", b"")


# --------------------------------------------------------------------------- errors


def test_key_lengths_are_checked() -> None:
    with pytest.raises(ValueError, match="df must be 20 bytes"):
        RelayState(bytes(19), bytes(20), bytes(16), bytes(16))
    with pytest.raises(ValueError, match="kb must be 16 bytes"):
        RelayState(bytes(20), bytes(20), bytes(16), bytes(17))
    with pytest.raises(TypeError):
        RelayState("x" * 20, bytes(20), bytes(16), bytes(16))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="_iv must be 16 bytes"):
        RelayState(bytes(20), bytes(20), bytes(16), bytes(16), _iv=bytes(15))
    with pytest.raises(ValueError, match="kf must be 16 bytes"):
        OriginState([(bytes(20), bytes(20), bytes(15), bytes(16))])
    with pytest.raises(ValueError, match=r"\(df, db, kf, kb\)"):
        OriginState([(bytes(20), bytes(20), bytes(16))])
    with pytest.raises(ValueError, match="at most 255 hops"):
        OriginState([(bytes(20), bytes(20), bytes(16), bytes(16))] * 256)


def test_buffer_lengths_and_hops_are_checked_without_state_change() -> None:
    rng = random.Random(6)
    keys = keys_from(rng)
    fast, ref = FastRelayCrypto(keys), RelayCrypto(keys)
    with pytest.raises(ValueError, match="multiple of 509"):
        fast.forward_buf(bytes(508))
    with pytest.raises(ValueError, match="multiple of 509"):
        fast.backward_buf(bytes(1019))
    with pytest.raises(ValueError, match="509 bytes"):
        fast.forward(bytes(1018))  # two cells where one is expected
    with pytest.raises(ValueError, match="509 bytes"):
        fast.backward_many([bytes(508), bytes(510)])  # joins to 1018, still rejected
    with pytest.raises(TypeError):
        fast.forward_buf("not bytes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"multiple of 509 .*got 1017"):
        fast.forward_buf([bytes(509), bytearray(500), memoryview(bytes(8))])
    with pytest.raises(TypeError):
        fast.backward_buf([bytes(509), "text"])  # type: ignore[list-item]
    second = keys_from(rng)
    origin = FastOriginCrypto([keys, second])
    for bad_hop in (-1, 2, 10**6):
        with pytest.raises(ValueError, match="out of range"):
            origin.encrypt_buf(bytes(CELL_PAYLOAD_LEN), bad_hop)
    with pytest.raises(ValueError, match="multiple of 509"):
        origin.decrypt_buf(bytes(100))
    # Nothing above moved any state: the next calls still equal a fresh reference.
    cells = [relay_payload(rng) for _ in range(3)]
    assert fast.backward_many(cells) == ref.backward_many(cells)
    assert fast.forward_many(cells) == ref.forward_many(cells)
    assert origin.encrypt_many(cells, 1) == OriginCrypto([keys, second]).encrypt_many(cells, 1)


def test_states_are_small() -> None:
    """A circuit's state is a few hundred bytes (no cipher context is kept between calls)."""
    hop = (bytes(20), bytes(20), bytes(16), bytes(16))
    assert sys.getsizeof(RelayState(*hop)) <= 512
    one, three = sys.getsizeof(OriginState([hop])), sys.getsizeof(OriginState([hop] * 3))
    assert one < three <= 1024


def test_state_objects_cannot_be_pickled() -> None:
    keys = keys_from(random.Random(9))
    with pytest.raises(TypeError):
        pickle.dumps(kernel_relay(keys))
    with pytest.raises(TypeError):
        pickle.dumps(OriginState([(keys.df, keys.db, keys.kf, keys.kb)]))
