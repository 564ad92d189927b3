"""A WorkerPool inside an async application: the parts asyncio and trio share, no loop library.

:mod:`workers.on_asyncio` and :mod:`workers.on_trio` attach a :class:`~workers.pool.WorkerPool`
to a running asyncio loop or trio run (its reply queue wakes that loop: :mod:`reactor.wakers`)
and add what users of those libraries expect: an ``async with`` that drains and closes without
blocking the loop, and per-circuit results to ``await``. Everything that does not depend on
the library is here, once:

* :class:`ResultBuffer`: one circuit's results in delivery order (per lane, submission order),
  then its error or its end. The pool's callbacks fill it on the loop thread; a task takes from
  it. The subclasses add only how a task waits (an asyncio future, a trio parking lot).
* :class:`EmbeddedPool`: the pool, the buffers of the circuits it opened, and the shutdown
  sequence: stop intake, await a helper thread that joins the workers (they exit once their
  work is done or cancelled; the loop keeps delivering replies meanwhile), then ``close()``,
  which only joins threads that are already done and hands over the replies already put.

Buffered results are not counted by the pool's back-pressure (a delivered batch has left
``in_flight``): an application that submits faster than it takes results must bound that
itself, e.g. by awaiting results before submitting more.

Threads: everything here is loop thread only (the thread running the asyncio loop or the trio
run) except :meth:`EmbeddedPool.stats`, which any thread may call (counters, maybe stale); the
worker threads reach it only through the reply queue.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from workers.circuit import Circuit, CircuitClosedError
from workers.pool import WorkerPool

__all__ = ["EmbeddedPool", "ResultBuffer"]

#: One result as a task receives it: ``(lane, result)``.
LaneResult = tuple[int, Any]


class ResultBuffer:
    """One circuit's results for a task to take, in delivery order. Loop thread only.

    ``take()`` gives ``(lane, result)`` items in the order the pool delivered them (each lane in
    submission order); after the last one, the worker's exception if the circuit failed
    (raised once, then the circuit counts as closed), or ``CircuitClosedError`` once the
    circuit was closed. ``None`` means: nothing yet, wait for ``_wake()``.
    """

    def __init__(self, owner: EmbeddedPool) -> None:
        """An empty buffer; ``circuit`` is set by :meth:`EmbeddedPool.open_circuit`."""
        self._owner = owner
        self.circuit: Circuit | None = None
        self._items: deque[LaneResult] = deque()
        self._error: BaseException | None = None
        self._ended = False

    # ------------------------------------------------------------ the pool's callbacks

    def on_result(self, circuit: Circuit, lane: int, result: Any) -> None:
        """The pool delivered one batch's result. Loop thread only."""
        self._items.append((lane, result))
        self._wake()

    def on_error(self, circuit: Circuit, lane: int, exc: BaseException) -> None:
        """A worker's exception for this circuit: close it, report it after what came before.
        Loop thread only."""
        self._error = exc
        self._owner.close_circuit(circuit)

    def end(self) -> None:
        """No more results will come (the circuit or the pool was closed). Loop thread only."""
        if not self._ended:
            self._ended = True
            self._wake()

    # ------------------------------------------------------------ the consumer

    def submit(self, lane: int, cells: Any, count: int | None = None) -> bool:
        """``pool.submit(self.circuit, lane, cells, count)``. Loop thread only."""
        assert self.circuit is not None
        return self._owner.pool.submit(self.circuit, lane, cells, count)

    def close(self) -> None:
        """Close the circuit: queued cells are cancelled, results in flight discarded; what
        was already delivered can still be taken. Loop thread only. Idempotent."""
        if self.circuit is not None:
            self._owner.close_circuit(self.circuit)
        else:
            self.end()

    @property
    def buffered(self) -> int:
        """Results delivered and not yet taken. Loop thread only."""
        return len(self._items)

    @property
    def closed(self) -> bool:
        """True once no more results will be delivered. Loop thread only."""
        return self._ended

    def take(self) -> LaneResult | None:
        """The next result, or None if none is there yet; raises at the end. Loop thread only."""
        if self._items:
            return self._items.popleft()
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        if self._ended:
            raise CircuitClosedError(f"{self.circuit!r} is closed: no more results")
        return None

    def _wake(self) -> None:
        """Wake the task waiting in the subclass's ``get()``, if any. Loop thread only."""
        raise NotImplementedError


