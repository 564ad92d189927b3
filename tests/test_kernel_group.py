"""``tor1._kernel.crypt_group``: several circuits' batches in one call, one GIL release.

What is checked:

* byte for byte, a group call gives what the per-circuit method calls give, in the same order:
  a hypothesis property drives two identical sets of kernel states (relay and origin, random
  hop counts) through the same random jobs -- every op, random batch sizes and piece splits,
  damaged cells, a state appearing several times in one group, invalid jobs mixed in -- one
  set by methods, the other by ``crypt_group``, and compares every result, every exception
  type and the states afterwards; the reference (``tor1.reference``) checks the relay
  forward path independently;
* errors stay with their job (bad type, op, length or hop; a state in use elsewhere) and the
  failed job leaves its state untouched;
* the GIL is released for the group (another thread runs Python while a group is inside);
* the in-use guard: a state held by another thread's call fails only its own job;
* the pool's group functions (``tor1.fast.relay_group`` / ``origin_group``) return
  what the ``*_buf`` methods return, UnrecognizedCell included.

No timing assertions anywhere.
"""

from __future__ import annotations

import itertools
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support_kernel import Runner

from tor1 import CELL_PAYLOAD_LEN
from tor1._kernel import (
    OP_BACKWARD,
    OP_DECRYPT,
    OP_ENCRYPT,
    OP_FORWARD,
    OP_ORIGINATE,
    OriginState,
    RelayState,
    crypt_group,
)
from tor1.fast import (
    FastOriginCrypto,
    FastRelayCrypto,
    origin_group,
    relay_group,
)
from tor1.reference import HopKeys, OriginCrypto, RelayCrypto, UnrecognizedCell

BIG = bytes(16 * 1024 * 1024 // CELL_PAYLOAD_LEN * CELL_PAYLOAD_LEN)  # ~16 MB of whole cells


def hop_keys(rng: random.Random) -> tuple[bytes, bytes, bytes, bytes]:
    keys = HopKeys.from_material(rng.randbytes(72))
    return (keys.df, keys.db, keys.kf, keys.kb)


def payload(rng: random.Random, plausible: bool) -> bytes:
    """A cell: a plausible relay payload (recognized and digest zero) or random bytes."""
    p = bytearray(rng.randbytes(CELL_PAYLOAD_LEN))
    if plausible:
        p[1:3] = b"\0\0"
        p[5:9] = b"\0\0\0\0"
    return bytes(p)


def as_pieces(rng: random.Random, joined: bytes) -> object:
    """The same bytes as one object or as pieces cut anywhere (a list or a tuple)."""
    if rng.random() < 0.4:
        return rng.choice([bytes, bytearray, memoryview])(joined)
    cuts = sorted(rng.randint(0, len(joined)) for _ in range(rng.randint(0, 4)))
    bounds = [0, *cuts, len(joined)]
    pieces = [joined[a:b] for a, b in itertools.pairwise(bounds)]
    return pieces if rng.random() < 0.5 else tuple(pieces)


class States:
    """Relay and origin kernel states built from the same keys (one set per world)."""

    def __init__(self, relay_keys: list, origin_hops: list[list]) -> None:
        self.relays = [RelayState(*k) for k in relay_keys]
        self.origins = [OriginState(hops) for hops in origin_hops]


def method_call(state: object, op: int, buf: object, hop: int | None) -> object:
    """The per-circuit method a job stands for."""
    if op == OP_FORWARD:
        return state.forward(buf)  # type: ignore[attr-defined]
    if op == OP_BACKWARD:
        return state.backward(buf)  # type: ignore[attr-defined]
    if op == OP_ORIGINATE:
        return state.originate(buf)  # type: ignore[attr-defined]
    if op == OP_ENCRYPT:
        return state.encrypt(buf, hop)  # type: ignore[attr-defined]
    return state.decrypt(buf)  # type: ignore[attr-defined]


def outcome(fn: object) -> object:
    """A call's result, or ("raised", exception type)."""
    try:
        return fn()  # type: ignore[operator]
    except Exception as exc:
        return ("raised", type(exc))


def group_outcome(result: object) -> object:
    return ("raised", type(result)) if isinstance(result, BaseException) else result


def random_job(rng: random.Random, n_relays: int, n_origins: int, hops: list[int]) -> tuple:
    """(kind, index, op, buf, hop, wrong_kind) for a random job; sometimes an invalid one."""
    cells = rng.choice([0, 1, 2, 3, 4, 5, 17, 64])
    plausible = rng.random() < 0.7
    joined = b"".join(payload(rng, plausible) for _ in range(cells))
    roll = rng.random()
    if roll < 0.05:
        joined = joined + b"x"  # not whole cells
    if rng.random() < 0.5:
        op = rng.choice([OP_FORWARD, OP_BACKWARD, OP_ORIGINATE])
        kind, index = "relay", rng.randrange(n_relays)
    else:
        op = rng.choice([OP_ENCRYPT, OP_DECRYPT])
        kind, index = "origin", rng.randrange(n_origins)
    hop = None
    if op == OP_ENCRYPT:
        hop = rng.randrange(-1, hops[index] + 1)  # sometimes out of range
    wrong_kind = rng.random() < 0.03  # the wrong kind of state for the op
    if wrong_kind:
        kind = "origin" if kind == "relay" else "relay"
        index = 0
    return kind, index, op, joined, hop, wrong_kind


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), groups=st.integers(1, 6))
def test_group_equals_method_calls_byte_for_byte(seed: int, groups: int) -> None:
    rng = random.Random(seed)
    relay_keys = [hop_keys(rng) for _ in range(rng.randint(1, 4))]
    hops = [rng.randint(0, 4) for _ in range(rng.randint(1, 3))]
    origin_hops = [[hop_keys(rng) for _ in range(n)] for n in hops]
    by_method = States(relay_keys, origin_hops)
    by_group = States(relay_keys, origin_hops)
    for _ in range(groups):
        jobs = [random_job(rng, len(relay_keys), len(hops), hops)
                for _ in range(rng.randint(0, 8))]
        expected = []
        group_jobs = []
        for kind, index, op, joined, hop, wrong_kind in jobs:
            m_state = (by_method.relays if kind == "relay" else by_method.origins)[index]
            g_state = (by_group.relays if kind == "relay" else by_group.origins)[index]
            if wrong_kind:  # the state has no such method; the group says TypeError
                expected.append(("raised", TypeError))
            else:
                expected.append(outcome(lambda s=m_state, o=op, j=joined, h=hop:
                                        method_call(s, o, as_pieces(rng, j), h)))
            buf = as_pieces(rng, joined)
            group_jobs.append((g_state, op, buf) if hop is None and op != OP_ENCRYPT
                              else (g_state, op, buf, hop))
        got = [group_outcome(r) for r in crypt_group(group_jobs)]
        assert got == expected
    # Same states afterwards: one more identical call on each gives identical bytes.
    probe = b"".join(payload(rng, True) for _ in range(5))
    for a, b in zip(by_method.relays, by_group.relays, strict=True):
        assert a.forward(probe) == b.forward(probe)
        assert a.originate(probe) == b.originate(probe)
    for a, b, n in zip(by_method.origins, by_group.origins, hops, strict=True):
        if n:
            assert a.encrypt(probe, n - 1) == b.encrypt(probe, n - 1)


