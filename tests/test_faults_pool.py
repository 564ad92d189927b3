"""Fault injection at the worker pool: random circuit closes with batches in flight, worker
exceptions in some circuits, and ``close()`` under load, all on a real Reactor with real tor1
crypto (the default backend: the C kernel when built).

What is checked, and why
------------------------
The pool's promises (docs/design.md, invariants 2, 3, 6, 7) must hold *together*, under churn, not
only one at a time as the unit tests check them:

* **Nothing lost, nothing reordered, for the circuits nobody touched.** Many circuits receive
  cells in random arrivals from loop callbacks while a random schedule closes some of them
  (sometimes in the very callback that just submitted their batch, so the batch is in flight or
  owned by a worker at that moment) and makes the crypto of others raise on a chosen batch. Every
  circuit that was neither closed nor failed must come out byte-equal to crypting its cells
  sequentially with a fresh state: zero cells lost.
* **A closed circuit is silent.** No result callback after ``close_circuit``; what it got before
  is a prefix of its sequential output.
* **A worker exception stays in its circuit.** ``on_error`` runs exactly once, on the loop
  thread, for exactly the circuits whose crypto raised; no result after it; every worker thread
  is still alive afterwards.
* **Every cell is accounted for.** ``submitted == delivered + cancelled + discarded_cells``
  once the pool is quiet, and ``in_flight`` is 0.
* **close() under load.** With thousands of cells queued on every worker, ``close(drain=False)``
  cancels the rest, joins every thread and closes the reply queue; ``close(drain=True)``
  delivers every cell before it returns. The bound checked on close's duration is generous (the
  machine is shared); the joined threads and the counts are the real assertions. Pools built and
  closed under load over and over leave no thread and no file descriptor behind.
"""

from __future__ import annotations

import gc
import os
import random
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from support_loop import run_polled, run_until

from reactor import Reactor
from tor1.backend import ReferenceRelayCrypto, relay_crypto_for
from tor1.reference import HopKeys, kdf_tor
from workers.circuit import Circuit
from workers.pool import WorkerPool

pytestmark = pytest.mark.timeout(120)

CELL = 509
FORWARD, BACKWARD = 0, 1
WORKER_PREFIX = "faults-worker"


class InjectedFault(Exception):
    """Raised inside a circuit's crypto on a worker thread, on purpose."""


def hop_keys(seed: int) -> HopKeys:
    return HopKeys.from_material(kdf_tor(b"faults-%d" % seed, 72))


@dataclass
class FaultyState:
    """A circuit's real relay crypto, which raises on its ``fail_at``-th batch (if set)."""

    crypto: Any
    fail_at: int | None = None
    batches: int = 0


def crypt(state: FaultyState, direction: int, batch: bytes) -> bytes:
    """The process function: one kernel call per batch. Worker thread."""
    state.batches += 1
    if state.batches == state.fail_at:
        raise InjectedFault(f"injected on batch {state.batches}")
    if direction == FORWARD:
        return state.crypto.forward_buf(batch)[0]
    return state.crypto.backward_buf(batch)


def sequential(seed: int, direction: int, cells: list[bytes], make: Callable[[HopKeys], Any]
               ) -> bytes:
    """The oracle: the same cells through a fresh state, in order, in one call."""
    state = make(hop_keys(seed))
    joined = b"".join(cells)
    return state.forward_buf(joined)[0] if direction == FORWARD else state.backward_buf(joined)


@dataclass
class Track:
    """What the test knows about one circuit."""

    seed: int
    sent: dict[int, list[bytes]] = field(default_factory=lambda: defaultdict(list))
    got: dict[int, bytearray] = field(default_factory=lambda: defaultdict(bytearray))
    closed: bool = False
    closed_by_test: bool = False  # closed by the schedule, not by on_error
    errors: int = 0
    results_after_close: int = 0


