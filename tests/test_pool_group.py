"""The pool's grouped path: several circuits' batches crypted by one ``group`` call.

What is checked (never speed):

* order: per circuit and direction, results come back in submission order and equal the
  stream a per-circuit ``process`` gives, with the real kernel (``relay_group``) against the
  pure-Python reference, and with a stream stand-in across buffers and lists of cells;
* a group call gets only circuits its worker owns: no circuit is ever in two calls at once,
  and a call really holds several circuits;
* cancellation in flight: a circuit closed while its batch is inside a group call has that
  result discarded and counted, and the other circuits of the same call are delivered;
* errors are isolated: an exception instance for one job fails only that circuit (its
  ``on_error`` runs once, nothing more is crypted for it), a group call that raises fails the
  circuits in it and no other, and the worker lives on;
* a pool mixes grouped and ungrouped circuits; ``put_many`` is used when the reply queue has it.
"""

from __future__ import annotations

import random
import threading
from collections import defaultdict
from typing import Any

import pytest
from test_pool_support import CELL, Collector, OrderedState, OwnerGuard, cell, expected_stream

from tor1.fast import FastRelayCrypto, relay_group
from tor1.reference import HopKeys, RelayCrypto
from workers.circuit import Circuit
from workers.pool import WorkerPool


class ManyCollector(Collector):
    """A Collector that also has ``put_many`` (as ``reactor.ReplyQueue``)."""

    def __init__(self) -> None:
        super().__init__()
        self.put_many_calls = 0

    def put_many(self, items: list[Any]) -> bool:
        """Any thread."""
        self.put_many_calls += 1
        was_empty = False
        for item in items:
            was_empty = self.put(item) or was_empty
        return was_empty


def cells_of(pieces: list[Any]) -> list[bytes]:
    joined = b"".join(bytes(p) for p in pieces)
    assert len(joined) % CELL == 0
    return [joined[i : i + CELL] for i in range(0, len(joined), CELL)]


class StreamGroup:
    """A group function over OrderedState circuits that records what each call held."""

    def __init__(self, guard: OwnerGuard | None = None) -> None:
        self.guard = guard
        self.calls: list[int] = []  # circuits per call
        self.lock = threading.Lock()

    def __call__(self, jobs: list[tuple[Any, int, Any]]) -> list[Any]:
        keys = {state.key for state, _, _ in jobs}
        if self.guard is not None:
            for key in keys:
                self.guard.enter(key)
        try:
            with self.lock:
                self.calls.append(len(keys))
            return [state.crypt_list(direction, cells_of(pieces))
                    for state, direction, pieces in jobs]
        finally:
            if self.guard is not None:
                for key in keys:
                    self.guard.leave(key)


def stream_process(state: OrderedState, direction: int, batch: list[bytes]) -> list[bytes]:
    return state.crypt_list(direction, batch)


def test_order_and_exclusivity_across_groups() -> None:
    replies = ManyCollector()
    guard = OwnerGuard()
    group = StreamGroup(guard)
    got: dict[tuple[int, int], list[bytes]] = defaultdict(list)

    def on_result(circuit: Circuit, direction: int, result: list[bytes]) -> None:
        got[(circuit.context, direction)].extend(result)

    pool = WorkerPool(replies, threads=3, process=stream_process, group=group, batch_cells=7,
                      cell_size=CELL)
    pool.start()
    circuits = [pool.open_circuit(OrderedState(i), on_result=on_result, context=i)
                for i in range(40)]
    rng = random.Random(1)
    sent: dict[tuple[int, int], list[bytes]] = defaultdict(list)
    for round_ in range(60):
        work = []
        for c in rng.sample(circuits, 25):
            direction = rng.randrange(2)
            key = (c.context, direction)
            batch = [cell(c.context * 10 + direction, len(sent[key]) + k)
                     for k in range(rng.randint(1, 6))]
            sent[key].extend(batch)
            work.append((c, direction, b"".join(batch) if rng.random() < 0.5 else batch))
        pool.submit_many(work)
        if round_ % 5 == 0:
            replies.deliver_all(pool)
    replies.pump(pool, lambda: pool.in_flight == 0)
    pool.close()
    for (key, direction), cells in sent.items():
        assert got[(key, direction)] == expected_stream(key, direction, cells)
    assert guard.violations == []
    stats = pool.stats()
    assert stats["groups"] == len(group.calls) > 0
    assert max(group.calls) > 1  # some call really held several circuits
    assert stats["cells"] == stats["delivered"] == sum(len(v) for v in sent.values())
    assert replies.put_many_calls == stats["groups"]


