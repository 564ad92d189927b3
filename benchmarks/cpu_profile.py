"""Where a process's CPU goes, by library, over a measured window (``perf record``).

A relay's CPU per relayed cell (:mod:`benchmarks.relay_cpu`) says how much; this says where:
the share of the process's samples in each shared object, grouped as

* ``kernel``: system calls and everything under them (on loopback a ``write`` also runs the
  receiving side's TCP input), page faults, task switches;
* ``openssl``: libcrypto and libssl -- TLS records and the relay cell crypto, whoever calls it;
* ``python``: the interpreter (libpython); ``extensions``: CPython extension modules (our C
  kernels, pyuv); ``libc``: the C library (memcpy, malloc); ``tor`` and ``libevent``: C tor's
  own code; ``other``: the rest.

``kernel + openssl`` is what a relay pays for the cells themselves on this machine whatever it
is written in: the same reads and writes of the same bytes and the same ciphers; the figures
show it for C tor and for ours under the same load. Samples are cpu-clock samples of every
thread of the process, so shares multiply with the CPU measured from /proc over the same
window into microseconds per cell. The samples of one thread (the loop thread, whose tid is
the process id) split that thread's own CPU the same way (:func:`thread_split`): its kernel
part is the system calls the loop thread makes for the cells (its socket reads and writes),
which no code of ours on that thread can avoid.

:class:`Recorder` needs ``perf`` and permission to sample the process (``perf_event_paranoid``
at most 1, or root); :func:`unavailable` says why not.

Threads: one owner thread per :class:`Recorder`; the functions are pure or block only on perf.
"""

from __future__ import annotations

import math
import re
import shutil
import signal
import statistics
import subprocess
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["GROUPS", "Recorder", "by_group", "classify", "median_split", "parse_thread_report",
           "process_shares", "split_per_cell", "thread_split", "unavailable"]

GROUPS = ("kernel", "openssl", "python", "extensions", "libc", "tor", "libevent", "other")
"""The groups, in the order reports list them."""

_THREAD_LINE = re.compile(r"^\s*([0-9.]+)%\s*\|\s*(\d+):[^|]*\|\s*(\S.*?)\s*$")


def classify(dso: str) -> str:
    """The group of one shared object as ``perf report --sort dso`` names it. Any thread
    (pure)."""
    name = dso.rsplit("/", 1)[-1]
    if name.startswith("[") and name != "[unknown]":
        return "kernel"  # [kernel.kallsyms], [vdso], modules
    if name.startswith(("libcrypto.so", "libssl.so")):
        return "openssl"
    if name.startswith("libpython") or re.fullmatch(r"python3(\.\d+)?", name):
        return "python"
    if ".cpython-" in name or name.endswith(".abi3.so"):
        return "extensions"
    if name.startswith(("libc.so", "libm.so", "ld-linux", "libpthread")):
        return "libc"
    if name == "tor":
        return "tor"
    if name.startswith("libevent"):
        return "libevent"
    return "other"


def parse_thread_report(text: str) -> dict[int, dict[str, float]]:
    """``perf report --sort pid,dso --stdio -t '|'`` text (perf's ``pid`` is the thread, its
    name may hold spaces, hence the separator): each thread's shares of the samples by shared
    object, as fractions of ALL the samples. Any thread (pure)."""
    threads: dict[int, dict[str, float]] = {}
    for line in text.splitlines():
        match = _THREAD_LINE.match(line)
        if match and not line.startswith("#"):
            shares = threads.setdefault(int(match.group(2)), {})
            dso = match.group(3)
            shares[dso] = shares.get(dso, 0.0) + float(match.group(1)) / 100.0
    return threads


def process_shares(threads: dict[int, dict[str, float]]) -> dict[str, float]:
    """The whole process's share of the samples by shared object: its threads'
    (:func:`parse_thread_report`) added up. Any thread (pure)."""
    shares: dict[str, float] = {}
    for thread in threads.values():
        for dso, share in thread.items():
            shares[dso] = shares.get(dso, 0.0) + share
    return shares


def by_group(shares: dict[str, float]) -> dict[str, float]:
    """Per-object shares summed into :data:`GROUPS` (every group present). Any thread
    (pure)."""
    groups = dict.fromkeys(GROUPS, 0.0)
    for dso, share in shares.items():
        groups[classify(dso)] += share
    return groups


