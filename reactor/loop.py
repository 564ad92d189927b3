"""The Reactor: the loop thread (docs/design.md), a thin owner of one ``pyuv.Loop``.

Design
------
A Reactor either creates its own ``pyuv.Loop`` or wraps one an application already has (and may
keep driving itself with ``loop.run()``). It adds what pyuv leaves out:

* **Thread ownership.** The *loop thread* is the thread that created the Reactor, or the thread
  that last called ``run()``. Methods marked "Loop thread only" check it and raise
  ``RuntimeError`` saying so; pyuv handles are not thread-safe and a call from the wrong
  thread would corrupt libuv's lists silently.
* **call_soon** (loop thread): a deque of ready callbacks and one ``pyuv.Idle`` handle, started
  only while the deque is non-empty (an active Idle makes libuv poll with a zero timeout). Each
  Idle callback runs the callbacks that were queued when it started; callbacks they queue run
  on the next iteration, so a callback chain cannot starve I/O.
* **call_after_io** (loop thread): the end of *this* iteration, for work that gathers what the
  iteration's I/O callbacks produced (a relay's flush of its circuits, a link's one write).
  It runs in libuv's check phase, right after the poll phase's callbacks, so the loop does
  not go round once more with a zero-timeout poll as a ``call_soon`` would make it; callbacks
  queued by these callbacks run in the same pass (a flush queues the writes it makes). Work
  queued before the poll (from a timer or a ``call_soon``) also starts an Idle that does
  nothing, only so that the poll does not block before the check phase comes.
* **call_soon_threadsafe / stop from any thread**: both go through an internal ``ReplyQueue``
  whose handler calls ``fn(*args)``; so they inherit its coalesced wake-up (one ``Async.send``
  per empty -> non-empty transition) and its no-lost-wake-up argument. ``Loop.stop()`` is not
  thread-safe, so ``stop()`` off the loop thread queues ``loop.stop`` to run on it.
* **run() runs until stop().** Every Async of this package is unref'd so it never keeps an
  application's own ``loop.run()`` alive; ``run()`` re-refs the internal Async for its
  duration instead, so it does not return early when the loop has nothing else to do.
* **Timers and signals** are ``pyuv.Timer`` / ``pyuv.Signal`` handles wrapped so that user
  exceptions are logged and counted instead of reaching pyuv's excepthook.
* **close()** closes everything created through this Reactor (timers, signal handlers, reply
  queues, listeners, streams; each registered in an insertion-ordered dict, O(1) per
  add/remove), handles what reply queues already hold, runs pending ``call_soon`` and
  ``call_after_io`` callbacks, and then closes its own handles. If the Reactor owns its loop it
  also runs the loop (without blocking) until every close callback has run, so afterwards
  ``loop.handles`` is empty. Over an application's loop, the application's next iteration
  finishes the closes. The Reactor never starts a thread.

Signals: libuv's signal handling replaces Python's C-level handler for that signal while a
``pyuv.Signal`` is active and installs ``SIG_DFL`` when the last one stops. Removing a handler
therefore re-installs Python's own handler (``signal.signal(signum, signal.getsignal(signum))``)
when called on the main thread, so Ctrl-C raises ``KeyboardInterrupt`` again afterwards.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections import deque
from collections.abc import Callable
from types import TracebackType
from typing import Any, Protocol

import pyuv

from reactor.replyqueue import ReplyQueue, ReplyQueueClosedError
from reactor.wakers import PyuvWaker, WakerOwner

__all__ = ["Reactor", "SignalHandle", "TimerHandle"]

logger = logging.getLogger("reactor")

_Call = tuple[Callable[..., object], tuple[Any, ...]]
_AFTER_IO_ROUNDS = 8  # call_after_io: rounds of newly queued callbacks run in one pass


def _nothing(handle: pyuv.Idle) -> None:
    """The call_after_io nudge's callback: an active Idle alone keeps the poll from
    blocking."""


class _Resource(Protocol):
    """Something a Reactor closes on ``close()``: reply queues, timers, signals, streams."""

    def _close_for_reactor(self) -> None: ...


class TimerHandle:
    """A pending ``call_later`` call; ``cancel()`` it on the loop thread."""

    def __init__(
        self, reactor: Reactor, seconds: float, fn: Callable[..., object], args: tuple[Any, ...]
    ) -> None:
        """Start the timer. Loop thread only (``Reactor.call_later`` creates these)."""
        self._reactor = reactor
        self._fn = fn
        self._args = args
        self._done = False
        self._cancelled = False
        self._timer = pyuv.Timer(reactor.loop)
        # libuv timers count whole milliseconds; round a positive delay below 1 ms up to 1 ms
        # (never fire early) instead of letting pyuv warn about it.
        delay = 0.0 if seconds <= 0 else max(seconds, 0.001)
        self._timer.start(self._fire, delay, 0.0)
        reactor._register_resource(self)

    @property
    def cancelled(self) -> bool:
        """True if ``cancel()`` stopped the call before it ran. Any thread."""
        return self._cancelled

    @property
    def done(self) -> bool:
        """True once the call ran or was cancelled. Any thread."""
        return self._done

    def cancel(self) -> None:
        """Stop the call if it has not run yet. Loop thread only. Idempotent."""
        self._reactor.check_loop_thread("TimerHandle.cancel()")
        if self._done:
            return
        self._cancelled = True
        self._finish()

    def _finish(self) -> None:
        self._done = True
        self._reactor._close_handle(self._timer)
        self._reactor._unregister_resource(self)

    def _fire(self, timer: pyuv.Timer) -> None:
        self._finish()
        self._reactor._run_callback(self._fn, self._args)

    def _close_for_reactor(self) -> None:
        if not self._done:
            self._cancelled = True
            self._finish()

    def __repr__(self) -> str:
        state = "cancelled" if self._cancelled else "done" if self._done else "pending"
        return f"<TimerHandle {state} {self._fn!r}>"


class SignalHandle:
    """A signal handler installed by ``Reactor.add_signal_handler``."""

    def __init__(
        self, reactor: Reactor, signum: int, fn: Callable[..., object], args: tuple[Any, ...]
    ) -> None:
        """Start watching ``signum``. Loop thread only."""
        self._reactor = reactor
        self.signum = signum
        self._fn = fn
        self._args = args
        self._active = True
        self._signal = pyuv.Signal(reactor.loop)
        self._signal.start(self._deliver, signum)
        # A signal handler alone does not keep run() from returning (as in asyncio).
        self._signal.ref = False
        reactor._register_resource(self)

    def _deliver(self, handle: pyuv.Signal, signum: int) -> None:
        # libuv's handler only writes to a pipe; this runs later in the loop's poll phase, on the
        # loop thread, whichever thread the kernel interrupted.
        self._reactor._run_callback(self._fn, self._args)

    def cancel(self) -> None:
        """Remove this handler; restore Python's handler if on the main thread. Loop thread only."""
        self._reactor.check_loop_thread("SignalHandle.cancel()")
        self._remove()

    def _remove(self) -> None:
        if not self._active:
            return
        self._active = False
        self._signal.stop()
        self._reactor._close_handle(self._signal)
        self._reactor._unregister_resource(self)
        self._reactor._forget_signal(self)
        self._restore_python_handler()

    def _restore_python_handler(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            logger.warning(
                "signal %d: libuv left SIG_DFL installed; Python's handler can only be restored "
                "on the main thread",
                self.signum,
            )
            return
        previous = signal.getsignal(self.signum)
        if previous is not None:
            signal.signal(self.signum, previous)

    def _close_for_reactor(self) -> None:
        self._remove()


class Reactor:
    """The loop thread: a ``pyuv.Loop`` plus thread-safe calls, timers, signals and closing."""

    def __init__(self, loop: pyuv.Loop | None = None) -> None:
        """Wrap ``loop`` or create a new one. The calling thread becomes the loop thread."""
        self._owns_loop = loop is None
        self._loop: pyuv.Loop = pyuv.Loop() if loop is None else loop
        self._loop_thread_id = threading.get_ident()
        self._running = False
        self._closing = False
        self._closed = False
        self._handles_closing = 0
        self._callback_errors = 0
        self._resources: dict[_Resource, None] = {}
        self._signals: dict[int, SignalHandle] = {}
        self._ready: deque[_Call] = deque()
        self._idle = pyuv.Idle(self._loop)
        self._idle_started = False
        self._after_io: deque[_Call] = deque()
        self._check = pyuv.Check(self._loop)
        self._nudge = pyuv.Idle(self._loop)  # keeps the poll from blocking (call_after_io)
        self._check_started = False
        self._calls: ReplyQueue[_Call] = ReplyQueue(self, self._run_threadsafe_call)

    # ------------------------------------------------------------------ threads

    @property
    def loop(self) -> pyuv.Loop:
        """The wrapped ``pyuv.Loop``. Any thread (but use it only on the loop thread)."""
        return self._loop

    def in_loop_thread(self) -> bool:
        """True when called on the loop thread. Any thread."""
        return threading.get_ident() == self._loop_thread_id

    def check_loop_thread(self, what: str) -> None:
        """Raise ``RuntimeError`` naming ``what`` unless on the loop thread. Any thread."""
        if threading.get_ident() != self._loop_thread_id:
            raise RuntimeError(
                f"{what} may only be called on the reactor's loop thread "
                f"(thread id {self._loop_thread_id}), but was called from "
                f"{threading.current_thread().name!r} (thread id {threading.get_ident()}); "
                "from other threads use Reactor.call_soon_threadsafe() or a ReplyQueue"
            )

    def make_waker(self, callback: Callable[[], object], owner: WakerOwner) -> PyuvWaker:
        """A ``pyuv.Async`` waker on this loop for a ReplyQueue (``owner``), which this
        Reactor then closes on ``close()``. Loop thread only."""
        self.check_loop_thread("ReplyQueue()")
        return PyuvWaker(self, callback, owner)

    # ------------------------------------------------------------------ running

    def run(self) -> None:
        """Run the loop until ``stop()``. The calling thread becomes the loop thread.

        Call from the thread that will own the loop (normally the one that created it).
        """
        if self._closing or self._closed:
            raise RuntimeError("Reactor.run() after close()")
        if self._running:
            raise RuntimeError("Reactor.run() is already running")
        self._loop_thread_id = threading.get_ident()
        self._running = True
        # Keep the loop alive until stop(): every other Async of ours is unref'd.
        self._calls.ref = True
        try:
            self._loop.run(pyuv.UV_RUN_DEFAULT)
        finally:
            self._calls.ref = False
            self._running = False

    @property
    def running(self) -> bool:
        """True while ``run()`` is running. Any thread."""
        return self._running

    def stop(self) -> None:
        """Make ``run()`` (or whoever drives the loop) return after this iteration. Any thread.

        Off the loop thread this queues ``Loop.stop`` to run on the loop thread, because
        ``Loop.stop`` only sets a flag that the loop thread reads without a lock. If nothing is
        running the loop, the next run stops after one iteration. After ``close()`` it does
        nothing.
        """
        if threading.get_ident() == self._loop_thread_id:
            if not self._closed:
                self._loop.stop()
            return
        try:
            self._calls.put((self._loop.stop, ()))
        except ReplyQueueClosedError:
            pass  # closed: nothing is running the loop for this Reactor any more

    # ------------------------------------------------------------------ calls

    def call_soon(self, fn: Callable[..., object], *args: Any) -> None:
        """Run ``fn(*args)`` on the next loop iteration, in call order. Loop thread only."""
        if threading.get_ident() != self._loop_thread_id:
            self.check_loop_thread("Reactor.call_soon()")
        if self._closed:
            raise RuntimeError("Reactor.call_soon() after close()")
        self._ready.append((fn, args))
        if not self._idle_started:
            self._idle_started = True
            self._idle.start(self._run_ready)

    def call_after_io(self, fn: Callable[..., object], *args: Any) -> None:
        """Run ``fn(*args)`` at the end of this loop iteration, once its I/O callbacks have
        run (libuv's check phase), in call order; see "call_after_io" above. Loop thread
        only."""
        if threading.get_ident() != self._loop_thread_id:
            self.check_loop_thread("Reactor.call_after_io()")
        if self._closed:
            raise RuntimeError("Reactor.call_after_io() after close()")
        self._after_io.append((fn, args))
        if not self._check_started:
            self._check_started = True
            self._check.start(self._run_after_io)
            self._nudge.start(_nothing)

    def call_soon_threadsafe(self, fn: Callable[..., object], *args: Any) -> None:
        """Run ``fn(*args)`` on the loop thread soon, in call order per thread. Any thread.

        Coalesced: only the call that finds the queue empty wakes the loop. Raises
        ``RuntimeError`` after ``close()``.
        """
        try:
            self._calls.put((fn, args))
        except ReplyQueueClosedError:
            raise RuntimeError("Reactor.call_soon_threadsafe() after close()") from None

    def call_later(self, seconds: float, fn: Callable[..., object], *args: Any) -> TimerHandle:
        """Run ``fn(*args)`` after ``seconds``; returns a handle with ``cancel()``.

        Loop thread only. libuv timers have millisecond resolution: a positive delay below
        1 ms becomes 1 ms. The pending timer keeps ``loop.run()`` alive, as in asyncio.
        """
        self.check_loop_thread("Reactor.call_later()")
        self._check_open("Reactor.call_later()")
        return TimerHandle(self, seconds, fn, args)

    def add_signal_handler(
        self, signum: int, fn: Callable[..., object], *args: Any
    ) -> SignalHandle:
        """Run ``fn(*args)`` on the loop thread when ``signum`` arrives. Loop thread only.

        Replaces an earlier handler for the same signal. The handler does not keep the loop
        alive by itself. ``Reactor.close()`` removes it.
        """
        self.check_loop_thread("Reactor.add_signal_handler()")
        self._check_open("Reactor.add_signal_handler()")
        old = self._signals.get(signum)
        if old is not None:
            old._remove()
        handle = SignalHandle(self, signum, fn, args)
        self._signals[signum] = handle
        return handle

    def remove_signal_handler(self, signum: int) -> bool:
        """Remove the handler for ``signum``; True if there was one. Loop thread only."""
        self.check_loop_thread("Reactor.remove_signal_handler()")
        handle = self._signals.get(signum)
        if handle is None:
            return False
        handle._remove()
        return True

    def stats(self) -> dict[str, int]:
        """Counters: callback_errors, threadsafe_calls, ready, after_io (pending callbacks of
        each kind), resources. Any thread."""
        calls = self._calls.stats()
        return {
            "callback_errors": self._callback_errors + calls["handler_errors"],
            "threadsafe_calls": calls["puts"],
            "ready": len(self._ready),
            "after_io": len(self._after_io),
            "resources": len(self._resources),
        }

    # ------------------------------------------------------------------ closing

    @property
    def closed(self) -> bool:
        """True once ``close()`` has finished. Any thread."""
        return self._closed

    def close(self) -> None:
        """Close everything created through this Reactor, then its own handles. Idempotent.

        Loop thread only, and not while ``run()`` is running (``stop()`` first). Reply queues
        handle what they already hold; pending ``call_soon_threadsafe``, ``call_soon`` and
        ``call_after_io`` callbacks run; timers are cancelled; streams are closed without
        flushing; signal handlers are removed. When the Reactor owns its loop, this returns
        after every handle's close callback has run.
        """
        self.check_loop_thread("Reactor.close()")
        if self._closing:
            return
        if self._running:
            raise RuntimeError("Reactor.close() while run() is running: call stop() first")
        self._closing = True
        for resource in list(self._resources):
            if resource is not self._calls:
                resource._close_for_reactor()
        self._calls.close()
        for _ in range(1000):  # callbacks that keep queueing callbacks must not hang close()
            if not self._ready and not self._after_io:
                break
            self._run_ready(self._idle)
            self._run_after_io(self._check)
        if self._ready or self._after_io:
            logger.error("Reactor.close(): dropped %d call_soon and %d call_after_io callbacks",
                         len(self._ready), len(self._after_io))
            self._ready.clear()
            self._after_io.clear()
        self._closed = True
        self._close_handle(self._idle)
        self._close_handle(self._check)
        self._close_handle(self._nudge)
        if self._owns_loop:
            for _ in range(100):
                if self._handles_closing == 0:
                    break
                self._loop.run(pyuv.UV_RUN_NOWAIT)

    def __enter__(self) -> Reactor:
        """Return self. Loop thread only."""
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """``close()``. Loop thread only."""
        self.close()

    # ------------------------------------------------------------------ internals

    def _check_open(self, what: str) -> None:
        if self._closing:
            raise RuntimeError(f"{what} after Reactor.close()")

    def _register_resource(self, resource: _Resource) -> None:
        self._check_open(type(resource).__name__)
        self._resources[resource] = None

    def _unregister_resource(self, resource: _Resource) -> None:
        self._resources.pop(resource, None)

    def _forget_signal(self, handle: SignalHandle) -> None:
        if self._signals.get(handle.signum) is handle:
            del self._signals[handle.signum]

    def _close_handle(self, handle: pyuv.Handle) -> None:
        """Close a pyuv handle and count it until its close callback runs. Loop thread only."""
        if handle.closed:
            return
        self._handles_closing += 1
        handle.close(self._on_handle_closed)

    def _close_handle_with(
        self, handle: pyuv.Handle, callback: Callable[[pyuv.Handle], object]
    ) -> None:
        """As ``_close_handle``, then ``callback(handle)`` (errors logged). Loop thread only."""
        if handle.closed:
            return
        self._handles_closing += 1

        def closed(closed_handle: pyuv.Handle) -> None:
            self._handles_closing -= 1
            self._run_callback(callback, (closed_handle,))

        handle.close(closed)

    def _on_handle_closed(self, handle: pyuv.Handle) -> None:
        self._handles_closing -= 1

    def _run_callback(self, fn: Callable[..., object], args: tuple[Any, ...]) -> None:
        try:
            fn(*args)
        except Exception:
            self._callback_errors += 1
            logger.exception("reactor callback %r raised; the loop continues", fn)

    def _run_threadsafe_call(self, call: _Call) -> None:
        fn, args = call
        fn(*args)  # exceptions are logged and counted by the ReplyQueue

    def _run_queued(self, calls: deque[_Call], kind: str) -> None:
        """Run the calls ``calls`` holds now (those queued meanwhile stay for the caller); a
        raising one is logged and counted, and the rest still run."""
        for _ in range(len(calls)):
            fn, args = calls.popleft()
            try:
                fn(*args)
            except Exception:
                self._callback_errors += 1
                logger.exception("%s callback %r raised; the loop continues", kind, fn)

    def _run_ready(self, idle: pyuv.Idle) -> None:
        ready = self._ready
        # Only what was queued before this pass: callbacks queued now run next iteration.
        self._run_queued(ready, "call_soon")
        if not ready and self._idle_started:
            self._idle_started = False
            idle.stop()

    def _run_after_io(self, check: pyuv.Check) -> None:
        after_io = self._after_io
        # Callbacks queued meanwhile run in this pass too; a bounded number of rounds, so one
        # that queues itself again and again cannot hold the loop (it runs next iteration).
        for _ in range(_AFTER_IO_ROUNDS):
            if not after_io:
                break
            self._run_queued(after_io, "call_after_io")
        if not after_io and self._check_started:
            self._check_started = False
            check.stop()
            self._nudge.stop()  # before the next poll: it may block again

    def __repr__(self) -> str:
        state = (
            "closed" if self._closed else "running" if self._running else "idle"
        )
        return f"<Reactor {state} loop={self._loop!r} owns_loop={self._owns_loop}>"
