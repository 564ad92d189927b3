"""The relay under test: one unmodified ``python -m examples.relay`` process, and its CPU by thread.

:class:`RelayProcess` starts the relay program exactly as a user would (its own data directory,
a free loopback OR port, ``--testing-network`` so it may extend to 127.0.0.1, not an exit,
tor's per-IP DoS limits off because every peer is 127.0.0.1, ``--plain-links`` when asked),
reads its ``READY`` line (OR port, fingerprint, and the JSON with its ``descriptor``: identity
digest and ntor onion key) and its ``STATS`` lines, and asks for live counters with SIGUSR1
(:meth:`RelayProcess.stats`). The child gets SIGTERM if this process dies first
(``PR_SET_PDEATHSIG``), so it never outlives the benchmark; :meth:`RelayProcess.stop` ends it
with SIGTERM (SIGKILL after a grace period) and returns its final STATS.

Which thread is which
---------------------
Python 3.11 does not name OS threads: every thread of the relay is ``python`` in
``/proc/PID/task/TID/comm``. The relay program runs its loop on the main thread
(``examples.relay.main``), so the **loop thread** is the task whose TID is the PID. Its
``RelayNode.start()`` starts the worker pool's threads before the READY line is printed, and
the relay starts no other thread before READY when run without ``--exit-on-stdin-eof`` (as
here), so the **worker threads** are the other tasks alive at READY; :meth:`RelayProcess.start`
checks that their number equals the pool size the relay reports (``STATS`` ``threads``).
Threads that appear later (none were seen in a relay that only relays cells) are reported as
``other``.

CPU per thread
--------------
:func:`thread_times` reads, for each task, ``/proc/PID/task/TID/schedstat`` (nanoseconds on
the CPU, the scheduler's own account) and ``/proc/PID/task/TID/stat`` (utime + stime in clock
ticks, 10 ms). The benchmark uses the nanosecond figure and reports the tick figure beside it
as a cross-check. A :class:`CpuSplit` is the difference of two samples, by role.

Threads: the owner thread calls everything; a reader thread per process collects its stdout.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import queue
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from relay.directory import RelayDescriptor

__all__ = ["CLOCK_TICKS", "CpuSplit", "RelayProcess", "RelayStartError", "ThreadTimes",
           "thread_times"]

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
"""Clock ticks per second, the unit of utime/stime in /proc/PID/task/TID/stat."""
_ROOT = Path(__file__).resolve().parent.parent
_PR_SET_PDEATHSIG = 1


class RelayStartError(RuntimeError):
    """The relay did not print READY (its stderr tail is in the message)."""


@dataclass(frozen=True)
class ThreadTimes:
    """One task's CPU at one moment: nanoseconds on the CPU (schedstat) and ticks (stat)."""

    ns: int
    ticks: int


def thread_times(pid: int) -> dict[int, ThreadTimes]:
    """``{tid: ThreadTimes}`` for every live task of ``pid`` ({} when it is gone). Any thread
    (reads /proc only)."""
    out: dict[int, ThreadTimes] = {}
    task_dir = Path("/proc") / str(pid) / "task"
    try:
        tids = [int(name) for name in os.listdir(task_dir)]
    except OSError:
        return out
    for tid in tids:
        try:
            ns = int((task_dir / str(tid) / "schedstat").read_text().split()[0])
            text = (task_dir / str(tid) / "stat").read_text()
        except (OSError, ValueError, IndexError):
            continue  # the task ended while we read
        fields = text[text.rindex(")") + 2:].split()
        # fields[0] is stat field 3 (state); utime is field 14, stime field 15
        out[tid] = ThreadTimes(ns, int(fields[11]) + int(fields[12]))
    return out


@dataclass(frozen=True)
class CpuSplit:
    """CPU seconds spent between two samples, by role (see the module docstring)."""

    loop_s: float
    workers_s: float
    other_s: float
    ticks_s: float
    """Every task's utime + stime over the same span, from the 10 ms tick counters."""
    per_worker_s: tuple[float, ...]

    @property
    def total_s(self) -> float:
        """Loop + workers + other (nanosecond accounts). Any thread (pure)."""
        return self.loop_s + self.workers_s + self.other_s

    @classmethod
    def between(cls, pid: int, workers: frozenset[int], before: dict[int, ThreadTimes],
                after: dict[int, ThreadTimes]) -> CpuSplit:
        """The split of ``after - before`` for tasks alive at both samples. Any thread
        (pure)."""
        loop = other = 0.0
        ticks = 0
        per_worker: dict[int, float] = {}
        for tid, late in after.items():
            early = before.get(tid)
            if early is None:
                continue
            seconds = (late.ns - early.ns) / 1e9
            ticks += late.ticks - early.ticks
            if tid == pid:
                loop = seconds
            elif tid in workers:
                per_worker[tid] = seconds
            else:
                other += seconds
        return cls(loop, sum(per_worker.values()), other, ticks / CLOCK_TICKS,
                   tuple(per_worker[tid] for tid in sorted(per_worker)))