def test_real_kernel_groups_give_the_reference_bytes() -> None:
    """Middle-relay forward crypto through grouped workers equals RelayCrypto, per circuit."""
    rng = random.Random(2)
    replies = Collector()  # no put_many: the pool falls back to one put per reply
    out: dict[int, list[bytes]] = defaultdict(list)
    flags: dict[int, bytearray] = defaultdict(bytearray)

    def on_result(circuit: Circuit, direction: int, result: tuple[bytes, bytes]) -> None:
        data, recognized = result
        out[circuit.context].append(data)
        flags[circuit.context] += recognized

    pool = WorkerPool(replies, threads=2, process=lambda s, d, b: s.forward_buf(b), joined=True,
                      group=relay_group(), batch_cells=64, cell_size=CELL)
    pool.start()
    keys = [HopKeys.from_material(rng.randbytes(72)) for _ in range(12)]
    circuits = [pool.open_circuit(FastRelayCrypto(k), on_result=on_result, context=i)
                for i, k in enumerate(keys)]
    references = [RelayCrypto(k) for k in keys]
    expected: dict[int, list[bytes]] = defaultdict(list)
    expected_flags: dict[int, bytearray] = defaultdict(bytearray)
    for _ in range(30):
        for i, c in enumerate(circuits):
            cells = [rng.randbytes(CELL) for _ in range(rng.randint(1, 20))]
            for recognized, plain in references[i].forward_many(cells):
                expected[i].append(plain)
                expected_flags[i].append(int(recognized))
            pool.submit(c, 0, cells if rng.random() < 0.5 else b"".join(cells))
    replies.pump(pool, lambda: pool.in_flight == 0)
    pool.close()
    for i in range(len(circuits)):
        assert b"".join(out[i]) == b"".join(expected[i])
        assert flags[i] == expected_flags[i]
    assert pool.stats()["groups"] > 0


def test_close_while_its_batch_is_inside_a_group_call() -> None:
    replies = Collector()
    inside = threading.Event()
    release = threading.Event()
    held: list[set[int]] = []

    def group(jobs: list[tuple[Any, int, Any]]) -> list[Any]:
        held.append({state.key for state, _, _ in jobs})
        if not inside.is_set():
            inside.set()
            assert release.wait(10)
        return [state.crypt_list(d, cells_of(p)) for state, d, p in jobs]

    got: dict[int, list[bytes]] = defaultdict(list)
    pool = WorkerPool(replies, threads=1, process=stream_process, group=group, cell_size=CELL)
    circuits = [pool.open_circuit(OrderedState(i), context=i,
                                  on_result=lambda c, d, r: got[c.context].extend(r))
                for i in range(4)]
    sent = {c.context: [cell(c.context, 0), cell(c.context, 1)] for c in circuits}
    pool.submit_many([(c, 0, sent[c.context]) for c in circuits])
    pool.start()
    assert inside.wait(10)
    victim = circuits[held[0].pop() if len(held[0]) == 1 else 1]
    pool.close_circuit(victim)
    release.set()
    others = [c for c in circuits if c is not victim]
    replies.pump(pool, lambda: all(c.in_flight == 0 for c in others))
    pool.close()
    replies.deliver_all(pool)
    stats = pool.stats()
    assert victim.context not in got
    assert stats["discarded"] == 1 and stats["discarded_cells"] == 2
    for c in others:
        assert got[c.context] == expected_stream(c.context, 0, sent[c.context])
    assert stats["in_flight"] == 0


def test_errors_are_isolated_to_their_circuit() -> None:
    replies = ManyCollector()
    bad_key = 3

    def group(jobs: list[tuple[Any, int, Any]]) -> list[Any]:
        return [ValueError(f"circuit {state.key} is broken") if state.key == bad_key
                else state.crypt_list(d, cells_of(p)) for state, d, p in jobs]

    got: dict[int, list[bytes]] = defaultdict(list)
    errors: list[tuple[int, BaseException]] = []

    def on_error(circuit: Circuit, direction: int, exc: BaseException) -> None:
        errors.append((circuit.context, exc))
        pool.close_circuit(circuit)

    pool = WorkerPool(replies, threads=2, process=stream_process, group=group, cell_size=CELL)
    pool.start()
    circuits = [pool.open_circuit(OrderedState(i), context=i, on_error=on_error,
                                  on_result=lambda c, d, r: got[c.context].extend(r))
                for i in range(8)]
    sent: dict[int, list[bytes]] = defaultdict(list)
    for _ in range(20):
        work = []
        for c in circuits:
            if c.closed:
                continue
            batch = [cell(c.context, len(sent[c.context]) + k) for k in range(3)]
            sent[c.context].extend(batch)
            work.append((c, 0, batch))
        pool.submit_many(work)
        replies.deliver_all(pool)
    replies.pump(pool, lambda: pool.in_flight == 0)
    pool.close()
    replies.deliver_all(pool)
    assert [key for key, _ in errors] == [bad_key]
    assert isinstance(errors[0][1], ValueError)
    for c in circuits:
        if c.context != bad_key:
            assert got[c.context] == expected_stream(c.context, 0, sent[c.context])
    assert bad_key not in got
    stats = pool.stats()
    assert stats["errors"] == 1 and stats["alive_threads"] == 0


