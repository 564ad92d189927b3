"""How the worker threads are scheduled by the OS, and how their memory is kept: small helpers.

Nothing here takes the pool's lock or touches a circuit. The functions change process-wide or
per-thread OS settings: :class:`workers.pool.WorkerPool` calls :func:`retain_freed_memory`
from ``start()`` (loop thread), each worker calls :func:`run_at_idle_priority` on itself when
it starts, and an idle-priority worker's own :class:`IdleGovernor` may move it out of and back
into idle priority after its turns (:func:`set_idle_priority`; worker threads).

The loop keeps its CPU
----------------------
Workers crypt with the GIL released, so on a machine with as many CPUs as workers, the loop
thread and the workers are more runnable threads than there are CPUs, and at equal priority the
scheduler lets a worker finish its time slice (milliseconds) before the loop runs: a 1 ms timer
then fires 3-5 ms late and the loop's own work waits too. So the last ``low_priority_workers``
workers (by default as many as the workers exceed the CPUs minus one, see
:func:`default_low_priority_workers`: 1 of 2 workers on 2 CPUs) put themselves in Linux's
SCHED_IDLE class at start: they use any CPU time the loop and the normal workers leave, and give
way at once when those wake. The loop plus the normal workers never outnumber the CPUs.
Measured on 2 CPUs with 2 workers, relay_forward: lateness p99 3-9 ms -> 0.2-0.9 ms and 1.5x
the cells/s (the loop is what limits there); under two CPU-bound processes from elsewhere, the
normal worker keeps its fair share (a pool of only idle-priority workers starved to ~1% of its
speed). This is per worker thread; nothing else in the process changes. ``0`` opts out.

The cost under outside load, measured later (benchmarks.pipeline's pool design, relay_forward,
200 circuits x 256 cells, runs back to back for 8-10 s, every result checked): an
idle-priority worker preempted while it owns circuits (and, likely, while it holds the GIL)
holds up the loop and the normal worker until the scheduler gives it a slice again. With two
CPU-bound processes at normal priority added on the 2-CPU host (itself at load ~3), the longest
wait between two results of a run was 0.27-0.95 s with the default (1 idle-priority worker)
against 33-36 ms with ``low_priority_workers=0``, and 4-6x fewer runs completed (a run
includes starting and joining the workers). Pinned to one CPU with 1 and 3 such processes:
0.45-0.56 s and 0.76 s against 26 and 20 ms. Nothing was lost (every cell arrived, in order),
but on a host whose CPUs others keep busy, ``low_priority_workers=0`` was the better choice.

So an idle-priority worker now watches itself (``adaptive_idle``, on by default;
:class:`IdleGovernor` holds the rule, :func:`set_idle_priority` applies it). After each turn
that crypted something it compares the turn's wall time with its thread CPU time
(``time.thread_time()``). A turn of at least :data:`STARVED_WALL_S` (30 ms) wall during which it
ran less than :data:`STARVED_CPU_SHARE` (half) of that time means other runnable work kept it
off the CPU: it moves itself back to SCHED_OTHER (a *demotion*, counted in ``pool.stats()``
as ``idle_demotions``). It stays there until :data:`QUIET_PERIOD_S` (5 s) pass with no such
turn, then returns to SCHED_IDLE (``idle_promotions``). The first starved turn is still paid
for (the rule sees it only when it ends); after that a loaded host costs one starved turn per
quiet period at most, while a quiet host keeps the gain above. The time of the last starved
turn is kept in a :class:`StarvationRecord` that a pool's workers share (a pool makes its own,
or several pools share one: ``WorkerPool(starvation=...)``), and an idle-priority worker that
starts within a quiet period of it is demoted at once. A ``process``
that blocks (sleeps, waits on I/O) for 30 ms looks starved too and only costs the worker its
idle priority for a while. Raising a thread back to SCHED_OTHER needs CAP_SYS_NICE or an
RLIMIT_NICE of 20 or more; where that is refused the worker stays at idle priority for good.
``adaptive_idle=False`` opts out of the rule (idle priority for the worker's life).
Measured as above (2 CPUs, two CPU-bound processes, runs back to back for 10 s): longest wait
between results 131-278 ms (measured with the record shared by every run's pool: almost
every run's worker was demoted at its start; a new pool with its own record pays one starved
turn first, 140-360 ms measured that way; the worst waits are starved turns the rule saw
only once they ended)
against 723-776 ms without the rule and 10 ms with ``low_priority_workers=0``; 455-495 runs
against 52-72 and 448. Quiet (benchmarks.pipeline, pool design, alternated with the rule
off): no demotion, lateness p99 0.36-0.44 ms (relay_forward) and 1.0-1.1 ms (origin) against
0.39-0.66 and 0.69-4.0 ms.

The GIL's switch interval, by contrast, is left alone: with grouped turns and the idle-priority
worker, 5, 1 and 0.5 ms gave the same cells/s and lateness within noise (benchmarks.tuning).

Memory handed across threads
----------------------------
A batch's output (hundreds of KB) is allocated by a worker, in that thread's malloc arena, and
freed by the loop thread once delivered. With glibc's default thresholds the arena is trimmed
(its top returned to the OS) after such frees, and the next outputs page-fault their memory
back in: measured on relay_forward, page faults took about a quarter of the workers' CPU, as
much as the AES. So the pool's ``start()`` tells glibc, process-wide, to keep up to
``malloc_retain`` bytes (default :data:`DEFAULT_MALLOC_RETAIN`, 32 MiB) of freed memory per
arena and to serve blocks below :data:`MALLOC_MMAP_THRESHOLD` (4 MiB) from its arenas
(:func:`retain_freed_memory`, a ``mallopt``). The cost is that much RSS kept per
arena at most, only after it was used. It is never undone (glibc cannot go back to its dynamic
thresholds, and other pools in the process may rely on it); ``malloc_retain=None`` opts out.
On another C library nothing changes.
"""

