"""The cross-thread reply queue: worker threads hand results to the loop thread.

Design
------
One ``threading.Lock`` guards one Python list (the *shared list*), a closed flag and two
counters. A producer (any thread) appends under the lock and, while still holding it, looks
whether its append made the list go from empty to non-empty. Only that producer wakes the loop;
every other producer returns at once, because a wake-up for the items in front of it is already
on its way. So a burst of N puts costs one wake-up instead of N; ``put`` returns True exactly
for the producer that sent it.

The wake-up is the loop's own (a :class:`reactor.wakers.Waker`): a ``pyuv.Async`` on a
:class:`reactor.Reactor`, an eventfd watched with ``add_reader`` on an asyncio or uvloop loop
(:mod:`reactor.aio`), ``TrioToken.run_sync_soon`` in a trio run (:mod:`reactor.triowaker`).
Everything below is this one class whatever the loop; the first argument picks the waker
(:func:`reactor.wakers.make_waker`), and the waker defines which thread is the *loop thread*.

On the loop thread the wake-up callback takes the whole shared list in one step: under the lock
it swaps the list for a fresh empty one (O(1), no per-item pops under the lock), releases the
lock and calls ``handler(item)`` for each item outside it. Taking the list under the same lock
that producers test "was empty" under is what makes the wake-up impossible to lose (docs/design.md,
invariant 4): an item is either in the list the loop took, or it is in the new list and then
some producer found that new list empty and sent a wake-up after the swap. A wake-up whose items
an earlier callback already took finds an empty list and is counted (``empty_callbacks``).

``max_batch=n`` bounds the work done in one callback (so a flood of replies cannot starve the
loop's sockets). The callback then moves the swapped list into a loop-private *backlog*, handles
at most n items of it, and if any are left it wakes the loop itself before returning
(``Waker.send_from_loop``): the items in the backlog are no longer in the shared list, so no
producer will send for them. When the backlog runs out it also looks (under the lock) whether
the shared list has filled meanwhile and wakes if so: the producer that filled it did send, but
that wake-up may have been spent on a callback that served the backlog. The backlog is always
handled before the next shared list is taken, which keeps put order.

Order: every append happens under one lock, so the shared list is in a single global order that
extends each producer's own put order; the loop handles lists whole and in the order it took
them. Items from one producer thread are therefore handled in put order.

Errors: an exception from ``handler`` is logged and counted, and the remaining items are still
handled (the dispatch loop re-enters the same iterator after the failing item). It never reaches
the loop library, so it can never stop the loop (nor crash a trio run).

Reference counting (pyuv): the Async is created with ``ref = False``. An idle ReplyQueue
therefore never keeps ``pyuv.Loop.run()`` alive on its own: an application that drives the loop
itself sees ``run()`` return once its own handles are done, and ``Reactor.close()`` can finish
closing. ``Reactor.run()`` runs until ``Reactor.stop()`` regardless, so replies still arrive
while it runs. Set ``ref = True`` if you drive the loop yourself and want it kept alive while
work is in flight. asyncio and trio loops count no handles: there ``ref`` has no effect.

A loop that is not running: puts still append, and the one wake-up stays pending (pyuv,
asyncio) or is refused (a closed asyncio loop, a finished trio run; the queue ignores that
error). Nothing is handled until the loop runs again or ``close()`` is called.

Shutdown: ``close()`` (loop thread) marks the queue closed under the lock, handles every item that
was already put, then closes the waker. A ``put`` that did not raise is handled before ``close()``
returns; a ``put`` after that raises ``ReplyQueueClosedError``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Generic, Protocol, TypeVar

from reactor.wakers import LoopLike, make_waker

__all__ = ["ReplyQueue", "ReplyQueueClosedError", "ReplySink"]

logger = logging.getLogger("reactor.replyqueue")

T = TypeVar("T")
T_contra = TypeVar("T_contra", contravariant=True)


class ReplyQueueClosedError(RuntimeError):
    """``put`` was called on a ReplyQueue after ``close()`` (or after its Reactor closed)."""


class ReplySink(Protocol[T_contra]):
    """The interface the worker side codes against: ``ReplyQueue`` implements it."""

    def put(self, item: T_contra) -> bool:
        """Hand one item to the loop thread. Any thread."""
        ...

    def put_many(self, items: Iterable[T_contra]) -> bool:
        """Hand several items to the loop thread with one lock round. Any thread."""
        ...


class ReplyQueue(Generic[T]):
    """Items put from any thread, handled one by one by ``handler(item)`` on the loop thread.

    ``loop``: a ``reactor.Reactor``, an asyncio or uvloop event loop, or a trio
    ``TrioToken`` (see :func:`reactor.wakers.make_waker`). ``max_batch=None`` handles
    everything taken in one callback; ``max_batch=n`` handles at most n items per callback and
    continues in later callbacks without any further put.
    """

    def __init__(
        self,
        loop: LoopLike,
        handler: Callable[[T], object],
        *,
        max_batch: int | None = None,
    ) -> None:
        """Create the queue and its waker on ``loop``. Loop thread only (checked)."""
        if max_batch is not None and max_batch < 1:
            raise ValueError(f"max_batch must be None or >= 1, not {max_batch!r}")
        self._handler = handler
        self._max_batch = max_batch
        # --- shared state, read and written only under _lock ---
        self._lock = threading.Lock()
        self._items: list[T] = []
        self._closed = False
        self._taken = 0  # items the loop has taken out of the shared list; puts = taken + len
        self._wakeups_sent = 0
        # --- loop-thread-only state ---
        self._backlog: list[T] = []
        self._backlog_pos = 0
        self._dispatching: Iterator[T] | None = None
        self._waker_closed = False
        self._callbacks = 0
        self._empty_callbacks = 0
        self._self_wakeups = 0
        self._items_handled = 0
        self._handler_errors = 0
        self._largest_batch = 0
        # Checks the loop thread before it creates anything (a pyuv Async must be made there).
        self._waker = make_waker(loop, self._on_wakeup, self)
        # put()'s hot path reads these two attributes, never the waker object.
        self._wake = self._waker.send
        self._wake_closed_errors = self._waker.closed_errors

    # ------------------------------------------------------------------ producers (any thread)

    def put(self, item: T) -> bool:
        """Append one item; return True exactly when it found the queue empty and woke the loop.

        Any thread. Raises ``ReplyQueueClosedError`` after ``close()``.
        """
        # acquire/try/finally rather than `with`: a third cheaper per put (no __enter__ and
        # __exit__ lookups), and put() is the workers' hot path.
        lock = self._lock
        lock.acquire()
        try:
            if self._closed:
                raise ReplyQueueClosedError("ReplyQueue.put() after close()")
            items = self._items
            if items:
                # Not empty before us: the producer that made it non-empty sends (or has sent)
                # the wake-up after its append, and the loop can only take the list under this
                # lock, all of it, so it will take ours too. Nothing to send.
                items.append(item)
                return False
            items.append(item)
            self._wakeups_sent += 1
        finally:
            lock.release()
        # Inlined _send_outside_lock() (see there for why the send cannot be lost or fail
        # harmfully): stamp-to-send is on the isolated wake-up latency path.
        try:
            self._wake()
        except self._wake_closed_errors:
            pass
        return True

    def put_many(self, items: Iterable[T]) -> bool:
        """Append several items under one lock round, in order; same return value as ``put``.

        Any thread. Pass a list or tuple: the iterable is consumed while the lock is held.
        """
        with self._lock:
            if self._closed:
                raise ReplyQueueClosedError("ReplyQueue.put_many() after close()")
            shared = self._items
            before = len(shared)
            shared.extend(items)
            if before != 0 or len(shared) == 0:
                # Same argument as in put(): a non-empty list already has a wake-up coming.
                return False
            self._wakeups_sent += 1
        self._send_outside_lock()
        return True

    def _send_outside_lock(self) -> None:
        """Wake the loop after an empty -> non-empty append. Any thread."""
        try:
            # Sent after releasing the lock so other producers do not queue behind a syscall.
            # The loop may swap the list before this send: then the callback this send causes
            # finds an empty list and returns (counted as empty_callbacks), nothing is lost.
            self._wake()
        except self._wake_closed_errors:
            # Either close() ran between our unlock and this send: we saw _closed False under
            # the lock and close() sets it under the lock before it takes what is left, so our
            # item was in what close() took and has been handled. Or the loop itself is gone
            # (a closed asyncio loop, a finished trio run): the item waits in the shared list
            # for close(), which the owner must call on the loop thread anyway.
            pass

    # ------------------------------------------------------------------ loop side

    def _on_wakeup(self) -> None:
        """The wake-up callback. Loop thread only (the waker's loop calls it there).

        The unbounded path is written out in one function: it is both the burst hot path and
        part of every isolated wake-up's latency.
        """
        self._callbacks += 1
        if self._max_batch is not None:
            self._on_wakeup_bounded(self._max_batch)
            return
        lock = self._lock
        lock.acquire()
        try:
            batch = self._items
            if batch:
                # Swap under the lock: from here on a put finds the new list empty and sends
                # again, so items put while we run the handler below get their own callback.
                self._items = []
                self._taken += len(batch)
        finally:
            lock.release()
        if not batch:
            # A coalesced or early wake-up whose items an earlier callback already took.
            self._empty_callbacks += 1
            return
        count = len(batch)
        self._items_handled += count
        if count > self._largest_batch:
            self._largest_batch = count
        handler = self._handler
        iterator = iter(batch)
        # Published so that close(), if the handler calls it, can finish this batch first.
        self._dispatching = iterator
        try:
            for item in iterator:
                handler(item)
        except Exception:
            self._handler_failed()
            self._drain(iterator)  # the rest of the batch, surviving further errors
        self._dispatching = None

    def _on_wakeup_bounded(self, max_batch: int) -> None:
        """Handle at most ``max_batch`` items, backlog first. Loop thread only."""
        backlog = self._backlog
        pos = self._backlog_pos
        if pos >= len(backlog):
            with self._lock:
                backlog = self._items
                if not backlog:
                    self._empty_callbacks += 1
                    return
                self._items = []  # as in _on_wakeup: later puts will send for themselves
                self._taken += len(backlog)
            pos = 0
        end = pos + max_batch
        batch = backlog[pos:end]
        if end >= len(backlog):
            self._backlog = []
            self._backlog_pos = 0
        else:
            self._backlog = backlog
            self._backlog_pos = end
        self._handle_batch(batch)
        if self._waker_closed:
            return  # close() was called by the handler and has handled everything
        more = bool(self._backlog)
        if not more:
            # The backlog is done, but the shared list may have filled meanwhile: its producer
            # found it empty and sent, and that wake-up may have been spent on a callback that
            # served the backlog instead. Nobody else will send for those items, so look.
            with self._lock:
                more = bool(self._items)
        if more:
            # Items remain (in the backlog, which left the shared list, or in the shared list
            # whose wake-up we consumed): we must send, or they would stall until a put that
            # may never come. A put that finds the shared list empty after our look sends
            # itself.
            self._self_wakeups += 1
            self._waker.send_from_loop()

    def _handle_batch(self, batch: list[T]) -> None:
        """Call the handler for every item of ``batch``, in order. Loop thread only."""
        count = len(batch)
        self._items_handled += count
        if count > self._largest_batch:
            self._largest_batch = count
        iterator = iter(batch)
        previous = self._dispatching
        # Published so that close(), if the handler calls it, can finish this batch first.
        self._dispatching = iterator
        self._drain(iterator)
        self._dispatching = previous

    def _drain(self, iterator: Iterator[T]) -> None:
        """Run the handler over the iterator, surviving handler exceptions. Loop thread only."""
        handler = self._handler
        while True:
            try:
                for item in iterator:
                    handler(item)
                return
            except Exception:
                # The iterator has already moved past the failing item: looping back into the
                # same `for` continues with the next one.
                self._handler_failed()

    def _handler_failed(self) -> None:
        """Count and log the exception being handled. Loop thread only."""
        self._handler_errors += 1
        logger.exception("ReplyQueue handler %r raised; continuing", self._handler)

    # ------------------------------------------------------------------ control

    @property
    def ref(self) -> bool:
        """Whether the waker keeps a pyuv ``Loop.run()`` alive (default False; no effect on
        asyncio or trio). Loop thread only."""
        return bool(self._waker.ref) if not self._waker_closed else False

    @ref.setter
    def ref(self, value: bool) -> None:
        self._waker.check_loop_thread("ReplyQueue.ref")
        if not self._waker_closed:
            self._waker.ref = value

    def check_loop_thread(self, what: str) -> None:
        """Raise ``RuntimeError`` naming ``what`` unless on this queue's loop thread. Any
        thread."""
        self._waker.check_loop_thread(what)

    @property
    def closed(self) -> bool:
        """True once ``close()`` has started. Any thread."""
        return self._closed

    def close(self) -> None:
        """Handle every item already put, then close the waker. Loop thread only. Idempotent.

        Guarantee: a ``put`` (or ``put_many``) that did not raise is handled before this
        returns. Safe to call from inside the handler: the rest of the current batch is handled
        first, then the backlog, then the shared list, so put order is kept.
        """
        self._waker.check_loop_thread("ReplyQueue.close()")
        with self._lock:
            if self._closed:
                return
            # Set under the lock: every put either appended before this point (and its item is
            # in `remaining`, taken in the same critical section) or sees _closed and raises.
            self._closed = True
            remaining = self._items
            self._items = []
            self._taken += len(remaining)
        if self._dispatching is not None:
            self._drain(self._dispatching)
        backlog = self._backlog[self._backlog_pos :]
        self._backlog = []
        self._backlog_pos = 0
        for batch in (backlog, remaining):
            if batch:
                self._handle_batch(batch)
        self._waker_closed = True
        self._waker.close()

    def _close_for_reactor(self) -> None:
        """Called by ``Reactor.close()``. Loop thread only."""
        self.close()

    def stats(self) -> dict[str, Any]:
        """A snapshot of the counters as a plain dict. Any thread.

        Keys: puts, wakeups_sent (wake-ups sent by producers: one per empty -> non-empty
        transition), callbacks (wake-up callbacks run), empty_callbacks, self_wakeups (wake-ups
        the loop sent itself for a max_batch backlog),
        items_handled, handler_errors, largest_batch, pending, closed. Off the loop thread the
        loop-side counters may lag by the callback running at that moment.
        """
        with self._lock:
            puts = self._taken + len(self._items)
            wakeups_sent = self._wakeups_sent
            shared_pending = len(self._items)
            closed = self._closed
        return {
            "puts": puts,
            "wakeups_sent": wakeups_sent,
            "callbacks": self._callbacks,
            "empty_callbacks": self._empty_callbacks,
            "self_wakeups": self._self_wakeups,
            "items_handled": self._items_handled,
            "handler_errors": self._handler_errors,
            "largest_batch": self._largest_batch,
            "pending": shared_pending + len(self._backlog) - self._backlog_pos,
            "closed": closed,
        }

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<ReplyQueue {state} handler={self._handler!r} max_batch={self._max_batch}>"
