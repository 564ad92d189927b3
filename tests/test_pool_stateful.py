"""Randomized, stateful tests with real threads: order, no loss, no duplicate, exclusivity.

The test thread plays the loop thread: it submits (buffers, lists, ``submit_many``), changes
priorities, closes circuits, opens new ones, hands workers updates and delivers replies in a
random interleaving, while 4 real worker threads crypt. Each circuit's state is a hash chain per
direction, so any reordered, lost or duplicated cell changes the bytes, and an owner guard
records any moment two workers are inside one circuit. The run queues are also checked against
a plain reference model with hypothesis.
"""

from __future__ import annotations

import os
import random
import time
from collections import defaultdict
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule
from test_pool_support import (
    CELL,
    Collector,
    OrderedState,
    OwnerGuard,
    bare_circuit,
    cell,
    expected_stream,
)

from workers.circuit import Circuit
from workers.pool import WorkerPool
from workers.runqueues import RunQueues


class GuardedState(OrderedState):
    def __init__(self, key: int, guard: OwnerGuard) -> None:
        super().__init__(key)
        self.guard = guard


def guarded_process(state: GuardedState, direction: int, batch: Any) -> Any:
    state.guard.enter(state.key)
    try:
        if isinstance(batch, bytes):
            cells = [batch[i : i + CELL] for i in range(0, len(batch), CELL)]
        else:
            cells = batch
        if len(cells) % 3 == 0:
            time.sleep(0)  # let the GIL go mid-batch: more interleavings
        out = state.crypt_list(direction, cells)
        return b"".join(out) if isinstance(batch, bytes) else out
    finally:
        state.guard.leave(state.key)


class GuardedGroup:
    """A ``group`` function over GuardedState circuits: every circuit of a call is entered in
    the owner guard for the whole call, so a circuit in two calls at once is a violation."""

    def __init__(self) -> None:
        self.calls = 0
        self.jobs = 0

    def __call__(self, jobs: list[tuple[Any, int, Any]]) -> list[Any]:
        states = {id(state): state for state, _, _ in jobs}
        for state in states.values():
            state.guard.enter(state.key)
        try:
            self.calls += 1
            self.jobs += len(jobs)
            results: list[Any] = []
            for state, direction, pieces in jobs:
                joined = b"".join(bytes(p) for p in pieces)
                cells = [joined[i : i + CELL] for i in range(0, len(joined), CELL)]
                if len(cells) % 3 == 0:
                    time.sleep(0)  # let the GIL go mid-call: more interleavings
                results.append(b"".join(state.crypt_list(direction, cells)))
            return results
        finally:
            for state in states.values():
                state.guard.leave(state.key)


def grouped_process(state: GuardedState, direction: int, batch: Any) -> Any:
    """What GuardedGroup gives for one job, for circuits served one at a time."""
    return guarded_process(state, direction, b"".join(batch) if isinstance(batch, list) else batch)


#: Seeds per randomized test; raise it (RELAYCRYPT_POOL_SEEDS=500) for a long stress run.
SEEDS = int(os.environ.get("RELAYCRYPT_POOL_SEEDS", "6"))


@pytest.mark.parametrize("seed", range(SEEDS))
def test_random_interleavings_keep_order_and_exclusivity(seed: int) -> None:
    run_random_interleavings(seed, grouped=False)


@pytest.mark.parametrize("seed", range(SEEDS))
def test_random_grouped_interleavings_keep_order_and_exclusivity(seed: int) -> None:
    """The same, through the grouped path: circuits with a ``group`` function (and some
    without, popped along), several circuits per call, random group sizes and thread counts."""
    run_random_interleavings(seed, grouped=True)