def test_relay_forward_group_matches_the_reference() -> None:
    """Independent of the kernel's methods: many circuits' forward batches in one group give
    the reference's bytes and recognized flags."""
    rng = random.Random(7)
    circuits = []
    for _ in range(6):
        keys = [HopKeys.from_material(rng.randbytes(72)) for _ in range(3)]
        circuits.append((OriginCrypto(keys), RelayCrypto(keys[0]), RelayCrypto(keys[1]),
                         FastRelayCrypto(keys[1])))
    group = relay_group()
    for _ in range(3):
        jobs, expected = [], []
        for client, guard, middle, fast in circuits:
            plain = [payload(rng, True) for _ in range(rng.randint(1, 40))]
            hop = rng.choice([1, 2])  # some cells are for the middle itself
            at_middle = [c for _, c in guard.forward_many(client.encrypt_many(plain, hop))]
            ref = middle.forward_many(at_middle)
            expected.append((b"".join(c for _, c in ref), bytes(int(r) for r, _ in ref)))
            jobs.append((fast, 0, [c for c in at_middle]))
        assert group(jobs) == expected


def test_errors_stay_with_their_job_and_leave_state_untouched() -> None:
    rng = random.Random(3)
    keys = hop_keys(rng)
    a, b = RelayState(*keys), RelayState(*keys)
    origin = OriginState([hop_keys(rng), hop_keys(rng)])
    cells = b"".join(payload(rng, True) for _ in range(8))
    results = crypt_group([
        (a, OP_BACKWARD, cells),
        ("not a state", OP_FORWARD, cells),
        (a, 99, cells),
        (a, OP_BACKWARD, cells + b"x"),
        (origin, OP_ENCRYPT, cells, 2),
        (origin, OP_FORWARD, cells),
        (a, OP_ENCRYPT, cells, 0),
        (origin, OP_ENCRYPT, cells),
        (a, OP_BACKWARD, [cells[:100], cells[100:]]),
        42,
    ])
    assert results[0] == b.backward(cells)
    assert isinstance(results[1], TypeError)
    assert isinstance(results[2], ValueError)
    assert isinstance(results[3], ValueError)
    assert isinstance(results[4], ValueError)  # hop 2 of a 2-hop circuit
    assert isinstance(results[5], TypeError)  # a relay op on an origin state
    assert isinstance(results[6], TypeError)  # an origin op on a relay state
    assert isinstance(results[7], TypeError)  # encrypt without its hop
    assert results[8] == b.backward(cells)  # the failed jobs did not move a's keystream
    assert isinstance(results[9], TypeError)
    assert crypt_group([]) == []
    with pytest.raises(TypeError):
        crypt_group(None)  # type: ignore[arg-type]


