"""The worker pool in an asyncio application (the standard loop or uvloop).

::

    async with open_pool(threads=2, process=crypt, joined=True, lanes=1) as pool:
        results = pool.open_circuit(state)        # one circuit, its results to await
        results.submit(0, cells)                  # = pool.submit(results.circuit, 0, cells)
        lane, out = await results.get()           # in order; or: async for lane, out in results
        results.close()

:func:`open_pool` attaches a :class:`workers.pool.WorkerPool` to the running loop: its reply
queue wakes the loop through an eventfd (``add_reader``) once per empty -> non-empty transition
(:mod:`reactor.aio`), and every ``on_result`` runs on the loop's thread, as on pyuv. Leaving the
``async with`` stops intake, waits (without blocking the loop) until every queued cell is
crypted and the workers have exited, and hands over the last replies; an exception or a
cancellation inside the block cancels the queued cells instead. :func:`attach` is the same
without the context manager (``await pool.aclose()`` at the end); ``WorkerPool.attach(loop,
...)`` is the bare pool with your own callbacks.

Thread rules: everything here is loop thread only (the thread running the loop), checked where
the reply queue is made and closed; worker threads reach the loop only through the queue.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from workers.circuit import CircuitClosedError
from workers.embedded import EmbeddedPool, LaneResult, ResultBuffer

__all__ = ["AsyncioPool", "CircuitResults", "attach", "open_pool"]


class CircuitResults(ResultBuffer):
    """One circuit's results to await, in delivery order. Loop thread only.

    ``await get()`` returns ``(lane, result)``; it raises the worker's exception if the
    circuit failed (after the results delivered before it), and ``CircuitClosedError`` once the
    circuit is closed and everything delivered has been taken. ``async for lane, result in
    results`` stops there instead. One task waits at a time.
    """

    def __init__(self, owner: EmbeddedPool) -> None:
        """Empty; made by :meth:`AsyncioPool.open_circuit`."""
        super().__init__(owner)
        self._waiter: asyncio.Future[None] | None = None

    async def get(self) -> LaneResult:
        """The next ``(lane, result)``, waiting for it if needed. Loop thread only."""
        while True:
            item = self.take()
            if item is not None:
                return item
            if self._waiter is not None:
                raise RuntimeError("another task is already waiting for this circuit's results")
            waiter = asyncio.get_running_loop().create_future()
            self._waiter = waiter
            try:
                await waiter
            finally:
                self._waiter = None

    def __aiter__(self) -> AsyncIterator[LaneResult]:
        """Iterate until the circuit is closed (a worker's exception is raised). Loop thread."""
        return self

    async def __anext__(self) -> LaneResult:
        """The next result; ``StopAsyncIteration`` once the circuit is closed. Loop thread."""
        try:
            return await self.get()
        except CircuitClosedError:
            raise StopAsyncIteration from None

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class AsyncioPool(EmbeddedPool):
    """A started pool whose replies arrive on an asyncio loop. Loop thread only.

    ``open_circuit(state, **options) -> CircuitResults``; ``pool`` (the WorkerPool), ``replies``
    (its ReplyQueue), ``submit``/``submit_many`` (the pool's), ``close_circuit``, ``stats()``,
    ``await aclose(drain=True)``.
    """

    results_class = CircuitResults

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop | None = None,
        *,
        max_batch: int | None = None,
        **options: Any,
    ) -> None:
        """Attach to ``loop`` (default: the running loop) and start the workers. Loop thread
        only (the thread running ``loop``; checked)."""
        self.loop = loop if loop is not None else asyncio.get_running_loop()
        super().__init__(self.loop, max_batch=max_batch, **options)

    def open_circuit(self, state: Any, **options: Any) -> CircuitResults:
        """A new circuit and its results (``results.circuit``). Loop thread only."""
        results: CircuitResults = super().open_circuit(state, **options)
        return results

    async def aclose(self, drain: bool = True) -> None:
        """Stop intake; crypt (``drain``) or cancel what is queued; await the last delivery
        without blocking the loop; join the workers; end every circuit's results.

        Loop thread only. The workers are joined by a helper thread (``asyncio.to_thread``)
        while the loop goes on delivering replies. If this is cancelled while it waits, what is
        still queued is cancelled and the workers are joined before the cancellation
        propagates (at most one batch per worker is still running then). Idempotent.
        """
        if self.closed:
            return
        done = False
        try:
            self._begin_close(drain)
            done = await asyncio.to_thread(self.pool.wait_for_workers)
        finally:
            self._finish_close(workers_done=done)


def attach(
    loop: asyncio.AbstractEventLoop | None = None,
    *,
    max_batch: int | None = None,
    **options: Any,
) -> AsyncioPool:
    """An :class:`AsyncioPool` on ``loop`` (default: the running loop), started. Loop thread
    only. ``options``: those of :class:`workers.pool.WorkerPool`; ``max_batch``: the reply
    queue's (replies handled per loop callback)."""
    return AsyncioPool(loop, max_batch=max_batch, **options)


@asynccontextmanager
async def open_pool(*, max_batch: int | None = None, **options: Any) -> AsyncIterator[AsyncioPool]:
    """``async with open_pool(...) as pool``: a pool on the running loop, drained and closed on
    exit (cancelled instead if the block raised). Loop thread only."""
    pool = AsyncioPool(max_batch=max_batch, **options)
    try:
        yield pool
    except BaseException:
        await pool.aclose(drain=False)
        raise
    await pool.aclose(drain=True)
