"""How the worker threads are scheduled by the OS, and how their memory is kept: small helpers.

Nothing here takes the pool's lock or touches a circuit. The functions change process-wide or
per-thread OS settings: :class:`workers.pool.WorkerPool` calls :func:`retain_freed_memory`
from ``start()`` (loop thread), each worker calls :func:`run_at_idle_priority` on itself when
it starts, and an idle-priority worker's own :class:`IdleGovernor` may move it out of and back
into idle priority after its turns (:func:`set_idle_priority`; worker threads).

The loop keeps its CPU
----------------------
Workers crypt with the GIL released, so with as many workers as CPUs the loop would wait for a
worker's time slice. The last ``low_priority_workers`` workers (by default as many as the
workers exceed the CPUs minus one: :func:`default_low_priority_workers`) put themselves in
Linux's SCHED_IDLE class at start, so the loop plus the normal workers never outnumber the
CPUs. ``0`` opts out. Because an idle-priority worker that outside load preempts while it owns
circuits holds up the loop, each watches itself (``adaptive_idle``, :class:`IdleGovernor`): a
turn of at least :data:`STARVED_WALL_S` wall time with less than :data:`STARVED_CPU_SHARE` of
it on the CPU moves it back to SCHED_OTHER until :data:`QUIET_PERIOD_S` pass without one
(:func:`set_idle_priority`). The last starved time is shared through a
:class:`StarvationRecord`, so a worker starting within a quiet period of it starts demoted.

Memory handed across threads
----------------------------
A batch's output is allocated by a worker and freed by the loop thread; with glibc's default
thresholds every output page-faulted its memory back in. So the pool's ``start()`` asks glibc,
process-wide and for good, to keep up to ``malloc_retain`` bytes of freed memory per arena and
to serve blocks below :data:`MALLOC_MMAP_THRESHOLD` from its arenas
(:func:`retain_freed_memory`); ``malloc_retain=None`` opts out; another C library is left alone.

When blocks cross threads both ways (a program whose workers also make what the loop thread
writes, as a relay's TLS records on the pool), glibc's per-thread cache of freed blocks
(tcache) hands the loop thread a worker's freed blocks for its own long-lived objects; those
pin the worker's arena, which then cannot shrink, and RSS creeps. The cache can only be turned
off at start-up (a glibc tunable): :func:`env_without_thread_cache` gives the environment to
re-execute the program with.

The measurements behind each rule and default are in docs/tuning.md.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Mapping
from typing import Literal

#: Freed memory glibc may keep per arena (``malloc_retain``); see "Memory handed across threads".
DEFAULT_MALLOC_RETAIN = 32 << 20
#: Blocks below this come from malloc's arenas, not mmap, once ``malloc_retain`` is applied.
MALLOC_MMAP_THRESHOLD = 4 << 20
#: glibc's ``mallopt`` parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: The glibc tunable that turns the per-thread cache of freed blocks off.
NO_THREAD_CACHE_TUNABLE = "glibc.malloc.tcache_count=0"
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


def env_without_thread_cache(environ: Mapping[str, str]) -> dict[str, str] | None:
    """The environment to re-execute this program with so that glibc keeps no per-thread cache
    of freed blocks (``GLIBC_TUNABLES`` with :data:`NO_THREAD_CACHE_TUNABLE` added), or None
    when the C library is not glibc or ``environ`` already sets the cache's size. Any thread."""
    if not _glibc_version():
        return None
    tunables = environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.tcache_count=" in tunables:
        return None
    env = dict(environ)
    env["GLIBC_TUNABLES"] = (f"{tunables}:{NO_THREAD_CACHE_TUNABLE}" if tunables
                             else NO_THREAD_CACHE_TUNABLE)
    return env


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
