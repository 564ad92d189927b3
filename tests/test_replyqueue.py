"""ReplyQueue on every loop kind: no lost wake-up, per-producer order, bounded batches, errors,
closing, and a loop that stops while producers go on.

Each test runs as a scenario (:mod:`support_loops`) on pyuv, asyncio, uvloop and trio: the same
queue logic behind each loop's waker. Waiting is bounded by a deadline, so a lost wake-up shows
up as a count assertion failing, not as a hung test; nothing asserts on time.
"""

from __future__ import annotations

import asyncio
import random
import threading
from collections.abc import Callable, Generator

import pytest
import trio
import uvloop
from support_loop import run_until
from support_loops import Done, Harness, every_loop, run_scenario

from reactor import Reactor, ReplyQueue, ReplyQueueClosedError


def start_producers(produce: Callable[[int], None], producers: int) -> list[threading.Thread]:
    """Start ``producers`` threads running ``produce(index)``. Loop thread."""
    threads = [threading.Thread(target=produce, args=(p,)) for p in range(producers)]
    for thread in threads:
        thread.start()
    return threads


@every_loop
def test_million_puts_from_four_threads_all_arrive_in_producer_order(loop_kind: str) -> None:
    producers, per_producer = 4, 250_000
    total = producers * per_producer

    def body(h: Harness) -> Generator[Done, bool, None]:
        received: list[list[int]] = [[] for _ in range(producers)]
        appenders = [lst.append for lst in received]
        count = [0]

        def handle(item: tuple[int, int]) -> None:
            appenders[item[0]](item[1])
            count[0] += 1

        queue: ReplyQueue[tuple[int, int]] = ReplyQueue(h.loop, handle)
        sent_true = [0] * producers

        def produce(producer: int) -> None:
            put = queue.put
            trues = 0
            for seq in range(per_producer):
                if put((producer, seq)):
                    trues += 1
            sent_true[producer] = trues

        threads = start_producers(produce, producers)
        yield lambda: count[0] == total
        for thread in threads:
            thread.join()
        stats = queue.stats()
        assert count[0] == total
        for producer in range(producers):
            assert received[producer] == list(range(per_producer))
        assert stats["puts"] == total
        assert stats["items_handled"] == total
        assert stats["pending"] == 0
        assert stats["handler_errors"] == 0
        # put() returns True exactly for the calls that sent a wake-up.
        assert sum(sent_true) == stats["wakeups_sent"]
        # "Far below": one wake-up per swap, not per put (typically well under 1%; the bound
        # leaves room for GIL hand-offs on a loaded machine).
        assert 1 <= stats["wakeups_sent"] < total // 10
        assert stats["callbacks"] >= 1
        queue.close()

    run_scenario(loop_kind, body)


@every_loop
def test_max_batch_one_handles_ten_thousand_items_without_further_puts(loop_kind: str) -> None:
    items = 10_000

    def body(h: Harness) -> Generator[Done, bool, None]:
        handled: list[int] = []
        queue: ReplyQueue[int] = ReplyQueue(h.loop, handled.append, max_batch=1)
        # All puts happen while the loop thread waits here; nothing is put afterwards.
        producer = threading.Thread(target=lambda: [queue.put(i) for i in range(items)])
        producer.start()
        producer.join()
        assert queue.stats()["wakeups_sent"] == 1
        assert queue.stats()["pending"] == items
        yield lambda: len(handled) == items
        stats = queue.stats()
        assert handled == list(range(items))
        assert stats["largest_batch"] == 1
        assert stats["callbacks"] - stats["empty_callbacks"] == items
        assert stats["self_wakeups"] == items - 1
        assert stats["pending"] == 0
        queue.close()

    run_scenario(loop_kind, body)


