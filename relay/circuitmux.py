"""Per-circuit cell queues in front of each link, and the round-robin that empties them.

Tor never stops reading one connection because another is slow: a cell bound for a link whose
output is backed up waits in its *circuit's* queue, and the link's scheduler (tor's
circuitmux) takes cells from the circuits that have some, in turn, as the link drains. Honest
circuits cannot queue much (SENDME windows: about 1,000 cells), so a circuit whose queue grows
past tor's cap is misbehaving and is closed (``relay.relaylimits.CellQueueCaps``), and the
relay-wide total is bounded by the OOM handler (``relay.relaylimits.QueueMemory``). This is
what the relay does:

* :class:`OutQueue`: one circuit's cells waiting for one link, as the wire chunks the circuit
  produced (whole batches, not cells), each with the time it was queued (the OOM handler kills
  the circuits with the oldest queued cell first);
* :class:`LinkScheduler`: one link's round-robin. While the link's write buffer is below its
  high watermark, a chunk is written at once (the common case: no queueing, one write per
  batch); above it, chunks wait in their circuit's queue, and every time the buffer drains to
  its low watermark the scheduler writes one chunk per waiting circuit in turn, until the
  buffer is high again or nothing waits.

Nothing here pauses reading: that is what lets relays form any topology (a ring of relays
whose links wait on each other can not deadlock when no one waits).

Threads: loop thread only.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from relay.link import Link

__all__ = ["LinkScheduler", "OutQueue"]


class OutQueue:
    """One circuit's cells waiting for one link. Loop thread only."""

    __slots__ = ("cells", "chunks", "on_sent", "scheduler", "waiting")

    def __init__(self, scheduler: LinkScheduler, on_sent: Callable[[int], object]) -> None:
        """A queue toward ``scheduler``'s link; ``on_sent(cells)`` follows every write of its
        queued cells. Loop thread only."""
        self.scheduler = scheduler
        self.on_sent = on_sent
        self.chunks: deque[tuple[bytes, int, float]] = deque()  # (wire bytes, cells, queued at)
        self.cells = 0
        self.waiting = False  # on the scheduler's round-robin

    @property
    def oldest(self) -> float | None:
        """When the oldest queued cell was queued (monotonic seconds), None when empty.
        Loop thread only."""
        return self.chunks[0][2] if self.chunks else None

    def clear(self) -> int:
        """Drop every queued cell (the circuit closed); returns how many. Loop thread only."""
        dropped, self.cells = self.cells, 0
        self.chunks.clear()
        return dropped


class LinkScheduler:
    """The round-robin of circuits with cells for one link. Loop thread only."""

    __slots__ = ("active", "congested", "link", "queued_writes")

    def __init__(self, link: Link) -> None:
        """Schedule writes to ``link``. Loop thread only."""
        self.link = link
        self.active: deque[OutQueue] = deque()
        self.congested = False  # the link's write buffer is above its high watermark
        self.queued_writes = 0  # chunks that had to wait (a counter for the stats)

    def send(self, queue: OutQueue, data: bytes, count: int) -> bool:
        """Write ``count`` cells at once, or queue them behind ``queue``'s earlier cells;
        True when written now. Loop thread only."""
        if not self.congested and not queue.chunks:
            self.link.send_cells(data, count)  # nothing when the link is no longer open
            return True
        queue.chunks.append((data, count, time.monotonic()))
        queue.cells += count
        self.queued_writes += 1
        if not queue.waiting:
            queue.waiting = True
            self.active.append(queue)
        return False

    def drained(self) -> None:
        """The link's write buffer fell to its low watermark: write one chunk per waiting
        circuit in turn until it is high again or nothing waits. Loop thread only."""
        self.congested = False
        active = self.active
        link = self.link
        while active and not self.congested and link.is_open:
            queue = active.popleft()
            if not queue.chunks:
                queue.waiting = False
                continue
            data, count, _ = queue.chunks.popleft()
            queue.cells -= count
            link.write_cells(data, count)  # may call back `congested = True` (on_write_high)
            if queue.chunks:
                active.append(queue)
            else:
                queue.waiting = False
            queue.on_sent(count)

    def forget(self, queue: OutQueue) -> None:
        """``queue``'s circuit closed: its cells are dropped; it leaves the round-robin lazily
        (an empty queue is skipped). Loop thread only."""
        queue.clear()