def test_a_raising_group_call_fails_its_circuits_only() -> None:
    replies = Collector()
    calls = 0

    def group(jobs: list[tuple[Any, int, Any]]) -> list[Any]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("the whole call failed")
        return [state.crypt_list(d, cells_of(p)) for state, d, p in jobs]

    failed: list[int] = []
    got: dict[int, list[bytes]] = defaultdict(list)

    def on_error(circuit: Circuit, direction: int, exc: BaseException) -> None:
        assert isinstance(exc, RuntimeError)
        failed.append(circuit.context)
        pool.close_circuit(circuit)

    pool = WorkerPool(replies, threads=1, process=stream_process, group=group, cell_size=CELL)
    first = [pool.open_circuit(OrderedState(i), context=i, on_error=on_error,
                               on_result=lambda c, d, r: got[c.context].extend(r))
             for i in range(3)]
    pool.submit_many([(c, 0, [cell(c.context, 0)]) for c in first])
    pool.start()
    replies.pump(pool, lambda: pool.in_flight == 0)
    assert sorted(failed) == [0, 1, 2]  # one worker took all three into the failing call
    later = pool.open_circuit(OrderedState(9), context=9, on_error=on_error,
                              on_result=lambda c, d, r: got[c.context].extend(r))
    pool.submit(later, 1, [cell(9, 0)])
    replies.pump(pool, lambda: pool.in_flight == 0)
    pool.close()
    assert got[9] == expected_stream(9, 1, [cell(9, 0)])
    assert pool.stats()["errors"] == 3


def test_grouped_and_ungrouped_circuits_share_a_pool() -> None:
    replies = ManyCollector()
    group = StreamGroup()
    got: dict[tuple[int, int], list[bytes]] = defaultdict(list)
    plain_calls: list[int] = []

    def plain_process(state: OrderedState, direction: int, batch: list[bytes]) -> list[bytes]:
        plain_calls.append(state.key)
        return state.crypt_list(direction, batch)

    def on_result(circuit: Circuit, direction: int, result: list[bytes]) -> None:
        got[(circuit.context, direction)].extend(result)

    pool = WorkerPool(replies, threads=2, process=stream_process, group=group, cell_size=CELL)
    pool.start()
    grouped = [pool.open_circuit(OrderedState(i), on_result=on_result, context=i)
               for i in range(10)]
    # Its own process and no group: never grouped (the pool's group is only inherited with
    # the pool's process).
    plain = [pool.open_circuit(OrderedState(i), on_result=on_result, context=i,
                               process=plain_process) for i in range(10, 20)]
    sent: dict[tuple[int, int], list[bytes]] = defaultdict(list)
    for round_ in range(30):
        work = []
        for c in grouped + plain:
            key = (c.context, round_ % 2)
            batch = [cell(c.context, len(sent[key]) + k) for k in range(2)]
            sent[key].extend(batch)
            work.append((c, round_ % 2, batch))
        pool.submit_many(work)
    replies.pump(pool, lambda: pool.in_flight == 0)
    pool.close()
    for (key, direction), cells in sent.items():
        assert got[(key, direction)] == expected_stream(key, direction, cells)
    assert set(plain_calls) == set(range(10, 20))
    assert group.calls and pool.stats()["groups"] == len(group.calls)


def test_start_applies_malloc_retain_unless_opted_out(monkeypatch: Any) -> None:
    import workers.tuning as tuning_module

    calls: list[int] = []
    monkeypatch.setattr(tuning_module, "retain_freed_memory", calls.append)
    for retain in (None, 1 << 20):
        pool = WorkerPool(Collector(), threads=1, process=stream_process, malloc_retain=retain,
                          cell_size=CELL)
        pool.start()
        pool.close()
    assert calls == [1 << 20]


