"""The worker threads: take a circuit or a group, crypt, reply, let go, take the next.

Each worker thread runs :meth:`WorkerThreads._run` for its whole life. A *turn* is one lock
round (:meth:`workers.scheduler.Scheduler.turn`: let go of the last turn's circuits and take
the next ones) followed by work done WITHOUT the pool lock:

* a single turn (:meth:`~WorkerThreads._serve`): one circuit, up to ``batch_cells`` cells per
  lane, joined into one batch, ``process(state, lane, batch)``, ONE
  :class:`~workers.circuit.Reply` per batch put on the reply queue. Cells that arrived meanwhile
  are taken in the same turn while the cap allows;
* a grouped turn (:meth:`~WorkerThreads._serve_group`), when the first circuit popped has a
  ``group`` function (:data:`workers.circuit.GroupFn`): up to ``group_circuits`` circuits, each
  one's pending entries per lane up to ``batch_cells`` taken as a list of pieces (no
  join: the kernel gathers them with the GIL released), ALL crypted by ONE ``group`` call, and
  the replies, one per circuit and lane as always, put with ONE ``put_many``. Under the
  GIL this is what makes cheap crypto pay: when a batch's AES takes tens of microseconds,
  taking the GIL back, the Python around each call and the lock round cost as much as the
  crypto, and grouping pays them once per group instead of once per circuit.

Order and exclusivity: every circuit of a turn is owned by its worker (``busy``, set and
cleared under the pool lock) from the pop to the release, and its replies are put before the
release, so a circuit's replies reach the loop in the order its cells were taken. A circuit's
lanes run in order inside a group call. Crypto state is touched only by the owner, and the
lock hand-over (busy set, busy cleared) orders those accesses between successive owners.

Errors: an exception from ``process``, an exception instance a ``group`` returns for a job, or
a ``group`` call that raises (for every job in it) becomes a reply with ``error`` set for that
circuit, which is then served no more (it is marked failed at release); the thread lives on.
A reply queue that refuses a reply is counted in ``lost_replies`` and logged.

What a worker touches without the lock: the front of its owned circuits' pending lists (the
rules are in :mod:`workers.circuit`), their crypto state, its own :class:`WorkerRecord`, and
reads of ``closed``/``exit`` (stale reads are harmless, see :meth:`WorkerThreads._serve`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from time import perf_counter_ns
from typing import Any, Protocol

from workers.batching import assemble, take_items, take_pieces
from workers.circuit import Circuit, GroupFn, Reply
from workers.scheduler import Scheduler, Update
from workers.tuning import (
    IdleGovernor,
    StarvationRecord,
    run_at_idle_priority,
    set_idle_priority,
)

# The pool's logger: what workers log keeps the name users configure for the pool.
log = logging.getLogger("workers.pool")

# Builds a Reply without the Python-level NamedTuple.__new__ frame (one reply per batch).
_new_reply = tuple.__new__


class SupportsPut(Protocol):
    """Where workers hand replies back: anything with a thread-safe ``put``."""

    def put(self, item: Any) -> Any:
        """Enqueue ``item`` for the loop thread. Any thread."""


def stops_pool(exc: object) -> bool:
    """True for what a job may raise to stop the whole pool: ``SystemExit`` and
    ``KeyboardInterrupt``. Any other exception (any ``BaseException``) fails only the job's
    circuit, and the worker lives on. Any thread (pure)."""
    return isinstance(exc, SystemExit | KeyboardInterrupt)


def _not_started(items: list[Any]) -> None:
    raise RuntimeError("replies are put only by the workers of a started pool")


def _put_each(replies: SupportsPut) -> Callable[[list[Any]], Any]:
    """A ``put_many`` for a reply queue that has only ``put``: one put per item, in order."""

    def put_many(items: list[Any]) -> None:
        for item in items:
            replies.put(item)

    return put_many


class WorkerRecord:
    """One worker thread's record. Counters are written only by that worker."""

    __slots__ = (
        "batches",
        "busy_ns",
        "cancelled",
        "cells",
        "errors",
        "governor",
        "groups",
        "idle_demotions",
        "idle_promotions",
        "inbox",
        "index",
        "lost_replies",
        "low_priority",
        "state",
        "thread",
    )

    def __init__(self, index: int) -> None:
        """Loop thread (``WorkerThreads.start``), before the thread starts."""
        self.index = index
        self.thread: threading.Thread | None = None
        self.state: Any = None
        self.inbox: deque[Update] = deque()  # appended under the pool lock
        self.cells = 0
        self.cancelled = 0  # written under the pool lock, by this worker only
        self.batches = 0
        self.groups = 0
        self.errors = 0
        self.busy_ns = 0
        self.lost_replies = 0
        self.low_priority = False  # written once by the worker, at its start
        self.governor: IdleGovernor | None = None  # the worker's own, if adaptive_idle
        self.idle_demotions = 0
        self.idle_promotions = 0