def worker_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(WORKER_PREFIX)]


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_random_closes_and_worker_exceptions_leave_every_other_circuit_intact(seed: int) -> None:
    rng = random.Random(seed)
    reactor = Reactor()
    loop_thread = threading.get_ident()
    callback_threads: set[int] = set()
    pool = WorkerPool.attach(reactor, threads=2, lanes=2, process=crypt, joined=True,
                             batch_cells=rng.choice([8, 32, 256]), name=WORKER_PREFIX,
                             cell_size=CELL)
    tracks: dict[Circuit, Track] = {}

    def on_result(circuit: Circuit, direction: int, result: bytes) -> None:
        callback_threads.add(threading.get_ident())
        track = tracks[circuit]
        if track.closed:
            track.results_after_close += 1
        track.got[direction] += result

    def on_error(circuit: Circuit, direction: int, exc: BaseException) -> None:
        callback_threads.add(threading.get_ident())
        assert isinstance(exc, InjectedFault), exc
        track = tracks[circuit]
        track.errors += 1
        track.closed = True
        pool.close_circuit(circuit)

    n_circuits = 300
    for i in range(n_circuits):
        fail_at = rng.randint(1, 6) if rng.random() < 0.08 else None
        state = FaultyState(relay_crypto_for(hop_keys(seed * 1000 + i)), fail_at)
        circuit = pool.open_circuit(state, on_result=on_result, on_error=on_error, context=i)
        tracks[circuit] = Track(seed * 1000 + i)
    circuits = list(tracks)
    arrivals = [600]
    closes_in_flight = [0]

    def arrive() -> None:
        """One loop iteration's arrivals, and sometimes a close. Loop thread."""
        live = [c for c in circuits if not tracks[c].closed]
        work = []
        for circuit in rng.sample(live, min(len(live), 8)):
            direction = rng.randrange(2)
            cells = [rng.randbytes(CELL) for _ in range(rng.randint(1, 24))]
            tracks[circuit].sent[direction].extend(cells)
            work.append((circuit, direction, b"".join(cells)))
        if work:
            pool.submit_many(work)
        if work and rng.random() < 0.12:  # close one just submitted: its batch is in flight
            victim = rng.choice(work)[0]
            closes_in_flight[0] += victim.in_flight > 0
            tracks[victim].closed = tracks[victim].closed_by_test = True
            pool.close_circuit(victim)
        elif rng.random() < 0.04 and live:
            victim = rng.choice(live)
            tracks[victim].closed = tracks[victim].closed_by_test = True
            pool.close_circuit(victim)
        arrivals[0] -= 1
        if arrivals[0]:
            reactor.call_later(0.001 if arrivals[0] % 4 == 0 else 0, arrive)

    reactor.call_soon(arrive)
    # until quiet; the 60 s deadline is a hang guard only
    run_until(reactor, lambda: arrivals[0] == 0 and pool.in_flight == 0, 60, poll=0.005)
    stats = pool.stats()
    assert arrivals[0] == 0 and stats["in_flight"] == 0, stats
    assert stats["alive_threads"] == 2  # worker exceptions killed no thread
    pool.close()
    reactor.close()

    assert callback_threads == {loop_thread}
    assert not worker_threads()
    injected = [t for c, t in tracks.items() if c.state.fail_at is not None
                and c.state.batches >= c.state.fail_at]
    # Every injected fault raised on a worker. Its error reached on_error exactly once, unless
    # the schedule had already closed that circuit while the failing batch was in flight: then
    # the error is discarded like any result of a closed circuit (no callback after a close).
    assert len(injected) == stats["errors"]
    assert all(t.errors == 1 for t in injected if not t.closed_by_test)
    assert all(t.errors <= 1 for t in injected)
    assert sum(t.errors for t in tracks.values()) == stats["errors_delivered"]
    assert stats["errors_delivered"] >= sum(not t.closed_by_test for t in injected)
    assert closes_in_flight[0] > 0  # the schedule really closed circuits with work in flight
    intact = 0
    for circuit, track in tracks.items():
        assert track.results_after_close == 0, circuit
        for direction in (FORWARD, BACKWARD):
            want = sequential(track.seed, direction, track.sent[direction], relay_crypto_for)
            if track.closed:
                assert want.startswith(bytes(track.got[direction])), (circuit, direction)
            else:
                assert bytes(track.got[direction]) == want, (circuit, direction)
        intact += not track.closed
    assert intact >= n_circuits // 2
    assert stats["submitted"] == stats["delivered"] + stats["cancelled"] + stats["discarded_cells"]
    print(f"FIGURES pool-faults seed={seed}: circuits={n_circuits} cells={stats['submitted']} "
          f"closed={sum(t.closed for t in tracks.values())} "
          f"closed_in_flight={closes_in_flight[0]} worker_exceptions={len(injected)} "
          f"intact={intact} lost=0 cancelled={stats['cancelled']} "
          f"discarded={stats['discarded_cells']}")


