"""CPU time of processes and their threads, read from /proc (Linux).

``/proc/PID/stat`` holds a process's user and system time (fields 14 and 15, in clock ticks of
``SC_CLK_TCK``, usually 10 ms), summed over all its threads including exited ones;
``/proc/PID/task/TID/stat`` holds one thread's. A relay may be several processes (the stand-in
relay is a small Python wrapper and the tor it runs), so :func:`tree_cpu` sums a process and
every descendant it has at the moment of reading (found through
``/proc/PID/task/TID/children``). A :class:`CpuSample` taken before and after some work gives
the CPU the work cost, in total and per thread name.

A descendant that exits between two samples takes its CPU out of the later total, so compare
samples of a tree whose members live through the work (a relay during a push).

The resolution is one clock tick: a figure is only meaningful when the work took many ticks
(the pushes move mebibytes, costing hundreds of ticks on tor's relays).

Threads: any thread (reads /proc only).
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["CLOCK_TICKS", "CpuSample", "descendants", "process_cpu", "thread_cpu", "tree_cpu"]

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
"""Clock ticks per second, the unit of the times in /proc/PID/stat."""
_PROC = Path("/proc")


def _stat_fields(path: Path) -> tuple[str, list[str]]:
    """``(comm, fields after comm)`` of a stat file (comm may contain spaces and parens)."""
    text = path.read_text()
    open_paren, close_paren = text.index("("), text.rindex(")")
    return text[open_paren + 1:close_paren], text[close_paren + 2:].split()


def _cpu_seconds(path: Path) -> tuple[str, float]:
    comm, rest = _stat_fields(path)
    # rest[0] is field 3 (state): utime is field 14 -> rest[11], stime field 15 -> rest[12].
    return comm, (int(rest[11]) + int(rest[12])) / CLOCK_TICKS


def process_cpu(pid: int) -> float:
    """User + system CPU seconds of one process (all its threads). Raises OSError when it is
    gone. Any thread."""
    return _cpu_seconds(_PROC / str(pid) / "stat")[1]


def thread_cpu(pid: int) -> dict[int, tuple[str, float]]:
    """``{tid: (thread name, CPU seconds)}`` for each live thread of ``pid`` ({} when it is
    gone). Any thread."""
    threads: dict[int, tuple[str, float]] = {}
    try:
        tids = [int(name) for name in os.listdir(_PROC / str(pid) / "task")]
    except OSError:
        return threads
    for tid in tids:
        try:
            threads[tid] = _cpu_seconds(_PROC / str(pid) / "task" / str(tid) / "stat")
        except (OSError, ValueError, IndexError):
            continue  # the thread ended while we read
    return threads


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (children first, breadth-first). Any thread."""
    found: list[int] = []
    frontier = [pid]
    while frontier:
        parent = frontier.pop(0)
        try:
            tids = os.listdir(_PROC / str(parent) / "task")
        except OSError:
            continue
        for tid in tids:
            try:
                children = (_PROC / str(parent) / "task" / tid / "children").read_text().split()
            except OSError:
                continue
            for child in map(int, children):
                if child not in found:
                    found.append(child)
                    frontier.append(child)
    return found


def tree_cpu(pid: int) -> float:
    """CPU seconds of ``pid`` plus its live descendants (0 for any that vanished). Any
    thread."""
    total = 0.0
    for member in [pid, *descendants(pid)]:
        try:
            total += process_cpu(member)
        except (OSError, ValueError, IndexError):
            continue
    return total


@dataclass
class CpuSample:
    """CPU seconds of a process tree at one moment, in total and per (pid, tid)."""

    total: float
    threads: dict[tuple[int, int], tuple[str, float]] = field(default_factory=dict)

    @classmethod
    def take(cls, pid: int) -> CpuSample:
        """Sample ``pid`` and its descendants now. Any thread."""
        threads: dict[tuple[int, int], tuple[str, float]] = {}
        for member in [pid, *descendants(pid)]:
            for tid, value in thread_cpu(member).items():
                threads[(member, tid)] = value
        return cls(tree_cpu(pid), threads)

    def since(self, earlier: CpuSample) -> tuple[float, dict[str, float]]:
        """``(CPU seconds, {thread name: CPU seconds})`` spent between ``earlier`` and this
        sample; per-thread figures cover threads alive at both moments. Any thread (pure)."""
        by_name: dict[str, float] = defaultdict(float)
        for key, (name, seconds) in self.threads.items():
            if key in earlier.threads:
                by_name[name] += seconds - earlier.threads[key][1]
        return self.total - earlier.total, dict(by_name)