def run_random_interleavings(seed: int, *, grouped: bool) -> None:
    """One randomized run; asserts order, no loss, no duplicate and exclusivity. Test thread."""
    rng = random.Random(seed)
    joined = seed % 2 == 0 or grouped
    replies = Collector()
    guard = OwnerGuard()
    group = GuardedGroup() if grouped else None
    pool = WorkerPool(
        replies,
        threads=rng.choice([2, 3, 4]) if grouped else 4,
        joined=joined,
        batch_cells=rng.choice([1, 2, 5, 16, 64]),
        process=guarded_process,
        group=group,
        group_circuits=rng.choice([2, 3, 8, 16]), cell_size=CELL
    )
    sent: dict[tuple[int, int], list[bytes]] = defaultdict(list)
    got: dict[tuple[int, int], list[bytes]] = defaultdict(list)
    late_callbacks: list[int] = []

    def on_result(c: Circuit, d: int, r: Any) -> None:
        if c.closed:
            late_callbacks.append(c.context)
        if joined:
            got[(c.context, d)].extend(r[i : i + 20] for i in range(0, len(r), 20))
        else:
            got[(c.context, d)].extend(r)

    next_key = 0
    live: list[Circuit] = []
    closed: list[Circuit] = []

    def open_one() -> None:
        nonlocal next_key
        own: dict[str, Any] = {}
        if grouped and rng.random() < 0.2:
            own["process"] = grouped_process  # its own process and no group: never grouped
        c = pool.open_circuit(
            GuardedState(next_key, guard),
            context=next_key,
            on_result=on_result,
            priority=rng.randrange(3),
            **own,
        )
        next_key += 1
        live.append(c)

    def cells_for(c: Circuit, d: int, n: int) -> list[bytes]:
        batch = [cell(c.context * 10 + d, len(sent[(c.context, d)]) + k) for k in range(n)]
        sent[(c.context, d)].extend(batch)
        return batch

    for _ in range(24):
        open_one()
    pool.start()
    for _ in range(1500):
        op = rng.random()
        if op < 0.45:
            c, d = rng.choice(live), rng.randrange(2)
            batch = cells_for(c, d, rng.randint(1, 6))
            pool.submit(c, d, b"".join(batch) if rng.random() < 0.4 else batch)
        elif op < 0.55:
            work = []
            for c in rng.sample(live, 4):
                d = rng.randrange(2)
                work.append((c, d, cells_for(c, d, rng.randint(1, 3))))
            pool.submit_many(work)
        elif op < 0.65:
            pool.set_priority(rng.choice(live), rng.randrange(3))
        elif op < 0.66:
            c = live.pop(rng.randrange(len(live)))
            pool.close_circuit(c)
            closed.append(c)
            open_one()
        elif op < 0.67:
            pool.update_workers(lambda s: s)
        elif op < 0.9:
            replies.deliver_all(pool)
        else:
            # Wait a moment (GIL released) so workers run while the loop keeps submitting.
            for reply in replies.take(0.002):
                pool.deliver(reply)
    replies.pump(pool, lambda: pool.in_flight == 0)
    drain = rng.random() < 0.5
    for c in live[:4]:  # some work still queued at close time
        pool.submit(c, 0, cells_for(c, 0, 3))
    pool.close(drain=drain)
    replies.deliver_all(pool)

    assert guard.violations == []
    assert late_callbacks == []
    stats = pool.stats()
    assert stats["errors"] == 0 and stats["lost_replies"] == 0
    assert stats["alive_threads"] == 0
    assert stats["submitted"] == stats["delivered"] + stats["cancelled"] + stats["discarded_cells"]
    assert stats["in_flight"] == 0
    for c in live:
        for d in range(2):
            cells = sent[(c.context, d)]
            n = len(got[(c.context, d)])
            assert got[(c.context, d)] == expected_stream(c.context, d, cells[:n])
            if drain:
                assert n == len(cells)
    for c in closed:  # a prefix of what was sent, in order, nothing after the close
        for d in range(2):
            n = len(got[(c.context, d)])
            assert got[(c.context, d)] == expected_stream(c.context, d, sent[(c.context, d)][:n])
    if group is None:
        assert guard.entries == stats["batches"]
    else:
        assert stats["groups"] == group.calls > 0
        assert group.jobs <= stats["batches"]


# --------------------------------------------------------------------------- run-queue model


def make(cls: int, key: int) -> Circuit:
    return bare_circuit(cls, key)


class RunQueuesModel(RuleBasedStateMachine):
    """RunQueues against a plain list-based reference with the documented rule."""

    CLASSES = 3
    PERIOD = 5

    def __init__(self) -> None:
        super().__init__()
        self.queues = RunQueues(self.CLASSES, starvation_period=self.PERIOD)
        self.model: list[list[int]] = [[] for _ in range(self.CLASSES)]
        self.pops = 0
        self.bypass = self.CLASSES - 1
        self.circuits = [make(i % self.CLASSES, i) for i in range(8)]

    def model_class(self, key: int) -> int | None:
        for cls, keys in enumerate(self.model):
            if key in keys:
                return cls
        return None

    @rule(i=st.integers(0, 7))
    def push(self, i: int) -> None:
        c = self.circuits[i]
        if c.queued:
            return
        self.queues.push(c)
        self.model[c.priority].append(i)

    @rule(i=st.integers(0, 7))
    def discard(self, i: int) -> None:
        c = self.circuits[i]
        self.queues.discard(c)
        cls = self.model_class(i)
        if cls is not None:
            self.model[cls].remove(i)

    @rule(i=st.integers(0, 7), cls=st.integers(0, 2))
    def move(self, i: int, cls: int) -> None:
        c = self.circuits[i]
        self.queues.move(c, cls)
        old = self.model_class(i)
        if old is not None:
            self.model[old].remove(i)
            self.model[cls].append(i)

    @rule()
    def pop(self) -> None:
        got = self.queues.pop()
        nonempty = [cls for cls in range(self.CLASSES) if self.model[cls]]
        if not nonempty:
            assert got is None
            return
        top = nonempty[0]
        chosen = top
        self.pops += 1
        if self.pops % self.PERIOD == 0:
            for step in range(1, self.CLASSES + 1):
                cls = (self.bypass + step) % self.CLASSES
                if cls != top and self.model[cls]:
                    chosen = cls
                    self.bypass = cls
                    break
        expected = self.model[chosen].pop(0)
        assert got is self.circuits[expected]
        assert not got.queued

    @invariant()
    def depths_match(self) -> None:
        assert self.queues.depths() == [len(keys) for keys in self.model]
        for i, c in enumerate(self.circuits):
            assert c.queued == (self.model_class(i) is not None)


TestRunQueuesModel = RunQueuesModel.TestCase
TestRunQueuesModel.settings = settings(max_examples=150, stateful_step_count=60, deadline=None)