@every_loop
@pytest.mark.parametrize("max_batch", [None, 1, 3, 64])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_race_puts_while_the_handler_drains(
    loop_kind: str, max_batch: int | None, seed: int
) -> None:
    """Producers put in random bursts while the handler is busy; nothing is left behind."""
    rng = random.Random(seed)
    producers = 3
    plans = [[rng.randint(1, 40) for _ in range(120)] for _ in range(producers)]
    expected = [sum(plan) for plan in plans]
    total = sum(expected)

    def body(h: Harness) -> Generator[Done, bool, None]:
        received: list[list[int]] = [[] for _ in range(producers)]
        handler_rng = random.Random(seed * 7919)
        count = [0]

        def handle(item: tuple[int, int]) -> None:
            received[item[0]].append(item[1])
            count[0] += 1
            spin = handler_rng.random()
            if spin < 0.02:
                threading.Event().wait(0.0005)  # drop the GIL while "draining"
            elif spin < 0.2:
                sum(range(200))  # stay busy holding the GIL

        queue: ReplyQueue[tuple[int, int]] = ReplyQueue(h.loop, handle, max_batch=max_batch)

        def produce(producer: int) -> None:
            producer_rng = random.Random(seed * 31 + producer)
            seq = 0
            for burst in plans[producer]:
                if producer_rng.random() < 0.5:
                    queue.put_many([(producer, seq + k) for k in range(burst)])
                else:
                    for k in range(burst):
                        queue.put((producer, seq + k))
                seq += burst
                pause = producer_rng.random()
                if pause < 0.3:
                    threading.Event().wait(producer_rng.random() * 0.0005)
                elif pause < 0.6:
                    threading.Event().wait(0)  # yield the GIL

        threads = start_producers(produce, producers)
        yield lambda: count[0] == total
        for thread in threads:
            thread.join()
        for producer in range(producers):
            assert received[producer] == list(range(expected[producer]))
        stats = queue.stats()
        assert stats["pending"] == 0
        assert stats["puts"] == stats["items_handled"] == total
        queue.close()

    run_scenario(loop_kind, body)


@every_loop
def test_put_returns_true_only_on_empty_to_non_empty(loop_kind: str) -> None:
    def body(h: Harness) -> Generator[Done, bool, None]:
        handled: list[str] = []
        queue: ReplyQueue[str] = ReplyQueue(h.loop, handled.append)
        assert queue.put("a") is True
        assert queue.put("b") is False
        assert queue.put_many(["c", "d"]) is False
        yield lambda: len(handled) == 4
        assert handled == ["a", "b", "c", "d"]
        assert queue.put_many([]) is False
        assert queue.put_many(["e"]) is True
        assert queue.put("f") is False
        yield lambda: len(handled) == 6
        assert handled == ["a", "b", "c", "d", "e", "f"]
        assert queue.stats()["wakeups_sent"] == 2
        queue.close()

    run_scenario(loop_kind, body)


@every_loop
def test_handler_exceptions_are_counted_and_the_other_items_handled(loop_kind: str) -> None:
    def body(h: Harness) -> Generator[Done, bool, None]:
        handled: list[int] = []

        def handle(item: int) -> None:
            if item % 3 == 0:
                raise ValueError(f"bad item {item}")
            handled.append(item)

        queue: ReplyQueue[int] = ReplyQueue(h.loop, handle)
        later: list[str] = []
        worker = threading.Thread(target=lambda: [queue.put(i) for i in range(100)])
        worker.start()
        worker.join()
        yield lambda: queue.stats()["items_handled"] == 100
        # The loop survived: a timer and another put still work.
        h.call_later(0.001, lambda: later.append("timer"))
        queue.put(101)
        yield lambda: later == ["timer"] and 101 in handled
        assert handled == [i for i in range(100) if i % 3 != 0] + [101]
        assert later == ["timer"]
        assert queue.stats()["handler_errors"] == 34
        queue.close()

    run_scenario(loop_kind, body)


