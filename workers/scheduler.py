"""The pool's locked state: run queues, circuit flags, waiting workers, update inboxes, exit flags.

Everything in this module happens under ONE lock, the pool lock, behind one
``threading.Condition``; nothing else in the pool takes it. :class:`Scheduler` holds what that
lock guards and is the only code that reads or writes it:

* the run queues (:class:`workers.runqueues.RunQueues`) and each circuit's ``queued``,
  ``busy``, ``closed`` and ``failed`` flags and class;
* ``idle``, the count of workers waiting and not yet notified, and ``notifies``;
* the workers' update inboxes and each update's ``remaining`` count;
* the flags ``closing`` (no more intake) and ``exit`` (workers leave now), and the circuits
  ``abandoned`` by workers told to exit.

The lock is never held while crypting, joining buffers, putting replies or running a callback:
each method is one short critical section, O(1) per circuit it is given (``stop_intake`` with
``cancel`` is O(queued circuits), at shutdown only).

Who calls what: the loop thread calls :meth:`Scheduler.schedule`, :meth:`~Scheduler.schedule_all`,
:meth:`~Scheduler.move`, :meth:`~Scheduler.close_circuit`, :meth:`~Scheduler.stop_intake` and
:meth:`~Scheduler.take_abandoned`; a worker calls :meth:`~Scheduler.turn` (let go of its
circuits and take the next ones, in one critical section) and
:meth:`~Scheduler.update_applied`; any thread may call :meth:`~Scheduler.post_update` and
:meth:`~Scheduler.snapshot`.

Wake-ups
--------
Workers ``wait()`` only after re-checking the exit flag, their inbox and the run queues under
the lock, so a ``notify_all`` sent while a worker was busy is not lost: the flags it announced
are still set. ``idle`` counts workers waiting and not yet notified: the notifier decrements
it, so a notify is sent only when it reaches a waiting worker, and never once per cell. The
loop notifies for the circuits it queues; a worker that leaves circuits on the run queues when
it takes its turn (circuits it re-queued at release: a grouped turn re-queues several and pops
only its share) notifies one waiting worker, which does the same. So no queued circuit waits
for a busy worker while another worker sleeps.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

from workers.circuit import Circuit
from workers.runqueues import RunQueues


class Update:
    """One ``update_workers`` call travelling through the workers' inboxes."""

    __slots__ = ("errors", "fn", "on_applied", "remaining")

    def __init__(
        self,
        fn: Callable[[Any], Any],
        workers: int,
        on_applied: Callable[[list[BaseException]], None] | None,
    ) -> None:
        """Any thread (``WorkerPool.update_workers``)."""
        self.fn = fn
        self.remaining = workers  # pool lock
        self.errors: list[BaseException] = []  # appended by each worker (list.append is atomic)
        self.on_applied = on_applied


class Owner(Protocol):
    """What :meth:`Scheduler.turn` needs of a worker's record (``workers.worker.WorkerRecord``)."""

    inbox: deque[Update]
    cancelled: int


