"""The worker pool: circuits on run queues, one Condition, a fixed set of worker threads.

The email's design, built with real thread synchronization: "stick circuits in need of getting
some cells en/decrypted on the work queue, and have the worker threads just encrypt cells from
them in-order", workers that pull work, and a reply queue that wakes the main thread only when it
goes from empty to non-empty.

The shape
---------
The loop thread owns the circuits. ``submit(circuit, direction, cells)`` appends ONE entry (a
joined buffer of many cells, or a list of cells) to the circuit's pending list for that
direction and *schedules* the circuit: under the pool lock, if the circuit is neither queued nor
busy, it goes to the tail of its priority class in :class:`~workers.runqueues.RunQueues`, and
one idle worker is notified if any is waiting. A worker pops a circuit (marking it busy), takes
the pending entries of each direction up to ``batch_cells`` cells, joins them into one batch,
calls ``process(state, direction, batch)`` and puts ONE :class:`~workers.circuit.Reply` per
batch on ``replies`` (normally a ``reactor.ReplyQueue``, whose handler calls :meth:`deliver` on
the loop thread). Cells that arrived meanwhile are taken in the same turn while the cap allows;
then, under the lock, the worker lets the circuit go, re-queuing it at the tail if cells remain,
and pops its next circuit in the same critical section (one lock round per turn).

Grouped turns: several circuits per kernel call
-----------------------------------------------
A circuit opened with a ``group`` function (:data:`workers.circuit.GroupFn`; the kernel's are
:func:`workers.fastcrypto.relay_group` and :func:`~workers.fastcrypto.origin_group`) is served
in a *grouped* turn: the worker pops it together with up to ``group_circuits - 1`` more
circuits in the same critical section (never more than its share, the queued circuits divided
by the workers, so that one worker does not take the others' work), takes each one's pending
entries per direction up to ``batch_cells`` as a list of pieces (no join: the kernel gathers
them with the GIL released), and crypts ALL of them with ONE ``group`` call, i.e. one release
and one re-acquisition of the GIL. The replies, one per circuit and direction as always, go to
the loop with one ``put_many``. Under the GIL this is what makes cheap crypto pay: when a
batch's AES takes tens of microseconds, taking the GIL back, the Python around each call and
the lock round cost as much as the crypto, and grouping pays them once per group instead of
once per circuit. Order and exclusivity are those of single turns (every circuit of a group is
owned by its worker; a circuit's directions run in order inside the call); a job's exception
fails only its circuit, and a ``group`` call that raises fails the circuits in it.

The loop keeps its CPU
----------------------
Workers crypt with the GIL released, so on a machine with as many CPUs as workers, the loop
thread and the workers are more runnable threads than there are CPUs, and at equal priority the
scheduler lets a worker finish its time slice (milliseconds) before the loop runs: a 1 ms timer
then fires 3-5 ms late and the loop's own work waits too. So the last ``low_priority_workers``
workers (by default as many as the workers exceed the CPUs minus one: 1 of 2 workers on 2 CPUs)
put themselves in Linux's SCHED_IDLE class at start: they use any CPU time the loop and the
normal workers leave, and give way at once when those wake. The loop plus the normal workers
never outnumber the CPUs. Measured on 2 CPUs with 2 workers, relay_forward: lateness p99
3-9 ms -> 0.2-0.9 ms and 1.5x the cells/s (the loop is what limits there); under two CPU-bound
processes from elsewhere, the normal worker keeps its fair share (a pool of only idle-priority
workers starved to ~1% of its speed). A worker cannot raise its priority back, so this is per
worker thread for its whole life; nothing else in the process changes. ``0`` opts out.

The GIL's switch interval, by contrast, is left alone: with grouped turns and the idle-priority
worker, 5, 1 and 0.5 ms gave the same cells/s and lateness within noise (benchmarks.tuning).

Memory handed across threads
----------------------------
A batch's output (hundreds of KB) is allocated by a worker, in that thread's malloc arena, and
freed by the loop thread once delivered. With glibc's default thresholds the arena is trimmed
(its top returned to the OS) after such frees, and the next outputs page-fault their memory
back in: measured on relay_forward, page faults took about a quarter of the workers' CPU, as
much as the AES. So :meth:`start` tells glibc, process-wide, to keep up to ``malloc_retain``
bytes (default 32 MiB) of freed memory per arena and to serve blocks below 4 MiB from its
arenas (``workers._kernel.retain_freed_memory``, a ``mallopt``). The cost is that much RSS
kept per arena at most, only after it was used. It is never undone (glibc cannot go back to
its dynamic thresholds, and other pools in the process may rely on it); ``malloc_retain=None``
opts out. Without the kernel extension, or on another C library, nothing changes.

What the lock guards
--------------------
One ``threading.Condition`` guards only the run queues, each circuit's ``queued``/``busy``/
``closed``/``failed`` flags and class, the idle-worker count, the update inboxes and the exit
flags. The lock is never held while crypting, joining buffers or putting replies. Pending lists
are appended by the loop thread and emptied from the front by the owning worker without it (the
rules are in :mod:`workers.circuit`); crypto state is touched only by the owning worker, and the
lock hand-over (busy set, busy cleared) orders those accesses between successive owners.

The lost-cell race, and why it cannot happen
--------------------------------------------
The loop thread appends *before* it takes the lock to schedule; the worker decides whether
anything is left *while holding* the lock, at the moment it clears ``busy``. If the append came
first, the worker sees it and re-queues the circuit; otherwise the loop thread takes the lock
after the worker let go, finds the circuit idle, and queues it. There is no third order.

Wake-ups
--------
Workers ``wait()`` only after re-checking the exit flag, the update inbox and the run queues
under the lock. ``_idle`` counts workers waiting and not yet notified: the notifier decrements
it, so a notify is sent only when it reaches a waiting worker, and never once per cell. The
loop notifies for the circuits it queues; a worker that leaves circuits on the run queues when
it takes its turn (circuits it re-queued at release: a grouped turn re-queues several and pops
only its share) notifies one waiting worker, which does the same. So no queued circuit waits
for a busy worker while another worker sleeps.

The hot path
------------
Per-cell Python is what makes a pool slower than crypting inline (PERF-FACTS.md), so nothing
here runs per cell: ``submit`` costs one append and one lock round per call whatever the number
of cells, ``submit_many`` one lock round per call, a worker one lock round and one reply per
batch (grouped: one lock round, one GIL round trip and one ``put_many`` per group),
``deliver`` a few counter updates per reply. A lone ``bytes`` item reaches a
``joined=True`` process function without a copy.

Priorities, fairness, starvation
--------------------------------
See :mod:`workers.runqueues`: round-robin inside a class (one turn of at most ``batch_cells``
cells per direction, then back to the tail), and every 37th pop serves a less urgent class.

Back-pressure, counted on the loop thread only
----------------------------------------------
In-flight cells are cells submitted and not yet delivered back (or cancelled): ``+n`` in
``submit``, ``-n`` in ``deliver``/``close_circuit``. Per circuit and pool-wide, crossing the
high-water mark calls ``on_pressure(circuit, True)`` / ``on_pool_pressure(True)`` and falling to
the low-water mark calls them with False. Nothing is ever dropped: ``submit`` also returns False
while a mark is exceeded, so a producer can stop reading without a callback.

Cancellation and errors
-----------------------
``close_circuit`` marks the circuit closed, drops it from its run queue (lazily, O(1)) and
cancels its pending cells (if a worker owns the circuit at that moment, the worker empties them
when it lets go, so the lists never have two consumers); results of a batch that was in flight
are discarded in ``deliver`` and counted. No callback ever runs for a closed circuit. An
exception from ``process`` becomes a reply with ``error`` set for that circuit; the pool then
crypts nothing more for it (its stream state is suspect) and the owner's ``on_error`` closes it.
The worker thread lives on.

Per-worker state and updates (Tor's ``threadpool_queue_update``)
-----------------------------------------------------------------
``worker_state_factory(index)`` builds each worker's private state, available to the process
function through :meth:`worker_state`. ``update_workers(fn)`` hands every worker ``fn``, which
it applies as ``state = fn(state)`` before its next job; idle workers are woken to apply it.

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
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from time import perf_counter_ns
from typing import TYPE_CHECKING, Any, Protocol

from workers.batching import CELL_PAYLOAD_LEN, assemble, count_cells, take_items, take_pieces
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
from workers.runqueues import DEFAULT_STARVATION_PERIOD, RunQueues

if TYPE_CHECKING:
    from reactor import Reactor

log = logging.getLogger(__name__)

# Builds a Reply without the Python-level NamedTuple.__new__ frame (one reply per batch).
_new_reply = tuple.__new__

#: Cells per direction per turn (per circuit of a grouped turn). Each batch costs the loop one
#: reply. Measured with the grouped path (benchmarks.tuning, 2 CPUs, 200 circuits): relay_forward
#: 1.27x / 1.35x / 1.41x inline with caps 256 / 1024 / 4096, origin 1.81x / 1.90x / 1.88x. 1024
#: keeps a circuit's share of a turn short (~45 us of AES relaying, ~0.4 ms at the origin).
DEFAULT_BATCH_CELLS = 1024
#: Most circuits a worker pops in one lock round for one ``group`` call (grouped path only).
#: Measured on relay_forward (2 CPUs): 1 / 4 / 16 / 64 circuits gave 0.98x / 1.18x / 1.46x /
#: 1.27x inline; origin 1.69x / 1.83x / 1.89x / 1.88x.
DEFAULT_GROUP_CIRCUITS = 16
#: Freed memory glibc may keep per arena (``malloc_retain``); see "Memory handed across threads".
DEFAULT_MALLOC_RETAIN = 32 << 20
#: Blocks below this come from malloc's arenas, not mmap, once ``malloc_retain`` is applied.
MALLOC_MMAP_THRESHOLD = 4 << 20
DEFAULT_CIRCUIT_HIGH_WATER = 4096
DEFAULT_POOL_HIGH_WATER = 1 << 20


class SupportsPut(Protocol):
    """Where workers hand replies back: anything with a thread-safe ``put``."""

    def put(self, item: Any) -> Any:
        """Enqueue ``item`` for the loop thread. Any thread."""


def _retain_freed_memory(trim_threshold: int) -> bool:
    """Apply ``malloc_retain`` through the kernel (glibc only). Loop thread (any, really).

    Process-wide and permanent: glibc cannot return to its dynamic thresholds. Returns False
    when it could not be applied (no kernel extension, or not glibc).
    """
    try:
        from workers._kernel import retain_freed_memory
    except ImportError:
        return False
    return bool(retain_freed_memory(trim_threshold, min(trim_threshold, MALLOC_MMAP_THRESHOLD)))


def _available_cpus() -> int:
    """CPUs this process may run on. Any thread."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _run_at_idle_priority() -> bool:
    """Put the calling thread in Linux's SCHED_IDLE class. Worker thread, at its start.

    A thread may always lower its own priority; it cannot raise it back without privilege, so
    this is done only by a worker for the rest of its life. Returns False where there is no
    SCHED_IDLE (not Linux) or the call is refused; the worker then runs at normal priority.
    """
    policy = getattr(os, "SCHED_IDLE", None)
    if policy is None or not hasattr(os, "sched_setscheduler"):
        return False
    try:
        os.sched_setscheduler(threading.get_native_id(), policy, os.sched_param(0))
    except OSError:
        return False
    return True