def test_low_priority_workers_run_at_idle_priority() -> None:
    """The last ``low_priority_workers`` workers put themselves in SCHED_IDLE (Linux).

    ``adaptive_idle=False``: a turn of an earlier test that looked starved (a process-wide
    record) would demote the worker at its start; that rule is tests/test_tuning_idle.py's.
    """
    import os
    import sys

    policies: dict[str, int] = {}

    def process(state: OrderedState, direction: int, batch: list[bytes]) -> list[bytes]:
        policies[threading.current_thread().name] = os.sched_getscheduler(0)
        return state.crypt_list(direction, batch)

    for low in (0, 1, 2):
        policies.clear()
        replies = Collector()
        pool = WorkerPool(replies, threads=2, process=process, low_priority_workers=low,
                          adaptive_idle=False, name="prio", cell_size=CELL)
        pool.start()
        circuits = [pool.open_circuit(OrderedState(i), on_result=lambda c, d, r: None)
                    for i in range(64)]
        for _ in range(200):  # until both workers have crypted something (a busy machine may
            if len(policies) == 2:  # leave an idle-priority worker no CPU for a while)
                break
            pool.submit_many([(c, 0, [cell(0, 0)]) for c in circuits])
            replies.pump(pool, lambda p=pool: p.in_flight == 0)  # type: ignore[misc]
        pool.close()
        if sys.platform.startswith("linux"):
            assert pool.stats()["low_priority_workers"] == low
            for name, policy in policies.items():
                index = int(name.rsplit("-", 1)[1])
                assert (policy == os.SCHED_IDLE) == (index >= 2 - low), (name, policy)
    with pytest.raises(ValueError):
        WorkerPool(Collector(), threads=2, process=process, low_priority_workers=3, cell_size=CELL)


def wait_until(condition: Any, what: str) -> None:
    """Spin (test thread) until ``condition()``; a hang guard, not a timing assertion."""
    for _ in range(10_000):
        if condition():
            return
        threading.Event().wait(0.001)
    raise AssertionError(f"never happened: {what}")


def test_circuits_a_group_requeues_wake_a_waiting_worker() -> None:
    """A grouped turn re-queues its circuits at release and pops only its share: the rest must
    wake a waiting worker, not wait for the busy one (regression: no one was notified).

    Forced interleaving: worker 0 takes g0 and g1 in one call while worker 1 is held in its
    state factory; worker 1 then serves g2 and waits. When worker 0 lets go, both circuits
    still have a cell; it pops g0 again and its call on g0 blocks until g1's second cell is
    delivered, which only worker 1 can do, and only if it is woken.
    """
    replies = ManyCollector()
    second_worker = threading.Event()
    release_first = threading.Event()
    release_second = threading.Event()
    g0_calls = 0
    crypted_by: list[tuple[int, str]] = []  # (circuit, worker thread) per job, in call order

    def factory(index: int) -> None:
        if index == 1:
            assert second_worker.wait(10)

    def group(jobs: list[tuple[Any, int, Any]]) -> list[Any]:
        nonlocal g0_calls
        keys = [state.key for state, _, _ in jobs]
        crypted_by.extend((key, threading.current_thread().name) for key in keys)
        if 0 in keys:
            g0_calls += 1
            assert (release_first if g0_calls == 1 else release_second).wait(60)
        return [state.crypt_list(d, cells_of(p)) for state, d, p in jobs]

    got: dict[int, list[bytes]] = defaultdict(list)
    pool = WorkerPool(replies, threads=2, process=stream_process, group=group, batch_cells=1,
                      group_circuits=2, worker_state_factory=factory, name="wake",
                      low_priority_workers=0,  # no idle-priority worker to starve on a busy host
                      cell_size=CELL)
    g0, g1, g2 = (pool.open_circuit(OrderedState(i), context=i,
                                    on_result=lambda c, d, r: got[c.context].extend(r))
                  for i in range(3))
    sent = {0: [cell(0, 0), cell(0, 1)], 1: [cell(1, 0), cell(1, 1)], 2: [cell(2, 0)]}
    # One entry per cell: a batch never splits an entry, so batch_cells=1 takes one at a time.
    pool.submit_many([(c, 0, [one]) for c in (g0, g1, g2) for one in sent[c.context]])
    try:
        pool.start()
        # Worker 0 pops its share of three queued circuits: two, g0 and g1, in one call.
        wait_until(lambda: g0_calls == 1, "worker 0 inside its call on g0 and g1")
        second_worker.set()
        replies.pump(pool, lambda: g2.in_flight == 0)  # worker 1 served g2 ...
        wait_until(lambda: pool.stats()["idle_workers"] == 1, "worker 1 waiting")  # ... and waits
        release_first.set()
        # Worker 0 re-queues g0 and g1 (one cell left each) and pops g0 only: g1 is left for
        # worker 1, which must have been woken for it.
        replies.pump(pool, lambda: g1.in_flight == 0)
    finally:
        release_first.set()
        release_second.set()
    replies.pump(pool, lambda: pool.in_flight == 0)
    pool.close()
    for key, cells in sent.items():
        assert got[key] == expected_stream(key, 0, cells)
    # g1's second cell was crypted by the worker that was waiting, while worker 0 was held.
    assert crypted_by[:3] == [(0, "wake-0"), (1, "wake-0"), (2, "wake-1")]
    assert sorted(crypted_by[3:]) == [(0, "wake-0"), (1, "wake-1")]
    assert pool.stats()["groups"] == 4