class Scheduler:
    """The pool lock, its Condition and everything they guard. See the module doc."""

    __slots__ = (
        "abandoned",
        "closing",
        "cond",
        "exit",
        "group_circuits",
        "idle",
        "lock",
        "notifies",
        "queues",
        "threads",
    )

    def __init__(
        self, threads: int, priorities: int, starvation_period: int, group_circuits: int
    ) -> None:
        """Empty run queues, no worker waiting. Loop thread (before any worker starts)."""
        # Critical sections take the raw lock (a C-level context manager, cheaper than the
        # Condition's Python one); wait/notify go through the Condition built on the same lock.
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        self.threads = threads
        self.group_circuits = group_circuits
        # Guarded by the lock.
        self.queues = RunQueues(priorities, starvation_period)
        self.idle = 0
        self.notifies = 0
        self.closing = False
        # Written under the lock; workers also read it without the lock between batches (a
        # stale False costs at most one more batch; True is never early).
        self.exit = False
        self.abandoned: list[Circuit] = []

    # ------------------------------------------------------------------ loop side

    def schedule(self, circuit: Circuit) -> None:
        """Queue a circuit whose cells were just appended. Loop thread, after the append."""
        with self.lock:
            self._schedule_locked(circuit)

    def schedule_all(self, circuits: list[Circuit]) -> None:
        """:meth:`schedule` for several circuits in one critical section. Loop thread."""
        with self.lock:
            for circuit in circuits:
                self._schedule_locked(circuit)

    def _schedule_locked(self, circuit: Circuit) -> None:
        """Queue a circuit that has work, unless queued, busy, closed or failed. Lock held."""
        if circuit.queued or circuit.busy or circuit.closed or circuit.failed:
            # Busy: its owner re-checks pending under this lock when it lets go (_release_locked).
            return
        self.queues.push(circuit)
        if self.idle:
            self.idle -= 1
            self.notifies += 1
            self.cond.notify()

    def move(self, circuit: Circuit, priority: int) -> None:
        """Move a circuit to priority class ``priority`` (a queued one to its tail). Loop thread."""
        with self.lock:
            self.queues.move(circuit, priority)

    def close_circuit(self, circuit: Circuit) -> bool:
        """Mark the circuit closed and take it off its run queue; return whether it is busy.

        Loop thread. Closed and not busy, no worker can take it any more, so its pending lists
        are the caller's to empty; busy, its owner empties them when it lets go.
        """
        with self.lock:
            circuit.closed = True
            self.queues.discard(circuit)
            return circuit.busy

    def stop_intake(self, cancel: bool) -> list[Circuit]:
        """Set ``closing`` (and ``exit`` if ``cancel``) and wake every worker. Loop thread.

        With ``cancel``, returns the circuits taken off the run queues: no worker will serve
        them, so their pending lists are the caller's.
        """
        with self.lock:
            self.closing = True
            queued: list[Circuit] = []
            if cancel:
                self.exit = True
                queued = self.queues.pop_all()
            self.idle = 0
            self.cond.notify_all()
        return queued

    def abort(self) -> None:
        """Stop intake and every worker after its current batch; queued circuits are set aside
        for ``close()`` to cancel. Worker thread (one whose job raised ``SystemExit`` or
        ``KeyboardInterrupt``: the pool must stop, and only the loop thread may cancel)."""
        with self.lock:
            self.closing = True
            self.exit = True
            self.abandoned.extend(self.queues.pop_all())
            self.idle = 0
            self.cond.notify_all()

    def take_abandoned(self) -> list[Circuit]:
        """The circuits left with cells when the workers were told to exit (by their owners at
        release, or by :meth:`abort`). Loop thread (at close)."""
        with self.lock:
            abandoned, self.abandoned = self.abandoned, []
        return abandoned

    # ------------------------------------------------------------------ any thread

    def post_update(self, update: Update, inboxes: list[deque[Update]]) -> bool:
        """Put ``update`` in every inbox and wake every worker; False once closing. Any thread."""
        with self.lock:
            if self.closing:
                return False
            for inbox in inboxes:
                inbox.append(update)
            self.idle = 0
            self.cond.notify_all()
        return True

    def snapshot(self) -> tuple[list[int], int, int, int, int]:
        """``(queue depths, notifies, idle, pops, queue touches)``, consistent. Any thread."""
        with self.lock:
            queues = self.queues
            return queues.depths(), self.notifies, self.idle, queues.pops, queues.touches

    # ------------------------------------------------------------------ worker side

    def turn(self, owner: Owner, owned: list[Circuit], failed: list[bool]) -> list[Circuit] | None:
        """Let go of the circuits of a turn and take the next ones, waiting if there are none.

        Worker thread, one critical section per turn. Returns the circuits now owned (marked
        busy); an empty list when the owner's inbox holds updates to apply first; None when
        the worker must exit.
        """
        with self.lock:
            for circuit, bad in zip(owned, failed, strict=True):
                self._release_locked(owner, circuit, bad)
            circuits = self._next_circuits_locked(owner)
            if not circuits and (self.exit or not owner.inbox):
                return None
            return circuits

    def update_applied(self, update: Update) -> bool:
        """One worker applied ``update``; True for the last one. Worker thread."""
        with self.lock:
            update.remaining -= 1
            return update.remaining == 0

    def _release_locked(self, owner: Owner, circuit: Circuit, failed: bool) -> None:
        """Let go of a circuit; re-queue it at the tail if cells remain. Lock held."""
        circuit.busy = False
        if circuit.closed:
            # close_circuit() saw it busy and left its pending lists to us (its owner).
            owner.cancelled += circuit.drop_pending()
        elif failed:
            circuit.failed = True
        # The loop thread appends without this lock, then takes it to schedule. Any append that
        # happened before this check is seen here; any later one finds busy False when its
        # thread gets the lock, and that thread queues the circuit. No third order exists.
        elif circuit.has_pending():
            if self.exit:
                self.abandoned.append(circuit)  # cancelled by close()
            else:
                self.queues.push(circuit)  # popped again below, or by a worker woken there

    def _next_circuits_locked(self, owner: Owner) -> list[Circuit]:
        """Pop circuits (marked busy), waiting if there is none. Lock held.

        Returns one circuit, or several when the first has a ``group`` function: at most
        ``group_circuits``, and at most this worker's share of what is queued (the queued
        circuits divided by the workers, rounded up), so that a lone worker does not take the
        work of the others. An empty list: exit, or updates to apply first.
        """
        queues = self.queues
        while True:
            # Re-checked before every wait: a notify_all sent while this worker was busy is gone,
            # but the flags it announced are still set, so no wake-up is lost.
            if self.exit or owner.inbox:
                return []
            circuit = queues.pop()
            if circuit is not None:
                circuit.busy = True
                circuits = [circuit]
                if circuit.group is not None and self.group_circuits > 1:
                    share = -(-(len(queues) + 1) // self.threads)
                    limit = min(self.group_circuits, share)
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
                if self.idle and queues:
                    self.idle -= 1
                    self.notifies += 1
                    self.cond.notify()
                return circuits
            if self.closing:
                return []  # draining, and nothing is left to drain
            self.idle += 1  # the notifier decrements it (see _schedule_locked)
            self.cond.wait()