def _not_started(items: list[Any]) -> None:
    raise RuntimeError("replies are put only by the workers of a started pool")


def _put_each(replies: SupportsPut) -> Callable[[list[Any]], Any]:
    """A ``put_many`` for a reply queue that has only ``put``: one put per item, in order."""

    def put_many(items: list[Any]) -> None:
        for item in items:
            replies.put(item)

    return put_many


class PoolClosedError(RuntimeError):
    """The pool was closed: it takes no more work."""


class _Update:
    """One ``update_workers`` call travelling through the workers' inboxes."""

    __slots__ = ("errors", "fn", "on_applied", "remaining")

    def __init__(
        self,
        fn: Callable[[Any], Any],
        workers: int,
        on_applied: Callable[[list[BaseException]], None] | None,
    ) -> None:
        self.fn = fn
        self.remaining = workers  # pool lock
        self.errors: list[BaseException] = []
        self.on_applied = on_applied


class _Worker:
    """One worker thread's record. Counters are written only by that worker."""

    __slots__ = (
        "batches",
        "busy_ns",
        "cancelled",
        "cells",
        "errors",
        "groups",
        "inbox",
        "index",
        "lost_replies",
        "low_priority",
        "state",
        "thread",
    )

    def __init__(self, index: int) -> None:
        self.index = index
        self.thread: threading.Thread | None = None
        self.state: Any = None
        self.inbox: deque[_Update] = deque()  # appended under the pool lock
        self.cells = 0
        self.cancelled = 0
        self.batches = 0
        self.groups = 0
        self.errors = 0
        self.busy_ns = 0
        self.lost_replies = 0
        self.low_priority = False  # written once by the worker, at its start


