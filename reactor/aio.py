"""The ReplyQueue's waker on an asyncio event loop (the standard one, or uvloop's).

:class:`AsyncioWaker` wakes the loop through a descriptor the loop watches: an eventfd (Linux;
a non-blocking pipe elsewhere) registered with ``loop.add_reader``. A producer's
empty -> non-empty transition writes to it (one syscall); the loop's reader callback reads the
counter back and runs the queue's callback. The queue sends only on such a transition, so this
happens once per batch of items, not once per item.

It was measured against the obvious alternative, ``loop.call_soon_threadsafe(callback)`` once
per transition (:class:`CallSoonThreadsafeWaker`, still used for loops without ``add_reader``,
such as Windows' proactor loop). Isolated wake-up p50 on this project's 2-core machine, three
runs of ``python -m examples.wakeup_latency -n 20000 --rounds 10`` while other work shared the
machine (``docs/embedding.md`` has the tables): standard loop 9.6 / 9.9 / 6.8 us with the
eventfd against 10.8 / 11.3 / 7.3 us with ``call_soon_threadsafe`` (the loop's own per-item
``call_soon_threadsafe``: 9.4 / 10.0 / 6.5 us); uvloop 7.0 / 7.2 / 5.9 us against
13.9 / 15.5 / 13.1 us (uvloop's own: 7.3 / 13.1 / 9.6 us). ``call_soon_threadsafe`` pays for
a ``Handle``, the ready queue and, on the standard loop, a self-pipe write plus a read callback
of its own; the eventfd's reader callback is the wake-up itself.

Closing: a producer that saw the queue open may still be about to write when the loop thread
closes the waker; writing into a descriptor number the process has meanwhile reused would
corrupt an unrelated file. So ``send`` and ``close`` take the waker's own lock: a send after
close does nothing (the queue's ``close()`` has handed its item over already). The lock is taken
once per transition, never per item.

Thread rule: the loop thread is the thread running the loop (``asyncio`` records it as the
running loop of that thread), or, while the loop is not running, the thread that last ran it
or made this waker. A loop that is closed (or stopped) never reads the descriptor: items then
wait in the queue for its ``close()``, which the owner calls on that thread.
"""

from __future__ import annotations

import asyncio
import functools
import os
import threading
from collections.abc import Callable

__all__ = ["AsyncioWaker", "CallSoonThreadsafeWaker", "asyncio_waker", "check_asyncio_thread"]


def check_asyncio_thread(loop: asyncio.AbstractEventLoop, last_thread: int, what: str) -> int:
    """Raise ``RuntimeError`` unless the caller is ``loop``'s thread; return that thread's id.

    Any thread. ``last_thread``: the thread that last ran the loop (or made the caller's
    object), used while the loop is not running.
    """
    running = asyncio._get_running_loop()
    me = threading.get_ident()
    if running is loop:
        return me
    if running is None and not loop.is_running() and me == last_thread:
        return me
    raise RuntimeError(
        f"{what} may only be called on the loop thread of {loop!r} (the thread running it, "
        "or while it does not run, the one that last ran it), but was called from "
        f"{threading.current_thread().name!r}; from other threads use "
        "loop.call_soon_threadsafe() or a ReplyQueue"
    )


def _wake_descriptors() -> tuple[int, int]:
    """(read end, write end): one eventfd for both where there is one, else a pipe."""
    if hasattr(os, "eventfd"):
        fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        return fd, fd
    read_end, write_end = os.pipe()
    for fd in (read_end, write_end):
        os.set_blocking(fd, False)
    return read_end, write_end


