"""The attacks' harness: relay processes under attack, their memory and counters, the results.

* :class:`Relay` is one ``python -m examples.relay`` process (``examples.network.ChildProcess``:
  READY/STATS line protocol, its own session, stdin watched so that it never outlives this
  program, SIGTERM then SIGKILL by its own pid when stopped), started with tor's defaults plus
  the options an attack names, optionally under a smaller descriptor limit (``ulimit -n`` in
  the ``sh`` that execs it). It gives the identity and onion key from its READY line, live
  counters (SIGUSR1), and RSS, descriptors and CPU from ``/proc``.
* :class:`RssPeak` samples a process's RSS on a thread while an attack runs.
* :class:`AttackContext` is what an attack function gets: the scale (``--quick``), a work
  directory, whether the relay has ``--max-mem-in-queues``, and an ``ExitStack`` that stops
  every process and closes every service the attack started, whatever happens.
* :class:`AttackResult` is one row: held or not, the figure, the limit, how the relay ran.
* :func:`enter_private_network` moves this process into a fresh network namespace with only
  a loopback interface (when permitted), before any thread exists, so that no relay, client
  or service of the program can reach another machine.

Threads: :class:`Relay`, :class:`AttackContext` and :func:`enter_private_network` belong to the
main thread; :class:`RssPeak` runs its own sampling thread (``start``/``stop`` from the owner);
the pure helpers are any thread.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import ctypes.util
import os
import shutil
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from examples.network import ChildProcess
from examples.soak import live_stats, process_sample
from relay.identity.keys import RelayIdentity
from tornet.netns import CLONE_NEWNET

__all__ = [
    "DOS_OFF",
    "MIB",
    "PRIVATE_EXTENDS",
    "REPO",
    "RSS_BASELINE",
    "SMALL_MAX_MEM_IN_QUEUES",
    "AttackContext",
    "AttackResult",
    "Figure",
    "Relay",
    "RssPeak",
    "enter_private_network",
    "relay_has_option",
    "run_time_s",
]

REPO = Path(__file__).resolve().parents[2]
MIB = 1 << 20
DOS_OFF = ("--dos-circuit-creation-enabled", "0", "--dos-connection-enabled", "0")
"""For attacks that are not about DoS: every peer here is 127.0.0.1, so tor's per-IP limits
would otherwise decide rows that are about something else."""
PRIVATE_EXTENDS = ("--extend-allow-private-addresses", "1")
"""ExtendAllowPrivateAddresses 1 (TestingTorNetwork's value): on loopback every next hop is a
private address, which tor's default refuses to dial."""
SMALL_MAX_MEM_IN_QUEUES = 64 * MIB
"""The relay's smallest MaxMemInQueues; the memory rows run with it when the relay can be told
(``--max-mem-in-queues``)."""
RSS_BASELINE = 4 * MIB
"""The "fixed baseline" a relay's RSS may grow beyond MaxMemInQueues under a memory attack:
what the count leaves out and does not scale with the limit (the allocator's free lists, the
attack's own link buffers, objects of streams already closed). ``streams_fds`` checks that it
is fixed by running at two limits (``docs/attacks.md``)."""

Figure = float | int | dict[str, float | int]
"""A figure or a limit: a number, or a small dict of numbers whose keys name their units."""


@dataclass
class AttackResult:
    """One row: whether the relay held (behaved as tor's column says), the figure measured
    and the limit it is held against; ``config`` says how the relay ran (options beyond tor's
    defaults and why), ``note`` what else a reader must know."""

    held: bool
    figure: Figure
    limit: Figure
    config: str
    note: str = ""
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The row as JSON-ready data. Any thread (pure)."""
        out: dict[str, Any] = {"held": self.held, "figure": self.figure, "limit": self.limit,
                               "config": self.config}
        if self.note:
            out["note"] = self.note
        if self.error is not None:
            out["error"] = self.error
        return out


def run_time_s(pid: int) -> float:
    """Seconds the threads of ``pid`` alive now have run so far: the first field of each
    ``/proc/PID/task/TID/schedstat``, in nanoseconds (``/proc/PID/stat`` counts clock ticks of
    10 ms, too coarse for a run of a few thousand cells). Any thread."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat", encoding="ascii") as stat:
                total += int(stat.read().split()[0])
        except OSError:
            continue  # the thread ended meanwhile
    return total / 1e9