def _no_result(circuit: Circuit, direction: int, result: Any) -> None:
    raise RuntimeError(f"{circuit!r} has no on_result callback")


class WorkerPool:
    """A fixed pool of worker threads crypting circuits' cells in order. See the module doc."""

    def __init__(
        self,
        replies: SupportsPut | None,
        *,
        threads: int | None = None,
        priorities: int = 3,
        directions: int = 2,
        process: ProcessFn | None = None,
        joined: bool = False,
        group: GroupFn | None = None,
        group_circuits: int = DEFAULT_GROUP_CIRCUITS,
        batch_cells: int = DEFAULT_BATCH_CELLS,
        cell_size: int = CELL_PAYLOAD_LEN,
        worker_state_factory: Callable[[int], Any] | None = None,
        circuit_high_water: int = DEFAULT_CIRCUIT_HIGH_WATER,
        circuit_low_water: int | None = None,
        pool_high_water: int = DEFAULT_POOL_HIGH_WATER,
        pool_low_water: int | None = None,
        on_pool_pressure: Callable[[bool], None] | None = None,
        starvation_period: int = DEFAULT_STARVATION_PERIOD,
        malloc_retain: int | None = DEFAULT_MALLOC_RETAIN,
        low_priority_workers: int | None = None,
        name: str = "relaycrypt-worker",
    ) -> None:
        """Configure the pool; no thread starts before :meth:`start`. Loop thread only.

        ``replies`` may be None only until :meth:`set_replies` (used by :meth:`attach`).
        ``process``/``joined``/``group`` are defaults for circuits that give none (``group`` only
        for circuits that also take the default ``process``). ``group_circuits`` caps the
        circuits of one ``group`` call. Low-water marks default to half the high-water marks.
        ``malloc_retain`` (bytes, or None to leave malloc alone) is applied process-wide by
        :meth:`start`: see "Memory handed across threads" in the module doc.
        ``low_priority_workers`` of the workers run at idle CPU priority; None: as many as the
        workers exceed the CPUs available minus one (see "The loop keeps its CPU").
        """
        if priorities < 3:
            raise ValueError(f"priorities must be >= 3, got {priorities}")
        if directions < 1 or batch_cells < 1 or cell_size < 1 or group_circuits < 1:
            raise ValueError("directions, batch_cells, cell_size and group_circuits must be >= 1")
        self._threads = threads if threads is not None else max(2, os.cpu_count() or 2)
        if self._threads < 1:
            raise ValueError(f"threads must be >= 1, got {self._threads}")
        self._replies = replies
        self._owns_replies = False
        self._directions = directions
        self._process = process
        self._joined = joined
        self._group = group
        self._group_circuits = group_circuits
        self._batch_cells = batch_cells
        self._cell_size = cell_size
        self._worker_state_factory = worker_state_factory
        self._default_priority = priorities // 2
        self._circuit_high = circuit_high_water
        self._circuit_low = (
            circuit_high_water // 2 if circuit_low_water is None else circuit_low_water
        )
        self._pool_high = pool_high_water
        self._pool_low = pool_high_water // 2 if pool_low_water is None else pool_low_water
        if self._circuit_low >= self._circuit_high or self._pool_low >= self._pool_high:
            raise ValueError("low-water marks must be below their high-water marks")
        self._on_pool_pressure = on_pool_pressure
        self._malloc_retain = malloc_retain
        if low_priority_workers is None:
            low_priority_workers = max(0, self._threads - (_available_cpus() - 1))
        if not 0 <= low_priority_workers <= self._threads:
            raise ValueError(
                f"low_priority_workers must be in [0, threads], got {low_priority_workers}"
            )
        self._low_priority_workers = low_priority_workers
        self._name = name
        # Critical sections take the raw lock (a C-level context manager, cheaper than the
        # Condition's Python one); wait/notify go through the Condition built on the same lock.
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        # Guarded by that lock.
        self._queues = RunQueues(priorities, starvation_period)
        self._idle = 0
        self._closing = False
        self._exit = False
        self._abandoned: list[Circuit] = []
        self._notifies = 0
        # Loop thread only.
        self._workers: list[_Worker] = []
        self._started = False
        self._closed = False
        self._in_flight = 0
        self._over_high_water = False
        self._submitted = 0
        self._delivered = 0
        self._cancelled = 0
        self._discarded = 0
        self._discarded_cells = 0
        self._errors_delivered = 0
        self._local = threading.local()
        self._replies_put_many: Callable[[list[Any]], Any] = _not_started  # set by start()

    # ----------------------------------------------------------------- set-up

    @classmethod
    def attach(
        cls, reactor: Reactor, *, max_batch: int | None = None, start: bool = True, **kwargs: Any
    ) -> WorkerPool:
        """Build a pool whose replies go through a new ``reactor.ReplyQueue`` to :meth:`deliver`.

        Loop thread only. The pool owns that queue: :meth:`close` closes it after the workers
        are joined, which delivers every reply already put.
        """
        from reactor import ReplyQueue  # the one interface workers/ takes from reactor/

        pool = cls(None, **kwargs)
        pool.set_replies(ReplyQueue(reactor, pool.deliver, max_batch=max_batch), owned=True)
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
        if self._closing:
            raise PoolClosedError("the pool is closed")
        if self._replies is None:
            raise RuntimeError("the pool has no reply queue: pass one or call set_replies()")
        self._started = True
        if self._malloc_retain is not None:
            _retain_freed_memory(self._malloc_retain)
        put_many = getattr(self._replies, "put_many", None)
        self._replies_put_many = put_many if put_many is not None else _put_each(self._replies)
        for index in range(self._threads):
            worker = _Worker(index)
            worker.thread = threading.Thread(
                target=self._run_worker, args=(worker,), name=f"{self._name}-{index}", daemon=True
            )
            self._workers.append(worker)
        for worker in self._workers:
            assert worker.thread is not None
            worker.thread.start()

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
        """Create a circuit whose batches run ``process(state, direction, batch)``.

        Loop thread only.
        ``on_result(circuit, direction, result)`` receives each batch's result on the loop thread
        in submission order per direction. ``on_error(circuit, direction, exc)`` receives a
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
        cls = self._default_priority if priority is None else priority
        self._check_class(cls)
        return Circuit(
            state,
            process,
            on_result if on_result is not None else _no_result,
            on_error,
            on_pressure,
            directions=self._directions,
            priority=cls,
            joined=self._joined if joined is None else joined,
            high_water=high,
            low_water=low,
            context=context,
            group=group,
        )

    def submit(
        self, circuit: Circuit, direction: int, cells: Any, count: int | None = None
    ) -> bool:
        """Append cells (a joined buffer or a list) and schedule the circuit. Loop thread only.

        O(1) in the number of cells and circuits. Returns False when the circuit or the pool is
        above its high-water mark after this call (the cells are accepted all the same).
        """
        if self._closing:
            raise PoolClosedError("the pool is closed: it takes no more work")
        n = self._append(circuit, direction, cells, count)
        if n == 0:
            return not (circuit.over_high_water or self._over_high_water)
        # Appended before the lock is taken to schedule: see "The lost-cell race" above.
        with self._lock:
            self._schedule_locked(circuit)
        return self._count_submitted(circuit, n)

    def submit_many(self, work: Iterable[tuple[Circuit, int, Any]]) -> bool:
        """Submit ``(circuit, direction, cells)`` triples, taking the pool lock once.

        Loop thread only. If an entry is rejected (closed circuit, bad direction or size), the
        entries before it are accepted and scheduled, and the exception propagates. Returns False
        when some circuit or the pool is above its high-water mark afterwards.
        """
        if self._closing:
            raise PoolClosedError("the pool is closed: it takes no more work")
        # The hot path of a loop that groups a read's cells by circuit: _append,
        # _schedule_locked and _count_submitted, inlined (one Python frame per call, not four
        # per entry). Keep the three in step with those methods.
        directions = self._directions
        size = self._cell_size
        appended: list[Circuit] = []
        counts: list[int] = []
        below = True
        try:
            for circuit, direction, cells in work:
                if circuit.closed:
                    raise CircuitClosedError(f"{circuit!r} is closed")
                if not 0 <= direction < directions:
                    raise ValueError(f"direction must be in [0, {directions}), got {direction!r}")
                if cells.__class__ is bytes:
                    n, rest = divmod(len(cells), size)
                    if rest:
                        n = count_cells(cells, None, size)  # raises with the full message
                else:
                    n = count_cells(cells, None, size)
                if n:
                    circuit.pending[direction].append((cells, n))
                    appended.append(circuit)
                    counts.append(n)
        finally:
            # Whatever was appended is scheduled, even if a later entry was rejected.
            if appended:
                with self._lock:
                    for circuit in appended:
                        if not (circuit.queued or circuit.busy or circuit.closed or circuit.failed):
                            self._queues.push(circuit)
                            if self._idle:
                                self._idle -= 1
                                self._notifies += 1
                                self._cond.notify()
                below = self._count_many(appended, counts)
        return below

    def _count_many(self, circuits: list[Circuit], counts: list[int]) -> bool:
        """``_count_submitted`` for many circuits, the pool's mark checked once. Loop thread."""
        total = 0
        below = True
        for circuit, n in zip(circuits, counts, strict=True):
            total += n
            circuit.in_flight += n
            if circuit.over_high_water:
                below = False
            elif circuit.in_flight >= circuit.high_water:
                circuit.over_high_water = True
                below = False
                if circuit.on_pressure is not None:
                    circuit.on_pressure(circuit, True)
        self._submitted += total
        self._in_flight += total
        if not self._over_high_water and self._in_flight >= self._pool_high:
            self._over_high_water = True
            if self._on_pool_pressure is not None:
                self._on_pool_pressure(True)
        return below and not self._over_high_water

    def _append(self, circuit: Circuit, direction: int, cells: Any, count: int | None) -> int:
        """Validate, count and append one item to a pending deque. Loop thread only.

        Returns its cell count (an empty item is not appended). The caller schedules.
        """
        if circuit.closed:
            raise CircuitClosedError(f"{circuit!r} is closed")
        if not 0 <= direction < self._directions:
            raise ValueError(f"direction must be in [0, {self._directions}), got {direction!r}")
        if count is None and cells.__class__ is bytes:
            n, rest = divmod(len(cells), self._cell_size)  # the hot case, inlined
            if rest:
                n = count_cells(cells, None, self._cell_size)  # raises with the full message
        else:
            n = count_cells(cells, count, self._cell_size)
        if n:
            circuit.pending[direction].append((cells, n))
        return n

    def set_priority(self, circuit: Circuit, cls: int) -> None:
        """Move the circuit to priority class ``cls`` (0 = most urgent). Loop thread only. O(1)."""
        self._check_class(cls)
        with self._lock:
            self._queues.move(circuit, cls)

    def close_circuit(self, circuit: Circuit) -> None:
        """Close the circuit: cancel its queued cells, discard results in flight. Loop thread only.

        Idempotent. O(pending entries of this circuit), never of all circuits. The cells it
        cancels are counted in ``stats()["cancelled"]``; results of batches already taken by a
        worker are discarded when they arrive (``stats()["discarded"]``).
        """
        if circuit.closed:
            return
        with self._lock:
            circuit.closed = True
            self._queues.discard(circuit)
            busy = circuit.busy
        if not busy:
            # Closed and not busy: no worker can take it any more, so its lists are ours.
            self._cancelled += circuit.drop_pending()
        # else: the owner empties them when it lets go (_release_locked), counting them.
        # Everything of this circuit not yet delivered leaves the counts now; replies still on
        # their way are discarded by deliver() without touching the counts again.
        self._in_flight -= circuit.in_flight
        circuit.in_flight = 0
        self._check_pool_low_water()

    # ----------------------------------------------------------------- loop side

    def deliver(self, reply: Reply) -> None:
        """Apply one worker reply: the circuit's callback, counts, resume signals. Loop thread only.

        Pass this as the ``reactor.ReplyQueue`` handler (``attach`` does). Replies of closed
        circuits are discarded and counted; no callback runs for them.
        """
        circuit, direction, result, cells, error = reply
        if circuit is None:
            self._deliver_update(result)
            return
        if circuit.closed:
            self._discarded += 1
            self._discarded_cells += cells
            return
        self._delivered += cells
        circuit.in_flight -= cells
        self._in_flight -= cells
        try:
            if error is None:
                circuit.on_result(circuit, direction, result)
            else:
                self._errors_delivered += 1
                if circuit.on_error is not None:
                    circuit.on_error(circuit, direction, error)
                else:
                    log.error("closing %r after a worker error", circuit, exc_info=error)
                    self.close_circuit(circuit)
        finally:
            # Even if the callback raised (the ReplyQueue logs it), a resume is never missed.
            if (
                circuit.over_high_water
                and not circuit.closed
                and circuit.in_flight <= circuit.low_water
            ):
                circuit.over_high_water = False
                if circuit.on_pressure is not None:
                    circuit.on_pressure(circuit, False)
            self._check_pool_low_water()

    @property
    def in_flight(self) -> int:
        """Cells submitted and not yet delivered or cancelled. Loop thread only."""
        return self._in_flight

    @property
    def over_high_water(self) -> bool:
        """True between the pool's high-water signal and its low-water signal. Loop thread only."""
        return self._over_high_water

    def _count_submitted(self, circuit: Circuit, n: int) -> bool:
        """Add ``n`` in-flight cells and signal high water. Loop thread only."""
        self._submitted += n
        circuit.in_flight += n
        self._in_flight += n
        if not circuit.over_high_water and circuit.in_flight >= circuit.high_water:
            circuit.over_high_water = True
            if circuit.on_pressure is not None:
                circuit.on_pressure(circuit, True)
        if not self._over_high_water and self._in_flight >= self._pool_high:
            self._over_high_water = True
            if self._on_pool_pressure is not None:
                self._on_pool_pressure(True)
        return not (circuit.over_high_water or self._over_high_water)

    def _check_pool_low_water(self) -> None:
        """Signal the pool's resume when at or below low water. Loop thread only."""
        if self._over_high_water and self._in_flight <= self._pool_low:
            self._over_high_water = False
            if self._on_pool_pressure is not None:
                self._on_pool_pressure(False)

    def _deliver_update(self, update: _Update) -> None:
        """Run an update's acknowledgement callback. Loop thread only."""
        if update.on_applied is not None:
            update.on_applied(update.errors)

    def _check_class(self, cls: int) -> None:
        if not 0 <= cls < self._queues.classes:
            raise ValueError(f"priority class must be in [0, {self._queues.classes}), got {cls}")

    # ----------------------------------------------------------------- scheduling (locked)

    def _schedule_locked(self, circuit: Circuit) -> None:
        """Queue a circuit that has work, unless queued, busy, closed or failed. Pool lock held."""
        if circuit.queued or circuit.busy or circuit.closed or circuit.failed:
            # Busy: its owner re-checks pending under this lock when it lets go (_release_locked).
            return
        self._queues.push(circuit)
        if self._idle:
            self._idle -= 1
            self._notifies += 1
            self._cond.notify()

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
        with self._lock:
            if self._closing:
                raise PoolClosedError("the pool is closed")
            update = _Update(fn, len(self._workers), on_applied)
            for worker in self._workers:
                worker.inbox.append(update)
            self._idle = 0
            self._cond.notify_all()

    def worker_state(self) -> Any:
        """The calling worker's private state. Worker thread only (e.g. inside ``process``)."""
        worker = getattr(self._local, "worker", None)
        if worker is None:
            raise RuntimeError("worker_state() may only be called on one of this pool's workers")
        return worker.state

    def _run_worker(self, worker: _Worker) -> None:
        """A worker's whole life: pop circuits, serve them, let go and pop again. Worker thread.

        Letting go of the circuits of one turn and popping the next happen in one critical
        section, so a worker takes the pool lock once per turn. A turn is one circuit, or, when
        the popped circuit has a ``group`` function, up to ``group_circuits`` circuits crypted
        by one ``group`` call (see :meth:`_serve_group`).
        """
        self._local.worker = worker
        if worker.index >= self._threads - self._low_priority_workers:
            worker.low_priority = _run_at_idle_priority()
        if self._worker_state_factory is not None:
            try:
                worker.state = self._worker_state_factory(worker.index)
            except Exception:
                worker.errors += 1
                log.exception("worker_state_factory failed on worker %d", worker.index)
        lock = self._lock
        owned: list[Circuit] = []
        failed: list[bool] = []
        while True:
            with lock:
                for circuit, bad in zip(owned, failed, strict=True):
                    self._release_locked(worker, circuit, bad)
                owned = self._next_circuits_locked(worker)
                if not owned:
                    leave = self._exit or not worker.inbox
            if not owned:
                if leave:
                    return
                self._apply_updates(worker)
                failed = []
                continue
            if len(owned) == 1 and owned[0].group is None:
                failed = [self._serve(worker, owned[0])]
            else:
                failed = self._serve_group(worker, owned)

    def _next_circuits_locked(self, worker: _Worker) -> list[Circuit]:
        """Pop circuits (marked busy), waiting if there is none. Lock held.

        Returns one circuit, or several when the first has a ``group`` function: at most
        ``group_circuits``, and at most this worker's share of what is queued (the queued
        circuits divided by the workers, rounded up), so that a lone worker does not take the
        work of the others. An empty list: exit, or updates to apply first.
        """
        while True:
            # Re-checked before every wait: a notify_all sent while this worker was busy is gone,
            # but the flags it announced are still set, so no wake-up is lost.
            if self._exit or worker.inbox:
                return []
            queues = self._queues
            circuit = queues.pop()
            if circuit is not None:
                circuit.busy = True
                circuits = [circuit]
                if circuit.group is not None and self._group_circuits > 1:
                    share = -(-(len(queues) + 1) // self._threads)
                    limit = min(self._group_circuits, share)
                    while len(circuits) < limit:
                        circuit = queues.pop()
                        if circuit is None:
                            break
                        circuit.busy = True
                        circuits.append(circuit)
                # Circuits this worker re-queued at release were pushed without a notify (the
                # loop notifies only for its own pushes). A grouped turn re-queues up to
                # group_circuits of them and pops only its share, so without this a waiting
                # worker slept while they waited for this one. Each woken worker passes the
                # wake-up on the same way while circuits remain: none waits behind a busy worker.
                if self._idle and queues:
                    self._idle -= 1
                    self._notifies += 1
                    self._cond.notify()
                return circuits
            if self._closing:
                return []  # draining, and nothing is left to drain
            self._idle += 1  # the notifier decrements it (see _schedule_locked)
            self._cond.wait()

    def _serve_group(self, worker: _Worker, circuits: list[Circuit]) -> list[bool]:
        """One grouped turn: each owned circuit's batches, crypted by one ``group`` call.

        Worker thread. Takes up to ``batch_cells`` cells per direction of each circuit as one
        job ``(state, direction, pieces)`` (no join: the kernel gathers the pieces), runs the
        jobs of circuits sharing a ``group`` function in ONE call, and puts one Reply per job,
        all with one ``put_many``. A job whose result is an exception fails its circuit only;
        a ``group`` call that raises fails every circuit in it. Circuits without a ``group``
        (popped along) are served by :meth:`_serve`. Returns each circuit's failed flag.
        """
        failed = [False] * len(circuits)
        budget = self._batch_cells
        calls: dict[GroupFn, tuple[list[tuple[Any, int, Any]], list[tuple[int, Circuit, int, int]]]]
        calls = {}
        for index, circuit in enumerate(circuits):
            group = circuit.group
            if group is None:
                failed[index] = self._serve(worker, circuit)
                continue
            # `closed` and `_exit` are written by the loop thread without this worker holding
            # the lock. A stale False costs at most one more batch, which deliver() discards
            # (closed) or which is crypted before the worker exits. True is never early.
            if circuit.closed or self._exit:
                continue
            for direction, pending in enumerate(circuit.pending):
                if not pending:
                    continue
                pieces, cells = take_pieces(pending, budget)
                if not cells:
                    continue  # a closer took them first
                call = calls.get(group)
                if call is None:
                    call = calls[group] = ([], [])
                call[0].append((circuit.state, direction, pieces))
                call[1].append((index, circuit, direction, cells))
        for group, (jobs, places) in calls.items():
            started = perf_counter_ns()
            try:
                results = group(jobs)
                if len(results) != len(jobs):
                    raise RuntimeError(
                        f"group function returned {len(results)} results for {len(jobs)} jobs"
                    )
            except Exception as exc:
                results = [exc] * len(jobs)
            worker.busy_ns += perf_counter_ns() - started
            worker.groups += 1
            replies: list[Reply] = []
            for (index, circuit, direction, cells), result in zip(places, results, strict=True):
                if isinstance(result, BaseException):
                    worker.errors += 1
                    failed[index] = True
                    replies.append(_new_reply(Reply, (circuit, direction, None, cells, result)))
                else:
                    worker.cells += cells
                    worker.batches += 1
                    replies.append(_new_reply(Reply, (circuit, direction, result, cells, None)))
            self._put_many(worker, replies)
        return failed

    def _serve(self, worker: _Worker, circuit: Circuit) -> bool:
        """One turn: crypt up to ``batch_cells`` cells per direction. Worker thread.

        Cells that arrive during the turn are taken while the direction's budget lasts. Returns
        True when ``process`` raised (the circuit is then served no more).
        """
        queues = circuit.pending
        budgets = [self._batch_cells] * len(queues)
        again = True
        while again:
            again = False
            for direction, pending in enumerate(queues):
                budget = budgets[direction]
                if budget <= 0 or not pending:
                    continue
                # `closed` and `_exit` are written by the loop thread without this worker holding
                # the lock. A stale False costs at most one more batch, which deliver() discards
                # (closed) or which is crypted before the worker exits. True is never early.
                if circuit.closed or self._exit:
                    return False
                items, cells = take_items(pending, budget)
                if not cells:
                    continue  # a closer took them first
                budgets[direction] = budget - cells
                if not self._run_batch(worker, circuit, direction, items, cells):
                    return True
                again = True
        return False

    def _run_batch(
        self, worker: _Worker, circuit: Circuit, direction: int, items: list[Any], cells: int
    ) -> bool:
        """Crypt one batch and put its ONE reply. False if ``process`` raised. Worker thread."""
        started = perf_counter_ns()
        try:
            result = circuit.process(circuit.state, direction, assemble(items, circuit.joined))
        except Exception as exc:
            worker.busy_ns += perf_counter_ns() - started
            worker.errors += 1
            self._put(worker, _new_reply(Reply, (circuit, direction, None, cells, exc)))
            return False
        worker.busy_ns += perf_counter_ns() - started
        worker.cells += cells
        worker.batches += 1
        self._put(worker, _new_reply(Reply, (circuit, direction, result, cells, None)))
        return True

    def _release_locked(self, worker: _Worker, circuit: Circuit, failed: bool) -> None:
        """Let go of a circuit; re-queue it at the tail if cells remain. Worker, lock held."""
        circuit.busy = False
        if circuit.closed:
            # close_circuit() saw it busy and left its pending lists to us (its owner).
            worker.cancelled += circuit.drop_pending()
        elif failed:
            circuit.failed = True
        # The loop thread appends without this lock, then takes it to schedule. Any append that
        # happened before this check is seen here; any later one finds busy False when its
        # thread gets the lock, and that thread queues the circuit. No third order exists.
        elif circuit.has_pending():
            if self._exit:
                self._abandoned.append(circuit)  # cancelled by close()
            else:
                self._queues.push(circuit)  # this worker pops next: no notify needed

    def _apply_updates(self, worker: _Worker) -> None:
        """Apply every update in this worker's inbox, in order. Worker thread."""
        while worker.inbox:
            update = worker.inbox.popleft()
            try:
                worker.state = update.fn(worker.state)
            except Exception as exc:
                update.errors.append(exc)
            with self._lock:
                update.remaining -= 1
                done = update.remaining == 0
            if done:
                self._put(worker, _new_reply(Reply, (None, 0, update, 0, None)))

    def _put_many(self, worker: _Worker, replies: list[Reply]) -> None:
        """Hand several replies to the loop thread in one lock round. Worker thread."""
        try:
            self._replies_put_many(replies)
        except Exception:
            worker.lost_replies += len(replies)
            log.exception("reply queue refused %d replies; they are lost", len(replies))

    def _put(self, worker: _Worker, reply: Reply) -> None:
        """Hand a reply to the loop thread; a failing reply queue is counted. Worker thread."""
        try:
            self._replies.put(reply)  # type: ignore[union-attr]
        except Exception:
            worker.lost_replies += 1
            log.exception("reply queue refused a reply; it is lost")

    # ----------------------------------------------------------------- shutdown

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
        if getattr(self._local, "worker", None) is not None:
            raise RuntimeError("close() called from a worker thread would join itself")
        if self._closed:
            return
        if not self._closing:
            self._stop_intake(cancel=not drain or not self._started)
        alive = self._join(timeout)
        if alive and not self._exit:
            self._stop_intake(cancel=True)
            alive = self._join(timeout)
        with self._lock:
            abandoned, self._abandoned = self._abandoned, []
        self._cancel(abandoned)
        if alive:
            names = ", ".join(t.name for t in alive)
            raise TimeoutError(f"worker threads still running after close(): {names}")
        self._closed = True
        if self._owns_replies and self._replies is not None:
            self._replies.close()  # type: ignore[attr-defined]

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called. Any thread."""
        return self._closing

    def _stop_intake(self, cancel: bool) -> None:
        """Set the flags, wake everyone, and cancel queued work if asked. Loop thread only."""
        with self._lock:
            self._closing = True
            queued: list[Circuit] = []
            if cancel:
                self._exit = True
                queued = self._queues.pop_all()
            self._idle = 0
            self._cond.notify_all()
        self._cancel(queued)

    def _join(self, timeout: float | None) -> list[threading.Thread]:
        """Join the workers within ``timeout``; return those still alive. Loop thread only."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for worker in self._workers:
            assert worker.thread is not None
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            worker.thread.join(left)
        return [w.thread for w in self._workers if w.thread is not None and w.thread.is_alive()]

    def _cancel(self, circuits: list[Circuit]) -> None:
        """Drop the pending cells of circuits no worker will serve again. Loop thread only."""
        for circuit in circuits:
            n = circuit.drop_pending()
            self._cancelled += n
            circuit.in_flight -= n
            self._in_flight -= n

    # ----------------------------------------------------------------- stats

    def stats(self) -> dict[str, Any]:
        """A plain-dict snapshot of the pool's counters. Any thread (other threads' counters may
        be a moment stale).

        Keys: ``threads``, ``alive_threads``, ``cells``, ``batches``, ``batch_mean``, ``groups``
        (``group`` calls; each crypted several batches), ``submitted``, ``delivered``,
        ``in_flight``, ``queue_depth`` (live circuits per class, most urgent first),
        ``cancelled`` (cells), ``discarded`` (replies of closed circuits), ``discarded_cells``,
        ``errors`` (batches that raised), ``errors_delivered``, ``lost_replies``,
        ``low_priority_workers`` (running at idle priority), ``notifies``, ``idle_workers``
        (waiting, not yet notified), ``pops``, ``queue_touches`` (run-queue work, see
        :mod:`workers.runqueues`), ``worker_busy_s``, ``worker_cells``.
        """
        with self._lock:
            depths = self._queues.depths()
            notifies = self._notifies
            idle = self._idle
            pops = self._queues.pops
            touches = self._queues.touches
        workers = list(self._workers)
        cells = sum(w.cells for w in workers)
        batches = sum(w.batches for w in workers)
        groups = sum(w.groups for w in workers)
        return {
            "threads": len(workers),
            "alive_threads": sum(1 for w in workers if w.thread and w.thread.is_alive()),
            "cells": cells,
            "batches": batches,
            "batch_mean": cells / batches if batches else 0.0,
            "groups": groups,
            "submitted": self._submitted,
            "delivered": self._delivered,
            "in_flight": self._in_flight,
            "queue_depth": depths,
            "cancelled": self._cancelled + sum(w.cancelled for w in workers),
            "discarded": self._discarded,
            "discarded_cells": self._discarded_cells,
            "errors": sum(w.errors for w in workers),
            "errors_delivered": self._errors_delivered,
            "lost_replies": sum(w.lost_replies for w in workers),
            "notifies": notifies,
            "idle_workers": idle,
            "pops": pops,
            "queue_touches": touches,
            "worker_busy_s": [w.busy_ns / 1e9 for w in workers],
            "low_priority_workers": sum(1 for w in workers if w.low_priority),
            "worker_cells": [w.cells for w in workers],
        }
