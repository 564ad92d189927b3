"""The onion queue: CREATE2 handshakes waiting for a worker, bounded by the delay they would see.

Tor does not answer a CREATE2 on its main thread: the onionskin goes to a cpuworker thread, and
when the workers are all busy it waits in the *onion queue* (tor's ``onion_queue.c``), which
bounds the wait rather than the length. This module is that discipline, for a relay whose
handshakes run on worker threads (:func:`relay._ntor.ntor_server_batch`):

Refusal (tor's ``have_room_for_onionskin``)
    An onionskin is refused when the queue already holds at least ``min_room`` entries (tor: 50;
    below that there is always room) and the time the workers would need to clear what is queued,
    ``sum(pending(kind) * cost(kind)) / workers``, exceeds ``max_delay``. Tor's names: the torrc
    option ``MaxOnionQueueDelay`` (0 = use the consensus) and the consensus parameter of the same
    name, ``MaxOnionQueueDelay`` (milliseconds; default 1750, min 1). ``max_entries`` is a hard
    cap of ours on top: it bounds memory even if the cost estimate is too low. The caller
    answers a refused CREATE2 with DESTROY, reason RESOURCELIMIT (tor: ``command.c`` marks the
    circuit for close with ``END_CIRC_REASON_RESOURCELIMIT``).

Culling (tor's "cull elderly requests" in ``onion_pending_add``)
    At each add (before the room check), entries at the head that have waited ``wait_cutoff``
    or longer are dropped and returned, so the caller can DESTROY them (RESOURCELIMIT): by then
    the client has most likely given up on the circuit. Tor's consensus parameter
    ``onion_queue_wait_cutoff`` (seconds; default 5). An entry whose circuit went away meanwhile
    is removed with :meth:`OnionQueue.cancel` (tor's ``onion_pending_remove``).

Cost (tor's ``estimated_usec_for_onionskins``)
    Workers report each batch's wall time with :meth:`OnionQueue.record_cost`. Until
    ``PRIOR_SAMPLES`` (100) handshakes of a kind are measured, each is assumed to cost
    ``PRIOR_COST`` (1 ms), as tor does; then the estimate is the measured total over the
    measured count, both halved whenever the count reaches ``COST_WINDOW``: a moving average
    over the last few thousand handshakes (tor halves at 500,000; a smaller window follows a
    change of load sooner). A batch's per-handshake time is clipped at ``MAX_BELIEVABLE_COST``
    (tor's ``MAX_BELIEVABLE_ONIONSKIN_DELAY``, 2 s).

Kinds and order
    Entries carry a *kind* (the CREATE2 handshake type, e.g. ``HTYPE_NTOR``), each kind with its
    own FIFO, cost estimate and counters, because a worker's batch must be of one kind. Service
    is first come, first served across kinds: :meth:`OnionQueue.take` serves the kind whose
    oldest entry is oldest. (Tor's second queue was for TAP, which this relay does not
    implement; CREATE_FAST never enters the queue: it costs a few hashes, and tor's
    ``command_process_create_cell`` answers it inline on the main thread, as
    :class:`relay.node.RelayNode` does.)

Counters: ``added``, ``refused``, ``culled``, ``cancelled``, ``served`` per kind and in total.

Threads: none here. The queue is plain data owned by one thread, the loop thread, which adds,
takes, cancels and records; the clock is injected (``clock``, default ``time.monotonic``),
so tests drive it with a fake clock. Nothing blocks and nothing does I/O.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass
from typing import Any

__all__ = [
    "COST_WINDOW",
    "DEFAULT_MAX_DELAY",
    "DEFAULT_MAX_ENTRIES",
    "DEFAULT_MIN_ROOM",
    "DEFAULT_WAIT_CUTOFF",
    "MAX_BELIEVABLE_COST",
    "PRIOR_COST",
    "PRIOR_SAMPLES",
    "AddResult",
    "OnionEntry",
    "OnionQueue",
]

DEFAULT_MAX_DELAY = 1.750
"""Seconds: tor's ``MaxOnionQueueDelay`` default (1750 ms)."""
DEFAULT_WAIT_CUTOFF = 5.0
"""Seconds: tor's ``onion_queue_wait_cutoff`` default."""
DEFAULT_MIN_ROOM = 50
"""Below this many queued entries there is always room (tor's hard-coded 50)."""
DEFAULT_MAX_ENTRIES = 16384
"""Our hard cap on queued entries (a few MB of onionskins and circuit references)."""
PRIOR_COST = 0.001
"""Seconds per handshake assumed until PRIOR_SAMPLES are measured (tor: 1 ms)."""
PRIOR_SAMPLES = 100
"""Handshakes of a kind measured before the measurement replaces PRIOR_COST (tor: 100)."""
COST_WINDOW = 4096
"""The measured count and total are halved when the count reaches this (a moving average)."""
MAX_BELIEVABLE_COST = 2.0
"""Seconds: a per-handshake time above this is clipped (tor's 2 s)."""

_QUEUED, _TAKEN, _CULLED, _CANCELLED = range(4)