def _die_with_parent() -> None:
    """In the child between fork and exec: SIGTERM when the parent dies."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


class RelayProcess:
    """One ``python -m examples.relay`` child. See the module docstring."""

    def __init__(self, data_dir: Path, *, tls: bool, threads: int, nickname: str = "relaybench",
                 extra_args: tuple[str, ...] = ()) -> None:
        """Configure; nothing runs before :meth:`start`. Owner thread."""
        self.data_dir = data_dir
        self.tls = tls
        self.threads = threads
        self.nickname = nickname
        self.extra_args = extra_args
        self.popen: subprocess.Popen[str] | None = None
        self.address: tuple[str, int] = ("127.0.0.1", 0)
        self.fingerprint = ""
        self.descriptor: RelayDescriptor | None = None
        self.workers: frozenset[int] = frozenset()
        self.final_stats: dict[str, Any] | None = None
        self._ready: queue.Queue[str | None] = queue.Queue()
        self._stats: queue.Queue[dict[str, Any]] = queue.Queue()
        self._log: IO[bytes] | None = None
        self._reader: threading.Thread | None = None

    @property
    def pid(self) -> int:
        """The relay's process id. Owner thread."""
        assert self.popen is not None
        return self.popen.pid

    def argv(self) -> list[str]:
        """The relay's command line. Any thread (pure)."""
        return [
            sys.executable, "-m", "examples.relay", "--data-dir", str(self.data_dir),
            "--orport", "127.0.0.1:0", "--nickname", self.nickname,
            "--threads", str(self.threads), "--testing-network",
            # every peer is 127.0.0.1: tor's per-IP limits would take the load for an attack
            "--dos-circuit-creation-enabled", "0", "--dos-connection-enabled", "0",
            *(["--plain-links"] if not self.tls else []), *self.extra_args,
        ]

    def start(self, timeout: float = 60.0) -> None:
        """Start the relay and wait for READY; identify its worker threads. Raises
        :class:`RelayStartError`. Owner thread (blocks)."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        env["PYTHONPATH"] = str(_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        self._log = open(self.data_dir.parent / f"{self.data_dir.name}.log", "wb")
        self.popen = subprocess.Popen(
            self.argv(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self._log,
            env=env, cwd=_ROOT, text=True, bufsize=1, start_new_session=True,
            preexec_fn=_die_with_parent)
        self._reader = threading.Thread(target=self._read, name="relaybench-reader",
                                        daemon=True)
        self._reader.start()
        try:
            line = self._ready.get(timeout=timeout)
        except queue.Empty:
            line = None
        if line is None:
            self.stop()
            raise RelayStartError(f"the relay did not start:\n{self.log_tail()}")
        words = line.split()
        self.address = ("127.0.0.1", int(words[1].rpartition(":")[2]))
        self.fingerprint = words[2].partition("=")[2].upper()
        info = json.loads(line[line.index("{"):])
        self.descriptor = RelayDescriptor.from_json(info["descriptor"])
        self.workers = frozenset(thread_times(self.pid)) - {self.pid}
        pool = self.stats()["threads"]
        if len(self.workers) != pool:
            self.stop()
            raise RelayStartError(f"expected {pool} worker threads at READY, found "
                                  f"{len(self.workers)} non-main threads: cannot tell them apart")

    def stats(self, timeout: float = 10.0) -> dict[str, Any]:
        """Live counters: SIGUSR1, then the STATS line it prints. Owner thread (blocks for
        one of the relay's loop iterations)."""
        while not self._stats.empty():
            self._stats.get_nowait()
        os.kill(self.pid, signal.SIGUSR1)
        try:
            return self._stats.get(timeout=timeout)
        except queue.Empty:
            raise RelayStartError(f"no STATS within {timeout} s:\n{self.log_tail()}") from None

    def counters(self) -> dict[str, Any]:
        """:meth:`stats` (what :func:`benchmarks.relay_cpu.measure` asks every relay under
        test for). Owner thread (blocks)."""
        return self.stats()

    def times(self) -> dict[int, ThreadTimes]:
        """CPU of every task now (:func:`thread_times`). Any thread."""
        return thread_times(self.pid)

    def split(self, before: dict[int, ThreadTimes], after: dict[int, ThreadTimes]) -> CpuSplit:
        """CPU between two :meth:`times` samples by role. Any thread (pure)."""
        return CpuSplit.between(self.pid, self.workers, before, after)

    def stop(self, timeout: float = 10.0) -> dict[str, Any] | None:
        """SIGTERM (SIGKILL after ``timeout``); the final STATS, if it printed them.
        Idempotent. Owner thread."""
        popen = self.popen
        if popen is not None and popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(popen.pid, signal.SIGTERM)
            try:
                popen.wait(timeout)
            except subprocess.TimeoutExpired:
                popen.kill()
                popen.wait()
        if self._reader is not None:
            self._reader.join(timeout)
            self._reader = None
        if self._log is not None:
            self._log.close()
            self._log = None
        return self.final_stats

    def log_tail(self, lines: int = 20) -> str:
        """The end of the relay's stderr log. Any thread."""
        path = self.data_dir.parent / f"{self.data_dir.name}.log"
        try:
            text = path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(f"  [relay] {line}" for line in text.splitlines()[-lines:])

    def _read(self) -> None:
        """Reader thread: hand READY and STATS lines over until EOF."""
        popen = self.popen
        assert popen is not None and popen.stdout is not None
        try:
            for line in popen.stdout:
                if line.startswith("READY "):
                    self._ready.put(line.strip())
                elif line.startswith("STATS "):
                    with contextlib.suppress(json.JSONDecodeError):
                        stats = json.loads(line[6:])
                        self.final_stats = stats
                        self._stats.put(stats)
        finally:
            popen.stdout.close()
            self._ready.put(None)
