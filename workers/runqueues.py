"""Run queues: circuits ready for a worker, by priority class, with O(1) push, pop and removal.

The email: "stick circuits in need of getting some cells en/decrypted on the work queue" and
"it could be that we'll be better off just using round-robin here, or partitioning circuits into
two or three groups". :class:`RunQueues` is that: ``classes`` FIFO deques of circuits, class 0
the most urgent. The pool's lock is held by the caller for every method: this class has no lock
of its own and is used only by :class:`workers.scheduler.Scheduler`, under that lock.

Threads: any thread holding the pool's lock (the loop thread submitting and cancelling, the
workers taking circuits); every method assumes it and says so ("Pool lock held").

Round-robin inside a class
    A circuit is pushed at the tail and popped from the head; a worker that still finds cells
    pending after its batch pushes the circuit back at the tail. So circuits of one class take
    turns, one batch each.

No starvation across classes (the rule)
    Normally a pop serves the most urgent non-empty class. Every ``starvation_period``-th pop
    (37, Tor's "lower priority chance", made deterministic) is a *bypass* pop: it serves the next
    non-empty class, other than the most urgent one, after the class the previous bypass served,
    cycling over the class indices. With ``k`` classes a class that stays non-empty is served at
    least once every ``starvation_period * (k - 1)`` pops, whatever floods the classes above it.

Lazy removal
    ``discard`` (a circuit closed, or moved to another class, while queued) does not search the
    deque. Every entry is a pair ``(ticket, circuit)``; pushing increments ``circuit.ticket`` and
    ``discard`` increments it again, so an entry is live exactly when ``circuit.queued`` and
    its ticket equals ``circuit.ticket``. ``pop`` skips stale entries; each stale entry is skipped
    at most once, so every operation is amortized O(1). ``_live[c]`` counts the live entries of
    class ``c`` (the queue depth ``stats()`` reports); when it drops to zero the deque holds only
    stale entries and is cleared, which bounds the memory held by stale entries.

Counting touches
    ``touches`` counts every deque entry appended, examined or dropped and every class looked
    at. The O(1) test checks that it grows by a bounded amount per push and pop whatever the
    number of circuits (docs/design.md, invariant 5).

The flags ``queued``, ``ticket`` and ``queued_class`` of a circuit are written here, under the
pool's lock, and nowhere else.
"""

from __future__ import annotations

from collections import deque

from workers.circuit import Circuit

#: Tor's workqueue serves a lower priority about one time in 37.
DEFAULT_STARVATION_PERIOD = 37


class RunQueues:
    """Priority classes of ready circuits. The caller holds the pool lock for every method."""

    __slots__ = ("_bypass", "_live", "_period", "_pops", "_queues", "touches")

    def __init__(self, classes: int, starvation_period: int = DEFAULT_STARVATION_PERIOD) -> None:
        """Create ``classes`` empty classes. Any thread (before the pool is shared)."""
        if classes < 1:
            raise ValueError(f"need at least one priority class, got {classes}")
        if starvation_period < 2:
            raise ValueError(f"starvation_period must be >= 2, got {starvation_period}")
        self._queues: list[deque[tuple[int, Circuit]]] = [deque() for _ in range(classes)]
        self._live: list[int] = [0] * classes
        self._period = starvation_period
        self._pops = 0
        self._bypass = classes - 1
        self.touches = 0

    @property
    def classes(self) -> int:
        """Number of priority classes. Any thread."""
        return len(self._queues)

    @property
    def pops(self) -> int:
        """Circuits popped so far (bypass counting uses it). Pool lock held."""
        return self._pops

    def depths(self) -> list[int]:
        """Live circuits per class, most urgent first. Pool lock held."""
        return list(self._live)

    def __len__(self) -> int:
        """Live circuits in all classes. Pool lock held."""
        return sum(self._live)

    def push(self, circuit: Circuit) -> None:
        """Append ``circuit`` at the tail of its ``priority`` class. Pool lock held.

        The caller has checked that the circuit is neither queued nor busy nor closed.
        """
        priority = circuit.priority
        circuit.ticket += 1
        circuit.queued = True
        circuit.queued_class = priority
        self._queues[priority].append((circuit.ticket, circuit))
        self._live[priority] += 1
        self.touches += 1

    def discard(self, circuit: Circuit) -> None:
        """Take a queued circuit off its run queue, lazily (O(1)). Pool lock held."""
        if not circuit.queued:
            return
        # The entry stays in the deque; bumping the ticket makes it stale for pop().
        circuit.ticket += 1
        circuit.queued = False
        priority = circuit.queued_class
        self._live[priority] -= 1
        self.touches += 1
        if self._live[priority] == 0:
            # Only stale entries remain: dropping them now keeps their memory bounded. Each was
            # appended once, so this is paid for by the pushes (amortized O(1)).
            self.touches += len(self._queues[priority])
            self._queues[priority].clear()

    def move(self, circuit: Circuit, priority: int) -> None:
        """Set the circuit's class; a queued circuit goes to the tail of the new class.

        Pool lock held. O(1): the old entry is removed lazily.
        """
        if circuit.queued:
            self.discard(circuit)
            circuit.priority = priority
            self.push(circuit)
        else:
            circuit.priority = priority

    def pop(self) -> Circuit | None:
        """Take the next circuit to serve, or None when all classes are empty. Pool lock held.

        Applies the anti-starvation rule of the module docstring, then skips stale entries of the
        chosen class. Clears the circuit's ``queued`` flag; the caller marks it busy.
        """
        live = self._live
        classes = len(live)
        top = -1
        for priority in range(classes):
            self.touches += 1
            if live[priority]:
                top = priority
                break
        if top < 0:
            return None
        chosen = top
        self._pops += 1
        if self._pops % self._period == 0 and classes > 1:
            # Bypass pop: the next non-empty class after the last one served this way, never
            # the top class (classes above the top one are empty, so they are skipped too).
            for step in range(1, classes + 1):
                priority = (self._bypass + step) % classes
                self.touches += 1
                if priority != top and live[priority]:
                    chosen = priority
                    self._bypass = priority
                    break
        queue = self._queues[chosen]
        while True:
            ticket, circuit = queue.popleft()
            self.touches += 1
            if circuit.queued and circuit.ticket == ticket:
                break
            # Stale entry (closed or moved while queued): dropped here, exactly once.
        live[chosen] -= 1
        circuit.queued = False
        return circuit

    def pop_all(self) -> list[Circuit]:
        """Empty every class and return the live circuits, most urgent first. Pool lock held.

        Used by ``close(drain=False)`` to cancel what is queued: O(queued), at shutdown only.
        """
        circuits: list[Circuit] = []
        while True:
            circuit = self.pop()
            if circuit is None:
                return circuits
            circuits.append(circuit)