def loaded_pool(reactor: Reactor, circuits: int, cells_each: int, *, threads: int = 2
                ) -> tuple[WorkerPool, dict[Circuit, bytearray], dict[Circuit, bytes]]:
    """A pool whose workers have ``circuits * cells_each`` forward cells of pure-Python crypto
    queued (a per-cell digest check in Python: slow on purpose, so the workers are certainly
    busy when the test closes the pool)."""
    pool = WorkerPool.attach(reactor, threads=threads, lanes=2, process=crypt, joined=True,
                             batch_cells=64, name=WORKER_PREFIX, cell_size=CELL)
    got: dict[Circuit, bytearray] = {}
    sent: dict[Circuit, bytes] = {}

    def on_result(circuit: Circuit, direction: int, result: bytes) -> None:
        got[circuit] += result

    rng = random.Random(circuits)
    shared = rng.randbytes(CELL * cells_each)  # one buffer for all: the pool never copies it
    for i in range(circuits):
        circuit = pool.open_circuit(FaultyState(ReferenceRelayCrypto(hop_keys(i))),
                                    on_result=on_result, context=i)
        got[circuit] = bytearray()
        sent[circuit] = shared
        pool.submit(circuit, FORWARD, sent[circuit])
    return pool, got, sent


def test_close_without_drain_under_load_joins_every_thread_promptly() -> None:
    reactor = Reactor()
    # ~300k cells of pure-Python crypto: about a second of work for the whole pool
    pool, got, _ = loaded_pool(reactor, circuits=300, cells_each=1024, threads=3)
    assert run_briefly(reactor, lambda: pool.stats()["delivered"] > 0)
    in_flight = pool.in_flight
    assert in_flight > 0  # still loaded when close() is called
    started = time.monotonic()
    pool.close(drain=False, timeout=10.0)
    elapsed = time.monotonic() - started
    stats = pool.stats()
    reactor.close()
    assert stats["alive_threads"] == 0 and not worker_threads()
    assert stats["cancelled"] > 0
    assert stats["submitted"] == stats["delivered"] + stats["cancelled"] + stats["discarded_cells"]
    assert sum(len(g) for g in got.values()) == stats["delivered"] * CELL
    # Generous: a worker finishes at most its current batch of pure-Python crypto.
    assert elapsed < 2.0, elapsed
    print(f"FIGURES pool-close-under-load: in_flight_at_close={in_flight} "
          f"cancelled={stats['cancelled']} close_s={elapsed:.4f}")


def test_close_with_drain_under_load_delivers_every_cell() -> None:
    reactor = Reactor()
    pool, got, sent = loaded_pool(reactor, circuits=60, cells_each=64)
    pool.close(drain=True)
    stats = pool.stats()
    reactor.close()
    assert stats["alive_threads"] == 0 and not worker_threads()
    assert stats["delivered"] == stats["submitted"] == 60 * 64
    for circuit, data in sent.items():
        want = sequential(circuit.context, FORWARD, [data], ReferenceRelayCrypto)
        assert bytes(got[circuit]) == want


def test_pools_closed_under_load_leave_no_thread_or_descriptor() -> None:
    def fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    gc.collect()  # earlier tests' loops and sockets are closed now, not during the count
    threads_before = threading.active_count()
    reactor = Reactor()
    fds_before = fds()
    for round_ in range(30):
        pool, _, _ = loaded_pool(reactor, circuits=20, cells_each=16, threads=2)
        run_briefly(reactor, lambda: True)
        pool.close(drain=round_ % 2 == 0, timeout=10.0)
        assert pool.stats()["alive_threads"] == 0
    run_briefly(reactor, lambda: True)  # let the closed Async handles finish closing
    gc.collect()
    assert fds() <= fds_before
    reactor.close()
    assert threading.active_count() == threads_before
    assert not worker_threads()


def run_briefly(reactor: Reactor, done: Callable[[], bool], limit: float = 10.0) -> bool:
    """Run the loop a few iterations at least, until ``done()`` (or ``limit`` seconds)."""
    turns = [0]

    def third_turn_and_done() -> bool:
        turns[0] += 1
        return turns[0] >= 3 and done()

    run_polled(reactor, third_turn_and_done, limit, 0.001)
    return done()
