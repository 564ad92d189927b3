"""The onion queue's discipline (relay.onionqueue), driven by a fake clock: pure logic.

Refusal by estimated wait (tor's have_room_for_onionskin: always room below 50 entries, then
queued x cost / workers against MaxOnionQueueDelay), our hard cap, culling of entries older than
the cutoff at each add, first-come-first-served order within and across kinds, batches of one
kind, cancellation, the cost estimate (1 ms prior, moving average, clipping) and the counters.
"""

from __future__ import annotations

import pytest

from relay.onionqueue import (
    COST_WINDOW,
    DEFAULT_MAX_DELAY,
    DEFAULT_MIN_ROOM,
    DEFAULT_WAIT_CUTOFF,
    MAX_BELIEVABLE_COST,
    PRIOR_COST,
    PRIOR_SAMPLES,
    OnionEntry,
    OnionQueue,
)

NTOR = 2
OTHER = 3


class FakeClock:
    """Seconds that move only when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(workers: int = 1, **kwargs: object) -> tuple[OnionQueue, FakeClock]:
    clock = FakeClock()
    return OnionQueue(workers, clock=clock, **kwargs), clock  # type: ignore[arg-type]


def fill(queue: OnionQueue, kind: int, count: int, start: int = 0) -> list[OnionEntry]:
    entries = []
    for i in range(start, start + count):
        result = queue.add(kind, i)
        assert result.entry is not None and result.culled == []
        entries.append(result.entry)
    return entries


def test_tor_defaults() -> None:
    assert (DEFAULT_MAX_DELAY, DEFAULT_WAIT_CUTOFF, DEFAULT_MIN_ROOM) == (1.75, 5.0, 50)
    assert (PRIOR_COST, PRIOR_SAMPLES, MAX_BELIEVABLE_COST) == (0.001, 100, 2.0)


def test_fifo_order_and_batches() -> None:
    queue, _ = make()
    fill(queue, NTOR, 7)
    batches = [[e.item for e in queue.take(3)] for _ in range(4)]
    assert batches == [[0, 1, 2], [3, 4, 5], [6], []]
    stats = queue.stats()
    assert (stats["added"], stats["served"], stats["queued"]) == (7, 7, 0)
    with pytest.raises(ValueError):
        queue.take(0)


def test_kinds_are_served_first_come_first_served_in_homogeneous_batches() -> None:
    queue, clock = make()
    for i, kind in enumerate([NTOR, NTOR, OTHER, NTOR, OTHER, OTHER]):
        clock.now += 0.001
        queue.add(kind, i)
    first = queue.take(10)
    assert [(e.kind, e.item) for e in first] == [(NTOR, 0), (NTOR, 1), (NTOR, 3)]
    second = queue.take(10)
    assert [(e.kind, e.item) for e in second] == [(OTHER, 2), (OTHER, 4), (OTHER, 5)]
    assert queue.stats()["kinds"][NTOR]["served"] == 3
    assert queue.stats()["kinds"][OTHER]["served"] == 3


def test_oldest_head_wins_across_kinds() -> None:
    queue, clock = make()
    queue.add(OTHER, "old")
    clock.now += 1
    queue.add(NTOR, "new")
    assert [e.item for e in queue.take(5)] == ["old"]
    assert [e.item for e in queue.take(5)] == ["new"]


def test_below_min_room_there_is_always_room() -> None:
    """Even with a huge measured cost, the first min_room entries are admitted."""
    queue, _ = make()
    queue.record_cost(NTOR, PRIOR_SAMPLES, PRIOR_SAMPLES * 1.0)  # 1 s per handshake
    fill(queue, NTOR, DEFAULT_MIN_ROOM)
    assert queue.estimated_wait() == DEFAULT_MIN_ROOM * 1.0
    assert queue.add(NTOR, "one too many").refused
    assert queue.stats()["refused"] == 1


@pytest.mark.parametrize("workers", [1, 2, 4])
def test_refused_when_the_estimated_wait_exceeds_max_delay(workers: int) -> None:
    """cost 1/64 s, max_delay 1 s: admitted while queued / 64 / workers <= 1, so exactly
    64 * workers + 1 entries get in (the last one saw a wait of exactly 1 s)."""
    queue, _ = make(workers, max_delay=1.0)
    queue.record_cost(NTOR, 128, 2.0)
    assert queue.cost(NTOR) == 1 / 64
    admitted = 0
    while not queue.add(NTOR, admitted).refused:
        admitted += 1
    assert admitted == 64 * workers + 1
    assert queue.add(NTOR, "again").refused
    assert queue.stats()["refused"] == 2
    # a worker takes a batch: the wait drops and the next add is admitted again
    queue.take(workers)
    assert not queue.add(NTOR, "after take").refused
    queue.workers = workers * 2  # more workers, shorter wait
    assert queue.has_room()


def test_the_prior_cost_applies_until_enough_samples() -> None:
    """Until 100 handshakes are measured each is assumed to take 1 ms (tor)."""
    queue, _ = make(max_delay=0.1)
    queue.record_cost(NTOR, PRIOR_SAMPLES - 1, 0.0)
    assert queue.cost(NTOR) == PRIOR_COST
    admitted = 0
    while not queue.add(NTOR, admitted).refused:
        admitted += 1
    assert admitted == 101  # 100 queued x 1 ms = 0.1 s still fits; 101 do not
    queue.record_cost(NTOR, 1, 0.0)  # the 100th sample: the measurement (0 s) takes over
    assert queue.cost(NTOR) == 0.0
    assert not queue.add(NTOR, "now cheap").refused


def test_hard_cap_holds_whatever_the_estimate() -> None:
    queue, _ = make(max_entries=300)
    queue.record_cost(NTOR, 1000, 0.0)
    fill(queue, NTOR, 300)
    assert queue.add(NTOR, "over").refused
    assert len(queue) == 300


def test_costs_of_several_kinds_add_up() -> None:
    queue, _ = make(2)
    queue.record_cost(NTOR, 128, 1.0)   # 1/128 s
    queue.record_cost(OTHER, 128, 4.0)  # 1/32 s
    fill(queue, NTOR, 64)
    fill(queue, OTHER, 16)
    assert queue.estimated_wait() == (64 / 128 + 16 / 32) / 2


def test_cost_is_a_moving_average_and_clipped() -> None:
    queue, _ = make()
    queue.record_cost(NTOR, COST_WINDOW, COST_WINDOW * 0.001)
    for _ in range(8):
        queue.record_cost(NTOR, 1024, 1024 * 0.004)
    assert 0.0035 < queue.cost(NTOR) < 0.004  # the old 1 ms has mostly decayed away
    queue.record_cost(OTHER, 200, 1e6)
    assert queue.cost(OTHER) == MAX_BELIEVABLE_COST
    queue.record_cost(OTHER, 0, 5.0)  # nothing measured: ignored
    assert queue.cost(OTHER) == MAX_BELIEVABLE_COST


def test_old_entries_are_culled_at_add_oldest_first() -> None:
    queue, clock = make()
    queue.add(NTOR, "t0")
    clock.now += 1
    queue.add(NTOR, "t1")
    clock.now += 1
    queue.add(OTHER, "t2")
    clock.now += 3 - 1e-9  # t0 has waited just under 5 s
    assert queue.add(NTOR, "t5-").culled == []
    clock.now += 1e-9  # t0: exactly 5 s (tor culls at >= cutoff)
    result = queue.add(NTOR, "t5")
    assert [e.item for e in result.culled] == ["t0"]
    assert not result.culled[0].queued
    clock.now += 2
    result = queue.add(NTOR, "t7")
    assert [e.item for e in result.culled] == ["t1", "t2"]  # both kinds, oldest first
    assert [e.item for e in queue.take(10)] == ["t5-", "t5", "t7"]
    stats = queue.stats()
    assert (stats["culled"], stats["added"], stats["served"]) == (3, 6, 3)


def test_culling_makes_room_and_explicit_cull() -> None:
    queue, clock = make(max_delay=0.05, min_room=0)
    fill(queue, NTOR, 51)  # 51 x 1 ms > 50 ms: full
    assert queue.add(NTOR, "refused").refused
    clock.now += DEFAULT_WAIT_CUTOFF
    result = queue.add(NTOR, "fresh")
    assert len(result.culled) == 51 and result.entry is not None
    clock.now += DEFAULT_WAIT_CUTOFF
    assert [e.item for e in queue.cull()] == ["fresh"]
    assert len(queue) == 0


def test_no_culling_without_cutoff() -> None:
    queue, clock = make(wait_cutoff=None)
    queue.add(NTOR, "old")
    clock.now += 1e6
    assert queue.add(NTOR, "new").culled == []
    assert queue.cull() == []
    assert len(queue) == 2


def test_cancel_skips_the_entry_once() -> None:
    queue, _ = make()
    entries = fill(queue, NTOR, 5)
    assert queue.cancel(entries[1]) and queue.cancel(entries[3])
    assert not queue.cancel(entries[1])
    assert queue.pending(NTOR) == 3 and len(queue) == 3
    assert [e.item for e in queue] == [0, 2, 4]
    taken = queue.take(2)
    assert [e.item for e in taken] == [0, 2]
    assert not queue.cancel(taken[0])  # already with a worker
    assert [e.item for e in queue.take(2)] == [4]
    stats = queue.stats()
    assert (stats["cancelled"], stats["served"], stats["queued"]) == (2, 3, 0)


def test_cancelling_everything_leaves_no_dead_slots() -> None:
    queue, _ = make()
    entries = fill(queue, NTOR, 10)
    for entry in entries:
        queue.cancel(entry)
    assert len(queue) == 0 and queue.take(5) == [] and list(queue) == []
    assert queue.stats()["kinds"][NTOR]["cancelled"] == 10


def test_drain_returns_everything_oldest_first() -> None:
    queue, clock = make()
    queue.add(NTOR, "a")
    clock.now += 1
    queue.add(OTHER, "b")
    clock.now += 1
    queue.add(NTOR, "c")
    assert [e.item for e in queue.drain()] == ["a", "b", "c"]
    assert len(queue) == 0 and queue.stats()["cancelled"] == 3


def test_configuration_is_checked() -> None:
    for bad in ({"max_delay": 0}, {"wait_cutoff": 0}, {"min_room": 10, "max_entries": 5},
                {"max_entries": 0}):
        with pytest.raises(ValueError):
            make(**bad)
    with pytest.raises(ValueError):
        make(0)
    queue, _ = make()
    with pytest.raises(ValueError):
        queue.workers = 0
