"""The adaptive idle priority: an idle-priority worker that other work starves goes back to
normal priority for a while (``workers.tuning.IdleGovernor``, ``adaptive_idle``).

What is checked (never speed): the rule on fed samples (wall, thread CPU, time), and that a
real worker thread changes its own scheduling policy when the rule says so, with the moves
counted in ``pool.stats()``; ``adaptive_idle=False`` keeps the worker at idle priority.
A worker is made to look starved by a ``process`` that sleeps (wall time without CPU time).
"""

from __future__ import annotations

import functools
import os
import sys
import threading
import time

import pytest
from test_pool_support import CELL, Collector, OrderedState, cell

import workers.tuning
import workers.worker
from workers.pool import WorkerPool
from workers.tuning import IdleGovernor, StarvationRecord, set_idle_priority


def test_governor_demotes_only_on_a_long_starved_turn() -> None:
    g = IdleGovernor(starved_wall=0.03, starved_share=0.5, quiet_period=5.0)
    assert g.observe(0.010, 0.001, 1.0) is None  # short: a GIL wait, not starvation
    assert g.observe(0.100, 0.090, 2.0) is None  # long but on the CPU: just work
    assert g.idle
    assert g.observe(0.300, 0.010, 3.0) == "demote"
    assert not g.idle
    assert g.observe(0.300, 0.010, 3.5) is None  # already normal: no second demotion


def test_governor_promotes_after_a_quiet_period_from_the_last_starved_turn() -> None:
    g = IdleGovernor(starved_wall=0.03, starved_share=0.5, quiet_period=5.0)
    assert g.observe(0.5, 0.0, 10.0) == "demote"
    assert g.observe(0.005, 0.005, 14.0) is None  # quiet, but not long enough yet
    assert g.observe(0.040, 0.010, 14.5) is None  # starved again: the quiet period restarts
    assert g.observe(0.005, 0.005, 19.0) is None
    assert g.observe(0.005, 0.005, 19.5) == "promote"
    assert g.idle
    assert g.observe(0.005, 0.005, 100.0) is None
    assert g.observe(0.040, 0.010, 101.0) == "demote"


def test_governor_started_normal_waits_out_the_quiet_period() -> None:
    g = IdleGovernor(quiet_period=5.0, idle=False, last_starved=10.0)
    assert g.observe(0.005, 0.005, 12.0) is None
    assert g.observe(0.005, 0.005, 15.0) == "promote"


def can_leave_idle_priority() -> bool:
    """Whether a thread of this process may go SCHED_IDLE and back (Linux, privilege)."""
    result: list[bool] = []

    def probe() -> None:
        result.append(set_idle_priority(True) and set_idle_priority(False))

    thread = threading.Thread(target=probe)
    thread.start()
    thread.join()
    return result[0]


def run_low_priority_pool(
    adaptive: bool, batches_on_low: int, starvation: StarvationRecord | None = None
) -> tuple[list[int], dict]:
    """Crypt until the idle-priority worker (index 1 of 2) has run ``batches_on_low`` batches;
    its first batch sleeps 50 ms. Returns the policies it saw, batch by batch, and the stats."""
    seen: list[int] = []

    def process(state: OrderedState, direction: int, batch: list[bytes]) -> list[bytes]:
        if threading.current_thread().name == "gov-1":
            seen.append(os.sched_getscheduler(0))
            if len(seen) == 1:
                time.sleep(0.05)  # wall time without CPU time: looks starved
        return state.crypt_list(direction, batch)

    replies = Collector()
    pool = WorkerPool(replies, threads=2, process=process, low_priority_workers=1,
                      adaptive_idle=adaptive, starvation=starvation, name="gov", cell_size=CELL)
    pool.start()
    circuits = [pool.open_circuit(OrderedState(i), on_result=lambda c, d, r: None)
                for i in range(64)]
    for _ in range(2000):
        if len(seen) >= batches_on_low:
            break
        pool.submit_many([(c, 0, [cell(0, 0)]) for c in circuits])
        replies.pump(pool, lambda p=pool: p.in_flight == 0)  # type: ignore[misc]
    pool.close()
    assert len(seen) >= batches_on_low
    return seen, pool.stats()


linux_privileged = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not can_leave_idle_priority(),
    reason="needs SCHED_IDLE and the right to return to SCHED_OTHER",
)


@linux_privileged
def test_starved_worker_leaves_idle_priority_and_stays_normal() -> None:
    seen, stats = run_low_priority_pool(adaptive=True, batches_on_low=4)
    assert seen[0] == os.SCHED_IDLE
    assert set(seen[1:]) == {os.SCHED_OTHER}  # 5 s quiet period: not back within this run
    assert stats["idle_demotions"] == 1
    assert stats["idle_promotions"] == 0
    assert stats["low_priority_workers"] == 1


@linux_privileged
def test_demoted_worker_returns_to_idle_priority_after_the_quiet_period(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(workers.worker, "IdleGovernor",
                        functools.partial(IdleGovernor, quiet_period=0.0))
    seen, stats = run_low_priority_pool(adaptive=True, batches_on_low=20)
    # batch 1 sleeps (demote after it); batch 2 runs at normal priority; the first quiet turn
    # after it (batch 2's, unless outside load starved that one too) promotes
    assert seen[:2] == [os.SCHED_IDLE, os.SCHED_OTHER]
    assert os.SCHED_IDLE in seen[2:]
    assert stats["idle_demotions"] == 1
    assert stats["idle_promotions"] >= 1


@linux_privileged
def test_worker_started_after_a_starved_turn_begins_at_normal_priority() -> None:
    shared = StarvationRecord()
    shared.note(time.monotonic())  # another pool sharing this record was just starved
    seen, stats = run_low_priority_pool(adaptive=True, batches_on_low=1, starvation=shared)
    assert seen[0] == os.SCHED_OTHER
    assert stats["idle_demotions"] >= 1


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SCHED_IDLE is Linux's")
def test_adaptive_idle_off_keeps_idle_priority() -> None:
    seen, stats = run_low_priority_pool(adaptive=False, batches_on_low=3)
    assert set(seen) == {os.SCHED_IDLE}
    assert stats["idle_demotions"] == stats["idle_promotions"] == 0
