"""C tor's CPU per relayed cell in the middle of a circuit, and ours beside it, in one tornet run.

:func:`measure_tor` builds a :class:`tornet.network.TorNet` (an authority, tor relays t1-t3, a
tor client and an echo service, in a fresh network namespace when allowed) with one relaycrypt
relay (``python -m examples.relay``, TLS links with tor's authentication, not an exit) as the
external relay ``xmiddle``, and pushes ``size`` bytes to the echo service and back ``runs``
times through each of two circuits pinned by the client tor:

* ``all_tor``: client > t1 > t2 > t3: **C tor's figure is t2's**, the middle relay;
* ``middle``: client > t1 > xmiddle > t3: our relay at the same position, moving the same
  bytes on the same network, for a side-by-side figure.

Both use tornet's definitions (:mod:`tornet.push`): *relayed cells* = the stream bytes that
crossed the relay, both directions, / 498 (one full RELAY_DATA cell), so the few SENDMEs are
not counted as cells (their CPU is: the figure is high by about the share of SENDMEs, ~1-3 %,
for both relays alike); CPU = user + system of the relay's process tree over the transfer,
from /proc in 10 ms ticks. For our relay the loop thread's share over the same push is read
too (:mod:`benchmarks.relay_proc`: the task whose TID is the PID; nanosecond accounts), its
own counters over the push (SIGUSR1 ``STATS``: the cells it crypted, whose ratio to tornet's
count shows the SENDMEs and set-up tornet leaves out, and its mean worker batch), and
both relays' total CPU on the nanosecond accounts as a cross-check of the tick figures
(``*_ns``; these windows include building the circuit, a few milliseconds).

Returns None (with the reason) when tor or tor-gencert is not installed.

Threads: main thread only.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.cpu_profile import Recorder, median_split, split_per_cell
from benchmarks.relay_proc import CpuSplit, thread_times
from tornet.external import RELAYCRYPT_COMMAND
from tornet.network import ExternalRelay, TorNet
from tornet.procs import NetworkFailed
from tornet.tornode import find_program

__all__ = ["measure_tor", "tor_missing"]

MIB = 1 << 20


def tor_missing() -> str | None:
    """Why tornet cannot run here (tor or tor-gencert missing), or None. Any thread."""
    missing = [name for name in ("tor", "tor-gencert") if find_program(name) is None]
    return f"{' and '.join(missing)} not installed (tools/install_tor.sh)" if missing else None


def _stats(relay: ExternalRelay, timeout: float = 10.0) -> dict[str, Any]:
    """Our relay's live counters: SIGUSR1, then the next STATS line on its stdout. Main
    thread (blocks)."""
    assert relay.process is not None
    seen = sum(1 for line in relay.process.stdout_lines() if line.startswith("STATS "))
    os.kill(relay.pid, signal.SIGUSR1)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = [line for line in relay.process.stdout_lines() if line.startswith("STATS ")]
        if len(lines) > seen:
            return dict(json.loads(lines[-1][6:]))
        time.sleep(0.01)
    raise NetworkFailed(f"{relay.name} printed no STATS within {timeout:.0f} s")


def _spread(values: list[float]) -> list[float]:
    """``[min, max]`` ([] when empty). Any thread (pure)."""
    return [min(values), max(values)] if values else []


def _recorder(perf_dir: Path | None, pid: int, name: str) -> Recorder | None:
    """A started perf recorder of ``pid`` into ``perf_dir``, or None without one. Main
    thread."""
    if perf_dir is None:
        return None
    recorder = Recorder(pid, perf_dir / f"{name}.perf")
    recorder.start()
    return recorder


def measure_tor(*, runs: int, size: int, timeout: float = 150.0,
                progress: Callable[[str], None] | None = None,
                perf_dir: Path | None = None) -> dict[str, Any]:
    """The pushes of the module docstring; medians over ``runs`` with [min, max]. With
    ``perf_dir``, each middle relay is also sampled with perf over its push
    (:mod:`benchmarks.cpu_profile`): ``cpu_by_group_us_per_cell`` and ``floor_us_per_cell``
    (kernel + OpenSSL) for tor's and ours. Raises :class:`tornet.procs.NetworkFailed` /
    :class:`tornet.push.PinError` when the network fails. Main thread."""
    net = TorNet(relay_command=RELAYCRYPT_COMMAND, progress=progress)
    ours = net.add_external_relay("xmiddle", exit=False)
    records: list[dict[str, Any]] = []
    try:
        bootstrap = net.start(timeout)
        t2 = net.relay("t2")
        for index in range(runs):
            recorder = _recorder(perf_dir, t2.pid, f"tornet-tor-{index}")
            before = thread_times(t2.pid)
            tor_push = net.push("all_tor", size)
            tor_split = CpuSplit.between(t2.pid, frozenset(), before, thread_times(t2.pid))
            tor_groups = recorder.stop() if recorder is not None else None
            stats_before = _stats(ours)
            recorder = _recorder(perf_dir, ours.pid, f"tornet-ours-{index}")
            before = thread_times(ours.pid)
            our_push = net.push("middle", size, ours)
            split = CpuSplit.between(ours.pid, frozenset(), before, thread_times(ours.pid))
            our_groups = recorder.stop() if recorder is not None else None
            stats_after = _stats(ours)
            crypted = stats_after["cells_crypted"] - stats_before["cells_crypted"]
            batches = stats_after["batches"] - stats_before["batches"]
            records.append({
                # what our relay's own counters saw during the push (SENDMEs and circuit
                # set-up included): its cells_crypted, and its mean worker batch
                "ours_cells_crypted": crypted,
                "ours_batch_mean": crypted / batches if batches else 0.0,
                # the same pushes on the nanosecond accounts (circuit set-up included)
                "tor_middle_cpu_us_per_cell_ns": tor_split.total_s * 1e6 / tor_push.cells,
                "ours_middle_cpu_us_per_cell_ns": split.total_s * 1e6 / our_push.cells,
                "tor_guard_cpu_us_per_cell": tor_push.cpu_us_per_cell("t1"),
                "tor_middle_cpu_us_per_cell": tor_push.cpu_us_per_cell("t2"),
                "tor_exit_cpu_us_per_cell": tor_push.cpu_us_per_cell("t3"),
                "tor_mb_per_s": tor_push.result.mb_per_s,
                "ours_middle_cpu_us_per_cell": our_push.cpu_us_per_cell("xmiddle"),
                "ours_middle_loop_cpu_us_per_cell": split.loop_s * 1e6 / our_push.cells,
                "ours_mb_per_s": our_push.result.mb_per_s,
                "cells": tor_push.cells,
                "intact": tor_push.result.intact and our_push.result.intact,
            })
            if tor_groups is not None and our_groups is not None:
                record = records[-1]
                for who, groups in (("tor", tor_groups), ("ours", our_groups)):
                    record[f"{who}_perf"] = split_per_cell(
                        groups, record[f"{who}_middle_cpu_us_per_cell"])
    finally:
        where = net.description
        net.stop()

    def median(key: str) -> float:
        return statistics.median(record[key] for record in records)

    tor_cpu = median("tor_middle_cpu_us_per_cell")
    ours_cpu = median("ours_middle_cpu_us_per_cell")
    profiles = {who: median_split([record.get(f"{who}_perf", {}) for record in records])
                for who in ("tor", "ours")}
    return {
        "cpu_us_per_cell": tor_cpu,
        "position": "middle",
        "spread": {key: _spread([record[key] for record in records])
                   for key in ("tor_middle_cpu_us_per_cell", "ours_middle_cpu_us_per_cell")},
        "guard_cpu_us_per_cell": median("tor_guard_cpu_us_per_cell"),
        "exit_cpu_us_per_cell": median("tor_exit_cpu_us_per_cell"),
        "mb_per_s": median("tor_mb_per_s"),
        "cpu_us_per_cell_ns": median("tor_middle_cpu_us_per_cell_ns"),
        **profiles["tor"],
        "ours_same_position": {
            **profiles["ours"],
            "cpu_us_per_cell": ours_cpu,
            "cpu_us_per_cell_ns": median("ours_middle_cpu_us_per_cell_ns"),
            "loop_cpu_us_per_cell": median("ours_middle_loop_cpu_us_per_cell"),
            "mb_per_s": median("ours_mb_per_s"),
            "ratio_to_tor": ours_cpu / tor_cpu if tor_cpu else 0.0,
            "batch_mean": median("ours_batch_mean"),
            "cells_crypted_per_relayed_cell": statistics.median(
                record["ours_cells_crypted"] / record["cells"] for record in records),
        },
        "intact": all(record["intact"] for record in records),
        "size_mib": size / MIB,
        "runs": records,
        "bootstrap_s": bootstrap,
        "where": where,
        "cell_definition": "stream bytes that crossed the relay, both directions, / 498; CPU "
                           "of the relay's process tree from /proc (10 ms ticks) over the push",
    }
