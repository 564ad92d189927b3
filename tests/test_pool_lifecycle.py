"""Cancellation, errors, back-pressure, per-worker updates and shutdown of the worker pool."""

from __future__ import annotations

import threading
from collections import defaultdict
from typing import Any

import pytest
from test_pool_support import CELL, Collector, OrderedState, cell, expected_stream

from workers.circuit import Circuit
from workers.pool import PoolClosedError, WorkerPool

WAIT = 30.0  # only a guard against hangs: no assertion depends on how long anything takes


def pool_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("relaycrypt-worker")]


class Gate:
    """A process function that blocks inside chosen batches until released."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    def process(self, state: Any, direction: int, batch: list[bytes]) -> list[bytes]:
        if any(c.startswith(b"block") for c in batch):
            self.entered.set()
            assert self.release.wait(WAIT)
        return batch


# --------------------------------------------------------------------------- cancellation


def test_close_circuit_while_its_batch_is_in_flight() -> None:
    replies = Collector()
    gate = Gate()
    results: dict[str, list[Any]] = defaultdict(list)
    pool = WorkerPool(replies, threads=2, process=gate.process, cell_size=CELL)

    def on_result(c: Circuit, d: int, r: Any) -> None:
        results[c.context].append(r)

    a = pool.open_circuit(None, on_result=on_result, context="a")
    b = pool.open_circuit(None, on_result=on_result, context="b")
    pool.start()
    pool.submit(a, 0, [b"block", b"a1"])
    assert gate.entered.wait(WAIT)
    pool.submit(a, 0, [b"a2", b"a3", b"a4"])  # pending while a is busy
    pool.submit(a, 1, [b"a5"])
    assert pool.in_flight == 6
    pool.close_circuit(a)  # 4 cells queued behind the running batch: the owner cancels them
    pool.close_circuit(a)  # idempotent
    assert pool.in_flight == 0
    gate.release.set()
    pool.submit(b, 0, [b"b1"])
    replies.pump(pool, lambda: pool.stats()["discarded"] == 1 and results["b"] != [])
    pool.close()
    replies.deliver_all(pool)
    stats = pool.stats()
    assert "a" not in results  # no callback ever runs for a closed circuit
    assert results["b"] == [[b"b1"]]
    assert stats["discarded"] == 1 and stats["discarded_cells"] == 2
    assert stats["cancelled"] == 4
    assert stats["submitted"] == stats["delivered"] + stats["cancelled"] + stats["discarded_cells"]


def test_close_circuit_while_queued_removes_it() -> None:
    replies = Collector()
    order: list[str] = []
    pool = WorkerPool(replies, threads=1, process=lambda s, d, b: b, cell_size=CELL)
    circuits = [
        pool.open_circuit(None, context=n, on_result=lambda c, d, r: order.append(c.context))
        for n in "abc"
    ]
    for c in circuits:
        pool.submit(c, 0, [b"x", b"y"])
    assert pool.stats()["queue_depth"] == [0, 3, 0]
    pool.close_circuit(circuits[1])
    assert pool.stats()["queue_depth"] == [0, 2, 0]
    assert pool.stats()["cancelled"] == 2
    pool.start()
    replies.pump(pool, lambda: pool.in_flight == 0)
    pool.close()
    assert order == ["a", "c"]
    assert pool.stats()["discarded"] == 0


# --------------------------------------------------------------------------- errors


def test_worker_error_reaches_the_loop_and_the_worker_lives_on() -> None:
    replies = Collector()
    results: list[tuple[str, Any]] = []
    errors: list[tuple[str, int, BaseException]] = []

    def process(state: Any, direction: int, batch: list[bytes]) -> list[bytes]:
        if b"boom" in batch:
            raise ValueError("bad cell")
        return batch

    pool = WorkerPool(replies, threads=1, batch_cells=1, process=process, cell_size=CELL)

    def on_error(c: Circuit, d: int, e: BaseException) -> None:
        errors.append((c.context, d, e))
        pool.close_circuit(c)  # the owner closes it: its last cell is cancelled

    a = pool.open_circuit(
        None,
        context="a",
        on_result=lambda c, d, r: results.append((c.context, r)),
        on_error=on_error,
    )
    b = pool.open_circuit(None, context="b", on_result=lambda c, d, r: results.append(("b", r)))
    for item in ([b"ok1"], [b"boom"], [b"ok2"]):
        pool.submit(a, 1, item)
    pool.submit(b, 0, [b"b1"])
    pool.start()
    replies.pump(pool, lambda: errors != [] and ("b", [b"b1"]) in results)
    pool.submit(b, 0, [b"b2"])  # the same (only) worker still serves others
    replies.pump(pool, lambda: ("b", [b"b2"]) in results)
    assert pool.stats()["alive_threads"] == 1
    pool.close()
    assert [r for r in results if r[0] == "a"] == [("a", [b"ok1"])]
    assert len(errors) == 1
    name, direction, exc = errors[0]
    assert (name, direction) == ("a", 1) and isinstance(exc, ValueError)
    stats = pool.stats()
    assert stats["errors"] == 1 and stats["errors_delivered"] == 1 and stats["cancelled"] == 1
    assert stats["in_flight"] == 0


def test_error_without_handler_closes_the_circuit() -> None:
    replies = Collector()

    def process(state: Any, direction: int, batch: Any) -> Any:
        raise RuntimeError("kernel failure")

    pool = WorkerPool(replies, threads=2, process=process, cell_size=CELL)
    c = pool.open_circuit(None, on_result=lambda c, d, r: None)
    pool.submit(c, 0, [b"x"])
    pool.start()
    replies.pump(pool, lambda: c.closed)
    pool.close()
    assert pool.stats()["errors_delivered"] == 1


class _NotAnException(BaseException):
    """A BaseException that is neither SystemExit nor KeyboardInterrupt."""


def _identity_holds(stats: dict[str, Any]) -> bool:
    return stats["submitted"] == (stats["delivered"] + stats["cancelled"]
                                  + stats["discarded_cells"]) and stats["in_flight"] == 0


@pytest.mark.parametrize("grouped", [False, True])
def test_a_base_exception_fails_only_its_circuit(grouped: bool) -> None:
    """Before, a worker died on it: the circuit stayed busy and the accounting broke."""
    replies = Collector()
    results: dict[str, list[bytes]] = defaultdict(list)
    errors: list[tuple[str, BaseException]] = []

    def process(state: Any, lane: int, batch: list[bytes]) -> list[bytes]:
        if b"base" in batch:
            raise _NotAnException("not an Exception")
        return batch

    def group(jobs: list[tuple[Any, int, Any]]) -> list[Any]:
        if any(b"base" in pieces for _, _, pieces in jobs):
            raise _NotAnException("not an Exception, in a group")
        return [list(pieces) for _, _, pieces in jobs]

    pool = WorkerPool(replies, threads=1, batch_cells=1, process=process,
                      group=group if grouped else None, cell_size=CELL)

    def on_error(c: Circuit, lane: int, e: BaseException) -> None:
        errors.append((c.context, e))
        pool.close_circuit(c)

    def on_result(c: Circuit, lane: int, r: list[bytes]) -> None:
        results[c.context].extend(r)

    bad = pool.open_circuit(None, context="bad", on_result=on_result, on_error=on_error)
    good = pool.open_circuit(None, context="good", on_result=on_result, on_error=on_error)
    pool.submit(bad, 0, [b"base"])
    pool.submit(bad, 0, [b"later"])  # neither served nor lost: cancelled with the circuit
    pool.start()
    replies.pump(pool, lambda: errors != [])
    pool.submit(good, 0, [b"g1"])
    pool.submit(good, 1, [b"g2"])
    replies.pump(pool, lambda: len(results["good"]) == 2)
    assert pool.stats()["alive_threads"] == 1  # the worker survived
    pool.close(drain=True, timeout=WAIT)
    replies.deliver_all(pool)
    assert [(n, type(e)) for n, e in errors] == [("bad", _NotAnException)]
    assert results["good"] == [b"g1", b"g2"] and "bad" not in results
    stats = pool.stats()
    assert stats["errors"] == 1 and stats["stopped_by"] is None
    assert _identity_holds(stats), stats


@pytest.mark.parametrize(("fatal", "grouped"), [(SystemExit, False), (KeyboardInterrupt, True)])
def test_system_exit_and_keyboard_interrupt_stop_the_pool_cleanly(
    fatal: type[BaseException], grouped: bool
) -> None:
    replies = Collector()
    gate = threading.Event()
    errors: list[tuple[str, BaseException]] = []
    results: dict[str, list[bytes]] = defaultdict(list)

    def process(state: Any, lane: int, batch: list[bytes]) -> list[bytes]:
        if b"fatal" in batch:
            assert gate.wait(WAIT)  # the others are queued behind it by then
            raise fatal("stop")
        return batch

    def group(jobs: list[tuple[Any, int, Any]]) -> list[Any]:
        return [process(state, lane, list(pieces)) for state, lane, pieces in jobs]

    pool = WorkerPool(replies, threads=1, batch_cells=1, process=process,
                      group=group if grouped else None, group_circuits=1, cell_size=CELL)
    circuits = [
        pool.open_circuit(None, context=str(i), on_result=lambda c, d, r: results[c.context]
                          .extend(r), on_error=lambda c, d, e: errors.append((c.context, e)))
        for i in range(5)
    ]
    pool.start()
    pool.submit(circuits[0], 0, [b"fatal"])
    for c in circuits[1:]:
        pool.submit(c, 0, [b"a", b"b"])
    gate.set()
    replies.pump(pool, lambda: errors != [])
    assert [(n, type(e)) for n, e in errors] == [("0", fatal)]
    with pytest.raises(PoolClosedError):
        pool.submit(circuits[1], 0, [b"c"])
    pool.close(drain=True, timeout=WAIT)  # no TimeoutError: every worker stopped
    replies.deliver_all(pool)
    stats = pool.stats()
    assert stats["alive_threads"] == 0
    assert stats["stopped_by"] == repr(fatal("stop"))
    assert stats["cancelled"] >= 1  # queued work was cancelled, not crypted after the stop
    assert _identity_holds(stats), stats
    assert pool_threads() == []


# --------------------------------------------------------------------------- back-pressure


def test_high_and_low_water_signals_per_circuit_and_pool() -> None:
    replies = Collector()
    events: list[tuple[str, bool, int]] = []
    pool_holder: list[WorkerPool] = []

    def on_pressure(c: Circuit, over: bool) -> None:
        events.append((c.context, over, c.in_flight))

    def on_pool_pressure(over: bool) -> None:
        events.append(("pool", over, pool_holder[0].in_flight))

    pool = WorkerPool(
        replies,
        threads=1,
        batch_cells=3,
        process=lambda s, d, b: b,
        circuit_high_water=10,
        circuit_low_water=4,
        pool_high_water=25,
        pool_low_water=10,
        on_pool_pressure=on_pool_pressure, cell_size=CELL
    )
    pool_holder.append(pool)
    a = pool.open_circuit(None, context="a", on_result=lambda *_: None, on_pressure=on_pressure)
    b = pool.open_circuit(
        None, context="b", on_result=lambda *_: None, on_pressure=on_pressure, high_water=100
    )
    accepted = [pool.submit(a, 0, [b"x"] * 3) for _ in range(5)]  # 3, 6, 9, 12, 15 in flight
    assert accepted == [True, True, True, False, False]
    assert events == [("a", True, 12)]
    assert pool.submit(b, 1, [b"y"] * 9) is True  # 24 in the pool
    assert pool.submit(b, 1, [b"y"] * 3) is False  # 27: the pool crossed its mark
    assert events == [("a", True, 12), ("pool", True, 27)]
    pool.start()
    # Deliver one reply at a time, as a loop would, and watch the resume signals.
    delivered = 0
    while pool.in_flight:
        for reply in replies.take(0.05):
            pool.deliver(reply)
            delivered += reply.cells
    pool.close()
    assert delivered == 27
    assert len(events) == 4
    resumes = {name: in_flight for name, over, in_flight in events[2:] if not over}
    assert set(resumes) == {"a", "pool"}
    # Each resume fired the first time its count fell to the low-water mark or below.
    assert 4 - 3 < resumes["a"] <= 4
    assert 10 - 3 < resumes["pool"] <= 10
    assert not a.over_high_water and not pool.over_high_water


def test_closing_a_circuit_can_resume_the_pool() -> None:
    events: list[bool] = []
    pool = WorkerPool(
        Collector(),
        threads=1,
        process=lambda s, d, b: b,
        pool_high_water=10,
        on_pool_pressure=events.append, cell_size=CELL
    )
    c = pool.open_circuit(None, on_result=lambda *_: None)
    assert pool.submit(c, 0, [b"x"] * 12) is False
    pool.close_circuit(c)
    assert events == [True, False]
    assert pool.in_flight == 0
    pool.close()


# --------------------------------------------------------------------------- updates


def test_worker_state_and_update_delivery() -> None:
    replies = Collector()
    applied: list[list[BaseException]] = []
    seen: list[tuple[int, int]] = []
    pool_holder: list[WorkerPool] = []

    def process(state: Any, direction: int, batch: list[bytes]) -> tuple[int, int]:
        ws = pool_holder[0].worker_state()
        return ws["worker"], ws["generation"]

    pool = WorkerPool(
        replies,
        threads=3,
        process=process,
        worker_state_factory=lambda index: {"worker": index, "generation": 0}, cell_size=CELL
    )
    pool_holder.append(pool)
    circuits = [
        pool.open_circuit(None, on_result=lambda c, d, r: seen.append(r)) for _ in range(30)
    ]
    pool.start()
    for c in circuits:
        pool.submit(c, 0, [b"x"])
    replies.pump(pool, lambda: pool.in_flight == 0)
    assert {gen for _, gen in seen} == {0}

    # Idle workers are woken to apply it; the acknowledgement comes through the reply queue.
    pool.update_workers(lambda s: {**s, "generation": s["generation"] + 1}, applied.append)
    replies.pump(pool, lambda: applied != [])
    assert applied == [[]]
    # Work submitted after update_workers() returned is only ever crypted with the new state.
    pool.update_workers(lambda s: {**s, "generation": s["generation"] + 1}, applied.append)
    seen.clear()
    for _ in range(5):
        for c in circuits:
            pool.submit(c, 0, [b"x"])
    replies.pump(pool, lambda: pool.in_flight == 0 and len(applied) == 2)
    assert {gen for _, gen in seen} == {2}
    assert {w for w, _ in seen} <= {0, 1, 2}

    # A failing update is reported; the worker it failed on keeps its old state.
    def fail_on_worker_0(s: dict[str, int]) -> dict[str, int]:
        if s["worker"] == 0:
            raise KeyError("no key for worker 0")
        return {**s, "generation": 10}

    pool.update_workers(fail_on_worker_0, applied.append)
    replies.pump(pool, lambda: len(applied) == 3)
    assert len(applied[2]) == 1 and isinstance(applied[2][0], KeyError)
    pool.close()
    with pytest.raises(PoolClosedError):
        pool.update_workers(lambda s: s)
    states = {w.index: w.state["generation"] for w in pool._workers.records}
    assert states == {0: 2, 1: 10, 2: 10}


# --------------------------------------------------------------------------- shutdown


def load(pool: WorkerPool, n_circuits: int, rounds: int) -> tuple[dict, dict]:
    sent: dict[tuple[int, int], list[bytes]] = defaultdict(list)
    got: dict[tuple[int, int], list[bytes]] = defaultdict(list)

    def on_result(c: Circuit, d: int, r: list[bytes]) -> None:
        got[(c.context, d)].extend(r)

    circuits = [
        pool.open_circuit(OrderedState(i), context=i, on_result=on_result)
        for i in range(n_circuits)
    ]
    for r in range(rounds):
        for c in circuits:
            d = (r + c.context) % 2
            batch = [cell(c.context, len(sent[(c.context, d)]) + k) for k in range(4)]
            sent[(c.context, d)].extend(batch)
            pool.submit(c, d, batch)
    return sent, got


def ordered_process(state: OrderedState, direction: int, batch: list[bytes]) -> list[bytes]:
    return state.crypt_list(direction, batch)


def test_close_with_drain_while_loaded_crypts_everything() -> None:
    replies = Collector()
    pool = WorkerPool(replies, threads=2, batch_cells=8, process=ordered_process, cell_size=CELL)
    pool.start()
    sent, got = load(pool, 100, 20)
    pool.close(drain=True)
    assert pool_threads() == []
    replies.deliver_all(pool)
    stats = pool.stats()
    assert stats["cancelled"] == 0 and stats["in_flight"] == 0
    assert stats["delivered"] == stats["submitted"] == 100 * 20 * 4
    for (key, d), cells in sent.items():
        assert got[(key, d)] == expected_stream(key, d, cells)


def test_close_without_drain_while_loaded_cancels_the_rest() -> None:
    replies = Collector()
    pool = WorkerPool(replies, threads=2, batch_cells=8, process=ordered_process, cell_size=CELL)
    pool.start()
    sent, got = load(pool, 100, 20)
    pool.close(drain=False)
    assert pool_threads() == []
    replies.deliver_all(pool)
    stats = pool.stats()
    assert stats["alive_threads"] == 0
    assert stats["delivered"] + stats["cancelled"] == stats["submitted"]
    assert stats["in_flight"] == 0
    for (key, d), cells in sent.items():
        # What was crypted is a prefix of the stream, in order, with nothing skipped.
        n = len(got[(key, d)])
        assert got[(key, d)] == expected_stream(key, d, cells[:n])


def test_close_never_started_pool_cancels() -> None:
    pool = WorkerPool(Collector(), threads=2, process=ordered_process, cell_size=CELL)
    load(pool, 5, 2)
    pool.close(drain=True)
    assert pool.stats()["cancelled"] == 40 and pool.in_flight == 0
    pool.close()  # again: nothing happens


def test_notify_sent_while_busy_is_not_lost() -> None:
    """close() runs while the only worker is inside a batch; the worker still sees the flag."""
    replies = Collector()
    gate = Gate()
    pool = WorkerPool(replies, threads=1, process=gate.process, cell_size=CELL)
    c = pool.open_circuit(None, on_result=lambda *_: None)
    pool.start()
    pool.submit(c, 0, [b"block"])
    assert gate.entered.wait(WAIT)
    closer = threading.Thread(target=pool.close, kwargs={"drain": True})
    closer.start()
    while not pool.closed:  # close() has set the flags and sent notify_all to nobody
        threading.Event().wait(0.001)
    gate.release.set()
    closer.join(WAIT)
    assert not closer.is_alive()
    assert pool_threads() == []
    replies.deliver_all(pool)
    assert pool.stats()["delivered"] == 1


def test_idle_workers_all_wake_and_exit() -> None:
    pool = WorkerPool(Collector(), threads=4, process=ordered_process, cell_size=CELL)
    pool.start()
    assert len(pool_threads()) == 4
    pool.close()
    assert pool_threads() == []
    assert pool.stats()["alive_threads"] == 0


def test_close_timeout_cancels_and_reports_a_stuck_worker() -> None:
    replies = Collector()
    gate = Gate()
    pool = WorkerPool(replies, threads=1, process=gate.process, cell_size=CELL)
    c = pool.open_circuit(None, on_result=lambda *_: None)
    pool.submit(c, 0, [b"block"])
    pool.start()
    assert gate.entered.wait(WAIT)
    pool.submit(c, 0, [b"later1", b"later2"])
    with pytest.raises(TimeoutError, match="still running"):
        pool.close(drain=True, timeout=0.05)
    assert pool_threads() != []
    gate.release.set()
    pool.close()  # again: waits for the worker and cancels what it left behind
    assert pool_threads() == []
    replies.deliver_all(pool)
    stats = pool.stats()
    # The stuck batch finished; the cells queued behind it were cancelled (the worker, told to
    # exit, left them, and nobody else will serve them).
    assert stats["delivered"] == 1 and stats["cancelled"] == 2 and pool.in_flight == 0


# --------------------------------------------------------------------------- wake-ups


def test_notify_only_reaches_waiting_workers() -> None:
    """A notify is sent only for a newly queued circuit while some worker waits, never per cell."""
    replies = Collector()
    gate = Gate()
    pool = WorkerPool(replies, threads=2, process=gate.process, cell_size=CELL)
    circuits = [pool.open_circuit(None, on_result=lambda *_: None) for _ in range(4)]
    a, b, c, d = circuits
    for _ in range(100):  # not started: nobody waits, nothing to notify
        pool.submit(a, 0, [b"x"])
    assert pool.stats()["notifies"] == 0
    pool.close_circuit(a)
    a = pool.open_circuit(None, on_result=lambda *_: None)
    pool.start()
    spins = 0
    while pool.stats()["idle_workers"] != 2:  # both workers reach their wait()
        threading.Event().wait(0.001)
        spins += 1
        assert spins < WAIT * 1000
    pool.submit(a, 0, [b"block"])
    assert pool.stats()["notifies"] == 1 and pool.stats()["idle_workers"] == 1
    assert gate.entered.wait(WAIT)
    for _ in range(50):  # a is busy: its owner will take these, nobody is woken
        pool.submit(a, 0, [b"x", b"y"])
    assert pool.stats()["notifies"] == 1
    pool.submit(b, 1, [b"x"])  # newly queued while one worker waits: one notify
    assert pool.stats()["notifies"] == 2 and pool.stats()["idle_workers"] == 0
    pool.submit(c, 0, [b"x"])
    pool.submit(d, 0, [b"x"])
    assert pool.stats()["notifies"] == 2  # no worker waits any more (nor was one told to)
    gate.release.set()
    replies.pump(pool, lambda: pool.in_flight == 0)
    pool.close()
    assert pool.stats()["delivered"] == 1 + 100 + 3