def split_per_cell(groups: dict[str, float], us_per_cell: float) -> dict[str, Any]:
    """``us_per_cell`` split by the group shares of one recording (:meth:`Recorder.stop`):
    ``cpu_by_group_us_per_cell``, and ``floor_us_per_cell`` (kernel + OpenSSL). Any thread
    (pure)."""
    return {"cpu_by_group_us_per_cell": {name: share * us_per_cell
                                         for name, share in groups.items()},
            "floor_us_per_cell": (groups["kernel"] + groups["openssl"]) * us_per_cell}


def thread_split(groups: dict[str, float], us_per_cell: float) -> dict[str, Any]:
    """One thread's CPU per cell (``us_per_cell``, e.g. the loop thread's from /proc) split
    by that thread's group shares (``groups``: :func:`by_group` of its
    :func:`parse_thread_report` entry, fractions of all samples, rescaled here to the thread's
    own): ``loop_cpu_by_group_us_per_cell`` and ``loop_kernel_us_per_cell``. Empty when the
    thread has no samples. Any thread (pure)."""
    total = math.fsum(groups.values())
    if total <= 0.0:
        return {}
    split = {name: share / total * us_per_cell for name, share in groups.items()}
    return {"loop_cpu_by_group_us_per_cell": split, "loop_kernel_us_per_cell": split["kernel"]}


def median_split(figures: list[dict[str, Any]]) -> dict[str, Any]:
    """The median over several runs' :func:`split_per_cell` (and :func:`thread_split`) figures
    (each run a dict holding them among others), group by group; empty when a run has none.
    Any thread (pure)."""
    out: dict[str, Any] = {}
    for floor, by in (("floor_us_per_cell", "cpu_by_group_us_per_cell"),
                      ("loop_kernel_us_per_cell", "loop_cpu_by_group_us_per_cell")):
        if not figures or not all(floor in figure for figure in figures):
            continue
        out[floor] = statistics.median(f[floor] for f in figures)
        out[by] = {name: statistics.median(f[by][name] for f in figures)
                   for name in figures[0][by]}
    return out


def unavailable() -> str | None:
    """Why :class:`Recorder` cannot run here, or None. Blocks up to a few seconds."""
    perf = shutil.which("perf")
    if perf is None:
        return "perf is not installed (Debian: linux-perf)"
    with tempfile.TemporaryDirectory() as tmp:
        probe = subprocess.run([perf, "record", "-q", "-o", str(Path(tmp) / "probe.data"),
                                "--", "true"], capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        return f"perf record fails here: {probe.stderr.strip()[:200]}"
    return None


class Recorder:
    """``perf record`` of one process (every thread it has when started) until :meth:`stop`.
    Owner thread only."""

    def __init__(self, pid: int, output: Path, frequency: int = 999) -> None:
        """Sample ``pid`` at ``frequency`` Hz into ``output`` once started. Owner thread."""
        self.pid = pid
        self.output = output
        self.frequency = frequency
        self._perf: subprocess.Popen[str] | None = None
        self.thread_groups: dict[int, dict[str, float]] = {}
        """After :meth:`stop`: each thread's :func:`by_group` shares (of all the samples)."""

    def start(self) -> None:
        """Start sampling. Raises ``OSError`` when perf cannot be run. Owner thread."""
        self._perf = subprocess.Popen(
            ["perf", "record", "-q", "-F", str(self.frequency), "-p", str(self.pid),
             "-o", str(self.output)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            text=True)

    def halt(self) -> None:
        """Stop sampling now, without waiting for perf to write its file. Owner thread."""
        if self._perf is not None and self._perf.poll() is None:
            self._perf.send_signal(signal.SIGINT)  # perf writes its file and exits

    def stop(self, timeout: float = 30.0) -> dict[str, float]:
        """Stop sampling (if :meth:`halt` did not); the share of each group
        (:func:`by_group`) over the samples taken. Raises ``RuntimeError`` when perf recorded
        nothing usable. Owner thread (blocks)."""
        self.halt()
        perf, self._perf = self._perf, None
        if perf is None:
            raise RuntimeError("the recorder was not started")
        try:
            _, err = perf.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            perf.kill()
            _, err = perf.communicate()
        report = subprocess.run(
            ["perf", "report", "-i", str(self.output), "--no-children", "--sort", "pid,dso",
             "--stdio", "-q", "-t", "|"], capture_output=True, text=True, timeout=timeout)
        threads = parse_thread_report(report.stdout)
        self.thread_groups = {tid: by_group(shares) for tid, shares in threads.items()}
        shares = process_shares(threads)
        if not shares:
            raise RuntimeError(f"perf recorded no samples of pid {self.pid}: "
                               f"{(err or '').strip()[:200]} {report.stderr.strip()[:200]}")
        return by_group(shares)
