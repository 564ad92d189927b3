"""Reactor: run/stop across threads, calls and timers, signals, closing, embedding."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import pyuv

from reactor import Reactor, ReplyQueue, listen

WATCHDOG_S = 20.0


def test_stop_from_another_thread_ends_run() -> None:
    with Reactor() as reactor:
        running = threading.Event()
        reactor.call_soon(running.set)
        stopper = threading.Thread(target=lambda: (running.wait(), reactor.stop()))
        stopper.start()
        watchdog = reactor.call_later(WATCHDOG_S, reactor.stop)
        reactor.run()  # nothing else is active: only stop() ends this
        stopper.join()
        assert running.is_set()
        assert not watchdog.done
        watchdog.cancel()
        assert not reactor.running


def test_run_keeps_running_until_stop_even_with_nothing_to_do() -> None:
    with Reactor() as reactor:
        iterations: list[str] = []

        def from_thread() -> None:
            time.sleep(0.05)
            reactor.call_soon_threadsafe(iterations.append, "call")
            reactor.call_soon_threadsafe(reactor.stop)

        thread = threading.Thread(target=from_thread)
        thread.start()
        reactor.run()
        thread.join()
        assert iterations == ["call"]


def test_call_soon_and_threadsafe_calls_keep_order() -> None:
    with Reactor() as reactor:
        seen: list[tuple[str, int]] = []
        for i in range(5):
            reactor.call_soon(seen.append, ("soon", i))

        def produce(name: str) -> None:
            for i in range(2000):
                reactor.call_soon_threadsafe(seen.append, (name, i))

        threads = [threading.Thread(target=produce, args=(f"t{n}",)) for n in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        reactor.call_soon_threadsafe(reactor.stop)
        reactor.run()
        assert seen[:5] == [("soon", i) for i in range(5)]
        for name in ("t0", "t1", "t2"):
            assert [i for n, i in seen if n == name] == list(range(2000))
        assert reactor.stats()["threadsafe_calls"] == 6001


def test_call_soon_from_a_callback_runs_on_the_next_iteration() -> None:
    with Reactor() as reactor:
        order: list[str] = []

        def record(what: str) -> None:
            order.append(what)
            if len(order) == 3:
                reactor.stop()

        def first() -> None:
            record("first")
            reactor.call_soon(record, "queued by first")

        reactor.call_soon(first)
        reactor.call_soon(record, "second")
        # Only a guard against a hang: stopping on a short timer instead raced with a
        # descheduled test process (timers run before the call_soon phase of an iteration).
        reactor.call_later(30, reactor.stop)
        reactor.run()
        assert order == ["first", "second", "queued by first"]


def test_call_later_fires_in_time_order_and_cancel_prevents_it() -> None:
    with Reactor() as reactor:
        fired: list[str] = []
        reactor.call_later(0.03, fired.append, "late")
        reactor.call_later(0.01, fired.append, "early")
        cancelled = reactor.call_later(0.02, fired.append, "cancelled")
        cancelled.cancel()
        cancelled.cancel()  # idempotent
        reactor.call_later(0.05, reactor.stop)
        reactor.run()
        assert fired == ["early", "late"]
        assert cancelled.cancelled and cancelled.done


def test_raising_callbacks_do_not_stop_the_loop() -> None:
    with Reactor() as reactor:
        after: list[str] = []

        def boom() -> None:
            raise RuntimeError("callback failure")

        reactor.call_soon(boom)
        reactor.call_later(0.001, boom)
        reactor.call_soon_threadsafe(boom)
        reactor.call_later(0.005, after.append, "timer after the failures")
        reactor.call_later(0.01, reactor.stop)
        reactor.run()
        assert after == ["timer after the failures"]
        assert reactor.stats()["callback_errors"] == 3


def test_loop_only_methods_called_off_thread_raise_saying_so() -> None:
    with Reactor() as reactor:
        messages: list[str] = []
        calls = [
            lambda: reactor.call_soon(print),
            lambda: reactor.call_later(1, print),
            lambda: reactor.add_signal_handler(signal.SIGUSR1, print),
            reactor.close,
            lambda: listen(reactor, "127.0.0.1", 0, print),
        ]

        def off_thread() -> None:
            assert not reactor.in_loop_thread()
            for call in calls:
                try:
                    call()
                except RuntimeError as exc:
                    messages.append(str(exc))
            reactor.stop()  # allowed anywhere

        thread = threading.Thread(target=off_thread)
        thread.start()
        reactor.run()
        thread.join()
        assert reactor.in_loop_thread()
        assert len(messages) == len(calls)
        assert all("loop thread" in message for message in messages)
        assert not reactor.closed


def test_close_leaves_no_open_handle_and_no_thread() -> None:
    threads_before = set(threading.enumerate())
    reactor = Reactor()
    handled: list[int] = []
    queue: ReplyQueue[int] = ReplyQueue(reactor, handled.append)
    reactor.call_later(100, print)
    reactor.add_signal_handler(signal.SIGUSR2, print)
    listener = listen(reactor, "127.0.0.1", 0, lambda stream: None)
    assert listener.address[1] > 0
    reactor.call_soon(handled.append, -1)
    worker = threading.Thread(target=lambda: [queue.put(i) for i in range(100)])
    worker.start()
    worker.join()
    assert len(reactor.loop.handles) >= 5
    reactor.close()
    assert reactor.closed
    assert reactor.loop.handles == []
    assert sorted(handled) == [-1, *range(100)]  # queued work was handled, not dropped
    assert set(threading.enumerate()) == threads_before
    with pytest.raises(RuntimeError):
        reactor.call_soon_threadsafe(print)
    with pytest.raises(RuntimeError):
        reactor.run()
    reactor.stop()  # harmless after close
    reactor.close()  # idempotent


def test_close_while_running_is_refused() -> None:
    with Reactor() as reactor:
        errors: list[str] = []

        def try_close() -> None:
            try:
                reactor.close()
            except RuntimeError as exc:
                errors.append(str(exc))
            reactor.stop()

        reactor.call_soon(try_close)
        reactor.run()
        assert errors and "stop()" in errors[0]


def test_sigint_and_sigterm_handlers_run_on_the_loop_thread() -> None:
    received: list[tuple[str, int]] = []
    with Reactor() as reactor:
        loop_thread = threading.get_ident()

        def on_signal(name: str) -> None:
            received.append((name, threading.get_ident()))
            if len(received) == 2:
                reactor.stop()

        reactor.add_signal_handler(signal.SIGINT, on_signal, "SIGINT")
        reactor.add_signal_handler(signal.SIGTERM, on_signal, "SIGTERM")

        def send_signals() -> None:  # from another thread: delivery must still be on the loop
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
            os.kill(os.getpid(), signal.SIGTERM)

        sender = threading.Thread(target=send_signals)
        reactor.call_soon(sender.start)
        watchdog = reactor.call_later(WATCHDOG_S, reactor.stop)
        reactor.run()
        watchdog.cancel()
        sender.join()
        assert sorted(received) == [("SIGINT", loop_thread), ("SIGTERM", loop_thread)]
    # After close, Python's own SIGINT handling is back (libuv had left SIG_DFL behind).
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(1000):
            time.sleep(0.001)


def test_remove_signal_handler() -> None:
    with Reactor() as reactor:
        handle = reactor.add_signal_handler(signal.SIGUSR1, print)
        assert reactor.remove_signal_handler(signal.SIGUSR1) is True
        assert reactor.remove_signal_handler(signal.SIGUSR1) is False
        handle.cancel()  # already removed: harmless


def test_embedding_over_an_application_loop_with_its_own_timers() -> None:
    """The app creates and drives the loop; the Reactor only adds handles to it."""
    loop = pyuv.Loop()
    ticks: list[int] = []
    reactor = Reactor(loop)
    received: list[int] = []
    reactor_timer_fired: list[str] = []
    queue: ReplyQueue[int] = ReplyQueue(reactor, received.append)
    items = 5000
    worker = threading.Thread(target=lambda: [queue.put(i) for i in range(items)])
    app_timer = pyuv.Timer(loop)

    def app_tick(timer: pyuv.Timer) -> None:
        ticks.append(len(ticks))
        if len(ticks) == 1:
            worker.start()
            reactor.call_later(0.001, reactor_timer_fired.append, "reactor timer")
        # The app decides when it is done; the reactor's handles must not keep run() alive.
        if len(ticks) >= 20 and len(received) == items and reactor_timer_fired:
            timer.close()
        if len(ticks) > 20_000:  # watchdog, about 20 s
            timer.close()

    guard_fired: list[bool] = []
    guard = pyuv.Timer(loop)  # unref'd: stops the loop only if something else keeps it alive
    guard.start(lambda timer: (guard_fired.append(True), loop.stop()), WATCHDOG_S, 0)
    guard.ref = False
    app_timer.start(app_tick, 0.001, 0.001)
    loop.run()  # the application drives its loop; returns once its timer is closed
    assert not guard_fired  # run() returned by itself: the reactor's handles are unref'd
    guard.close()
    worker.join()
    assert received == list(range(items))
    assert reactor_timer_fired == ["reactor timer"]
    assert len(ticks) >= 20
    reactor.close()  # closes our handles; the app's next loop iteration finishes them
    loop.run()
    assert loop.handles == []