def test_one_state_in_several_jobs_runs_them_in_order() -> None:
    rng = random.Random(5)
    keys = hop_keys(rng)
    grouped, called = RelayState(*keys), RelayState(*keys)
    chunks = [b"".join(payload(rng, True) for _ in range(n)) for n in (3, 0, 9, 1)]
    ops = [OP_ORIGINATE, OP_BACKWARD, OP_FORWARD, OP_ORIGINATE]
    got = crypt_group([(grouped, op, c) for op, c in zip(ops, chunks, strict=True)])
    want = [method_call(called, op, c, None) for op, c in zip(ops, chunks, strict=True)]
    assert got == want
    assert not grouped.in_use


def test_unrecognized_cell_in_a_group_decrypt() -> None:
    """A decrypt job stops at the first unrecognized cell exactly like decrypt(); a later job on
    the same state continues from there; origin_group turns it into UnrecognizedCell."""
    rng = random.Random(11)
    keys = [HopKeys.from_material(rng.randbytes(72)) for _ in range(2)]
    relays = [RelayCrypto(k) for k in keys]
    wire = [relays[0].backward(relays[1].originate(payload(rng, True))) for _ in range(6)]
    good_third = wire[3]
    wire[3] = bytes(CELL_PAYLOAD_LEN)  # garbage: no hop recognizes it
    joined = b"".join(wire)
    ref = FastOriginCrypto(keys)
    with pytest.raises(UnrecognizedCell) as caught:
        ref.decrypt_buf(joined)
    fast = FastOriginCrypto(keys)
    (result,) = origin_group(1)([(fast, 1, [joined])])
    assert isinstance(result, UnrecognizedCell)
    assert result.index == caught.value.index == 3
    assert result.results == caught.value.results
    # Both states are as after the three good cells: the real cell 3 and the rest decrypt.
    rest = b"".join([good_third, *wire[4:]])
    assert fast.decrypt_buf(rest) == ref.decrypt_buf(rest)


def test_group_functions_match_the_buf_methods() -> None:
    rng = random.Random(13)
    keys = [HopKeys.from_material(rng.randbytes(72)) for _ in range(3)]
    a, b = FastRelayCrypto(keys[1]), FastRelayCrypto(keys[1])
    x, y = FastOriginCrypto(keys), FastOriginCrypto(keys)
    cells = [payload(rng, True) for _ in range(12)]
    joined = b"".join(cells)
    assert relay_group()([(a, 0, cells), (a, 1, [joined]), (a, 2, cells[:5])]) == [
        b.forward_buf(joined), b.backward_buf(joined), b.originate_buf(b"".join(cells[:5]))]
    assert origin_group(2)([(x, 0, cells)]) == [y.encrypt_buf(joined, 2)]


def test_the_gil_is_released_for_the_whole_group() -> None:
    """The test thread sees the group's last state in use: Python ran while the group (which
    crypts the first state before it) was inside the kernel."""
    rng = random.Random(17)
    first, last = RelayState(*hop_keys(rng)), RelayState(*hop_keys(rng))
    runner = Runner(lambda: crypt_group([(first, OP_BACKWARD, BIG), (last, OP_FORWARD, BIG)]))
    runner.start()
    seen = 0
    while runner.is_alive() and seen < 1000:
        if last.in_use and first.in_use:
            seen += 1
    runner.stop.set()
    runner.join()
    assert runner.error is None
    assert seen > 0
    assert runner.failed_jobs == 0


def test_a_state_in_use_elsewhere_fails_only_its_job() -> None:
    rng = random.Random(19)
    busy = RelayState(*hop_keys(rng))
    twin_keys = hop_keys(random.Random(23))
    free, twin = RelayState(*twin_keys), RelayState(*twin_keys)
    runner = Runner(lambda: busy.backward(BIG))
    runner.start()
    cells = b"".join(payload(rng, True) for _ in range(4))
    refused = None
    while refused is None and runner.is_alive():
        results = crypt_group([(busy, OP_BACKWARD, cells), (free, OP_BACKWARD, cells)])
        assert results[1] == twin.backward(cells)  # the free state is crypted either way
        if isinstance(results[0], RuntimeError):
            refused = results[0]
    runner.stop.set()
    runner.join()
    assert runner.error is None
    assert refused is not None and "in use" in str(refused)
    assert not busy.in_use and not free.in_use