class OnionEntry:
    """One queued onionskin: the caller's ``item``, its ``kind`` and when it was added.

    The caller keeps the entry (from :meth:`OnionQueue.add`) to cancel it if its circuit goes
    away. Loop thread only.
    """

    __slots__ = ("_state", "added_at", "item", "kind")

    def __init__(self, kind: Hashable, item: Any, added_at: float) -> None:
        self.kind = kind
        self.item = item
        self.added_at = added_at
        self._state = _QUEUED

    @property
    def queued(self) -> bool:
        """True until the entry is taken, culled or cancelled. Loop thread only."""
        return self._state == _QUEUED

    def __repr__(self) -> str:
        state = ("queued", "taken", "culled", "cancelled")[self._state]
        return f"<OnionEntry kind={self.kind!r} {state} added_at={self.added_at:.3f}>"


@dataclass(frozen=True)
class AddResult:
    """What :meth:`OnionQueue.add` did: ``entry`` is None when the onionskin was refused;
    ``culled`` lists the old entries dropped from the head (DESTROY them)."""

    entry: OnionEntry | None
    culled: list[OnionEntry]

    @property
    def refused(self) -> bool:
        """True when the onionskin was refused (DESTROY it with RESOURCELIMIT). Any thread."""
        return self.entry is None


class _Kind:
    """One kind's FIFO (with lazily removed cancelled entries), cost meter and counters."""

    __slots__ = (
        "added", "cancelled", "culled", "fifo", "live", "measured_n", "measured_s", "refused",
        "served",
    )

    def __init__(self) -> None:
        self.fifo: deque[OnionEntry] = deque()
        self.live = 0
        self.measured_n = 0.0
        self.measured_s = 0.0
        self.added = self.refused = self.culled = self.cancelled = self.served = 0

    def cost(self) -> float:
        if self.measured_n < PRIOR_SAMPLES:
            return PRIOR_COST
        return self.measured_s / self.measured_n

    def head(self) -> OnionEntry | None:
        """The oldest live entry; drops cancelled entries in front of it (each once)."""
        fifo = self.fifo
        while fifo and fifo[0]._state != _QUEUED:
            fifo.popleft()
        return fifo[0] if fifo else None

    def pop(self, state: int) -> OnionEntry:
        entry = self.fifo.popleft()
        entry._state = state
        self.live -= 1
        return entry


