"""End to end on every loop kind: a real loop (pyuv, asyncio, uvloop, trio) feeds the pool,
replies come back through a ReplyQueue woken the loop's way.

Cells are submitted from loop callbacks in many small arrivals; results are applied on the loop
thread; the ciphertext must equal calling ``tor1.reference`` sequentially per circuit.
Both pool forms run: lists of cells through the reference ``RelayCrypto``/``OriginCrypto`` batch
calls, and joined buffers through the backend the project uses by default (the C kernel when it
is built, releasing the GIL for each batch).
"""

from __future__ import annotations

import random
import threading
from collections import defaultdict
from collections.abc import Generator
from typing import Any

import pytest
from support_loops import Done, Harness, every_loop, run_scenario

from tor1 import CELL_PAYLOAD_LEN
from tor1.backend import origin_crypto_for, relay_crypto_for
from tor1.reference import HopKeys, OriginCrypto, RelayCrypto, kdf_tor
from workers.circuit import Circuit
from workers.pool import WorkerPool

PAYLOAD = 509
FORWARD, BACKWARD = 0, 1
N_CIRCUITS = 24
ARRIVALS = 60


def hop_keys(seed: int) -> HopKeys:
    return HopKeys.from_material(kdf_tor(b"pool-e2e-%d" % seed, 72))


def relay_list(state: RelayCrypto, direction: int, batch: list[bytes]) -> list[bytes]:
    if direction == FORWARD:
        return [cell for _, cell in state.forward_many(batch)]
    return state.backward_many(batch)


def relay_joined(state: Any, direction: int, batch: bytes) -> bytes:
    if direction == FORWARD:
        return state.forward_buf(batch)[0]
    return state.backward_buf(batch)


# The client's cells for the exit (hop 2): every layer's Kf stream is shared by all hops'
# cells, so an origin circuit is ONE ordered direction for the pool.
EXIT_HOP = 2


def origin_list(state: OriginCrypto, direction: int, batch: list[bytes]) -> list[bytes]:
    return state.encrypt_many(batch, EXIT_HOP)


def origin_joined(state: Any, direction: int, batch: bytes) -> bytes:
    return state.encrypt_buf(batch, EXIT_HOP)


def reference_relay(seed: int, direction: int, cells: list[bytes]) -> list[bytes]:
    ref = RelayCrypto(hop_keys(seed))
    if direction == FORWARD:
        return [ref.forward(c)[1] for c in cells]
    return [ref.backward(c) for c in cells]


def reference_origin(seed: int, direction: int, cells: list[bytes]) -> list[bytes]:
    ref = OriginCrypto([hop_keys(seed * 3 + h) for h in range(3)])
    return [ref.encrypt(c, EXIT_HOP) for c in cells]


CASES = {
    "relay-list": (lambda s: RelayCrypto(hop_keys(s)), relay_list, False, reference_relay, 2),
    "relay-joined": (
        lambda s: relay_crypto_for(hop_keys(s)),
        relay_joined,
        True,
        reference_relay,
        2,
    ),
    "origin-list": (
        lambda s: OriginCrypto([hop_keys(s * 3 + h) for h in range(3)]),
        origin_list,
        False,
        reference_origin,
        1,
    ),
    "origin-joined": (
        lambda s: origin_crypto_for([hop_keys(s * 3 + h) for h in range(3)]),
        origin_joined,
        True,
        reference_origin,
        1,
    ),
}


@every_loop
@pytest.mark.parametrize("case", sorted(CASES))
def test_loop_end_to_end_matches_sequential_relay_crypto(loop_kind: str, case: str) -> None:
    make_state, process, joined, reference, directions = CASES[case]
    rng = random.Random(case)
    sent: dict[tuple[int, int], list[bytes]] = defaultdict(list)
    got: dict[tuple[int, int], list[bytes]] = defaultdict(list)
    handler_threads: set[int] = set()
    counts = {"expected": 0, "delivered": 0, "arrivals_left": ARRIVALS}

    def body(h: Harness) -> Generator[Done, bool, None]:
        loop_thread = threading.get_ident()

        def on_result(c: Circuit, direction: int, result: Any) -> None:
            handler_threads.add(threading.get_ident())
            cells = (
                [result[i : i + PAYLOAD] for i in range(0, len(result), PAYLOAD)]
                if joined else result
            )
            got[(c.context, direction)].extend(cells)
            counts["delivered"] += len(cells)

        pool = WorkerPool.attach(h.loop, threads=2, process=process, joined=joined,
                                 batch_cells=64, cell_size=CELL_PAYLOAD_LEN)
        circuits = [
            pool.open_circuit(make_state(i), on_result=on_result, context=i)
            for i in range(N_CIRCUITS)
        ]

        def arrive() -> None:
            """One loop iteration's worth of cells for a few circuits. Loop thread."""
            work = []
            for c in rng.sample(circuits, 6):
                direction = rng.randrange(directions)
                batch = [rng.randbytes(PAYLOAD) for _ in range(rng.randint(1, 12))]
                sent[(c.context, direction)].extend(batch)
                counts["expected"] += len(batch)
                work.append((c, direction, b"".join(batch) if rng.random() < 0.5 else batch))
            pool.submit_many(work)
            counts["arrivals_left"] -= 1
            if counts["arrivals_left"]:
                h.call_later(0.0005 if counts["arrivals_left"] % 3 else 0, arrive)

        h.call_later(0, arrive)
        yield lambda: counts["arrivals_left"] == 0 and counts["delivered"] == counts["expected"]
        assert counts["arrivals_left"] == 0 and counts["delivered"] == counts["expected"]
        pool.close()
        stats = pool.stats()
        assert handler_threads == {loop_thread}
        assert stats["alive_threads"] == 0 and stats["errors"] == 0
        assert stats["delivered"] == stats["submitted"] == counts["expected"]

    run_scenario(loop_kind, body)
    assert not [t for t in threading.enumerate() if t.name.startswith("relaycrypt-worker")]
    for (seed, direction), cells in sent.items():
        assert got[(seed, direction)] == reference(seed, direction, cells), (seed, direction)
