"""The ReplyQueue's waker on an asyncio event loop (the standard one, or uvloop's).

``send`` is ``loop.call_soon_threadsafe(callback)``, bound once with ``functools.partial`` so a
producer's transition costs the loop's own thread-safe call and nothing more: on the standard
loop, one ``Handle`` appended to the ready deque and one byte written to the loop's self-pipe;
on uvloop, one ``uv_async_send``. The queue sends only on an empty -> non-empty transition, so
this happens once per batch of items, not once per item.

It was measured against the other way in: an eventfd registered with ``loop.add_reader``,
written (``os.eventfd_write``) on each transition and read back by the reader callback. On
this project's 2-core machine the two were within noise on the standard loop and
``call_soon_threadsafe`` was faster on uvloop (``docs/embedding.md`` has the figures and how
to rerun them: ``python -m examples.wakeup_latency --asyncio-wakers``). It also has no file
descriptor to close: a producer that races ``close()`` cannot write into a descriptor number the
process has meanwhile reused, which an eventfd waker would have to rule out with more locking.

Thread rule: the loop thread is the thread running the loop (``asyncio`` records it as the
running loop of that thread), or, while the loop is not running, the thread that last ran it
or made this waker. ``send`` raises ``RuntimeError`` once the loop is closed; the queue ignores
it (its ``close()`` hands every item already put to the handler).
"""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import Callable

__all__ = ["AsyncioWaker", "check_asyncio_thread"]


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


class AsyncioWaker:
    """``loop.call_soon_threadsafe(callback)`` per send. See the module docstring."""

    closed_errors: tuple[type[BaseException], ...] = (RuntimeError,)

    def __init__(self, loop: asyncio.AbstractEventLoop, callback: Callable[[], object]) -> None:
        """Bind ``callback`` to ``loop``. Loop thread only (the thread running ``loop``, or
        any thread while it does not run: that thread then counts as the loop thread)."""
        self._loop = loop
        self._thread = threading.get_ident()
        self.check_loop_thread("ReplyQueue()")
        self._callback = callback
        self._closed = False
        self.ref = False  # asyncio counts no handles: kept for the Waker interface only
        self.send: Callable[[], object] = functools.partial(
            loop.call_soon_threadsafe, callback
        )

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The loop this waker wakes. Any thread."""
        return self._loop

    def send_from_loop(self) -> None:
        """``loop.call_soon(callback)``: no self-pipe write needed. Loop thread only."""
        if not self._closed:
            self._loop.call_soon(self._callback)

    def check_loop_thread(self, what: str) -> None:
        """Raise ``RuntimeError`` naming ``what`` unless on the loop's thread. Any thread."""
        self._thread = check_asyncio_thread(self._loop, self._thread, what)

    def close(self) -> None:
        """Nothing to release; later sends only run a callback that finds nothing. Loop
        thread only."""
        self._closed = True