class OnionQueue:
    """Onionskins waiting for a worker, refused or culled by the wait they would see.

    See the module docstring. Every method is loop thread only (no lock: one thread owns it).
    """

    def __init__(
        self,
        workers: int,
        *,
        max_delay: float = DEFAULT_MAX_DELAY,
        wait_cutoff: float | None = DEFAULT_WAIT_CUTOFF,
        min_room: int = DEFAULT_MIN_ROOM,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``workers``: threads that answer handshakes (the estimate divides by it);
        ``max_delay`` / ``wait_cutoff`` in seconds (``wait_cutoff`` None: never cull);
        ``min_room``: entries always admitted; ``max_entries``: hard cap. Loop thread only."""
        if max_delay <= 0:
            raise ValueError(f"max_delay must be > 0 seconds, got {max_delay}")
        if wait_cutoff is not None and wait_cutoff <= 0:
            raise ValueError(f"wait_cutoff must be > 0 seconds or None, got {wait_cutoff}")
        if not 0 <= min_room <= max_entries or max_entries < 1:
            raise ValueError("need 0 <= min_room <= max_entries and max_entries >= 1")
        self.workers = workers  # validated by the property
        self.max_delay = max_delay
        self.wait_cutoff = wait_cutoff
        self.min_room = min_room
        self.max_entries = max_entries
        self._clock = clock
        self._kinds: dict[Hashable, _Kind] = {}

    # ------------------------------------------------------------------ configuration

    @property
    def workers(self) -> int:
        """Worker threads answering handshakes. Loop thread only."""
        return self._workers

    @workers.setter
    def workers(self, count: int) -> None:
        if count < 1:
            raise ValueError(f"workers must be >= 1, got {count}")
        self._workers = count

    def _kind(self, kind: Hashable) -> _Kind:
        k = self._kinds.get(kind)
        if k is None:
            k = self._kinds[kind] = _Kind()
        return k

    # ------------------------------------------------------------------ the estimate

    def cost(self, kind: Hashable) -> float:
        """Estimated seconds one worker needs for one handshake of ``kind``. Loop thread only."""
        return self._kind(kind).cost()

    def estimated_wait(self) -> float:
        """Seconds the workers would need to clear every queued entry: what a new entry would
        wait before a worker takes it. Loop thread only."""
        return sum(k.live * k.cost() for k in self._kinds.values()) / self._workers

    def record_cost(self, kind: Hashable, handshakes: int, seconds: float) -> None:
        """A worker answered ``handshakes`` of ``kind`` in ``seconds`` (wall time of the batch).
        Feeds the moving average. Loop thread only."""
        if handshakes < 1:
            return
        k = self._kind(kind)
        per = min(max(seconds, 0.0) / handshakes, MAX_BELIEVABLE_COST)
        k.measured_n += handshakes
        k.measured_s += per * handshakes
        while k.measured_n >= COST_WINDOW:
            k.measured_n /= 2
            k.measured_s /= 2

    # ------------------------------------------------------------------ queueing

    def has_room(self) -> bool:
        """Would an onionskin be admitted now? (Tor's ``have_room_for_onionskin``.)
        Loop thread only."""
        queued = len(self)
        if queued >= self.max_entries:
            return False
        if queued < self.min_room:
            return True
        return self.estimated_wait() <= self.max_delay

    def add(self, kind: Hashable, item: Any) -> AddResult:
        """Cull the heads that waited ``wait_cutoff`` or longer, then queue ``item`` (whatever
        the caller needs to answer it later) at the tail of ``kind`` unless the estimated wait
        refuses it. Loop thread only.

        Tor checks for room first and culls after adding (only when it added); culling first
        means entries that will never be served do not count against a new one."""
        now = self._clock()
        culled = self._cull(now)
        k = self._kind(kind)
        if not self.has_room():
            k.refused += 1
            return AddResult(None, culled)
        entry = OnionEntry(kind, item, now)
        k.fifo.append(entry)
        k.live += 1
        k.added += 1
        return AddResult(entry, culled)

    def cull(self) -> list[OnionEntry]:
        """Drop and return the entries that have waited ``wait_cutoff`` or longer (also done
        by every :meth:`add`; call it from a timer if adds may stop). Loop thread only."""
        return self._cull(self._clock())

    def _cull(self, now: float) -> list[OnionEntry]:
        culled: list[OnionEntry] = []
        if self.wait_cutoff is None:
            return culled
        for k in self._kinds.values():
            head = k.head()
            while head is not None and now - head.added_at >= self.wait_cutoff:
                culled.append(k.pop(_CULLED))
                k.culled += 1
                head = k.head()
        if len(self._kinds) > 1:
            culled.sort(key=lambda e: e.added_at)
        return culled

    def take(self, limit: int) -> list[OnionEntry]:
        """Up to ``limit`` entries of ONE kind for a worker's batch, oldest first: the kind
        whose oldest entry is the oldest of all. Empty when nothing is queued.
        Loop thread only."""
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        best: _Kind | None = None
        best_at = 0.0
        for k in self._kinds.values():
            head = k.head()
            if head is not None and (best is None or head.added_at < best_at):
                best, best_at = k, head.added_at
        if best is None:
            return []
        batch: list[OnionEntry] = []
        while len(batch) < limit and best.head() is not None:
            batch.append(best.pop(_TAKEN))
        best.served += len(batch)
        return batch

    def cancel(self, entry: OnionEntry) -> bool:
        """Take a queued entry out (its circuit went away). False if it was no longer queued
        (taken, culled or cancelled already). O(1): the slot is skipped later.
        Loop thread only."""
        if entry._state != _QUEUED:
            return False
        entry._state = _CANCELLED
        k = self._kinds[entry.kind]
        k.live -= 1
        k.cancelled += 1
        if k.live == 0:
            k.fifo.clear()  # only dead slots remain: drop them now, bounding their memory
        return True

    def drain(self) -> list[OnionEntry]:
        """Take every queued entry out, oldest first (shutdown: DESTROY them); they count
        as cancelled. Loop thread only."""
        out: list[OnionEntry] = []
        for k in self._kinds.values():
            while k.head() is not None:
                out.append(k.pop(_CANCELLED))
                k.cancelled += 1
        out.sort(key=lambda e: e.added_at)
        return out

    # ------------------------------------------------------------------ introspection

    def __len__(self) -> int:
        """Queued entries of all kinds. Loop thread only."""
        return sum(k.live for k in self._kinds.values())

    def pending(self, kind: Hashable) -> int:
        """Queued entries of ``kind``. Loop thread only."""
        k = self._kinds.get(kind)
        return 0 if k is None else k.live

    def __iter__(self) -> Iterator[OnionEntry]:
        """The queued entries, kind by kind, oldest first within a kind. Loop thread only."""
        for k in self._kinds.values():
            for entry in k.fifo:
                if entry._state == _QUEUED:
                    yield entry

    def stats(self) -> dict[str, Any]:
        """Counters in total and per kind (``added``, ``refused``, ``culled``, ``cancelled``,
        ``served``, ``queued``, ``cost_s``), ``estimated_wait_s`` and ``workers``.
        Loop thread only."""
        per_kind = {
            kind: {
                "added": k.added, "refused": k.refused, "culled": k.culled,
                "cancelled": k.cancelled, "served": k.served, "queued": k.live,
                "cost_s": k.cost(),
            }
            for kind, k in self._kinds.items()
        }
        totals = {
            name: sum(v[name] for v in per_kind.values())
            for name in ("added", "refused", "culled", "cancelled", "served", "queued")
        }
        return {
            **totals,
            "estimated_wait_s": self.estimated_wait(),
            "workers": self._workers,
            "kinds": per_kind,
        }
