"""relay.relaylimits: RELAY_EARLY budget, cell-queue caps, MaxMemInQueues and the OOM victim
order."""

from __future__ import annotations

from pathlib import Path

import pytest

from relay.cells import DestroyReason
from relay.relaylimits import (
    MAX_RELAY_EARLY_CELLS_PER_CIRCUIT,
    CellQueueCaps,
    QueueMemory,
    RelayEarlyBudget,
    compute_max_mem_in_queues,
    total_system_memory,
)

GIB = 1 << 30
MIB = 1 << 20


def test_eight_relay_early_cells_then_protocol() -> None:
    budget = RelayEarlyBudget()
    assert MAX_RELAY_EARLY_CELLS_PER_CIRCUIT == 8
    assert all(budget.on_relay_early(toward_exit=True).allowed for _ in range(8))
    ninth = budget.on_relay_early(toward_exit=True)
    assert not ninth.allowed and ninth.reason is DestroyReason.PROTOCOL
    assert "more than 8" in ninth.why


def test_inbound_relay_early_is_a_protocol_violation() -> None:
    verdict = RelayEarlyBudget().on_relay_early(toward_exit=False)
    assert not verdict.allowed and verdict.reason is DestroyReason.PROTOCOL


def test_cell_queue_caps() -> None:
    caps = CellQueueCaps()
    assert (caps.toward_client, caps.toward_exit) == (1250, 1000)
    assert CellQueueCaps.tor_builtin() == CellQueueCaps(2500, 2500)
    assert caps.check(999, toward_exit=True).allowed
    over = caps.check(1000, toward_exit=True)
    assert not over.allowed and over.reason is DestroyReason.RESOURCELIMIT
    assert "outbound" in over.why and "maximum allowed is 1000" in over.why
    assert caps.check(1000, toward_exit=False).allowed
    assert not caps.check(1200, toward_exit=False, adding=51).allowed
    assert caps.check(1200, toward_exit=False, adding=50).allowed
    assert CellQueueCaps(10, 10**12) == CellQueueCaps(50, 2**31 - 1)   # tor's range


@pytest.mark.parametrize("ram, expected", [
    (24 * GIB, 8 * GIB),          # 40% of 24 GiB is above the 8 GiB ceiling
    (16 * GIB, (16 * GIB // 5) * 2),
    (8 * GIB, (8 * GIB // 5) * 2),
    (4 * GIB, 3 * GIB),           # below 8 GiB: 75%
    (200 * MIB, 256 * MIB),       # floor
    (0, 8 * GIB),                 # unknown RAM on 64-bit
])
def test_default_max_mem_in_queues(ram: int, expected: int) -> None:
    assert compute_max_mem_in_queues(0, total_ram=ram, is_64bit=True) == expected


def test_configured_max_mem_in_queues() -> None:
    assert compute_max_mem_in_queues(10 * MIB) == 64 * MIB              # relay minimum
    assert compute_max_mem_in_queues(10 * MIB, is_server=False) == 10 * MIB
    assert compute_max_mem_in_queues(512 * MIB) == 512 * MIB
    assert compute_max_mem_in_queues(0, total_ram=64 * GIB, is_64bit=False) == 2 * GIB
    assert compute_max_mem_in_queues(0, total_ram=0, is_64bit=False) == GIB


def test_total_system_memory_reads_meminfo(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24683568 kB\nMemFree: 1 kB\n")
    assert total_system_memory(meminfo) == 24683568 * 1024
    assert total_system_memory(tmp_path / "missing") is None
    real = total_system_memory()
    assert real is None or real > 0


def test_oom_victims_oldest_first_until_ninety_percent() -> None:
    memory = QueueMemory(1000)
    assert memory.low_threshold == 750
    ages = {"a": 50.0, "b": 10.0, "c": 30.0, "d": 20.0, "e": 40.0}
    for key, oldest in ages.items():
        assert not memory.update(key, 180, oldest)
    assert memory.total == 900 and memory.under_pressure
    assert memory.victims() == []                      # below the limit: nobody
    assert memory.update("f", 150, 60.0)               # 1050 >= 1000: run the OOM handler
    # Must get down to 900: recover 150, taking the oldest queued cell first.
    assert memory.victims() == ["b"]
    assert memory.total == 870 and len(memory) == 5
    memory.update("g", 400, 5.0)                       # 1270: recover 370
    assert memory.victims() == ["g"]
    memory.update("h", 100, 70.0)
    memory.update("i", 100, 80.0)
    memory.update("j", 100, 90.0)                      # 1170: recover 270
    assert memory.victims() == ["d", "c"]


def test_updates_replace_and_forget_is_o1_bookkeeping() -> None:
    memory = QueueMemory(10_000)
    memory.update("x", 500, 1.0)
    memory.update("x", 200, 2.0)
    assert memory.total == 200
    memory.update("x", 0, 3.0)                         # drained: not tracked
    assert memory.total == 0 and len(memory) == 0
    memory.update("y", 300, 1.0)
    memory.forget("y")
    memory.forget("never-seen")
    assert memory.total == 0
    with pytest.raises(ValueError):
        QueueMemory(0)
