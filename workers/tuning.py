"""How the worker threads are scheduled by the OS, and how their memory is kept: small helpers.

Nothing here takes the pool's lock or touches a circuit. The functions change process-wide or
per-thread OS settings, once: :class:`workers.pool.WorkerPool` calls
:func:`retain_freed_memory` from ``start()`` (loop thread) and each worker calls
:func:`run_at_idle_priority` on itself when it starts (worker thread).

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
speed). A worker cannot raise its priority back, so this is per worker thread for its whole
life; nothing else in the process changes. ``0`` opts out.

The cost under outside load, measured later (benchmarks.pipeline's pool design, relay_forward,
200 circuits x 256 cells, runs back to back for 8-10 s, every result checked): an
idle-priority worker preempted while it owns circuits (and, likely, while it holds the GIL)
holds up the loop and the normal worker until the scheduler gives it a slice again. With two
CPU-bound processes at normal priority added on the 2-CPU host (itself at load ~3), the longest
wait between two results of a run was 0.27-0.95 s with the default (1 idle-priority worker)
against 33-36 ms with ``low_priority_workers=0``, and 4-6x fewer runs completed (a run
includes starting and joining the workers). Pinned to one CPU with 1 and 3 such processes:
0.45-0.56 s and 0.76 s against 26 and 20 ms. Nothing was lost (every cell arrived, in order),
but on a host whose CPUs others keep busy, ``low_priority_workers=0`` is the better choice.

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
(``workers._kernel.retain_freed_memory``, a ``mallopt``). The cost is that much RSS kept per
arena at most, only after it was used. It is never undone (glibc cannot go back to its dynamic
thresholds, and other pools in the process may rely on it); ``malloc_retain=None`` opts out.
Without the kernel extension, or on another C library, nothing changes.
"""

from __future__ import annotations

import os
import threading

#: Freed memory glibc may keep per arena (``malloc_retain``); see "Memory handed across threads".
DEFAULT_MALLOC_RETAIN = 32 << 20
#: Blocks below this come from malloc's arenas, not mmap, once ``malloc_retain`` is applied.
MALLOC_MMAP_THRESHOLD = 4 << 20


def retain_freed_memory(trim_threshold: int) -> bool:
    """Apply ``malloc_retain`` through the kernel (glibc only). Loop thread (any, really).

    Process-wide and permanent: glibc cannot return to its dynamic thresholds. Returns False
    when it could not be applied (no kernel extension, or not glibc).
    """
    try:
        from workers._kernel import retain_freed_memory as apply
    except ImportError:
        return False
    return bool(apply(trim_threshold, min(trim_threshold, MALLOC_MMAP_THRESHOLD)))


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

    A thread may always lower its own priority; it cannot raise it back without privilege, so
    this is done only by a worker for the rest of its life. Returns False where there is no
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