def relay_has_option(option: str) -> bool:
    """Whether ``python -m examples.relay --help`` lists ``option``. Main thread (runs the
    program once)."""
    done = subprocess.run([sys.executable, "-m", "examples.relay", "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=60, check=False)
    return option in done.stdout


def enter_private_network() -> str:
    """Move this process into a fresh network namespace whose only interface is ``lo`` (up),
    and say where the program runs. Without the privilege (or ``ip``) it stays on the host's
    loopback, which every address here is anyway. Main thread, before any other thread
    exists: threads and children made later inherit the namespace."""
    if threading.active_count() != 1:
        return "host loopback (threads already running)"
    ip = shutil.which("ip")
    if ip is None:
        return "host loopback (no `ip` command)"
    libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    if libc.unshare(CLONE_NEWNET) != 0:
        return f"host loopback (unshare: {os.strerror(ctypes.get_errno())})"
    done = subprocess.run([ip, "link", "set", "lo", "up"], capture_output=True, text=True,
                          timeout=10, check=False)
    if done.returncode != 0:  # too late to go back: nothing could connect, not even loopback
        raise RuntimeError(f"in the new network namespace, `ip link set lo up` failed: "
                           f"{done.stderr.strip()} (run with --host-network)")
    return "private network namespace (loopback only)"


class Relay:
    """One relay process under attack. Main thread."""

    def __init__(self, workdir: Path, name: str, options: tuple[str, ...] = (), *,
                 nofile: int | None = None, ready_timeout: float = 60.0) -> None:
        """Start ``python -m examples.relay`` with ``options`` (tor's defaults otherwise) and
        wait for its READY line; ``nofile`` sets its descriptor limit (soft and hard)."""
        self.name = name
        self.options = options
        data_dir = workdir / name
        data_dir.mkdir(parents=True, exist_ok=True)
        argv = [sys.executable, "-m", "examples.relay", "--data-dir", str(data_dir),
                "--nickname", name, "--orport", "127.0.0.1:0", *options]
        if nofile is not None:
            argv = ["sh", "-c", f'ulimit -n {int(nofile)} && exec "$@"', "sh", *argv]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
        self.child = ChildProcess(name, argv, workdir / f"{name}.log", env=env)
        try:
            info = self.child.wait_ready(ready_timeout)
        except BaseException:
            self.child.stop(5.0)
            raise
        descriptor = info["descriptor"]
        self.pid: int = info["pid"]
        self.port: int = descriptor["port"]
        self.identity = bytes.fromhex(descriptor["identity"])
        key = descriptor["ntor_onion_key"]
        self.onion_key = base64.b64decode(key + "=" * (-len(key) % 4))
        self.final_stats: dict[str, Any] | None = None

    def stats(self) -> dict[str, Any]:
        """Its live counters (``RelayNode.stats``, asked for with SIGUSR1)."""
        return live_stats(self.child)

    def fds(self) -> int:
        """Open file descriptors now."""
        return process_sample(self.pid).fds

    def cpu_s(self) -> float:
        """CPU seconds used so far by every thread (see :func:`run_time_s`)."""
        return run_time_s(self.pid)

    @property
    def alive(self) -> bool:
        """True while the process runs."""
        return self.child.alive

    def log_tail(self, lines: int = 20) -> str:
        """The end of its log (stderr)."""
        return self.child.log_tail(lines)

    def stop(self) -> dict[str, Any] | None:
        """SIGTERM (SIGKILL after 10 s); its final counters. Idempotent."""
        if self.final_stats is None:
            self.final_stats = self.child.stop(10.0)
        return self.final_stats


class RssPeak:
    """The highest RSS of a process while sampled every ``interval`` seconds on a thread."""

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        """Owner thread."""
        self.pid = pid
        self.interval = interval
        self.baseline_mib = process_sample(pid).rss_bytes / MIB
        self.peak_mib = self.baseline_mib
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name=f"rss-{pid}", daemon=True)

    def __enter__(self) -> RssPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    @property
    def growth_mib(self) -> float:
        """Peak minus the reading taken when this was made."""
        return self.peak_mib - self.baseline_mib

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                rss = process_sample(self.pid).rss_bytes / MIB
            except OSError:
                return  # the process is gone
            self.peak_mib = max(self.peak_mib, rss)


@dataclass
class AttackContext:
    """What one attack gets. Main thread."""

    quick: bool
    workdir: Path
    has_max_mem_option: bool
    stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)
    relays: list[Relay] = field(default_factory=list)

    def scale(self, quick: Any, full: Any) -> Any:
        """``quick`` with ``--quick``, else ``full``."""
        return quick if self.quick else full

    def relay(self, name: str, options: tuple[str, ...] = (), *,
              nofile: int | None = None) -> Relay:
        """Start a relay that is stopped when the attack ends."""
        relay = Relay(self.workdir, name, options, nofile=nofile)
        self.stack.callback(relay.stop)
        self.relays.append(relay)
        return relay

    def log_tails(self, lines: int = 10) -> str:
        """The end of every relay's log, for a row that failed to run."""
        return "\n".join(relay.log_tail(lines) for relay in self.relays)

    def memory_options(self, limit: int = SMALL_MAX_MEM_IN_QUEUES) -> tuple[str, ...]:
        """``--max-mem-in-queues`` with ``limit`` bytes (the relay's minimum unless told) when
        the relay has the option."""
        if self.has_max_mem_option:
            return ("--max-mem-in-queues", str(limit))
        return ()

    def memory_note(self, limit_bytes: int) -> str:
        """What the memory limit of a row is, and where it comes from."""
        if self.has_max_mem_option:
            return f"MaxMemInQueues {limit_bytes // MIB} MiB (--max-mem-in-queues)"
        return (f"MaxMemInQueues {limit_bytes // MIB} MiB: tor's default from this machine's "
                "RAM; examples.relay has no --max-mem-in-queues to lower it")

    def identity(self, name: str) -> RelayIdentity:
        """A relay identity with real keys, for a fake relay played by this process."""
        return RelayIdentity.load_or_create(self.workdir / f"fake-{name}", name)

    def close(self) -> None:
        """Stop everything the attack started (last started, first stopped)."""
        self.stack.close()
