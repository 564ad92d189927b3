"""Wakers: the one thing a ``ReplyQueue`` needs from an event loop, one kind per loop library.

A :class:`reactor.ReplyQueue` holds the queue logic once (the lock, the shared list, the
empty -> non-empty test, take-all, ``max_batch`` with its self-wake, close). What differs
between pyuv, asyncio, uvloop and trio is only how a producer thread makes the loop thread
call the queue's callback soon, and which thread is the loop thread. A :class:`Waker` is that:

``send``
    Any thread. A plain callable (a bound method or a ``functools.partial`` of the loop's own
    thread-safe call, so that ``put`` pays no extra Python frame): after it returns, the loop
    thread will call the queue's callback at least once, unless the loop is gone for good.
    Several sends before the callback runs may be coalesced into one call (pyuv's Async does
    this) or not (asyncio and trio run one call per send); the queue treats a callback that
    finds nothing as harmless and counts it. Once the waker or its loop is closed, ``send``
    raises one of ``closed_errors`` or does nothing; the queue ignores those errors, because
    its own ``close()`` hands every item already put to the handler.
``send_from_loop``
    Loop thread only: the same promise, for the queue's own self-wake when ``max_batch`` left
    items behind; a loop may have a cheaper same-thread call (asyncio's ``call_soon``).
``check_loop_thread(what)``
    Any thread: raise ``RuntimeError`` naming ``what`` unless called on the loop thread.
``close()``
    Loop thread only; idempotent. Releases what the waker holds (pyuv's Async handle).
``ref``
    Whether the waker keeps the loop running on its own (pyuv handles only; asyncio and trio
    loops do not count handles, so there it is a plain flag with no effect).

The loop thread is, for pyuv, the Reactor's (:mod:`reactor.loop`); for an asyncio or uvloop
loop, the thread running it, or while it does not run, the thread that last ran it (or made
the waker); for trio, the thread running that ``trio.run``, and after the run, the thread that
ran it. :func:`make_waker` picks the kind from the loop object it is given, importing asyncio
or trio support only when such a loop is passed.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, Protocol

import pyuv

__all__ = ["LoopLike", "PyuvWaker", "Waker", "WakerOwner", "WakerSource", "make_waker"]

#: Anything :func:`make_waker` accepts: a ``reactor.Reactor``, an asyncio (or uvloop) event
#: loop, a ``trio.lowlevel.TrioToken``, or any object with ``make_waker(callback, owner)``.
LoopLike = Any


class WakerOwner(Protocol):
    """What owns a waker (a ReplyQueue): a Reactor closes it on ``Reactor.close()``."""

    def _close_for_reactor(self) -> None: ...


class Waker(Protocol):
    """One loop kind's wake-up. See the module docstring for each member's thread rule."""

    send: Callable[[], object]
    closed_errors: tuple[type[BaseException], ...]
    ref: bool

    def send_from_loop(self) -> None:
        """Have the loop call the callback soon. Loop thread only."""

    def check_loop_thread(self, what: str) -> None:
        """Raise ``RuntimeError`` naming ``what`` unless on the loop thread. Any thread."""

    def close(self) -> None:
        """Release the wake-up's resources. Loop thread only. Idempotent."""


class WakerSource(Protocol):
    """A loop object that builds its own wakers (``reactor.Reactor`` does)."""

    def make_waker(self, callback: Callable[[], object], owner: WakerOwner) -> Waker:
        """A waker that calls ``callback()`` on this loop's thread. Loop thread only."""
        ...


class PyuvWaker:
    """A ``pyuv.Async`` on a Reactor's loop: libuv coalesces sends into one callback.

    Made by ``Reactor.make_waker``, which checks the loop thread first. The Async is unref'd
    (an idle queue never keeps ``loop.run()`` alive; see ``reactor.replyqueue``).
    """

    closed_errors: tuple[type[BaseException], ...] = (pyuv.error.HandleClosedError,)

    def __init__(self, reactor: Any, callback: Callable[[], object], owner: WakerOwner) -> None:
        """Create the Async and register ``owner`` with the Reactor. Loop thread only."""
        self._reactor = reactor
        self._owner = owner
        self._closed = False
        self._async = pyuv.Async(reactor.loop, lambda handle: callback())
        self._async.ref = False
        # The bound method itself: put() calls it with no frame of ours in between. After
        # close() it raises HandleClosedError (pyuv checks under the GIL), never touches libuv.
        self.send: Callable[[], object] = self._async.send
        self.check_loop_thread = reactor.check_loop_thread
        reactor._register_resource(owner)

    def send_from_loop(self) -> None:
        """``Async.send`` from the loop thread. Loop thread only."""
        self._async.send()

    @property
    def ref(self) -> bool:
        """Whether the Async keeps ``Loop.run()`` alive. Loop thread only."""
        return bool(self._async.ref) if not self._closed else False

    @ref.setter
    def ref(self, value: bool) -> None:
        if not self._closed:
            self._async.ref = value

    def close(self) -> None:
        """Close the Async and unregister the owner. Loop thread only. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._reactor._close_handle(self._async)
        self._reactor._unregister_resource(self._owner)


def make_waker(loop: LoopLike, callback: Callable[[], object], owner: WakerOwner) -> Waker:
    """The waker for ``loop``'s kind that calls ``callback()`` on its thread. Loop thread only.

    ``loop``: a ``reactor.Reactor`` (or any :class:`WakerSource`), an asyncio or uvloop event
    loop, or a ``trio.lowlevel.TrioToken``. asyncio and trio support is imported only when
    such an object is passed, so a pyuv application never imports trio.
    """
    builder = getattr(loop, "make_waker", None)
    if builder is not None:
        return builder(callback, owner)
    asyncio = sys.modules.get("asyncio")
    if asyncio is not None and isinstance(loop, asyncio.AbstractEventLoop):
        from reactor.aio import asyncio_waker

        return asyncio_waker(loop, callback)
    trio = sys.modules.get("trio")
    if trio is not None and isinstance(loop, trio.lowlevel.TrioToken):
        from reactor.triowaker import TrioWaker

        return TrioWaker(loop, callback)
    raise TypeError(
        "a ReplyQueue needs a reactor.Reactor, an asyncio event loop or a trio TrioToken "
        f"(trio.lowlevel.current_trio_token()), not {loop!r}"
    )