class EmbeddedPool:
    """A started :class:`WorkerPool` whose reply queue wakes an async loop, plus the result
    buffers of the circuits it opened. Loop thread only. Use the subclasses of
    :mod:`workers.on_asyncio` / :mod:`workers.on_trio`.

    ``pool``: the pool itself, for everything not wrapped here (``open_circuit`` with your own
    callbacks, ``set_priority``, ``stats``...). ``submit`` and ``submit_many`` are the pool's own
    bound methods (no extra call per submit).
    """

    #: The buffer class of this ecosystem (its ``get()`` awaits the loop's way).
    results_class: type[ResultBuffer] = ResultBuffer

    def __init__(self, loop: Any, *, max_batch: int | None = None, **options: Any) -> None:
        """Build a pool (``options``: those of :class:`WorkerPool`) whose reply queue wakes
        ``loop`` (an asyncio loop or a trio token), and start it. Loop thread only (checked).
        """
        from reactor.replyqueue import ReplyQueue  # the one interface workers/ takes from reactor/

        pool = WorkerPool(None, **options)
        self.replies: ReplyQueue[Any] = ReplyQueue(loop, pool.deliver, max_batch=max_batch)
        pool.set_replies(self.replies, owned=True)  # pool.close() closes it
        pool.start()
        self.pool = pool
        self.submit = pool.submit
        self.submit_many = pool.submit_many
        self._buffers: dict[Circuit, ResultBuffer] = {}
        self._closing = False
        self._closed = False

    @property
    def closed(self) -> bool:
        """True once the shutdown finished: workers joined, replies handed over. Loop thread."""
        return self._closed

    def open_circuit(self, state: Any, **options: Any) -> Any:
        """Open a circuit whose results go to a new results object, which is returned (its
        ``circuit`` attribute is the pool's circuit). Loop thread only.

        ``options`` are those of :meth:`WorkerPool.open_circuit` except ``on_result`` and
        ``on_error``, which the results object provides.
        """
        if self._closing:
            raise CircuitClosedError("the pool is closing: no new circuits")
        results = self.results_class(self)
        circuit = self.pool.open_circuit(
            state, on_result=results.on_result, on_error=results.on_error, **options
        )
        results.circuit = circuit
        self._buffers[circuit] = results
        return results

    def close_circuit(self, circuit: Circuit) -> None:
        """Close ``circuit`` and end its results (what was delivered stays takeable). Loop
        thread only. Idempotent."""
        self.pool.close_circuit(circuit)
        results = self._buffers.pop(circuit, None)
        if results is not None:
            results.end()

    def stats(self) -> dict[str, Any]:
        """The pool's counters plus ``replies`` (the reply queue's). Any thread."""
        stats = self.pool.stats()
        stats["replies"] = self.replies.stats()
        return stats

    def _begin_close(self, drain: bool) -> None:
        """Stop intake, draining or cancelling what is queued; the workers then exit on their
        own (the subclass awaits ``pool.wait_for_workers`` on a helper thread). Loop thread
        only."""
        self._closing = True
        self.pool.stop_intake(drain)

    def _finish_close(self, workers_done: bool) -> None:
        """Join the workers (first cancelling what is queued unless they are done), deliver
        the replies already put, end every circuit's results. Loop thread only."""
        self._closing = True
        if not workers_done:
            self.pool.stop_intake(drain=False)
        try:
            self.pool.close()
            self._closed = True
        finally:
            buffers, self._buffers = self._buffers, {}
            for results in buffers.values():
                results.end()
