"""ReplyQueue: no lost wake-up, per-producer order, bounded batches, errors, closing.

Every test that runs the loop arms a watchdog timer that stops it; a lost wake-up therefore
shows up as a count assertion failing, not as a hung test.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable

import pytest

from reactor import Reactor, ReplyQueue, ReplyQueueClosedError

WATCHDOG_S = 20.0


def run_until(reactor: Reactor, done: Callable[[], bool]) -> None:
    """Run the loop until a handler calls stop(); the watchdog ends a stuck run."""
    watchdog = reactor.call_later(WATCHDOG_S, reactor.stop)
    if not done():
        reactor.run()
    watchdog.cancel()


def run_producers(reactor: Reactor, produce: Callable[[int], None], producers: int,
                  done: Callable[[], bool]) -> None:
    """Start ``producers`` threads running ``produce(index)``, run the loop as ``run_until``
    does, then join the threads."""
    threads = [threading.Thread(target=produce, args=(p,)) for p in range(producers)]
    for thread in threads:
        thread.start()
    run_until(reactor, done)
    for thread in threads:
        thread.join()


def test_million_puts_from_four_threads_all_arrive_in_producer_order() -> None:
    producers, per_producer = 4, 250_000
    total = producers * per_producer
    with Reactor() as reactor:
        received: list[list[int]] = [[] for _ in range(producers)]
        appenders = [lst.append for lst in received]
        count = [0]

        def handle(item: tuple[int, int]) -> None:
            appenders[item[0]](item[1])
            count[0] += 1
            if count[0] == total:
                reactor.stop()

        queue: ReplyQueue[tuple[int, int]] = ReplyQueue(reactor, handle)
        sent_true = [0] * producers

        def produce(producer: int) -> None:
            put = queue.put
            trues = 0
            for seq in range(per_producer):
                if put((producer, seq)):
                    trues += 1
            sent_true[producer] = trues

        run_producers(reactor, produce, producers, lambda: count[0] == total)
        stats = queue.stats()
        assert count[0] == total
        for producer in range(producers):
            assert received[producer] == list(range(per_producer))
        assert stats["puts"] == total
        assert stats["items_handled"] == total
        assert stats["pending"] == 0
        assert stats["handler_errors"] == 0
        # put() returns True exactly for the calls that sent the Async.
        assert sum(sent_true) == stats["wakeups_sent"]
        # "Far below": one wake-up per swap, not per put (typically well under 1%; the bound
        # leaves room for GIL hand-offs on a loaded machine).
        assert 1 <= stats["wakeups_sent"] < total // 10
        assert stats["callbacks"] >= 1


def test_max_batch_one_handles_ten_thousand_items_without_further_puts() -> None:
    items = 10_000
    with Reactor() as reactor:
        handled: list[int] = []

        def handle(item: int) -> None:
            handled.append(item)
            if len(handled) == items:
                reactor.stop()

        queue: ReplyQueue[int] = ReplyQueue(reactor, handle, max_batch=1)
        # All puts happen before the loop runs; nothing is put afterwards.
        producer = threading.Thread(target=lambda: [queue.put(i) for i in range(items)])
        producer.start()
        producer.join()
        assert queue.stats()["wakeups_sent"] == 1
        assert queue.stats()["pending"] == items
        run_until(reactor, lambda: len(handled) == items)
        stats = queue.stats()
        assert handled == list(range(items))
        assert stats["largest_batch"] == 1
        assert stats["callbacks"] - stats["empty_callbacks"] == items
        assert stats["self_wakeups"] == items - 1
        assert stats["pending"] == 0


@pytest.mark.parametrize("max_batch", [None, 1, 3, 64])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_race_puts_while_the_handler_drains(max_batch: int | None, seed: int) -> None:
    """Producers put in random bursts while the handler is busy; nothing is left behind."""
    rng = random.Random(seed)
    producers = 3
    plans = [[rng.randint(1, 40) for _ in range(120)] for _ in range(producers)]
    expected = [sum(plan) for plan in plans]
    total = sum(expected)
    with Reactor() as reactor:
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
            if count[0] == total:
                reactor.stop()

        queue: ReplyQueue[tuple[int, int]] = ReplyQueue(reactor, handle, max_batch=max_batch)

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

        run_producers(reactor, produce, producers, lambda: count[0] == total)
        for producer in range(producers):
            assert received[producer] == list(range(expected[producer]))
        stats = queue.stats()
        assert stats["pending"] == 0
        assert stats["puts"] == stats["items_handled"] == total


def test_put_returns_true_only_on_empty_to_non_empty() -> None:
    with Reactor() as reactor:
        handled: list[str] = []
        queue: ReplyQueue[str] = ReplyQueue(reactor, handled.append)
        assert queue.put("a") is True
        assert queue.put("b") is False
        assert queue.put_many(["c", "d"]) is False
        reactor.call_later(0.01, reactor.stop)
        reactor.run()
        assert handled == ["a", "b", "c", "d"]
        assert queue.put_many([]) is False
        assert queue.put_many(["e"]) is True
        assert queue.put("f") is False
        assert queue.stats()["wakeups_sent"] == 2


def test_handler_exceptions_are_counted_and_the_other_items_handled() -> None:
    with Reactor() as reactor:
        handled: list[int] = []

        def handle(item: int) -> None:
            if item % 3 == 0:
                raise ValueError(f"bad item {item}")
            handled.append(item)
            if item == 98:  # the last good one; 99 raises
                reactor.stop()

        queue: ReplyQueue[int] = ReplyQueue(reactor, handle)
        later: list[str] = []
        worker = threading.Thread(target=lambda: [queue.put(i) for i in range(100)])
        worker.start()
        worker.join()
        run_until(reactor, lambda: False)
        # The loop survived: a timer and another put still work.
        reactor.call_later(0.001, later.append, "timer")
        queue.put(101)
        reactor.call_later(0.02, reactor.stop)
        reactor.run()
        assert handled == [i for i in range(100) if i % 3 != 0] + [101]
        assert later == ["timer"]
        assert queue.stats()["handler_errors"] == 34


def test_close_handles_what_was_put_and_later_puts_raise() -> None:
    reactor = Reactor()
    handled: list[int] = []
    queue: ReplyQueue[int] = ReplyQueue(reactor, handled.append, max_batch=2)
    worker = threading.Thread(target=lambda: [queue.put(i) for i in range(10)])
    worker.start()
    worker.join()
    queue.close()
    assert handled == list(range(10))
    with pytest.raises(ReplyQueueClosedError):
        queue.put(11)
    with pytest.raises(ReplyQueueClosedError):
        queue.put_many([12])
    queue.close()  # idempotent
    reactor.close()
    assert reactor.loop.handles == []


def test_close_from_inside_the_handler_keeps_order() -> None:
    with Reactor() as reactor:
        handled: list[int] = []
        box: list[ReplyQueue[int]] = []

        def handle(item: int) -> None:
            handled.append(item)
            if item == 3:
                box[0].close()  # the rest of this batch, then the rest, still in order

        queue: ReplyQueue[int] = ReplyQueue(reactor, handle, max_batch=4)
        box.append(queue)
        for i in range(20):
            queue.put(i)
        reactor.call_later(0.02, reactor.stop)
        reactor.run()
        assert handled == list(range(20))
        assert queue.closed


@pytest.mark.parametrize("close_after_ms", [1, 3, 6, 10])
def test_every_put_that_did_not_raise_is_handled_when_close_races_producers(
    close_after_ms: int,
) -> None:
    producers = 3
    with Reactor() as reactor:
        handled: list[tuple[int, int]] = []
        queue: ReplyQueue[tuple[int, int]] = ReplyQueue(reactor, handled.append)
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

        threads = [threading.Thread(target=produce, args=(p,)) for p in range(producers)]
        for thread in threads:
            thread.start()
        started.wait()
        reactor.call_later(close_after_ms / 1000, queue.close)
        reactor.call_later(close_after_ms / 1000, reactor.stop)
        reactor.run()
        for thread in threads:
            thread.join()
        assert queue.closed
        for producer in range(producers):
            mine = [seq for p, seq in handled if p == producer]
            assert mine == accepted[producer]
        assert sum(len(a) for a in accepted) == queue.stats()["items_handled"]


def test_idle_reply_queue_does_not_keep_the_loop_alive() -> None:
    with Reactor() as reactor:
        queue: ReplyQueue[int] = ReplyQueue(reactor, lambda item: None)
        assert queue.ref is False
        # Nothing else is active: a plain loop.run() returns at once instead of blocking.
        assert reactor.loop.run() is False
        queue.close()


def test_loop_only_methods_refuse_other_threads() -> None:
    with Reactor() as reactor:
        queue: ReplyQueue[int] = ReplyQueue(reactor, lambda item: None)
        errors: list[str] = []

        def off_thread() -> None:
            for call in (queue.close, lambda: ReplyQueue(reactor, print)):
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


def test_max_batch_must_be_positive() -> None:
    with Reactor() as reactor, pytest.raises(ValueError):
        ReplyQueue(reactor, print, max_batch=0)