@every_loop
def test_close_handles_what_was_put_and_later_puts_raise(loop_kind: str) -> None:
    def body(h: Harness) -> Generator[Done, bool, None]:
        handled: list[int] = []
        queue: ReplyQueue[int] = ReplyQueue(h.loop, handled.append, max_batch=2)
        worker = threading.Thread(target=lambda: [queue.put(i) for i in range(10)])
        worker.start()
        worker.join()
        queue.close()  # before the loop ran the wake-up: close() hands everything over
        assert handled == list(range(10))
        with pytest.raises(ReplyQueueClosedError):
            queue.put(11)
        with pytest.raises(ReplyQueueClosedError):
            queue.put_many([12])
        queue.close()  # idempotent
        # The wake-up sent before close() finds nothing if it still runs (pyuv and the eventfd
        # drop it with the handle; trio runs it): let the loop run a while, nothing changes.
        ran: list[bool] = []
        h.call_later(0.01, lambda: ran.append(True))
        yield lambda: bool(ran)
        assert handled == list(range(10))
        assert queue.stats()["items_handled"] == 10

    run_scenario(loop_kind, body)


def test_close_closes_the_pyuv_async() -> None:
    reactor = Reactor()
    queue: ReplyQueue[int] = ReplyQueue(reactor, lambda item: None)
    queue.close()
    reactor.close()
    assert reactor.loop.handles == []


@every_loop
def test_close_from_inside_the_handler_keeps_order(loop_kind: str) -> None:
    def body(h: Harness) -> Generator[Done, bool, None]:
        handled: list[int] = []
        box: list[ReplyQueue[int]] = []

        def handle(item: int) -> None:
            handled.append(item)
            if item == 3:
                box[0].close()  # the rest of this batch, then the rest, still in order

        queue: ReplyQueue[int] = ReplyQueue(h.loop, handle, max_batch=4)
        box.append(queue)
        for i in range(20):
            queue.put(i)
        yield lambda: queue.closed
        assert handled == list(range(20))

    run_scenario(loop_kind, body)


@every_loop
@pytest.mark.parametrize("close_after_ms", [1, 3, 6, 10])
def test_every_put_that_did_not_raise_is_handled_when_close_races_producers(
    loop_kind: str, close_after_ms: int
) -> None:
    producers = 3

    def body(h: Harness) -> Generator[Done, bool, None]:
        handled: list[tuple[int, int]] = []
        queue: ReplyQueue[tuple[int, int]] = ReplyQueue(h.loop, handled.append)
        accepted: list[list[int]] = [[] for _ in range(producers)]
        started = threading.Barrier(producers + 1)

        def produce(producer: int) -> None:
            started.wait()
            seq = 0
            while True:
                try:
                    queue.put((producer, seq))
                except ReplyQueueClosedError:
                    return
                accepted[producer].append(seq)
                seq += 1

        threads = start_producers(produce, producers)
        started.wait()
        h.call_later(close_after_ms / 1000, queue.close)
        yield lambda: queue.closed
        for thread in threads:
            thread.join()
        assert queue.closed
        for producer in range(producers):
            mine = [seq for p, seq in handled if p == producer]
            assert mine == accepted[producer]
        assert sum(len(a) for a in accepted) == queue.stats()["items_handled"]

    run_scenario(loop_kind, body)


def test_idle_reply_queue_does_not_keep_the_loop_alive() -> None:
    with Reactor() as reactor:
        queue: ReplyQueue[int] = ReplyQueue(reactor, lambda item: None)
        assert queue.ref is False
        # Nothing else is active: a plain loop.run() returns at once instead of blocking.
        assert reactor.loop.run() is False
        queue.close()


@every_loop
def test_loop_only_methods_refuse_other_threads(loop_kind: str) -> None:
    def body(h: Harness) -> Generator[Done, bool, None]:
        queue: ReplyQueue[int] = ReplyQueue(h.loop, lambda item: None)
        errors: list[str] = []

        def off_thread() -> None:
            for call in (queue.close, lambda: ReplyQueue(h.loop, print)):
                try:
                    call()
                except RuntimeError as exc:
                    errors.append(str(exc))
            queue.put(1)  # allowed from any thread

        thread = threading.Thread(target=off_thread)
        thread.start()
        thread.join()
        assert len(errors) == 2
        assert all("loop thread" in message for message in errors)
        assert queue.stats()["puts"] == 1
        yield lambda: queue.stats()["items_handled"] == 1
        queue.close()

    run_scenario(loop_kind, body)


