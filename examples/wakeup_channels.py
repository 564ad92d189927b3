"""The wake-up mechanisms that ``examples.wakeup_latency`` compares, on four loop kinds.

Each mechanism carries an item from a worker thread to ``handle(item)`` on a loop thread and is
built by a factory ``(ctx, handle) -> Channel`` on that loop's thread. :func:`run_loop` makes a
loop of one kind, lets a ``setup(ctx)`` start things on its thread, runs it until ``ctx.stop()``
and then calls the cleanup ``setup`` returned, still on that thread.

pyuv (one :class:`reactor.Reactor`):

``replyqueue``   ours: ``ReplyQueue.put``, ``uv.Async.send`` on empty -> non-empty only;
``raw_async``    a locked deque (the same lean locking as ``put``), ``Async.send()`` per item;
``socketpair``   cpuworker style: locked deque plus one byte per item down a socketpair.

asyncio and uvloop (the same code, two loops):

``replyqueue_<loop>``             ours: ``ReplyQueue`` woken through an eventfd watched with
                                  ``loop.add_reader``, once per transition (:mod:`reactor.aio`);
``<loop>``                        the loop's own ``call_soon_threadsafe(handle, item)`` per item;
``replyqueue_<loop>_threadsafe``  ours, woken instead with ``call_soon_threadsafe`` once per
                                  transition (the alternative measured for :mod:`reactor.aio`).

trio:

``replyqueue_trio``   ours: ``ReplyQueue`` with ``TrioToken.run_sync_soon`` per transition;
``trio``              ``run_sync_soon(handle, item)`` per item.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyuv

from reactor import Reactor, ReplyQueue
from reactor.aio import CallSoonThreadsafeWaker

Post = Callable[[int], object]
Handle = Callable[[int], None]

#: The mechanisms of each loop kind, ours first.
LOOPS: dict[str, tuple[str, ...]] = {
    "pyuv": ("replyqueue", "raw_async", "socketpair"),
    "asyncio": ("replyqueue_asyncio", "asyncio", "replyqueue_asyncio_threadsafe"),
    "uvloop": ("replyqueue_uvloop", "uvloop", "replyqueue_uvloop_threadsafe"),
    "trio": ("replyqueue_trio", "trio"),
}


def available_loops() -> tuple[str, ...]:
    """The loop kinds importable here (uvloop and trio are optional). Any thread."""
    kinds = ["pyuv", "asyncio"]
    for optional in ("uvloop", "trio"):
        try:
            __import__(optional)
        except ImportError:
            continue
        kinds.append(optional)
    return tuple(kinds)


@dataclass
class LoopCtx:
    """One running loop, as the mechanisms and the recorders see it. Loop thread only."""

    kind: str
    loop: Any  # a Reactor, an asyncio loop, or a trio TrioToken
    call_soon: Callable[..., object]
    stop: Callable[[], object]


@dataclass
class Channel:
    """One mechanism set up on a loop: how to post, its counters, how to tear it down.

    ``signals`` counts what producers issued (Async sends, bytes written, thread-safe calls,
    the reply queue's own counter); ``passes`` returns -1 for mechanisms that run one loop
    callback per item by construction.
    """

    post: Post
    signals: Callable[[], int]  # wake-up signals issued by producers so far
    passes: Callable[[], int]  # loop-side passes so far
    close: Callable[[], None]


def run_loop(kind: str, setup: Callable[[LoopCtx], Callable[[], None]]) -> None:
    """Make a loop of ``kind``, run ``setup(ctx)`` on its thread, run the loop until
    ``ctx.stop()``, then the cleanup ``setup`` returned. Main thread (it runs the loop)."""
    if kind == "pyuv":
        reactor = Reactor()
        cleanup = setup(LoopCtx(kind, reactor, reactor.call_soon, reactor.stop))
        reactor.run()
        cleanup()
        reactor.close()
    elif kind in ("asyncio", "uvloop"):
        if kind == "uvloop":
            import uvloop

            loop = uvloop.new_event_loop()
        else:
            loop = asyncio.new_event_loop()
        cleanup = setup(LoopCtx(kind, loop, loop.call_soon, loop.stop))
        loop.run_forever()
        cleanup()
        loop.close()
    elif kind == "trio":
        import trio

        async def main() -> None:
            token = trio.lowlevel.current_trio_token()
            done = trio.Event()
            cleanup = setup(LoopCtx(kind, token, token.run_sync_soon, done.set))
            await done.wait()
            cleanup()

        trio.run(main)
    else:
        raise ValueError(f"unknown loop kind {kind!r}")


# --------------------------------------------------------------------------- ours, any loop


def replyqueue_channel(ctx: LoopCtx, handle: Handle) -> Channel:
    """Ours, with the loop's own waker. Loop thread."""
    queue: ReplyQueue[int] = ReplyQueue(ctx.loop, handle)
    return Channel(
        post=queue.put,
        signals=lambda: queue.stats()["wakeups_sent"],
        passes=lambda: queue.stats()["callbacks"],
        close=queue.close,
    )


class ThreadsafeCallWakers:
    """A waker source: ``ReplyQueue(ThreadsafeCallWakers(loop), handler)`` wakes ``loop`` with
    ``call_soon_threadsafe`` once per transition instead of the library's eventfd."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop

    def make_waker(self, callback: Callable[[], object], owner: object) -> Any:
        """Loop thread."""
        return CallSoonThreadsafeWaker(self.loop, callback)


def replyqueue_threadsafe_channel(ctx: LoopCtx, handle: Handle) -> Channel:
    """Ours, woken with ``call_soon_threadsafe``. Loop thread (asyncio or uvloop)."""
    queue: ReplyQueue[int] = ReplyQueue(ThreadsafeCallWakers(ctx.loop), handle)
    return Channel(
        post=queue.put,
        signals=lambda: queue.stats()["wakeups_sent"],
        passes=lambda: queue.stats()["callbacks"],
        close=queue.close,
    )


# --------------------------------------------------------------------------- native, per item


def call_soon_threadsafe_channel(ctx: LoopCtx, handle: Handle) -> Channel:
    """``loop.call_soon_threadsafe(handle, item)`` per item. Loop thread (asyncio, uvloop).

    Signals are counted where the producer issues them: each call writes the standard loop's
    self-pipe (uvloop: one ``uv_async_send``). Counted in ``post``, not by wrapping the loop,
    so the loop the other mechanisms share is not slowed down.
    """
    call_soon_threadsafe = ctx.loop.call_soon_threadsafe
    counts = {"sent": 0}

    def post(item: int) -> None:
        call_soon_threadsafe(handle, item)
        counts["sent"] += 1  # one producer thread: no lock needed for the count

    return Channel(post=post, signals=lambda: counts["sent"], passes=lambda: -1,
                   close=lambda: None)


def run_sync_soon_channel(ctx: LoopCtx, handle: Handle) -> Channel:
    """``token.run_sync_soon(handle, item)`` per item (each writes one byte to the run's
    wake-up socket). Loop thread (trio)."""
    run_sync_soon = ctx.loop.run_sync_soon
    counts = {"sent": 0}

    def post(item: int) -> None:
        run_sync_soon(handle, item)
        counts["sent"] += 1  # one producer thread: no lock needed for the count

    return Channel(post=post, signals=lambda: counts["sent"], passes=lambda: -1,
                   close=lambda: None)


# --------------------------------------------------------------------------- pyuv only


def raw_async_channel(ctx: LoopCtx, handle: Handle) -> Channel:
    """A locked deque, a whole-deque swap, and ``Async.send()`` per item. Loop thread."""
    lock = threading.Lock()
    acquire = lock.acquire
    release = lock.release
    box: list[deque[int]] = [deque()]
    counts = {"passes": 0, "sent": 0}

    def on_async(async_handle: pyuv.Async) -> None:
        counts["passes"] += 1
        with lock:
            items = box[0]
            box[0] = deque()
        for item in items:
            handle(item)

    wakeup = pyuv.Async(ctx.loop.loop, on_async)
    wakeup.ref = False
    send = wakeup.send

    def post(item: int) -> None:
        # The same lean locking as ReplyQueue.put, so that only the mechanism differs.
        acquire()
        try:
            box[0].append(item)
        finally:
            release()
        send()
        counts["sent"] += 1  # one producer thread: no lock needed for the count

    def close() -> None:
        on_async(wakeup)
        wakeup.close()

    return Channel(post=post, signals=lambda: counts["sent"], passes=lambda: counts["passes"],
                   close=close)


def socketpair_channel(ctx: LoopCtx, handle: Handle) -> Channel:
    """A locked deque plus one byte per item down a socketpair, polled. Loop thread."""
    loop_sock, worker_sock = socket.socketpair()
    loop_sock.setblocking(False)
    lock = threading.Lock()
    items: deque[int] = deque()
    counts = {"passes": 0, "sent": 0}

    def on_readable(poll: pyuv.Poll, events: int, error: int | None) -> None:
        counts["passes"] += 1
        try:
            tokens = len(loop_sock.recv(65536))
        except BlockingIOError:
            return
        with lock:
            batch = [items.popleft() for _ in range(tokens)]
        for item in batch:
            handle(item)

    poll = pyuv.Poll(ctx.loop.loop, loop_sock.fileno())
    poll.start(pyuv.UV_READABLE, on_readable)
    poll.ref = False
    send = worker_sock.send

    def post(item: int) -> None:
        with lock:
            items.append(item)
        counts["sent"] += send(b"\0")  # bytes written: one producer thread

    def close() -> None:
        poll.close()
        loop_sock.close()
        worker_sock.close()

    return Channel(post=post, signals=lambda: counts["sent"], passes=lambda: counts["passes"],
                   close=close)


CHANNELS: dict[str, Callable[[LoopCtx, Handle], Channel]] = {
    "replyqueue": replyqueue_channel,
    "raw_async": raw_async_channel,
    "socketpair": socketpair_channel,
    "replyqueue_asyncio": replyqueue_channel,
    "asyncio": call_soon_threadsafe_channel,
    "replyqueue_asyncio_threadsafe": replyqueue_threadsafe_channel,
    "replyqueue_uvloop": replyqueue_channel,
    "uvloop": call_soon_threadsafe_channel,
    "replyqueue_uvloop_threadsafe": replyqueue_threadsafe_channel,
    "replyqueue_trio": replyqueue_channel,
    "trio": run_sync_soon_channel,
}
