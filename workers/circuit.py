"""A circuit as the worker pool sees it: pending cells per lane, crypto state, flags.

One :class:`Circuit` is the unit of work of :class:`workers.pool.WorkerPool` (the email's
"circuits in need of getting some cells en/decrypted"). Its cells travel in ``lanes``: numbered,
independent FIFOs, each crypted in the order submitted (a relay uses three: cells moving
forward, cells moving backward, and cells it originates; what a lane means is the caller's).
It holds:

* ``pending``: one list per lane (the email's ``unencrypted_cell_queue_in/out``), used
  as a FIFO. Each entry is one *submitted item*, a pair ``(payload, cells)``: ``payload`` is
  either a joined buffer of ``cells`` cells (``bytes``, ``bytearray`` or ``memoryview``) or a
  list of cells. Who may touch it:

  - the loop thread appends at the end, and only while the circuit is open;
  - the worker that owns the circuit (``busy``) removes entries from the front, with one slice
    and one ``del`` of that prefix (each atomic under the GIL; an append in between lands past
    the prefix, so it is neither taken nor lost);
  - after ``closed`` is set, the owner if the circuit is busy, otherwise the closer, empties it.

  So the lists need no lock of their own: what makes the hand-over safe is the order "append,
  then take the pool lock to schedule" on the loop side against "take the pool lock to decide
  whether anything is left" on the worker side (``Scheduler._schedule_locked`` and
  ``Scheduler._release_locked`` in :mod:`workers.scheduler`). Lists rather than deques: an
  empty list costs 56 bytes, an empty deque 760, and an idle circuit should stay small.
* the crypto ``state`` and the ``process`` function applied to it, touched only by the worker
  that owns the circuit (invariant 2 of docs/design.md); optionally a ``group`` function, which
  crypts the batches of several circuits in one call (see :data:`GroupFn`), used by the
  worker that owns all of them;
* the flags ``queued`` (on a run queue), ``busy`` (owned by a worker), ``closed`` and
  ``failed``, plus the run-queue bookkeeping ``priority``, ``ticket`` and ``queued_class``:
  read and written only under the pool's lock (:mod:`workers.scheduler` lists everything it
  guards);
* the back-pressure counters ``in_flight`` and ``over_high_water``, and the callbacks: loop
  thread only (:mod:`workers.pressure`).

The class has no behaviour beyond holding these fields; every rule lives in the pool's modules
(:mod:`workers.scheduler`, :mod:`workers.worker`, :mod:`workers.pressure`) and in
:class:`workers.runqueues.RunQueues`. ``__slots__`` keeps an idle circuit small (the scaling
benchmark asks for at most 2 KB per idle circuit).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

#: ``process(state, lane, batch) -> result``: runs on a worker thread with the circuit owned.
ProcessFn = Callable[[Any, int, Any], Any]
#: ``group(jobs) -> results``: ``jobs`` is a list of ``(state, lane, pieces)``, one per batch,
#: ``pieces`` a list of bytes-like objects whose concatenation is the batch (the cells in
#: order). Returns one entry per job, in order: what ``process(state, lane, batch)`` would
#: return, or the exception instance it would raise. Runs on a worker thread that owns every
#: circuit of the jobs (one state may appear in several jobs: they run in list order).
GroupFn = Callable[[list[tuple[Any, int, Any]]], list[Any]]
#: ``on_result(circuit, lane, result)``: loop thread.
ResultFn = Callable[["Circuit", int, Any], None]
#: ``on_error(circuit, lane, exception)``: loop thread.
ErrorFn = Callable[["Circuit", int, BaseException], None]
#: ``on_pressure(circuit, over_high_water)``: loop thread.
CircuitPressureFn = Callable[["Circuit", bool], None]


class CircuitClosedError(RuntimeError):
    """Work was submitted to (or a change asked of) a circuit that was already closed."""


class Reply(NamedTuple):
    """What a worker puts on the reply queue: the outcome of one batch of one circuit.

    ``cells`` is the number of cells the batch held (the loop thread subtracts it from the
    in-flight counts). Exactly one of ``result`` and ``error`` is meaningful: ``error`` is the
    exception the process function raised, or None. A reply with ``circuit`` None is a pool
    control message (an update every worker has applied); ``result`` is then that
    :class:`workers.scheduler.Update`, whose ``on_applied`` the loop thread runs.
    """

    circuit: Circuit | None
    lane: int
    result: Any
    cells: int
    error: BaseException | None


class Circuit:
    """One circuit's pending cells, crypto state and scheduling flags.

    Created by ``WorkerPool.open_circuit`` (loop thread). Users read ``context``, ``priority``,
    ``closed`` and ``in_flight``; everything else belongs to the pool.
    """

    __slots__ = (
        "busy",
        "closed",
        "context",
        "failed",
        "group",
        "high_water",
        "in_flight",
        "joined",
        "low_water",
        "on_error",
        "on_pressure",
        "on_result",
        "over_high_water",
        "pending",
        "priority",
        "process",
        "queued",
        "queued_class",
        "state",
        "ticket",
    )

    def __init__(
        self,
        state: Any,
        process: ProcessFn,
        on_result: ResultFn,
        on_error: ErrorFn | None,
        on_pressure: CircuitPressureFn | None,
        *,
        lanes: int,
        priority: int,
        joined: bool,
        high_water: int,
        low_water: int,
        context: Any = None,
        group: GroupFn | None = None,
    ) -> None:
        """Build an idle circuit. Loop thread only (normally through ``open_circuit``)."""
        self.pending: tuple[list[tuple[Any, int]], ...] = tuple([] for _ in range(lanes))
        self.state = state
        self.process = process
        self.group = group
        self.joined = joined
        self.on_result = on_result
        self.on_error = on_error
        self.on_pressure = on_pressure
        self.context = context
        # Guarded by the pool lock.
        self.priority = priority
        self.queued = False
        self.busy = False
        self.closed = False
        self.failed = False
        self.ticket = 0
        self.queued_class = priority
        # Loop thread only.
        self.in_flight = 0
        self.over_high_water = False
        self.high_water = high_water
        self.low_water = low_water

    def has_pending(self) -> bool:
        """True when some lane holds cells. Any thread (a snapshot)."""
        for queue in self.pending:
            if queue:
                return True
        return False

    def drop_pending(self) -> int:
        """Empty every pending list; return how many cells they held.

        Only the thread the rules above allow: the owner of a closed busy circuit, or the loop
        thread once the circuit is neither busy nor schedulable (closed, failed, or taken off the
        run queues at shutdown).
        """
        cells = 0
        for pending in self.pending:
            for _, n in pending:
                cells += n
            pending.clear()
        return cells

    def __repr__(self) -> str:
        flags = [name for name in ("queued", "busy", "closed", "failed") if getattr(self, name)]
        return (
            f"<Circuit {self.context!r} class={self.priority} in_flight={self.in_flight}"
            f" {' '.join(flags) or 'idle'}>"
        )
