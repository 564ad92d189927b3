"""The ReplyQueue's waker in a trio run: ``TrioToken.run_sync_soon(callback)`` per send.

trio's only way into a run from another thread is its token: ``run_sync_soon`` appends the
call to the run's entry queue under a lock and writes one byte to the run's wake-up socket.
The queue sends only on an empty -> non-empty transition, so that is once per batch of items.
The callback runs as part of a trio system task, on the run's thread, outside any user task:
it must not raise (trio would turn that into ``TrioInternalError``), which the queue already
guarantees (handler exceptions are logged and counted there).

Thread rule: the loop thread is the thread running the ``trio.run`` the token belongs to, and
after that run has exited, the thread that ran it (where the application then calls
``close()``). ``send`` raises ``trio.RunFinishedError`` once the run has exited; the queue
ignores it, and trio guarantees that every call that did not raise is processed before
``trio.run`` returns.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable

import trio

__all__ = ["TrioWaker", "check_trio_thread"]


def check_trio_thread(token: trio.lowlevel.TrioToken, run_thread: int, what: str) -> None:
    """Raise ``RuntimeError`` unless the caller is in the run of ``token`` or, outside any
    run, on ``run_thread`` (the thread that ran it). Any thread."""
    try:
        current = trio.lowlevel.current_trio_token()
    except RuntimeError:
        current = None
    if current is token or (current is None and threading.get_ident() == run_thread):
        return
    raise RuntimeError(
        f"{what} may only be called on the loop thread: inside the trio run it belongs to "
        f"(thread id {run_thread}), or on that thread after the run; it was called from "
        f"{threading.current_thread().name!r}; from other threads use "
        "TrioToken.run_sync_soon() or a ReplyQueue"
    )


class TrioWaker:
    """``token.run_sync_soon(callback)`` per send. See the module docstring."""

    closed_errors: tuple[type[BaseException], ...] = (trio.RunFinishedError,)

    def __init__(self, token: trio.lowlevel.TrioToken, callback: Callable[[], object]) -> None:
        """Bind ``callback`` to the run of ``token``. Loop thread only (inside that run)."""
        self._token = token
        self._thread = threading.get_ident()
        try:
            inside = trio.lowlevel.current_trio_token() is token
        except RuntimeError:
            inside = False
        if not inside:
            raise RuntimeError(
                "ReplyQueue() on a trio token may only be called on the loop thread, inside "
                "the trio run it serves"
            )
        self._closed = False
        self.ref = False  # trio counts no handles: kept for the Waker interface only
        self.send: Callable[[], object] = functools.partial(token.run_sync_soon, callback)

    @property
    def token(self) -> trio.lowlevel.TrioToken:
        """The token of the run this waker wakes. Any thread."""
        return self._token

    def send_from_loop(self) -> None:
        """``run_sync_soon`` from the run's own thread. Loop thread only."""
        if not self._closed:
            self.send()

    def check_loop_thread(self, what: str) -> None:
        """Raise ``RuntimeError`` naming ``what`` unless in this run (or, after it, on the
        thread that ran it). Any thread."""
        check_trio_thread(self._token, self._thread, what)

    def close(self) -> None:
        """Nothing to release; later sends only run a callback that finds nothing. Loop
        thread only."""
        self._closed = True
