"""Run queues: round-robin, priority classes, the anti-starvation rule, lazy removal, O(1)."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
from test_pool_support import CELL, Collector, bare_circuit

from workers.circuit import Circuit
from workers.pool import WorkerPool
from workers.runqueues import RunQueues


def make(cls: int, name: Any = None) -> Circuit:
    return bare_circuit(cls, name)


def test_round_robin_inside_a_class() -> None:
    queues = RunQueues(3)
    circuits = [make(1, name) for name in "abc"]
    for c in circuits:
        queues.push(c)
    order = []
    for _ in range(9):
        c = queues.pop()
        assert c is not None
        order.append(c.context)
        queues.push(c)  # a worker that still has cells re-queues at the tail
    assert "".join(order) == "abcabcabc"


def test_strict_priority_except_every_37th_pop() -> None:
    queues = RunQueues(3)
    high = [make(0, f"h{i}") for i in range(5)]
    low = make(2, "low")
    for c in high:
        queues.push(c)
    queues.push(low)
    served = []
    for _ in range(37 * 3):
        c = queues.pop()
        assert c is not None
        served.append(c.context)
        queues.push(c)
    low_pops = [i + 1 for i, name in enumerate(served) if name == "low"]
    assert low_pops == [37, 74, 111]


def test_bypass_cycles_over_lower_classes_so_none_starves() -> None:
    """With three flooded classes, bypass pops alternate between class 1 and class 2."""
    queues = RunQueues(3)
    for cls in range(3):
        for i in range(4):
            queues.push(make(cls, (cls, i)))
    served: Counter[int] = Counter()
    bypass_classes = []
    for pop in range(1, 37 * 2 * 10 + 1):
        c = queues.pop()
        assert c is not None
        served[c.priority] += 1
        if pop % 37 == 0:
            bypass_classes.append(c.priority)
        queues.push(c)
    assert bypass_classes == [1, 2] * 10
    assert served[1] == 10 and served[2] == 10
    # Documented bound: a non-empty class is served at least once every 37 * (k - 1) pops.


def test_bypass_with_only_the_top_class_serves_the_top() -> None:
    queues = RunQueues(3, starvation_period=2)
    a = make(1, "a")
    queues.push(a)
    assert queues.pop() is a
    queues.push(a)
    assert queues.pop() is a  # 2nd pop is a bypass pop, but nothing else is queued
    assert queues.pop() is None


def test_lazy_removal_and_move() -> None:
    queues = RunQueues(3)
    a, b, c = make(2, "a"), make(2, "b"), make(2, "c")
    for x in (a, b, c):
        queues.push(x)
    queues.discard(b)
    assert queues.depths() == [0, 0, 2]
    queues.move(c, 0)  # to the tail of class 0
    assert queues.depths() == [1, 0, 1]
    assert c.priority == 0 and c.queued
    assert [queues.pop(), queues.pop(), queues.pop()] == [c, a, None]
    assert not a.queued and not b.queued and not c.queued
    # Moving an idle circuit only changes its class.
    queues.move(b, 1)
    assert b.priority == 1 and not b.queued and queues.depths() == [0, 0, 0]


def test_stale_entries_do_not_accumulate() -> None:
    queues = RunQueues(3)
    a = make(0, "a")
    for _ in range(10_000):
        queues.push(a)
        queues.move(a, 1)
        queues.move(a, 0)
        queues.discard(a)
    # Every class went back to zero live entries, which clears its stale entries.
    assert all(len(q) == 0 for q in queues._queues)
    assert queues.depths() == [0, 0, 0]


@pytest.mark.parametrize("ops", ["push_pop", "move", "discard"])
def test_work_per_operation_does_not_grow_with_circuits(ops: str) -> None:
    """Touches per push/pop/move/discard are the same with 10 and with 100,000 queued circuits."""

    def touches_for(n_circuits: int) -> int:
        queues = RunQueues(3)
        background = [make(i % 3) for i in range(n_circuits)]
        for c in background:
            queues.push(c)
        probe = [make(1) for _ in range(50)]
        for c in probe:
            queues.push(c)
        before = queues.touches
        for round_ in range(200):
            if ops == "push_pop":
                c = queues.pop()
                assert c is not None
                queues.push(c)
            elif ops == "move":
                queues.move(probe[round_ % 50], round_ % 3)
            else:
                c = probe[round_ % 50]
                queues.discard(c)
                queues.push(c)
        return queues.touches - before

    small, large = touches_for(10), touches_for(100_000)
    assert small == large
    assert large <= 200 * 8  # a small constant per operation (k = 3 classes scanned at most)


def test_pool_submit_and_pop_touch_constant_work() -> None:
    """At pool level: one submit touches the run queues once, whatever the circuit count."""

    def per_submit(n_circuits: int) -> int:
        pool = WorkerPool(Collector(), threads=1, process=lambda s, d, b: b, cell_size=CELL)
        for _ in range(n_circuits):  # queued but never served: the pool is not started
            pool.submit(pool.open_circuit(None), 0, [b"x"])
        probe = pool.open_circuit(None)
        before = pool.stats()["queue_touches"]
        pool.submit(probe, 0, [b"y"])
        pool.submit(probe, 0, [b"z"])  # already queued: no run-queue work at all
        spent = pool.stats()["queue_touches"] - before
        pool.close(drain=False)
        assert pool.stats()["cancelled"] == n_circuits + 2
        return spent

    assert per_submit(10) == per_submit(20_000) == 1


def test_pool_serves_most_urgent_class_first() -> None:
    replies = Collector()
    order: list[str] = []
    pool = WorkerPool(replies, threads=1, process=lambda s, d, b: b, cell_size=CELL)
    circuits = {}
    for name, cls in [("low", 2), ("mid", 1), ("high", 0), ("low2", 2), ("moved", 2)]:
        circuits[name] = pool.open_circuit(
            None, priority=cls, context=name, on_result=lambda c, d, r: order.append(c.context)
        )
        pool.submit(circuits[name], 0, [b"x"])
    pool.set_priority(circuits["moved"], 0)  # to the tail of class 0, lazily
    assert pool.stats()["queue_depth"] == [2, 1, 2]
    pool.start()
    replies.pump(pool, lambda: pool.in_flight == 0)
    pool.close()
    assert order == ["high", "moved", "mid", "low", "low2"]


def test_low_priority_progresses_under_a_flood() -> None:
    """One worker, 20 class-0 circuits that are refilled as fast as they are served."""
    replies = Collector()
    flood_cells = 0
    low_done: list[int] = []
    pool = WorkerPool(replies, threads=1, batch_cells=1, process=lambda s, d, b: b, cell_size=CELL)

    def refill(c: Circuit, d: int, r: Any) -> None:
        nonlocal flood_cells
        flood_cells += 1
        if len(low_done) < 10:
            pool.submit(c, 0, [b"f"])

    flood = [pool.open_circuit(None, priority=0, on_result=refill) for _ in range(20)]
    for c in flood:
        for _ in range(4):
            pool.submit(c, 0, [b"f"])
    low = pool.open_circuit(None, priority=2, on_result=lambda c, d, r: low_done.append(1))
    for _ in range(10):
        pool.submit(low, 0, [b"l"])
    pool.start()
    replies.pump(pool, lambda: len(low_done) == 10 or flood_cells > 100_000)
    replies.pump(pool, lambda: pool.in_flight == 0)
    pool.close()
    assert len(low_done) == 10
    # Each low turn takes one cell (batch_cells=1); it is served at least every 37 * 2 pops.
    assert flood_cells <= 10 * 37 * 2 + 20 * 4