class AsyncioWaker:
    """An eventfd (or pipe) watched with ``loop.add_reader``. See the module docstring."""

    closed_errors: tuple[type[BaseException], ...] = ()  # send() after close() does nothing

    def __init__(self, loop: asyncio.AbstractEventLoop, callback: Callable[[], object]) -> None:
        """Register the descriptor with ``loop``. Loop thread only (the thread running
        ``loop``, or any thread while it does not run: that thread then is the loop thread).
        Raises ``NotImplementedError`` for a loop without ``add_reader``."""
        self._thread = check_asyncio_thread(loop, threading.get_ident(), "ReplyQueue()")
        self._loop = loop
        self._callback = callback
        self._read_fd, self._write_fd = _wake_descriptors()
        self._eventfd = self._read_fd == self._write_fd
        try:
            loop.add_reader(self._read_fd, self._readable)
        except BaseException:
            self._close_descriptors()
            raise
        self._lock = threading.Lock()  # send() against close(): see the module docstring
        self.ref = False  # asyncio counts no handles: kept for the Waker interface only

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The loop this waker wakes. Any thread."""
        return self._loop

    def send(self) -> None:
        """Write one wake-up. Any thread; does nothing once closed."""
        with self._lock:
            if self._write_fd < 0:
                return
            try:
                if self._eventfd:
                    os.eventfd_write(self._write_fd, 1)
                else:
                    os.write(self._write_fd, b"\0")
            except BlockingIOError:
                pass  # a full pipe: wake-ups are already waiting to be read

    def _readable(self) -> None:
        """The loop's reader callback: consume the wake-ups, run the callback. Loop thread."""
        try:
            if self._eventfd:
                os.eventfd_read(self._read_fd)
            else:
                os.read(self._read_fd, 4096)
        except (BlockingIOError, OSError):
            return  # nothing to read (already consumed), or closed meanwhile
        self._callback()

    def send_from_loop(self) -> None:
        """``loop.call_soon(callback)``: no syscall needed on the loop's own thread. Loop
        thread only."""
        if self._write_fd >= 0:
            self._loop.call_soon(self._callback)

    def check_loop_thread(self, what: str) -> None:
        """Raise ``RuntimeError`` naming ``what`` unless on the loop's thread. Any thread."""
        self._thread = check_asyncio_thread(self._loop, self._thread, what)

    def close(self) -> None:
        """Stop watching and close the descriptor(s). Loop thread only. Idempotent."""
        if self._write_fd < 0:
            return
        if not self._loop.is_closed():
            self._loop.remove_reader(self._read_fd)
        with self._lock:
            self._close_descriptors()

    def _close_descriptors(self) -> None:
        for fd in {self._read_fd, self._write_fd}:
            if fd >= 0:
                os.close(fd)
        self._read_fd = self._write_fd = -1


class CallSoonThreadsafeWaker:
    """``loop.call_soon_threadsafe(callback)`` per send: the fallback for loops without
    ``add_reader``, and the alternative measured against :class:`AsyncioWaker`.

    ``send`` raises ``RuntimeError`` once the loop is closed (the queue ignores it); a send
    after the waker's close only runs a callback that finds nothing.
    """

    closed_errors: tuple[type[BaseException], ...] = (RuntimeError,)

    def __init__(self, loop: asyncio.AbstractEventLoop, callback: Callable[[], object]) -> None:
        """Bind ``callback`` to ``loop``. Loop thread only (as :class:`AsyncioWaker`)."""
        self._thread = check_asyncio_thread(loop, threading.get_ident(), "ReplyQueue()")
        self._loop = loop
        self._callback = callback
        self._closed = False
        self.ref = False
        self.send: Callable[[], object] = functools.partial(
            loop.call_soon_threadsafe, callback
        )

    def send_from_loop(self) -> None:
        """``loop.call_soon(callback)``. Loop thread only."""
        if not self._closed:
            self._loop.call_soon(self._callback)

    def check_loop_thread(self, what: str) -> None:
        """Raise ``RuntimeError`` naming ``what`` unless on the loop's thread. Any thread."""
        self._thread = check_asyncio_thread(self._loop, self._thread, what)

    def close(self) -> None:
        """Nothing to release. Loop thread only."""
        self._closed = True


def asyncio_waker(
    loop: asyncio.AbstractEventLoop, callback: Callable[[], object]
) -> AsyncioWaker | CallSoonThreadsafeWaker:
    """The faster waker ``loop`` supports: :class:`AsyncioWaker`, or
    :class:`CallSoonThreadsafeWaker` where the loop has no ``add_reader``. Loop thread only."""
    try:
        return AsyncioWaker(loop, callback)
    except NotImplementedError:
        return CallSoonThreadsafeWaker(loop, callback)
