"""The pool attached to every loop kind (pyuv, asyncio, uvloop, trio): cancellation, close with
work in flight, and a loop that stops while the workers still produce.

Results are checked with ``OrderedState`` (each output chains a hash over every cell before it
on its circuit and lane), so a lost, duplicated or reordered cell changes the bytes. Counts come
from the pool's and the reply queue's counters; nothing asserts on time.
"""

from __future__ import annotations

import asyncio
import threading
from collections import defaultdict
from collections.abc import Generator
from typing import Any

import pytest
import trio
import uvloop
from support_loop import run_until
from support_loops import Done, Harness, every_loop, run_scenario
from test_pool_support import CELL, OrderedState, cell, expected_stream

from reactor import Reactor
from workers.circuit import Circuit
from workers.pool import WorkerPool

WAIT = 30.0  # a guard against hangs only


def ordered(state: OrderedState, lane: int, batch: list[bytes]) -> list[bytes]:
    """The process function: the circuit's chained stream. Worker thread, circuit owned."""
    return state.crypt_list(lane, batch)


class Gate:
    """A process function that blocks inside a batch holding a ``block`` cell until released."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    def process(self, state: OrderedState, lane: int, batch: list[bytes]) -> list[bytes]:
        if any(c.startswith(b"block") for c in batch):
            self.entered.set()
            assert self.release.wait(WAIT)
        return state.crypt_list(lane, batch)


class Outputs:
    """What came back per (circuit, lane), and on which threads. Loop thread."""

    def __init__(self) -> None:
        self.cells: dict[tuple[Any, int], list[bytes]] = defaultdict(list)
        self.threads: set[int] = set()
        self.count = 0

    def on_result(self, circuit: Circuit, lane: int, result: list[bytes]) -> None:
        self.threads.add(threading.get_ident())
        self.cells[(circuit.context, lane)].extend(result)
        self.count += len(result)


@every_loop
def test_close_circuit_while_its_batch_is_in_flight(loop_kind: str) -> None:
    def body(h: Harness) -> Generator[Done, bool, None]:
        gate = Gate()
        out = Outputs()
        pool = WorkerPool.attach(h.loop, threads=2, process=gate.process, cell_size=CELL)
        a = pool.open_circuit(OrderedState(1), on_result=out.on_result, context="a")
        b = pool.open_circuit(OrderedState(2), on_result=out.on_result, context="b")
        pool.submit(a, 0, [b"block", b"a1"])
        assert gate.entered.wait(WAIT)
        pool.submit(a, 0, [b"a2", b"a3", b"a4"])  # pending while a is busy
        pool.submit(a, 1, [b"a5"])
        assert pool.in_flight == 6
        pool.close_circuit(a)  # 4 cells queued behind the running batch: cancelled
        assert pool.in_flight == 0
        gate.release.set()
        pool.submit(b, 0, [b"b1", b"b2"])
        yield lambda: pool.stats()["discarded"] == 1 and out.count == 2
        pool.close()
        stats = pool.stats()
        assert ("a", 0) not in out.cells and ("a", 1) not in out.cells  # no callback for a
        assert out.cells[("b", 0)] == expected_stream(2, 0, [b"b1", b"b2"])
        assert stats["discarded"] == 1 and stats["discarded_cells"] == 2
        assert stats["cancelled"] == 4
        assert stats["submitted"] == (
            stats["delivered"] + stats["cancelled"] + stats["discarded_cells"]
        )

    run_scenario(loop_kind, body)


@every_loop
@pytest.mark.parametrize("drain", [True, False])
def test_close_with_work_in_flight(loop_kind: str, drain: bool) -> None:
    """``close()`` on the loop thread while workers are busy: draining delivers every cell in
    order before it returns; cancelling delivers a prefix of each stream and counts the rest."""
    circuits, submits, per_submit = 12, 40, 8

    def body(h: Harness) -> Generator[Done, bool, None]:
        out = Outputs()
        pool = WorkerPool.attach(h.loop, threads=2, process=ordered, cell_size=CELL,
                                 batch_cells=16)
        opened = [pool.open_circuit(OrderedState(k), on_result=out.on_result, context=k)
                  for k in range(circuits)]
        sent: dict[int, list[bytes]] = defaultdict(list)
        for s in range(submits):
            for k, circuit in enumerate(opened):
                cells = [cell(k, s * per_submit + i) for i in range(per_submit)]
                sent[k].extend(cells)
                pool.submit(circuit, 0, cells)
        total = circuits * submits * per_submit
        pool.close(drain=drain)  # no loop iteration ran since the submits
        stats = pool.stats()
        assert stats["alive_threads"] == 0
        assert stats["in_flight"] == 0
        assert stats["submitted"] == total
        assert stats["delivered"] + stats["cancelled"] + stats["discarded_cells"] == total
        assert out.count == stats["delivered"]
        for k in range(circuits):
            got = out.cells[(k, 0)]
            assert got == expected_stream(k, 0, sent[k])[: len(got)]
        if drain:
            assert stats["delivered"] == total and stats["cancelled"] == 0
        yield lambda: True

    run_scenario(loop_kind, body)


class StoppedLoopPool:
    """Workers still crypting when the loop stops; the loop thread then closes the pool, which
    must deliver every cell, in order, on that thread.

    The workers crypt each circuit's first submit at once and hold every later batch until the
    loop has stopped (``go_on``): so the loop stops with work in flight, and the workers
    produce (and put, and try to wake the loop) while nothing runs it.
    """

    circuits = 8
    submits = 60
    per_submit = 16

    def __init__(self) -> None:
        self.out = Outputs()
        self.pool: WorkerPool | None = None
        self.sent: dict[int, list[bytes]] = defaultdict(list)
        self.loop_thread = 0
        self.go_on = threading.Event()

    def process(self, state: OrderedState, lane: int, batch: list[bytes]) -> list[bytes]:
        """Hold batches past the first submit until ``go_on``. Worker thread, circuit owned."""
        if any(int(c.split(b";", 1)[0].split(b"/")[1]) >= self.per_submit for c in batch):
            assert self.go_on.wait(WAIT)  # cell(k, i) starts with b"k/i;"
        return state.crypt_list(lane, batch)

    @property
    def total(self) -> int:
        return self.circuits * self.submits * self.per_submit

    def start(self, loop: object) -> None:
        """Attach, submit everything. Loop thread."""
        self.loop_thread = threading.get_ident()
        pool = WorkerPool.attach(loop, threads=2, process=self.process, cell_size=CELL,
                                 batch_cells=8)
        self.pool = pool
        opened = [pool.open_circuit(OrderedState(k), on_result=self.out.on_result, context=k)
                  for k in range(self.circuits)]
        for s in range(self.submits):
            for k, circuit in enumerate(opened):
                cells = [cell(k, s * self.per_submit + i) for i in range(self.per_submit)]
                self.sent[k].extend(cells)
                pool.submit(circuit, 0, cells)

    def some_delivered(self) -> bool:
        return self.out.count > 0

    def finish(self) -> None:
        """The loop no longer runs; close the pool on the loop thread and check. Loop thread."""
        assert self.pool is not None
        assert 0 < self.out.count < self.total  # the loop stopped with work in flight
        self.go_on.set()
        self.pool.close()
        stats = self.pool.stats()
        assert stats["delivered"] == stats["submitted"] == self.total == self.out.count
        assert self.out.threads == {self.loop_thread}
        for k in range(self.circuits):
            assert self.out.cells[(k, 0)] == expected_stream(k, 0, self.sent[k])


def test_pyuv_loop_stopped_while_workers_produce() -> None:
    run = StoppedLoopPool()
    with Reactor() as reactor:
        run.start(reactor)
        assert run_until(reactor, run.some_delivered)
        run.finish()


@pytest.mark.parametrize("kind", ["asyncio", "uvloop"])
def test_asyncio_loop_stopped_while_workers_produce(kind: str) -> None:
    run = StoppedLoopPool()
    loop = uvloop.new_event_loop() if kind == "uvloop" else asyncio.new_event_loop()

    async def first_phase() -> None:
        run.start(asyncio.get_running_loop())
        while not run.some_delivered():
            await asyncio.sleep(0.001)

    try:
        loop.run_until_complete(asyncio.wait_for(first_phase(), 20))
        run.finish()  # on the thread that ran the loop, while it does not run
    finally:
        loop.close()


def test_trio_run_ended_while_workers_produce() -> None:
    run = StoppedLoopPool()

    async def first_phase() -> None:
        run.start(trio.lowlevel.current_trio_token())
        with trio.fail_after(20):
            while not run.some_delivered():
                await trio.sleep(0.001)

    trio.run(first_phase)
    run.finish()  # after trio.run, on its thread: the workers' wake-ups were refused