@every_loop
def test_max_batch_must_be_positive(loop_kind: str) -> None:
    def body(h: Harness) -> Generator[Done, bool, None]:
        with pytest.raises(ValueError):
            ReplyQueue(h.loop, print, max_batch=0)
        yield lambda: True

    run_scenario(loop_kind, body)


def test_a_loop_it_does_not_know_is_refused() -> None:
    with pytest.raises(TypeError, match="asyncio event loop"):
        ReplyQueue(object(), print)


# --------------------------------------------------------------------------- a stopped loop


class StoppedLoopRun:
    """Producers that go on putting after the loop stopped (or ended); the loop thread then
    closes the queue, which must hand over every item, in per-producer order."""

    producers = 2
    before = 5_000  # per producer while the loop runs
    after = 20_000  # per producer once it has stopped

    def __init__(self) -> None:
        self.handled: list[tuple[int, int]] = []
        self.queue: ReplyQueue[tuple[int, int]] | None = None
        self.phase_two = threading.Event()
        self.threads: list[threading.Thread] = []

    def start(self, loop: object) -> None:
        """Make the queue and start the producers. Loop thread."""
        self.queue = ReplyQueue(loop, self.handled.append)
        self.threads = start_producers(self.produce, self.producers)

    def produce(self, producer: int) -> None:
        assert self.queue is not None
        for seq in range(self.before):
            self.queue.put((producer, seq))
        assert self.phase_two.wait(30)
        for seq in range(self.before, self.before + self.after):
            self.queue.put((producer, seq))

    def first_phase_seen(self) -> bool:
        return len(self.handled) == self.producers * self.before

    def finish(self) -> None:
        """With the loop stopped: let the producers go on, join them, close. Loop thread."""
        assert self.queue is not None
        self.phase_two.set()
        for thread in self.threads:
            thread.join()
        total = self.producers * (self.before + self.after)
        stats = self.queue.stats()
        assert stats["puts"] == total
        # Nothing ran the loop meanwhile: at most the one wake-up of the first put after the
        # stop, and every item of the second phase still waiting.
        assert stats["pending"] == total - len(self.handled)
        assert len(self.handled) == self.producers * self.before
        self.queue.close()
        assert len(self.handled) == total
        for producer in range(self.producers):
            mine = [seq for p, seq in self.handled if p == producer]
            assert mine == list(range(self.before + self.after))


def test_pyuv_loop_stopped_while_producers_go_on() -> None:
    run = StoppedLoopRun()
    with Reactor() as reactor:
        run.start(reactor)
        assert run_until(reactor, run.first_phase_seen)
        run.finish()


@pytest.mark.parametrize("kind", ["asyncio", "uvloop"])
@pytest.mark.parametrize("closed_first", [False, True])
def test_asyncio_loop_stopped_while_producers_go_on(kind: str, closed_first: bool) -> None:
    """The loop stops (run_until_complete returns) with producers still putting; with
    ``closed_first`` the loop is even closed (their wake-up then raises inside put, which the
    queue ignores). ``close()`` on the thread that ran the loop hands over everything."""
    run = StoppedLoopRun()
    loop = uvloop.new_event_loop() if kind == "uvloop" else asyncio.new_event_loop()

    async def first_phase() -> None:
        run.start(asyncio.get_running_loop())
        while not run.first_phase_seen():
            await asyncio.sleep(0.002)

    try:
        loop.run_until_complete(asyncio.wait_for(first_phase(), 20))
        if closed_first:
            loop.close()
        run.finish()
    finally:
        loop.close()


def test_trio_run_ended_while_producers_go_on() -> None:
    """The trio run ends with producers still putting: their wake-ups raise RunFinishedError
    inside put, which the queue ignores; ``close()`` after ``trio.run`` on its thread hands
    over everything."""
    run = StoppedLoopRun()

    async def first_phase() -> None:
        run.start(trio.lowlevel.current_trio_token())
        with trio.fail_after(20):
            while not run.first_phase_seen():
                await trio.sleep(0.002)

    trio.run(first_phase)
    run.finish()