class WorkerThreads:
    """A pool's fixed set of worker threads and the body they run. See the module doc."""

    def __init__(
        self,
        scheduler: Scheduler,
        *,
        threads: int,
        batch_cells: int,
        low_priority_workers: int,
        adaptive_idle: bool = True,
        starvation: StarvationRecord | None = None,
        state_factory: Callable[[int], Any] | None,
        name: str,
    ) -> None:
        """Configure; no thread starts before :meth:`start`. Loop thread."""
        self._scheduler = scheduler
        self._threads = threads
        self._batch_cells = batch_cells
        self._low_priority_workers = low_priority_workers
        self._adaptive_idle = adaptive_idle
        self._starvation = starvation if starvation is not None else StarvationRecord()
        self._state_factory = state_factory
        self._name = name
        self.records: list[WorkerRecord] = []  # filled by start(), then never changed
        self._local = threading.local()
        self._replies: SupportsPut | None = None
        self._put_many_fn: Callable[[list[Any]], Any] = _not_started

    # ------------------------------------------------------------------ loop side

    def start(self, replies: SupportsPut) -> None:
        """Create and start the threads; they put replies on ``replies``. Loop thread; once."""
        self._replies = replies
        put_many = getattr(replies, "put_many", None)
        self._put_many_fn = put_many if put_many is not None else _put_each(replies)
        for index in range(self._threads):
            worker = WorkerRecord(index)
            worker.thread = threading.Thread(
                target=self._run, args=(worker,), name=f"{self._name}-{index}", daemon=True
            )
            self.records.append(worker)
        for worker in self.records:
            assert worker.thread is not None
            worker.thread.start()

    def join(self, timeout: float | None) -> list[threading.Thread]:
        """Join the threads within ``timeout``; return those still alive. Any thread (it only
        joins; the pool calls it on the loop thread, or on a helper thread of an async loop)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for worker in self.records:
            assert worker.thread is not None
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            worker.thread.join(left)
        return [w.thread for w in self.records if w.thread is not None and w.thread.is_alive()]

    def current(self) -> WorkerRecord | None:
        """The calling thread's record, or None off this set's workers. Any thread."""
        return getattr(self._local, "worker", None)

    # ------------------------------------------------------------------ worker threads

    def _run(self, worker: WorkerRecord) -> None:
        """A worker's whole life: take circuits, serve them, let go and take again. Worker thread.

        Letting go of one turn's circuits and taking the next happen in one critical section
        (:meth:`Scheduler.turn`), so a worker takes the pool lock once per turn.
        """
        self._local.worker = worker
        if worker.index >= self._threads - self._low_priority_workers:
            worker.low_priority = run_at_idle_priority()
            if worker.low_priority and self._adaptive_idle:
                self._start_governor(worker)
        if self._state_factory is not None:
            try:
                worker.state = self._state_factory(worker.index)
            except Exception:
                worker.errors += 1
                log.exception("worker_state_factory failed on worker %d", worker.index)
        turn = self._scheduler.turn
        owned: list[Circuit] = []
        failed: list[bool] = []
        while True:
            next_owned = turn(worker, owned, failed)
            if next_owned is None:
                return
            owned = next_owned
            if not owned:
                self._apply_updates(worker)
                failed = []
                continue
            governor = worker.governor
            wall = cpu = 0.0
            if governor is not None:
                wall, cpu = time.monotonic(), time.thread_time()
            if len(owned) == 1 and owned[0].group is None:
                failed = [self._serve(worker, owned[0])]
            else:
                failed = self._serve_group(worker, owned)
            if governor is not None:
                now = time.monotonic()
                self._govern(worker, governor, now - wall, time.thread_time() - cpu, now)

    def _start_governor(self, worker: WorkerRecord) -> None:
        """Watch this idle-priority worker; demote it now if the host was starving workers
        within a quiet period. Worker thread, at its start."""
        governor = IdleGovernor()
        last = self._starvation.last
        if time.monotonic() - last < governor.quiet_period:
            if not set_idle_priority(False):
                return  # no privilege to leave SCHED_IDLE: no adaptation
            governor = IdleGovernor(idle=False, last_starved=last)
            worker.idle_demotions += 1
        worker.governor = governor

    def _govern(
        self, worker: WorkerRecord, governor: IdleGovernor, wall: float, cpu: float, now: float
    ) -> None:
        """Apply the governor's decision on one turn to this thread's policy. Worker thread.

        See "The loop keeps its CPU" in :mod:`workers.tuning`. A refused change (no privilege
        to leave SCHED_IDLE) ends the adaptation: the worker stays where it is.
        """
        decision = governor.observe(wall, cpu, now)
        if governor.last_starved == now:
            self._starvation.note(now)
        if decision is None:
            return
        if not set_idle_priority(decision == "promote"):
            worker.governor = None
            return
        if decision == "demote":
            worker.idle_demotions += 1
        else:
            worker.idle_promotions += 1

    def _serve_group(self, worker: WorkerRecord, circuits: list[Circuit]) -> list[bool]:
        """One grouped turn: each owned circuit's batches, crypted by one ``group`` call.

        Worker thread. Takes up to ``batch_cells`` cells per lane of each circuit as one
        job ``(state, lane, pieces)`` (no join: the kernel gathers the pieces), runs the
        jobs of circuits sharing a ``group`` function in ONE call, and puts one Reply per job,
        all with one ``put_many``. A job whose result is an exception fails its circuit only;
        a ``group`` call that raises fails every circuit in it. Circuits without a ``group``
        (popped along) are served by :meth:`_serve`. Returns each circuit's failed flag.
        """
        failed = [False] * len(circuits)
        budget = self._batch_cells
        scheduler = self._scheduler
        calls: dict[GroupFn, tuple[list[tuple[Any, int, Any]], list[tuple[int, Circuit, int, int]]]]
        calls = {}
        for index, circuit in enumerate(circuits):
            group = circuit.group
            if group is None:
                failed[index] = self._serve(worker, circuit)
                continue
            # `closed` and `exit` are written by the loop thread without this worker holding
            # the lock. A stale False costs at most one more batch, which deliver() discards
            # (closed) or which is crypted before the worker exits. True is never early.
            if circuit.closed or scheduler.exit:
                continue
            for lane, pending in enumerate(circuit.pending):
                if not pending:
                    continue
                pieces, cells = take_pieces(pending, budget)
                if not cells:
                    continue  # a closer took them first
                call = calls.get(group)
                if call is None:
                    call = calls[group] = ([], [])
                call[0].append((circuit.state, lane, pieces))
                call[1].append((index, circuit, lane, cells))
        for group, (jobs, places) in calls.items():
            started = perf_counter_ns()
            try:
                results = group(jobs)
                if len(results) != len(jobs):
                    raise RuntimeError(
                        f"group function returned {len(results)} results for {len(jobs)} jobs"
                    )
            except BaseException as exc:  # fails these circuits; see stops_pool
                results = [exc] * len(jobs)
            worker.busy_ns += perf_counter_ns() - started
            worker.groups += 1
            replies: list[Reply] = []
            for (index, circuit, lane, cells), result in zip(places, results, strict=True):
                if isinstance(result, BaseException):
                    worker.errors += 1
                    failed[index] = True
                    replies.append(_new_reply(Reply, (circuit, lane, None, cells, result)))
                else:
                    worker.cells += cells
                    worker.batches += 1
                    replies.append(_new_reply(Reply, (circuit, lane, result, cells, None)))
            fatal = next((r for r in results if stops_pool(r)), None)
            if fatal is not None:
                self._abort(worker, fatal)  # before its reply: the loop sees the pool stopped
            # Put before the release (the next turn() call): a later batch of these circuits,
            # taken by another worker after the release, cannot overtake these replies.
            self._put_many(worker, replies)
        return failed

    def _serve(self, worker: WorkerRecord, circuit: Circuit) -> bool:
        """One turn: crypt up to ``batch_cells`` cells per lane. Worker thread.

        Cells that arrive during the turn are taken while the lane's budget lasts. Returns
        True when ``process`` raised (the circuit is then served no more).
        """
        queues = circuit.pending
        scheduler = self._scheduler
        budgets = [self._batch_cells] * len(queues)
        again = True
        while again:
            again = False
            for lane, pending in enumerate(queues):
                budget = budgets[lane]
                if budget <= 0 or not pending:
                    continue
                # `closed` and `exit` are written by the loop thread without this worker holding
                # the lock. A stale False costs at most one more batch, which deliver() discards
                # (closed) or which is crypted before the worker exits. True is never early.
                if circuit.closed or scheduler.exit:
                    return False
                items, cells = take_items(pending, budget)
                if not cells:
                    continue  # a closer took them first
                budgets[lane] = budget - cells
                if not self._run_batch(worker, circuit, lane, items, cells):
                    return True
                again = True
        return False

    def _run_batch(
        self, worker: WorkerRecord, circuit: Circuit, lane: int, items: list[Any], cells: int
    ) -> bool:
        """Crypt one batch and put its ONE reply. False if ``process`` raised. Worker thread."""
        started = perf_counter_ns()
        try:
            result = circuit.process(circuit.state, lane, assemble(items, circuit.joined))
        except BaseException as exc:  # fails the circuit; see stops_pool
            worker.busy_ns += perf_counter_ns() - started
            worker.errors += 1
            if stops_pool(exc):
                self._abort(worker, exc)  # before its reply: the loop sees the pool stopped
            self._put(worker, _new_reply(Reply, (circuit, lane, None, cells, exc)))
            return False
        worker.busy_ns += perf_counter_ns() - started
        worker.cells += cells
        worker.batches += 1
        self._put(worker, _new_reply(Reply, (circuit, lane, result, cells, None)))
        return True

    def _abort(self, worker: WorkerRecord, exc: BaseException) -> None:
        """A job raised SystemExit or KeyboardInterrupt: its reply is already put (the circuit
        failed); now stop the whole pool, as the exception asks. Worker thread."""
        log.critical("worker %d: %r in a job: the pool stops", worker.index, exc)
        self._scheduler.abort()

    def _apply_updates(self, worker: WorkerRecord) -> None:
        """Apply every update in this worker's inbox, in order. Worker thread."""
        while worker.inbox:
            update = worker.inbox.popleft()
            try:
                worker.state = update.fn(worker.state)
            except BaseException as exc:  # reported to on_applied
                update.errors.append(exc)
                if stops_pool(exc):
                    self._abort(worker, exc)
            if self._scheduler.update_applied(update):
                # The last worker acknowledges: a control reply (circuit None) for the loop.
                self._put(worker, _new_reply(Reply, (None, 0, update, 0, None)))

    def _put_many(self, worker: WorkerRecord, replies: list[Reply]) -> None:
        """Hand several replies to the loop thread in one lock round. Worker thread."""
        try:
            self._put_many_fn(replies)
        except Exception:
            worker.lost_replies += len(replies)
            log.exception("reply queue refused %d replies; they are lost", len(replies))

    def _put(self, worker: WorkerRecord, reply: Reply) -> None:
        """Hand a reply to the loop thread; a failing reply queue is counted. Worker thread."""
        try:
            self._replies.put(reply)  # type: ignore[union-attr]
        except Exception:
            worker.lost_replies += 1
            log.exception("reply queue refused a reply; it is lost")
