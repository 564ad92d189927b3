"""``Reactor.call_after_io``: the end of this loop iteration, after its I/O callbacks.

Iterations are counted with a ``pyuv.Prepare`` handle (libuv runs prepare handles once per
iteration, just before the poll), so "the same iteration" is a checked fact, not a timing.
"""

from __future__ import annotations

import threading
import time

import pytest
import pyuv

from reactor import Reactor, ReplyQueue


class _Iterations:
    """Counts loop iterations (prepare phases) of ``reactor``'s loop."""

    def __init__(self, reactor: Reactor) -> None:
        self.count = 0
        self._prepare = pyuv.Prepare(reactor.loop)
        self._prepare.start(self._tick)

    def _tick(self, handle: pyuv.Prepare) -> None:
        self.count += 1

    def close(self) -> None:
        self._prepare.close()


def test_work_queued_by_an_io_callback_runs_in_the_same_iteration() -> None:
    with Reactor() as reactor:
        iterations = _Iterations(reactor)
        seen: list[tuple[str, int]] = []

        def at_end(value: int) -> None:
            seen.append(("at end", iterations.count))
            if value == 9:
                reactor.stop()

        def on_item(value: int) -> None:  # runs in the poll phase (the queue's uv.Async)
            seen.append(("item", iterations.count))
            reactor.call_after_io(at_end, value)

        queue: ReplyQueue[int] = ReplyQueue(reactor, on_item)

        def produce() -> None:
            for value in range(10):
                queue.put(value)
                time.sleep(0.002)

        thread = threading.Thread(target=produce)
        thread.start()
        reactor.call_later(30, reactor.stop)  # only a guard against a hang
        reactor.run()
        thread.join()
        iterations.close()
        items = [n for kind, n in seen if kind == "item"]
        ends = [n for kind, n in seen if kind == "at end"]
        assert len(items) == len(ends) == 10
        # each batch of items the poll delivered is followed by its end-of-iteration work in
        # the same iteration: the iteration numbers are equal, pairwise in order
        assert ends == items


def test_work_queued_before_the_poll_does_not_wait_for_io() -> None:
    with Reactor() as reactor:
        iterations = _Iterations(reactor)
        ran: list[tuple[int, int]] = []

        def at_end() -> None:
            ran.append((iterations.count, 1))
            reactor.stop()

        def from_timer() -> None:  # the timer phase comes before the poll
            ran.append((iterations.count, 0))
            reactor.call_after_io(at_end)

        reactor.call_later(0.005, from_timer)
        guard = reactor.call_later(10, reactor.stop)  # the poll would block until this
        started = time.monotonic()
        reactor.run()
        elapsed = time.monotonic() - started
        guard.cancel()
        iterations.close()
        assert [step for _, step in ran] == [0, 1]
        assert elapsed < 5, "call_after_io from a timer waited for the poll to time out"
        # the timer runs before this iteration's prepare phase, the work after its poll
        assert ran[1][0] == ran[0][0] + 1


def test_callbacks_queued_by_callbacks_run_in_the_same_pass_in_order() -> None:
    with Reactor() as reactor:
        iterations = _Iterations(reactor)
        order: list[tuple[str, int]] = []

        def second(tag: str) -> None:
            order.append((tag, iterations.count))

        def first() -> None:
            order.append(("first", iterations.count))
            reactor.call_after_io(second, "queued by first")

        def start() -> None:
            reactor.call_after_io(first)
            reactor.call_after_io(second, "queued second")
            reactor.call_after_io(reactor.stop)

        reactor.call_soon(start)
        reactor.call_later(30, reactor.stop)
        reactor.run()
        iterations.close()
        assert [tag for tag, _ in order] == ["first", "queued second", "queued by first"]
        assert len({count for _, count in order}) == 1  # one iteration for all three


def test_a_callback_that_requeues_itself_does_not_hold_the_loop() -> None:
    with Reactor() as reactor:
        runs = 0
        timer_fired: list[int] = []

        def again() -> None:
            nonlocal runs
            runs += 1
            if not timer_fired:
                reactor.call_after_io(again)

        def timer() -> None:
            timer_fired.append(runs)
            reactor.stop()

        reactor.call_soon(lambda: reactor.call_after_io(again))
        reactor.call_later(0.02, timer)
        reactor.call_later(30, reactor.stop)
        reactor.run()
        assert timer_fired, "the timer never ran: the callback held the loop"
        assert timer_fired[0] >= 8  # it ran, a bounded number of times per pass


def test_raising_callback_is_counted_and_the_rest_still_run() -> None:
    with Reactor() as reactor:
        after: list[str] = []

        def boom() -> None:
            raise RuntimeError("after-io failure")

        def start() -> None:
            reactor.call_after_io(boom)
            reactor.call_after_io(after.append, "after the failure")
            reactor.call_after_io(reactor.stop)

        reactor.call_soon(start)
        reactor.call_later(30, reactor.stop)
        reactor.run()
        assert after == ["after the failure"]
        assert reactor.stats()["callback_errors"] == 1


def test_off_thread_call_raises_and_close_runs_what_is_pending() -> None:
    reactor = Reactor()
    errors: list[str] = []

    def off_thread() -> None:
        try:
            reactor.call_after_io(print)
        except RuntimeError as exc:
            errors.append(str(exc))

    thread = threading.Thread(target=off_thread)
    thread.start()
    thread.join()
    assert len(errors) == 1 and "loop thread" in errors[0]
    ran: list[str] = []
    reactor.call_after_io(ran.append, "pending at close")
    reactor.close()
    assert ran == ["pending at close"]
    assert reactor.loop.handles == []
    with pytest.raises(RuntimeError):
        reactor.call_after_io(print)
