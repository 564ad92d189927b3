"""The worker pool in a trio application.

::

    async with open_pool(threads=2, process=crypt, joined=True, lanes=1) as pool:
        results = pool.open_circuit(state)        # one circuit, its results to await
        results.submit(0, cells)                  # = pool.submit(results.circuit, 0, cells)
        lane, out = await results.get()           # in order; or: async for lane, out in results
        results.close()

:func:`open_pool` attaches a :class:`workers.pool.WorkerPool` to the current trio run: its reply
queue wakes the run with ``TrioToken.run_sync_soon`` once per empty -> non-empty transition
(:mod:`reactor.triowaker`), and every ``on_result`` runs on the run's thread (inside trio's
system task for such calls: it must not block, and may wake tasks but not await). Leaving the
``async with`` stops intake, waits (the run keeps going) until every queued cell is crypted
and the workers have exited, hands over the last replies; an exception or a cancellation inside
the block cancels the queued cells instead (the join then waits for at most one running batch
per worker, shielded, so no thread outlives the block).

Thread rules: everything here is loop thread only (inside the trio run), checked where the
reply queue is made and closed; worker threads reach the run only through the queue.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio

from workers.circuit import CircuitClosedError
from workers.embedded import EmbeddedPool, LaneResult, ResultBuffer

__all__ = ["CircuitResults", "TrioPool", "open_pool"]


class CircuitResults(ResultBuffer):
    """One circuit's results to await, in delivery order. Loop thread only (in the run).

    ``await get()`` returns ``(lane, result)``; it raises the worker's exception if the
    circuit failed (after the results delivered before it), and ``CircuitClosedError`` once the
    circuit is closed and everything delivered has been taken. ``async for lane, result in
    results`` stops there instead. Every ``get()`` is a trio checkpoint. One task waits at a
    time.
    """

    def __init__(self, owner: EmbeddedPool) -> None:
        """Empty; made by :meth:`TrioPool.open_circuit`."""
        super().__init__(owner)
        self._lot = trio.lowlevel.ParkingLot()

    async def get(self) -> LaneResult:
        """The next ``(lane, result)``, waiting for it if needed. Loop thread only."""
        await trio.lowlevel.checkpoint_if_cancelled()
        item = self.take()
        if item is not None:
            await trio.lowlevel.cancel_shielded_checkpoint()
            return item
        if self._lot.statistics().tasks_waiting:
            raise RuntimeError("another task is already waiting for this circuit's results")
        while item is None:
            await self._lot.park()
            item = self.take()
        return item

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
        self._lot.unpark_all()


class TrioPool(EmbeddedPool):
    """A started pool whose replies arrive in a trio run. Loop thread only (in the run).

    ``open_circuit(state, **options) -> CircuitResults``; ``pool`` (the WorkerPool), ``replies``
    (its ReplyQueue), ``submit``/``submit_many`` (the pool's), ``close_circuit``, ``stats()``,
    ``await aclose(drain=True)``.
    """

    results_class = CircuitResults

    def __init__(self, *, max_batch: int | None = None, **options: Any) -> None:
        """Attach to the current trio run and start the workers. Loop thread only (in the run:
        checked)."""
        self.token = trio.lowlevel.current_trio_token()
        super().__init__(self.token, max_batch=max_batch, **options)

    def open_circuit(self, state: Any, **options: Any) -> CircuitResults:
        """A new circuit and its results (``results.circuit``). Loop thread only."""
        results: CircuitResults = super().open_circuit(state, **options)
        return results

    async def aclose(self, drain: bool = True) -> None:
        """Stop intake; crypt (``drain``) or cancel what is queued; wait for the workers to exit
        (joined by ``trio.to_thread``, while the run goes on delivering replies); hand over the
        last replies; end every circuit's results.

        Loop thread only. If this is cancelled while it waits, what is still queued is
        cancelled and the workers are joined before the cancellation propagates. Idempotent.
        """
        if self.closed:
            return
        done = False
        try:
            self._begin_close(drain)
            done = await trio.to_thread.run_sync(self.pool.wait_for_workers,
                                                 abandon_on_cancel=True)
        finally:
            self._finish_close(workers_done=done)


@asynccontextmanager
async def open_pool(*, max_batch: int | None = None, **options: Any) -> AsyncIterator[TrioPool]:
    """``async with open_pool(...) as pool``: a pool in the current run, drained and closed on
    exit (cancelled instead if the block raised). Loop thread only (in the run)."""
    pool = TrioPool(max_batch=max_batch, **options)
    try:
        yield pool
    except BaseException:
        with trio.CancelScope(shield=True):
            await pool.aclose(drain=False)
        raise
    await pool.aclose(drain=True)
