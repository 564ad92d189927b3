"""The worker pool: circuits on run queues, one Condition, a fixed set of worker threads.

The email's design, built with real thread synchronization: "stick circuits in need of getting
some cells en/decrypted on the work queue, and have the worker threads just encrypt cells from
them in-order", workers that pull work, and a reply queue that wakes the main thread only when it
goes from empty to non-empty.

:class:`WorkerPool` is the public face: the loop thread opens circuits, submits cells, changes
priorities, closes circuits and has each reply applied by :meth:`WorkerPool.deliver`. The rules
live in small modules, each with one lock discipline:

* :mod:`workers.pool` (here): the public API, configuration, ``deliver``, ``close``, stats;
  loop thread, except where a method says otherwise;
* :mod:`workers.scheduler`: the run queues, the circuits' flags, waiting workers, update
  inboxes and exit flags; everything under the pool lock, and nothing else takes it;
* :mod:`workers.worker`: the worker threads' loop (take a circuit or a group, crypt, reply,
  let go); worker threads, the lock taken only through the scheduler, once per turn;
* :mod:`workers.pressure`: in-flight counts, high/low-water signals, delivery counters; loop
  thread only, no lock;
* :mod:`workers.tuning`: SCHED_IDLE for some workers, malloc retention; OS settings, once;
* :mod:`workers.circuit` (a circuit's data and who may touch it), :mod:`workers.runqueues`
  (priority classes, under the pool lock) and :mod:`workers.batching` (counting, taking and
  joining batches, no lock).

Imports go one way: pool -> worker -> scheduler -> runqueues -> circuit, and pool -> pressure,
tuning, batching; nothing imports pool.

The shape
---------
The loop thread owns the circuits. ``submit(circuit, lane, cells)`` appends ONE entry (a
joined buffer of many cells, or a list of cells) to the circuit's pending list for that
lane and *schedules* the circuit: under the pool lock, if the circuit is neither queued nor
busy, it goes to the tail of its priority class in :class:`~workers.runqueues.RunQueues`, and
one idle worker is notified if any is waiting. A worker pops a circuit (marking it busy), takes
the pending entries of each lane up to ``batch_cells`` cells, joins them into one batch,
calls ``process(state, lane, batch)`` and puts ONE :class:`~workers.circuit.Reply` per
batch on ``replies`` (normally a ``reactor.ReplyQueue``, whose handler calls :meth:`deliver` on
the loop thread). Cells that arrived meanwhile are taken in the same turn while the cap allows;
then, under the lock, the worker lets the circuit go, re-queuing it at the tail if cells remain,
and pops its next circuit in the same critical section (one lock round per turn).

A circuit opened with a ``group`` function (:data:`workers.circuit.GroupFn`; the kernel's are
:func:`tor1.fast.relay_group` and :func:`~tor1.fast.origin_group`) is served
in a *grouped* turn: the worker pops it together with up to ``group_circuits - 1`` more
circuits in the same critical section (never more than its share, the queued circuits divided
by the workers, so that one worker does not take the others' work) and crypts all their
batches with ONE ``group`` call and one ``put_many`` (see :mod:`workers.worker`). Order and
exclusivity are those of single turns; a job's exception fails only its circuit.

The lost-cell race
------------------
Cells are appended *before* the pool lock is taken to schedule the circuit, and the owner
decides whether anything is left while holding it: docs/design.md, "The lost-cell race", has
the argument; the two sides are :meth:`WorkerPool.submit` / :meth:`WorkerPool.submit_many` here
and ``Scheduler._release_locked``.

The hot path
------------
Per-cell Python is what makes a pool slower than crypting inline (docs/tuning.md), so nothing
here runs per cell: ``submit`` costs one append and one lock round per call whatever the number
of cells, ``submit_many`` one lock round per call, a worker one lock round and one reply per
batch (grouped: one lock round, one GIL round trip and one ``put_many`` per group),
``deliver`` a few counter updates per reply. A lone ``bytes`` item reaches a
``joined=True`` process function without a copy.

Priorities, fairness, starvation
--------------------------------
See :mod:`workers.runqueues`: round-robin inside a class (one turn of at most ``batch_cells``
cells per lane, then back to the tail), and every 37th pop serves a less urgent class.

Back-pressure, counted on the loop thread only
----------------------------------------------
See :mod:`workers.pressure`: per circuit and pool-wide, crossing the high-water mark calls
``on_pressure(circuit, True)`` / ``on_pool_pressure(True)``, falling to the low-water mark
calls them with False, and ``submit`` returns False while a mark is exceeded. Nothing is ever
dropped.

Cancellation and errors
-----------------------
``close_circuit`` marks the circuit closed, drops it from its run queue (lazily, O(1)) and
cancels its pending cells (if a worker owns the circuit at that moment, the worker empties them
when it lets go, so the lists never have two consumers); results of a batch that was in flight
are discarded in ``deliver`` and counted. No callback ever runs for a closed circuit. Any
exception from ``process`` or ``group`` (any ``BaseException``) becomes a reply with ``error``
set for that circuit; the pool then crypts nothing more for it (its stream state is suspect)
and the owner's ``on_error`` closes it. The worker thread lives on, except after
``SystemExit`` or ``KeyboardInterrupt``, which stop the whole pool as they ask: the worker puts
the circuit's error reply, then stops intake and every worker (``Scheduler.abort``); the loop
thread, delivering that reply, cancels the queued work, so ``submitted == delivered + cancelled
+ discarded`` still holds, and ``close()`` joins the threads.

Per-worker state and updates (Tor's ``threadpool_queue_update``)
-----------------------------------------------------------------
``worker_state_factory(index)`` builds each worker's private state, available to the process
function through :meth:`worker_state`. ``update_workers(fn)`` hands every worker ``fn``, which
it applies as ``state = fn(state)`` before its next job; idle workers are woken to apply it.

The OS: scheduling and memory
-----------------------------
By default the workers beyond the CPUs minus one run in Linux's SCHED_IDLE class, so the loop
never waits for a worker's time slice (``low_priority_workers``; ``adaptive_idle`` moves one
back to normal priority while outside load starves it), and :meth:`start` asks glibc
to keep freed memory in its arenas (``malloc_retain``). Why, the measurements, and the cost
under outside CPU load: :mod:`workers.tuning`.

Shutdown
--------
``close(drain=True)`` stops intake and lets the workers crypt everything queued, each worker
exiting when it finds the run queues empty; ``close(drain=False)`` sets the exit flag, takes
every queued circuit off the run queues and cancels its cells. Either way ``notify_all`` wakes
every waiting worker, and because each worker re-checks the flags before every ``wait()``, a
notify that arrived while it was busy is not lost. Then every thread is joined.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from workers import tuning
from workers.batching import count_cells
from workers.circuit import (
    Circuit,
    CircuitClosedError,
    CircuitPressureFn,
    ErrorFn,
    GroupFn,
    ProcessFn,
    Reply,
    ResultFn,
)
from workers.pressure import Pressure
from workers.runqueues import DEFAULT_STARVATION_PERIOD
from workers.scheduler import Scheduler, Update
from workers.tuning import DEFAULT_MALLOC_RETAIN, MALLOC_MMAP_THRESHOLD, StarvationRecord
from workers.worker import SupportsPut, WorkerThreads, stops_pool

if TYPE_CHECKING:
    from reactor.wakers import LoopLike

__all__ = [
    "DEFAULT_BATCH_CELLS",
    "DEFAULT_CIRCUIT_HIGH_WATER",
    "DEFAULT_GROUP_CIRCUITS",
    "DEFAULT_MALLOC_RETAIN",
    "DEFAULT_POOL_HIGH_WATER",
    "MALLOC_MMAP_THRESHOLD",
    "PoolClosedError",
    "SupportsPut",
    "WorkerPool",
]

log = logging.getLogger(__name__)

#: Cells per lane per turn (per circuit of a grouped turn): each batch costs the loop one reply,
#: and a circuit's share of a turn stays short (docs/tuning.md has the measurements).
DEFAULT_BATCH_CELLS = 1024
#: Most circuits a worker pops in one lock round for one ``group`` call (grouped path only).
DEFAULT_GROUP_CIRCUITS = 16
DEFAULT_CIRCUIT_HIGH_WATER = 4096
DEFAULT_POOL_HIGH_WATER = 1 << 20


class PoolClosedError(RuntimeError):
    """The pool was closed: it takes no more work."""


def _no_result(circuit: Circuit, lane: int, result: Any) -> None:
    raise RuntimeError(f"{circuit!r} has no on_result callback")


class WorkerPool:
    """A fixed pool of worker threads crypting circuits' cells in order. See the module doc."""

    def __init__(
        self,
        replies: SupportsPut | None,
        *,
        threads: int | None = None,
        priorities: int = 3,
        lanes: int = 2,
        process: ProcessFn | None = None,
        joined: bool = False,
        group: GroupFn | None = None,
        group_circuits: int = DEFAULT_GROUP_CIRCUITS,
        batch_cells: int = DEFAULT_BATCH_CELLS,
        cell_size: int | None = None,
        worker_state_factory: Callable[[int], Any] | None = None,
        circuit_high_water: int = DEFAULT_CIRCUIT_HIGH_WATER,
        circuit_low_water: int | None = None,
        pool_high_water: int = DEFAULT_POOL_HIGH_WATER,
        pool_low_water: int | None = None,
        on_pool_pressure: Callable[[bool], None] | None = None,
        starvation_period: int = DEFAULT_STARVATION_PERIOD,
        malloc_retain: int | None = DEFAULT_MALLOC_RETAIN,
        low_priority_workers: int | None = None,
        adaptive_idle: bool = True,
        starvation: StarvationRecord | None = None,
        name: str = "relaycrypt-worker",
    ) -> None:
        """Configure the pool; no thread starts before :meth:`start`. Loop thread only.

        ``replies`` may be None only until :meth:`set_replies` (used by :meth:`attach`).
        ``process``/``joined``/``group`` are defaults for circuits that give none (``group`` only
        for circuits that also take the default ``process``). ``group_circuits`` caps the
        circuits of one ``group`` call. Low-water marks default to half the high-water marks.
        ``malloc_retain`` (bytes, or None to leave malloc alone) is applied process-wide by
        :meth:`start`: see "Memory handed across threads" in :mod:`workers.tuning`.
        ``low_priority_workers`` of the workers run at idle CPU priority; None: as many as the
        workers exceed the CPUs available minus one (see "The loop keeps its CPU" there);
        with ``adaptive_idle`` each leaves idle priority while other work starves it.
        ``starvation``: the record of starved turns this pool's workers share (default: the
        pool's own); pass one :class:`workers.tuning.StarvationRecord` to several pools to
        share it across them.
        """
        if priorities < 3:
            raise ValueError(f"priorities must be >= 3, got {priorities}")
        if lanes < 1 or batch_cells < 1 or group_circuits < 1 or (
            cell_size is not None and cell_size < 1
        ):
            raise ValueError("lanes, batch_cells, cell_size and group_circuits must be >= 1")
        threads = threads if threads is not None else max(2, os.cpu_count() or 2)
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        self._replies = replies
        self._owns_replies = False
        self._lanes = lanes
        self._process = process
        self._joined = joined
        self._group = group
        self._cell_size = cell_size
        self._default_priority = priorities // 2
        self._circuit_high = circuit_high_water
        self._circuit_low = (
            circuit_high_water // 2 if circuit_low_water is None else circuit_low_water
        )
        if self._circuit_low >= self._circuit_high:
            raise ValueError("low-water marks must be below their high-water marks")
        self._pressure = Pressure(
            pool_high_water,
            pool_high_water // 2 if pool_low_water is None else pool_low_water,
            on_pool_pressure,
        )
        self._malloc_retain = malloc_retain
        if low_priority_workers is None:
            low_priority_workers = tuning.default_low_priority_workers(threads)
        if not 0 <= low_priority_workers <= threads:
            raise ValueError(
                f"low_priority_workers must be in [0, threads], got {low_priority_workers}"
            )
        self._scheduler = Scheduler(threads, priorities, starvation_period, group_circuits)
        self._workers = WorkerThreads(
            self._scheduler,
            threads=threads,
            batch_cells=batch_cells,
            low_priority_workers=low_priority_workers,
            adaptive_idle=adaptive_idle,
            starvation=starvation,
            state_factory=worker_state_factory,
            name=name,
        )
        # Loop thread only.
        self._started = False
        self._closed = False
        self._stopped_by: BaseException | None = None

    # ----------------------------------------------------------------- set-up

    @classmethod
    def attach(
        cls, loop: LoopLike, *, max_batch: int | None = None, start: bool = True, **kwargs: Any
    ) -> WorkerPool:
        """Build a pool whose replies go through a new ``reactor.ReplyQueue`` to :meth:`deliver`.

        ``loop``: a ``reactor.Reactor`` (pyuv), a running asyncio or uvloop event loop, or a
        trio ``TrioToken`` (the queue's waker is picked from it: :mod:`reactor.wakers`);
        :meth:`deliver`, and so every ``on_result``, then runs on that loop's thread.
        Loop thread only (that loop's: checked). The pool owns the queue: :meth:`close` closes
        it after the workers are joined, which delivers every reply already put. For asyncio and
        trio applications, :mod:`workers.on_asyncio` and :mod:`workers.on_trio` wrap this in an
        ``async with`` and add awaitable results.
        """
        from reactor.replyqueue import ReplyQueue  # the one interface workers/ takes from reactor/

        pool = cls(None, **kwargs)
        pool.set_replies(ReplyQueue(loop, pool.deliver, max_batch=max_batch), owned=True)
        if start:
            pool.start()
        return pool

    def set_replies(self, replies: SupportsPut, *, owned: bool = False) -> None:
        """Set where replies go, before :meth:`start`. Loop thread only."""
        if self._started:
            raise RuntimeError("set_replies() must be called before start()")
        self._replies = replies
        self._owns_replies = owned

    def start(self) -> None:
        """Start the worker threads. Loop thread only; once."""
        if self._started:
            raise RuntimeError("WorkerPool.start() called twice")
        if self._scheduler.closing:
            raise PoolClosedError("the pool is closed")
        if self._replies is None:
            raise RuntimeError("the pool has no reply queue: pass one or call set_replies()")
        self._started = True
        if self._malloc_retain is not None:
            tuning.retain_freed_memory(self._malloc_retain)
        self._workers.start(self._replies)

    def __enter__(self) -> WorkerPool:
        """Start the pool if needed. Loop thread only."""
        if not self._started:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        """Close the pool, draining queued work. Loop thread only."""
        self.close()

    # ----------------------------------------------------------------- circuits

    def open_circuit(
        self,
        state: Any,
        *,
        on_result: ResultFn | None = None,
        on_error: ErrorFn | None = None,
        on_pressure: CircuitPressureFn | None = None,
        process: ProcessFn | None = None,
        joined: bool | None = None,
        group: GroupFn | None = None,
        priority: int | None = None,
        high_water: int | None = None,
        low_water: int | None = None,
        context: Any = None,
    ) -> Circuit:
        """Create a circuit whose batches run ``process(state, lane, batch)``.

        Loop thread only.
        ``on_result(circuit, lane, result)`` receives each batch's result on the loop thread
        in submission order per lane. ``on_error(circuit, lane, exc)`` receives a
        worker's exception (default: log it and close the circuit).
        ``group`` (see :data:`workers.circuit.GroupFn`) lets a worker crypt this circuit's
        batches together with other circuits' in one call; it must give exactly the results
        ``process`` would. A circuit that passes its own ``process`` is grouped only if it
        passes a ``group`` too; otherwise it inherits the pool's.
        """
        if process is None and group is None:
            group = self._group
        process = process if process is not None else self._process
        if process is None:
            raise ValueError("no process function: pass process= here or to WorkerPool()")
        if high_water is None:
            high, low = self._circuit_high, self._circuit_low
        else:
            high, low = high_water, high_water // 2
        if low_water is not None:
            low = low_water
        if low >= high:
            raise ValueError("low_water must be below high_water")
        priority = self._default_priority if priority is None else priority
        self._check_class(priority)
        return Circuit(
            state,
            process,
            on_result if on_result is not None else _no_result,
            on_error,
            on_pressure,
            lanes=self._lanes,
            priority=priority,
            joined=self._joined if joined is None else joined,
            high_water=high,
            low_water=low,
            context=context,
            group=group,
        )

    def submit(
        self, circuit: Circuit, lane: int, cells: Any, count: int | None = None
    ) -> bool:
        """Append cells (a joined buffer or a list) and schedule the circuit. Loop thread only.

        O(1) in the number of cells and circuits. Returns False when the circuit or the pool is
        above its high-water mark after this call (the cells are accepted all the same).
        """
        if self._scheduler.closing:
            raise PoolClosedError("the pool is closed: it takes no more work")
        n = self._append(circuit, lane, cells, count)
        if n == 0:
            return not (circuit.over_high_water or self._pressure.over_high_water)
        # Appended BEFORE the pool lock is taken to schedule: see "The lost-cell race" above.
        self._scheduler.schedule(circuit)
        return self._pressure.add(circuit, n)

    def submit_many(self, work: Iterable[tuple[Any, ...]]) -> bool:
        """Submit ``(circuit, lane, cells)`` or ``(circuit, lane, cells, count)`` entries (as
        :meth:`submit`'s arguments), taking the pool lock once.

        Loop thread only. If an entry is rejected (closed circuit, bad lane or size), the
        entries before it are accepted and scheduled, and the exception propagates. Returns False
        when some circuit or the pool is above its high-water mark afterwards.
        """
        if self._scheduler.closing:
            raise PoolClosedError("the pool is closed: it takes no more work")
        appended: list[Circuit] = []
        counts: list[int] = []
        below = True
        try:
            for entry in work:
                circuit = entry[0]
                n = self._append(circuit, entry[1], entry[2],
                                 entry[3] if len(entry) > 3 else None)
                if n:
                    appended.append(circuit)
                    counts.append(n)
        finally:
            # Whatever was appended is scheduled (after its append: "The lost-cell race"), even
            # if a later entry was rejected.
            if appended:
                self._scheduler.schedule_all(appended)
                below = self._pressure.add_many(appended, counts)
        return below

    def _append(self, circuit: Circuit, lane: int, cells: Any, count: int | None) -> int:
        """Validate, count and append one item to a pending list. Loop thread only.

        Returns its cell count (an empty item is not appended). The caller schedules.
        """
        if circuit.closed:
            raise CircuitClosedError(f"{circuit!r} is closed")
        if not 0 <= lane < self._lanes:
            raise ValueError(f"lane must be in [0, {self._lanes}), got {lane!r}")
        if count is None and cells.__class__ is bytes and self._cell_size:
            n, rest = divmod(len(cells), self._cell_size)  # the hot case, inlined
            if rest:
                n = count_cells(cells, None, self._cell_size)  # raises with the full message
        else:
            n = count_cells(cells, count, self._cell_size)
        if n:
            circuit.pending[lane].append((cells, n))
        return n

    def set_priority(self, circuit: Circuit, priority: int) -> None:
        """Move the circuit to priority class ``priority`` (0: most urgent). Loop thread only.
        O(1)."""
        self._check_class(priority)
        self._scheduler.move(circuit, priority)

    def close_circuit(self, circuit: Circuit) -> None:
        """Close the circuit: cancel its queued cells, discard results in flight. Loop thread only.

        Idempotent. O(pending entries of this circuit), never of all circuits. The cells it
        cancels are counted in ``stats()["cancelled"]``; results of batches already taken by a
        worker are discarded when they arrive (``stats()["discarded"]``).
        """
        if circuit.closed:
            return
        if not self._scheduler.close_circuit(circuit):
            # Closed and not busy: no worker can take it any more, so its lists are ours.
            self._pressure.cancelled += circuit.drop_pending()
        # else: the owner empties them when it lets go, counting them.
        self._pressure.closed(circuit)

    def _check_class(self, priority: int) -> None:
        if not 0 <= priority < self._scheduler.queues.classes:
            raise ValueError(
                f"priority class must be in [0, {self._scheduler.queues.classes}), got {priority}"
            )

    # ----------------------------------------------------------------- loop side

    def deliver(self, reply: Reply) -> None:
        """Apply one worker reply: the circuit's callback, counts, resume signals. Loop thread only.

        Pass this as the ``reactor.ReplyQueue`` handler (``attach`` does). Replies of closed
        circuits are discarded and counted; no callback ever runs for them.
        """
        circuit, lane, result, cells, error = reply
        pressure = self._pressure
        if circuit is None:
            self._deliver_update(result)
            return
        if circuit.closed:
            pressure.discarded += 1
            pressure.discarded_cells += cells
            return
        pressure.delivered_cells(circuit, cells)
        try:
            if error is None:
                circuit.on_result(circuit, lane, result)
            else:
                pressure.errors_delivered += 1
                if stops_pool(error) and self._stopped_by is None:
                    # The workers are stopping (Scheduler.abort): cancel what they set aside.
                    self._stopped_by = error
                    self._cancel(self._scheduler.take_abandoned())
                if circuit.on_error is not None:
                    circuit.on_error(circuit, lane, error)
                else:
                    log.error("closing %r after a worker error", circuit, exc_info=error)
                    self.close_circuit(circuit)
        finally:
            # Even if the callback raised (the ReplyQueue logs it), a resume is never missed.
            pressure.check_circuit_low_water(circuit)
            pressure.check_pool_low_water()

    @property
    def in_flight(self) -> int:
        """Cells submitted and not yet delivered or cancelled. Loop thread only."""
        return self._pressure.in_flight

    @property
    def over_high_water(self) -> bool:
        """True between the pool's high-water signal and its low-water signal. Loop thread only."""
        return self._pressure.over_high_water

    def _deliver_update(self, update: Update) -> None:
        """Run an update's acknowledgement callback. Loop thread only."""
        if update.on_applied is not None:
            update.on_applied(update.errors)

    # ----------------------------------------------------------------- workers

    def update_workers(
        self,
        fn: Callable[[Any], Any],
        on_applied: Callable[[list[BaseException]], None] | None = None,
    ) -> None:
        """Give every worker ``fn``; each sets ``state = fn(state)`` before its next job.

        Any thread.
        When every worker has applied it, ``on_applied(errors)`` runs on the loop thread through
        the reply queue (``errors``: exceptions ``fn`` raised; those workers kept their state).
        Updates given to a pool that is closed before a worker applied them are never applied.
        """
        if not self._started:
            raise RuntimeError("update_workers() needs a started pool")
        records = self._workers.records
        update = Update(fn, len(records), on_applied)
        if not self._scheduler.post_update(update, [w.inbox for w in records]):
            raise PoolClosedError("the pool is closed")

    def worker_state(self) -> Any:
        """The calling worker's private state. Worker thread only (e.g. inside ``process``)."""
        worker = self._workers.current()
        if worker is None:
            raise RuntimeError("worker_state() may only be called on one of this pool's workers")
        return worker.state

    # ----------------------------------------------------------------- shutdown

    def stop_intake(self, drain: bool = True) -> None:
        """Take no more work; crypt (``drain``) or cancel what is queued; join nothing.

        Loop thread only. Idempotent; ``drain=False`` after ``drain=True`` still cancels what
        is left. The first half of :meth:`close`, for an event loop that must not block: the
        workers finish on their own and exit, the loop awaits :meth:`wait_for_workers` run on a
        helper thread, then calls :meth:`close`, which joins threads that are already done.
        """
        scheduler = self._scheduler
        if scheduler.exit:
            return
        if scheduler.closing and drain:
            return
        self._cancel(scheduler.stop_intake(cancel=not drain or not self._started))

    def wait_for_workers(self, timeout: float | None = None) -> bool:
        """Block until every worker thread has exited (they do once :meth:`stop_intake` or
        :meth:`close` was called and their work is done or cancelled); True if all have.

        Any thread: it only joins threads, and is meant for a helper thread of an event loop
        that must not block (``asyncio.to_thread``, ``trio.to_thread.run_sync``).
        """
        if not self._started:
            return True
        return not self._workers.join(timeout)

    def close(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop intake, drain or cancel queued work, wake and join every worker. Loop thread only.

        ``drain=True`` crypts what is queued (a pool never started cancels it instead);
        ``drain=False`` cancels it, counted in ``stats()["cancelled"]``; batches already running
        finish either way. If draining exceeds ``timeout`` seconds, the rest is cancelled and
        the workers get another ``timeout`` to finish their current batch; a thread still alive
        then raises TimeoutError, and calling ``close()`` again later waits for it and finishes
        the job. Once every worker is joined, a reply queue made by :meth:`attach` is closed
        (which delivers the replies already put), and further calls do nothing.
        """
        if self._workers.current() is not None:
            raise RuntimeError("close() called from a worker thread would join itself")
        if self._closed:
            return
        scheduler = self._scheduler
        if not scheduler.closing:
            self.stop_intake(drain)
        alive = self._workers.join(timeout)
        if alive and not scheduler.exit:
            self._cancel(scheduler.stop_intake(cancel=True))
            alive = self._workers.join(timeout)
        self._cancel(scheduler.take_abandoned())
        if alive:
            names = ", ".join(t.name for t in alive)
            raise TimeoutError(f"worker threads still running after close(): {names}")
        self._closed = True
        if self._owns_replies and self._replies is not None:
            self._replies.close()  # type: ignore[attr-defined]

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called. Any thread."""
        return self._scheduler.closing

    def _cancel(self, circuits: list[Circuit]) -> None:
        """Drop the pending cells of circuits no worker will serve again. Loop thread only."""
        for circuit in circuits:
            self._pressure.cancel(circuit, circuit.drop_pending())

    # ----------------------------------------------------------------- stats

    def stats(self) -> dict[str, Any]:
        """A plain-dict snapshot of the pool's counters. Any thread (other threads' counters may
        be a moment stale).

        Keys: ``threads``, ``alive_threads``, ``cells``, ``batches``, ``batch_mean``, ``groups``
        (``group`` calls; each crypted several batches), ``submitted``, ``delivered``,
        ``in_flight``, ``queue_depth`` (live circuits per class, most urgent first),
        ``cancelled`` (cells), ``discarded`` (replies of closed circuits), ``discarded_cells``,
        ``errors`` (batches that raised), ``errors_delivered``, ``lost_replies``,
        ``low_priority_workers`` (started at idle priority), ``idle_demotions`` and
        ``idle_promotions`` (their moves out of and back to it, ``adaptive_idle``),
        ``notifies``, ``idle_workers`` (waiting, not yet notified), ``pops``,
        ``queue_touches`` (run-queue work, see :mod:`workers.runqueues`), ``worker_busy_s``,
        ``worker_cells``, ``stopped_by`` (repr of the ``SystemExit``/``KeyboardInterrupt`` a job
        raised to stop the pool, or None).
        """
        depths, notifies, idle, pops, touches = self._scheduler.snapshot()
        workers = list(self._workers.records)
        pressure = self._pressure
        cells = sum(w.cells for w in workers)
        batches = sum(w.batches for w in workers)
        return {
            "threads": len(workers),
            "alive_threads": sum(1 for w in workers if w.thread and w.thread.is_alive()),
            "cells": cells,
            "batches": batches,
            "batch_mean": cells / batches if batches else 0.0,
            "groups": sum(w.groups for w in workers),
            "submitted": pressure.submitted,
            "delivered": pressure.delivered,
            "in_flight": pressure.in_flight,
            "queue_depth": depths,
            "cancelled": pressure.cancelled + sum(w.cancelled for w in workers),
            "discarded": pressure.discarded,
            "discarded_cells": pressure.discarded_cells,
            "errors": sum(w.errors for w in workers),
            "errors_delivered": pressure.errors_delivered,
            "lost_replies": sum(w.lost_replies for w in workers),
            "notifies": notifies,
            "idle_workers": idle,
            "pops": pops,
            "queue_touches": touches,
            "worker_busy_s": [w.busy_ns / 1e9 for w in workers],
            "low_priority_workers": sum(1 for w in workers if w.low_priority),
            "idle_demotions": sum(w.idle_demotions for w in workers),
            "idle_promotions": sum(w.idle_promotions for w in workers),
            "worker_cells": [w.cells for w in workers],
            "stopped_by": repr(self._stopped_by) if self._stopped_by is not None else None,
        }