from __future__ import annotations

import ctypes
import os
import threading
from typing import Literal

#: Freed memory glibc may keep per arena (``malloc_retain``); see "Memory handed across threads".
DEFAULT_MALLOC_RETAIN = 32 << 20
#: Blocks below this come from malloc's arenas, not mmap, once ``malloc_retain`` is applied.
MALLOC_MMAP_THRESHOLD = 4 << 20
#: glibc's ``mallopt`` parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: A turn at least this long (wall seconds) may count as starved; see "The loop keeps its CPU".
STARVED_WALL_S = 0.030
#: ... if the worker's thread ran for less than this share of the turn's wall time.
STARVED_CPU_SHARE = 0.5
#: A demoted worker returns to idle priority after this long without a starved turn.
QUIET_PERIOD_S = 5.0


def retain_freed_memory(trim_threshold: int) -> bool:
    """Apply ``malloc_retain``: glibc's ``mallopt`` for the trim and mmap thresholds. Any thread.

    Process-wide and permanent: glibc cannot return to its dynamic thresholds. Returns False
    (and changes nothing) when the C library is not glibc or a call fails.
    """
    if trim_threshold < 0:
        raise ValueError("trim_threshold must be >= 0")
    if not os.confstr_names.get("CS_GNU_LIBC_VERSION") or not _glibc_version():
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    ok = mallopt(_M_TRIM_THRESHOLD, trim_threshold) == 1
    return mallopt(_M_MMAP_THRESHOLD, min(trim_threshold, MALLOC_MMAP_THRESHOLD)) == 1 and ok


def _glibc_version() -> str | None:
    try:
        return os.confstr("CS_GNU_LIBC_VERSION")
    except (ValueError, OSError):
        return None


def available_cpus() -> int:
    """CPUs this process may run on. Any thread."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def default_low_priority_workers(threads: int) -> int:
    """How many of ``threads`` workers run at idle priority by default. Any thread.

    As many as the workers exceed the CPUs available minus one (the loop's): 1 of 2 on 2 CPUs.
    """
    return max(0, threads - (available_cpus() - 1))


def run_at_idle_priority() -> bool:
    """Put the calling thread in Linux's SCHED_IDLE class. Worker thread, at its start.

    A thread may always lower its own priority; raising it back needs privilege (see
    :func:`set_idle_priority`, used by ``adaptive_idle``). Returns False where there is no
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

class StarvationRecord:
    """When a worker last saw a starved turn (``time.monotonic()``), shared by a pool's workers.

    A pool makes its own; pass one record to several pools (``WorkerPool(starvation=...)``) to
    let a new pool's idle-priority worker start at normal priority when another pool's worker
    was starved within the quiet period. Written by worker threads (a float store, atomic under
    the GIL; a lost race only keeps the later of two nearly equal times), read by any thread.
    """

    __slots__ = ("last",)

    def __init__(self) -> None:
        """No starved turn on record. Any thread."""
        self.last = float("-inf")

    def note(self, now: float) -> None:
        """Record that a worker's turn ending at ``now`` was starved. Worker thread."""
        if now > self.last:
            self.last = now


def set_idle_priority(idle: bool) -> bool:
    """Move the calling thread to SCHED_IDLE (``idle``) or back to SCHED_OTHER. Worker thread.

    Affects only the calling thread (Linux). Returns False where the policy does not exist or
    the call is refused (raising back to SCHED_OTHER needs CAP_SYS_NICE or RLIMIT_NICE >= 20).
    """
    policy = getattr(os, "SCHED_IDLE" if idle else "SCHED_OTHER", None)
    if policy is None or not hasattr(os, "sched_setscheduler"):
        return False
    try:
        os.sched_setscheduler(0, policy, os.sched_param(0))
    except OSError:
        return False
    return True


class IdleGovernor:
    """When an idle-priority worker should leave SCHED_IDLE and when it may return. Pure.

    Owned and called by one worker thread (no lock, no clock of its own: the caller passes
    the times). Starts idle, or normal with ``last_starved`` for a worker demoted at its start.
    :meth:`observe` takes one turn's wall and thread CPU seconds and
    the time at its end, and returns ``"demote"`` (go to SCHED_OTHER), ``"promote"`` (back to
    SCHED_IDLE) or None (stay). The rule is in "The loop keeps its CPU" above.
    """

    __slots__ = ("idle", "last_starved", "quiet_period", "starved_share", "starved_wall")

    def __init__(
        self,
        starved_wall: float = STARVED_WALL_S,
        starved_share: float = STARVED_CPU_SHARE,
        quiet_period: float = QUIET_PERIOD_S,
        *,
        idle: bool = True,
        last_starved: float = float("-inf"),
    ) -> None:
        """Thresholds in seconds (``starved_share`` a fraction). Any thread, before use."""
        self.starved_wall = starved_wall
        self.starved_share = starved_share
        self.quiet_period = quiet_period
        self.idle = idle
        self.last_starved = last_starved  # end of the last starved turn seen

    def starved(self, wall: float, cpu: float) -> bool:
        """Whether a turn of ``wall`` seconds with ``cpu`` seconds on the CPU was starved."""
        return wall >= self.starved_wall and cpu < self.starved_share * wall

    def observe(self, wall: float, cpu: float, now: float) -> Literal["demote", "promote"] | None:
        """Take one turn's sample; the owning worker thread only."""
        if self.starved(wall, cpu):
            self.last_starved = now
            if self.idle:
                self.idle = False
                return "demote"
            return None
        if not self.idle and now - self.last_starved >= self.quiet_period:
            self.idle = True
            return "promote"
        return None
