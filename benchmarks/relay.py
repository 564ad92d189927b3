"""What one relay costs per relayed cell, its saturation throughput and round trips, side by side.

``python -m benchmarks.relay [--runs N] [--quick] [--json] [--no-tor] [--modes M,...]
[--perf]``

For each mode -- ``tls`` (the relay's default: TLS with tor's link authentication, its record
crypto on the loop thread), ``plain`` (``--plain-links``), and on request ``tls-pool`` (TLS
record crypto on the pool, ``--tls-on-pool``) and ``pool-only`` (nothing crypted on the loop
thread: ``--tls-on-pool --inline-cells 0 --tls-inline-bytes 0``) -- and each of ``--runs``
rounds (the modes interleaved, so the host's changing load spreads over all):

1. **CPU per relayed cell and saturation throughput** (:mod:`benchmarks.relay_cpu`): one
   unmodified ``python -m examples.relay`` in the middle of ``--circuits`` circuits driven by
   this process (:mod:`benchmarks.relay_load`: an authenticated previous hop and a fake next
   hop moving cells both ways as fast as the relay takes them, each circuit with at most
   ``--window-cells`` in flight per direction). Over ``--window`` seconds of steady transfer:
   the relay's CPU by thread from /proc -- the loop thread (the main thread), the worker
   threads (the others alive at READY; see :mod:`benchmarks.relay_proc`) -- divided by the
   cells it relayed (its own ``cells_crypted`` counter, SIGUSR1 ``STATS``), and cells/s and
   MB/s through it.
2. **The same at a modest load** (``--paced-rate``, default 40,000 cells/s): the load offers
   that many cells/s in small batches every 2 ms, spread over the circuits, one write per link
   (as a neighbour relay flushes what its circuits hold): the cost per cell when batches are
   a few cells, as on a network where many circuits each carry a little.
3. **Single-cell round trips through 3 relays** (:mod:`benchmarks.relay_rtt`): idle (one cell
   at a time, p50/p99) and while a bulk transfer runs on other circuits through the same
   relays (p99).

When tor is installed and ``--no-tor`` is not given:

4. **C tor under the same load** (:mod:`benchmarks.relay_torpeer`): a private tor relay in
   the middle of the same circuits from the same load generator, saturated and paced, its
   relayed cells counted at the far ends (tor has no counter to ask); our TLS figures beside
   it (``c_tor_same_load``);
5. **C tor at the same position in a Tor network** (:mod:`benchmarks.relay_tor`): a private
   Tor network (tornet) where tor relay t2 is the middle of an all-tor circuit and our relay
   the middle of another, both moving the same pushes; C tor's CPU per relayed cell and ours
   beside it (``c_tor``).

*Relayed cell* (the same for every figure): a RELAY cell that a relay received on one link and
sent on the other after one layer of relay crypto, in either direction. Counted by our relay
itself in (1)-(2); at the far ends for tor in (4) (for our relay the two counts agree within
1 %); in tornet (5) from the stream bytes both ways / 498, tornet's definition, which misses
the few SENDME cells for tor and for ours alike.

``--json`` prints ``{"tls": M, "plain": M, "c_tor": {"cpu_us_per_cell": x, ...} or null,
"c_tor_same_load": {"saturated": T, "paced": T} or null, ...}`` where ``M`` holds
``loop_cpu_us_per_cell``, ``workers_cpu_us_per_cell``, ``cpu_us_per_cell``, ``cells_per_s``,
``mb_per_s``, ``rtt_idle_p50_ms``, ``rtt_idle_p99_ms``, ``rtt_load_p50_ms``,
``rtt_load_p99_ms`` (medians over the runs), ``spread`` ([min, max] of each over the runs),
``paced`` (the figures of (2)) and ``runs`` (every run's full record); ``T`` tor's
``cpu_us_per_cell`` (and the rest of (2)'s figures) with ``ratio_ours_to_tor``. Without
``--json``, a table. Every figure depends on the machine and on what else runs on it: the
output records the load average before and after. ``--quick``: one short run of each (for
tests; figures are rough).

``--perf`` (needs perf, :mod:`benchmarks.cpu_profile`) also samples every CPU run, ours and
C tor's, over its window, and adds to each run and summary ``cpu_by_group_us_per_cell`` (the
CPU per cell split into kernel, OpenSSL, interpreter, extensions, libc, tor, libevent) and
``floor_us_per_cell`` (kernel + OpenSSL: the reads, writes and ciphers any relay pays for the
same cells on this machine), so each relay's figure can be set against the part of it that is
not its own code; and the loop thread's own split, ``loop_cpu_by_group_us_per_cell`` and
``loop_kernel_us_per_cell`` (the system calls the loop thread makes for the cells: what the
loop-thread figure cannot go below while the loop does the socket I/O).

Threads: main thread only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.cpu_profile import median_split, unavailable
from benchmarks.relay_cpu import LoadFailed, measure
from benchmarks.relay_load import DEFAULT_WINDOW
from benchmarks.relay_proc import RelayStartError
from benchmarks.relay_rtt import measure_rtt
from benchmarks.relay_tor import MIB, measure_tor, tor_missing
from tornet.procs import NetworkFailed
from tornet.push import PinError

__all__ = ["FIGURES", "MODES", "main", "summarize_mode"]

MODES = ("tls", "plain", "tls-pool", "pool-only")
"""Link modes, in table order; ``--modes`` picks some (default: the first two)."""
MODE_SETTINGS: dict[str, tuple[bool, tuple[str, ...]]] = {
    "tls": (True, ()),
    "plain": (False, ()),
    # TLS record crypto on the pool (relay.tlspipe)
    "tls-pool": (True, ("--tls-on-pool",)),
    # nothing crypted on the loop thread: every batch and every TLS piece to the pool
    "pool-only": (True, ("--tls-on-pool", "--inline-cells", "0", "--tls-inline-bytes", "0")),
}
"""Per mode: TLS links or not, and the relay's extra arguments."""
FIGURES = {
    "loop_cpu_us_per_cell": "cpu", "workers_cpu_us_per_cell": "cpu", "cpu_us_per_cell": "cpu",
    "cells_per_s": "cpu", "mb_per_s": "cpu", "loop_busy": "cpu",
    "rtt_idle_p50_ms": "rtt", "rtt_idle_p99_ms": "rtt", "rtt_load_p50_ms": "rtt",
    "rtt_load_p99_ms": "rtt",
}
"""Each figure of a mode and the measurement it comes from."""
TARGETS = {
    "loop_cpu_us_per_cell": ("tls", 0.3), "rtt_idle_p50_ms": ("tls", 2.0),
    "rtt_idle_p99_ms": ("tls", 10.0), "rtt_load_p99_ms": ("tls", 30.0),
}
"""The issue's targets (for context in the table; nothing is tuned to them)."""


def _figure(name: str, record: dict[str, Any]) -> float:
    """One figure from one run's record (a CPU run's or a round-trip run's). Any thread
    (pure)."""
    if FIGURES[name] == "cpu":
        return float(record[name])
    phase, _, stat = name.removeprefix("rtt_").partition("_")
    return float(record[phase][stat])


def summarize_mode(cpu_runs: list[dict[str, Any]], rtt_runs: list[dict[str, Any]]
                   ) -> dict[str, Any]:
    """Median of each figure over the runs, ``spread`` [min, max], and the runs. Any thread
    (pure)."""
    out: dict[str, Any] = {}
    spread: dict[str, list[float]] = {}
    for name, source in FIGURES.items():
        values = [_figure(name, record) for record in (cpu_runs if source == "cpu"
                                                        else rtt_runs)]
        out[name] = statistics.median(values)
        spread[name] = [min(values), max(values)]
    out["spread"] = spread
    out.update(median_split(cpu_runs))
    out["samples"] = {"rtt_idle": sum(r["idle"]["samples"] for r in rtt_runs),
                      "rtt_load": sum(r["load"]["samples"] for r in rtt_runs),
                      "cells": sum(r["cells"] for r in cpu_runs)}
    out["runs"] = {"cpu": cpu_runs, "rtt": rtt_runs}
    return out


PACED_FIGURES = ("loop_cpu_us_per_cell", "workers_cpu_us_per_cell", "cpu_us_per_cell",
                 "cells_per_s", "loop_busy")
"""The figures of a paced run, and of C tor's runs under the same load."""


def summarize_runs(runs: list[dict[str, Any]], keys: tuple[str, ...] = PACED_FIGURES
                   ) -> dict[str, Any]:
    """Median of ``keys`` over CPU runs, their [min, max] and the runs. Any thread (pure)."""
    out: dict[str, Any] = {key: statistics.median(run[key] for run in runs) for key in keys}
    out["spread"] = {key: [min(run[key] for run in runs), max(run[key] for run in runs)]
                     for key in keys}
    if all("batch_mean" in run for run in runs):
        out["batch_mean"] = statistics.median(run["batch_mean"] for run in runs)
    out.update(median_split(runs))
    out["runs"] = runs
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line; ``--quick`` changes the defaults not given. Main thread."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.relay",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, help="rounds of each measurement (default 3, "
                                                 "quick 1); figures are medians")
    parser.add_argument("--quick", action="store_true", help="one short run of each")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--no-tor", action="store_true", help="skip the tornet comparison")
    parser.add_argument("--modes", default="tls,plain",
                        help=f"comma-separated, of {','.join(MODES)} (default tls,plain)")
    parser.add_argument("--threads", type=int, default=2, help="worker threads per relay")
    parser.add_argument("--circuits", type=int, default=32)
    parser.add_argument("--links", type=int, default=2)
    parser.add_argument("--window-cells", type=int, default=DEFAULT_WINDOW,
                        help="cells in flight per circuit and direction")
    parser.add_argument("--warmup", type=float, help="seconds before the window (default 1)")
    parser.add_argument("--window", type=float, help="seconds measured (default 5)")
    parser.add_argument("--rtt-samples", type=int, help="idle round trips per run (default 400)")
    parser.add_argument("--rtt-gap", type=float, default=0.002,
                        help="seconds between an echo and the next probe (default 0.002)")
    parser.add_argument("--load-seconds", type=float,
                        help="seconds of probing under load per run (default 5)")
    parser.add_argument("--tor-mib", type=float, help="MiB per tornet push (default 16)")
    parser.add_argument("--paced-rate", type=float, default=40_000.0,
                        help="also measure at this many cells/s offered, in small batches "
                             "over the circuits (default 40000, about a tornet push's rate "
                             "through a relay; 0: skip)")
    parser.add_argument("--perf", action="store_true",
                        help="also sample each CPU run (ours and C tor's) with perf: where the "
                             "CPU per cell goes, by library (benchmarks.cpu_profile)")
    args = parser.parse_args(argv)
    quick = args.quick
    defaults = {"runs": (3, 1), "warmup": (1.0, 0.5), "window": (5.0, 1.0),
                "rtt_samples": (400, 60), "load_seconds": (5.0, 1.5), "tor_mib": (16.0, 4.0)}
    for name, (normal, short) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, short if quick else normal)
    args.modes = [mode for mode in args.modes.split(",") if mode]
    if not args.modes or set(args.modes) - set(MODES):
        parser.error(f"--modes: a subset of {','.join(MODES)}")
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    return args


def _load() -> float:
    """The 1-minute load average. Any thread."""
    return os.getloadavg()[0]


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Every measurement; the report. Main thread."""
    def progress(line: str) -> None:
        print(f"relay bench: {line}", file=sys.stderr, flush=True)

    report: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "load_before": _load()}}
    cpu_runs: dict[str, list[dict[str, Any]]] = {mode: [] for mode in args.modes}
    paced_runs: dict[str, list[dict[str, Any]]] = {mode: [] for mode in args.modes}
    rtt_runs: dict[str, list[dict[str, Any]]] = {mode: [] for mode in args.modes}
    tor_runs: dict[str, list[dict[str, Any]]] = {"saturated": [], "paced": []}
    tor_here = not args.no_tor and tor_missing() is None
    load_bytes = (16 if args.quick else 64) * MIB
    if args.perf:
        why_not = unavailable()
        if why_not is not None:
            raise RuntimeError(f"--perf: {why_not}")

    def perf_data(name: str) -> Path | None:
        return workdir / f"{name}.perf" if args.perf else None

    common = {"circuits": args.circuits, "links": args.links, "warmup": args.warmup,
              "window": args.window, "window_cells": args.window_cells}
    for index in range(args.runs):
        for mode in args.modes:
            tls, relay_args = MODE_SETTINGS[mode]
            progress(f"run {index + 1}/{args.runs}, {mode}: relay under saturating load")
            result = measure(tls, workdir / f"cpu-{mode}-{index}", threads=args.threads,
                             extra_args=relay_args,
                             perf_data=perf_data(f"cpu-{mode}-{index}"), **common)
            cpu_runs[mode].append(result)
            progress(f"  {result['cells_per_s']:.0f} cells/s, "
                     f"{result['cpu_us_per_cell']:.2f} us/cell "
                     f"(loop {result['loop_cpu_us_per_cell']:.2f})")
            if args.paced_rate:
                result = measure(tls, workdir / f"paced-{mode}-{index}", threads=args.threads,
                                 rate=args.paced_rate, extra_args=relay_args,
                                 perf_data=perf_data(f"paced-{mode}-{index}"), **common)
                paced_runs[mode].append(result)
                progress(f"  paced at {args.paced_rate:.0f} cells/s: "
                         f"{result['cpu_us_per_cell']:.2f} us/cell "
                         f"(loop {result['loop_cpu_us_per_cell']:.2f})")
            progress(f"run {index + 1}/{args.runs}, {mode}: round trips through 3 relays")
            rtt = measure_rtt(tls, workdir / f"rtt-{mode}-{index}", samples=args.rtt_samples,
                              gap=args.rtt_gap, load_seconds=args.load_seconds,
                              load_bytes=load_bytes, threads=args.threads,
                              relay_args=relay_args)
            rtt_runs[mode].append(rtt)
            progress(f"  idle p50 {rtt['idle']['p50_ms']:.2f} ms, under load p99 "
                     f"{rtt['load']['p99_ms']:.1f} ms")
        if tor_here:
            progress(f"run {index + 1}/{args.runs}: C tor under the same load")
            for kind, rate in (("saturated", 0.0), ("paced", args.paced_rate)):
                if kind == "paced" and not rate:
                    continue
                result = measure(True, workdir / f"tor-{kind}-{index}", rate=rate, tor=True,
                                 perf_data=perf_data(f"tor-{kind}-{index}"), **common)
                tor_runs[kind].append(result)
                progress(f"  {kind}: {result['cells_per_s']:.0f} cells/s, "
                         f"{result['cpu_us_per_cell']:.2f} us/cell")
    for mode in args.modes:
        report[mode] = summarize_mode(cpu_runs[mode], rtt_runs[mode])
        if paced_runs[mode]:
            report[mode]["paced"] = {"offered_cells_per_s": args.paced_rate,
                                     **summarize_runs(paced_runs[mode])}
    report["c_tor"] = None
    report["c_tor_same_load"] = None
    why = "--no-tor" if args.no_tor else tor_missing()
    if why is None:
        same: dict[str, Any] = {kind: summarize_runs(runs)
                                for kind, runs in tor_runs.items() if runs}
        if "tls" in report:
            ours = report["tls"]
            same["saturated"]["ours_tls_cpu_us_per_cell"] = ours["cpu_us_per_cell"]
            same["saturated"]["ratio_ours_to_tor"] = (
                ours["cpu_us_per_cell"] / same["saturated"]["cpu_us_per_cell"])
            if "paced" in same and "paced" in ours:
                same["paced"]["offered_cells_per_s"] = args.paced_rate
                same["paced"]["ours_tls_cpu_us_per_cell"] = ours["paced"]["cpu_us_per_cell"]
                same["paced"]["ratio_ours_to_tor"] = (
                    ours["paced"]["cpu_us_per_cell"] / same["paced"]["cpu_us_per_cell"])
        report["c_tor_same_load"] = same
        progress("tornet: tor relays and ours at the middle of circuits")
        try:
            report["c_tor"] = measure_tor(runs=args.runs, size=int(args.tor_mib * MIB),
                                          progress=lambda line: progress(f"tornet {line}"),
                                          perf_dir=workdir if args.perf else None)
        except (NetworkFailed, PinError, TimeoutError) as exc:
            report["c_tor_error"] = f"{type(exc).__name__}: {exc}"
    else:
        report["c_tor_skipped"] = why
    report["machine"]["load_after"] = _load()
    report["settings"] = {key: getattr(args, key) for key in (
        "runs", "quick", "threads", "circuits", "links", "window_cells", "warmup", "window",
        "rtt_samples", "rtt_gap", "load_seconds", "tor_mib", "paced_rate", "modes",
        "perf")}
    report["definitions"] = {
        "relayed_cell": "a RELAY cell the relay received on one link and sent on the other "
                        "after one layer of relay crypto, either direction (its cells_crypted "
                        "counter; in tornet: stream bytes both ways / 498)",
        "cpu": "per thread from /proc/PID/task/TID/schedstat over the steady window; loop = "
               "the main thread, workers = the other threads alive at READY",
        "mb_per_s": "relayed cells x 514 bytes (a link-protocol-4 cell before TLS) per second",
        "rtt": "498 bytes on one stream through relay0 > relay1 > relay2 to the echo service "
               "and back, one probe at a time; under load: while examples.client echoes bulk "
               "data on other circuits through the same relays",
    }
    return report


def _row(label: str, values: dict[str, Any], key: str, unit: str, fmt: str,
         target: tuple[str, float] | None, modes: list[str]) -> str:
    """One line of the table: the figure per mode with its spread, and the target. Any thread
    (pure)."""
    cells = []
    for mode in modes:
        value = values[mode][key]
        low, high = values[mode]["spread"][key]
        cells.append(f"{value:{fmt}} [{low:{fmt}}-{high:{fmt}}]")
    note = f"   target ({target[0]}) <= {target[1]:g} {unit}" if target else ""
    return f"{label:<34}" + "".join(f"{cell:>28}" for cell in cells) + note


def print_table(report: dict[str, Any], out: Any = sys.stdout) -> None:
    """The human-readable report. Main thread."""
    modes = [mode for mode in MODES if mode in report]
    settings = report["settings"]
    print(f"One relay (python -m examples.relay, {settings['threads']} workers) as the middle "
          f"of {settings['circuits']} circuits; median [min-max] of {settings['runs']} "
          f"run(s); load average {report['machine']['load_before']:.2f} -> "
          f"{report['machine']['load_after']:.2f} on {report['machine']['cpus']} CPUs", file=out)
    print(f"{'':<34}" + "".join(f"{mode:>28}" for mode in modes), file=out)
    rows = [("loop-thread CPU us / relayed cell", "loop_cpu_us_per_cell", "us", ".2f"),
            ("worker CPU us / relayed cell", "workers_cpu_us_per_cell", "us", ".2f"),
            ("relay CPU us / relayed cell", "cpu_us_per_cell", "us", ".2f"),
            ("loop thread busy (CPU s / s)", "loop_busy", "", ".2f"),
            ("relayed cells / s (saturated)", "cells_per_s", "", ".0f"),
            ("MB/s through the relay", "mb_per_s", "MB/s", ".0f"),
            ("3-relay RTT idle p50 (ms)", "rtt_idle_p50_ms", "ms", ".2f"),
            ("3-relay RTT idle p99 (ms)", "rtt_idle_p99_ms", "ms", ".2f"),
            ("3-relay RTT under load p50 (ms)", "rtt_load_p50_ms", "ms", ".1f"),
            ("3-relay RTT under load p99 (ms)", "rtt_load_p99_ms", "ms", ".1f")]
    for label, key, unit, fmt in rows:
        print(_row(label, report, key, unit, fmt, TARGETS.get(key), modes), file=out)
    if all("paced" in report[mode] for mode in modes):
        rate = report[modes[0]]["paced"]["offered_cells_per_s"]
        paced = {mode: report[mode]["paced"] for mode in modes}
        for what, key in (("loop", "loop_cpu_us_per_cell"), ("relay", "cpu_us_per_cell")):
            label = f"paced {rate / 1000:.0f}k cells/s: {what} us/cell"
            print(_row(label, paced, key, "us", ".2f", None, modes), file=out)
    print_perf(report, modes, out)
    same = report.get("c_tor_same_load")
    if same:
        for kind, figures in same.items():
            ratio = figures.get("ratio_ours_to_tor")
            print(f"C tor under the same load, {kind}"
                  + (f" ({figures['offered_cells_per_s'] / 1000:.0f}k cells/s)"
                     if kind == "paced" else
                     f" ({figures['cells_per_s'] / 1000:.0f}k cells/s)")
                  + f": {figures['cpu_us_per_cell']:.2f} us / relayed cell"
                  + (f"; ours (tls) {figures['ours_tls_cpu_us_per_cell']:.2f} = "
                     f"{ratio:.2f}x tor's" if ratio is not None else ""), file=out)
    tor = report.get("c_tor")
    if tor is None:
        why = report.get("c_tor_skipped") or report.get("c_tor_error")
        print(f"C tor: not measured ({why})", file=out)
    else:
        ours = tor["ours_same_position"]
        print(f"tornet, middle of a circuit, {tor['size_mib']:g} MiB pushes ({tor['where']}): "
              f"C tor {tor['cpu_us_per_cell']:.2f} us / relayed cell (guard "
              f"{tor['guard_cpu_us_per_cell']:.2f}, exit {tor['exit_cpu_us_per_cell']:.2f}); "
              f"ours {ours['cpu_us_per_cell']:.2f} (loop thread "
              f"{ours['loop_cpu_us_per_cell']:.2f}) = {ours['ratio_to_tor']:.2f}x tor's "
              "(target <= 0.5x)", file=out)
    print("relayed cell: " + report["definitions"]["relayed_cell"], file=out)


def _groups(figures: dict[str, Any], key: str = "cpu_by_group_us_per_cell") -> str:
    """``kernel 1.34 openssl 1.16 ...`` (us per cell, groups above 0.005). Any thread
    (pure)."""
    return " ".join(f"{name} {value:.2f}" for name, value in figures[key].items()
                    if value >= 0.005)


def _perf_lines(label: str, figures: dict[str, Any] | None,
                thread: str = "its loop thread") -> list[str]:
    """One figure's split by library and floor, and its loop (main) thread's split, when
    ``--perf`` measured them. Any thread (pure)."""
    lines = []
    if figures and "floor_us_per_cell" in figures:
        lines.append(f"  {label}: {figures['cpu_us_per_cell']:.2f} us = {_groups(figures)}; "
                     f"kernel + OpenSSL {figures['floor_us_per_cell']:.2f}")
    if figures and "loop_kernel_us_per_cell" in figures:
        lines.append(f"    {thread}: {figures['loop_cpu_us_per_cell']:.2f} us = "
                     f"{_groups(figures, 'loop_cpu_by_group_us_per_cell')}")
    return lines


def print_perf(report: dict[str, Any], modes: list[str], out: Any) -> None:
    """With ``--perf``: where each CPU figure goes, by library, and the floor (kernel +
    OpenSSL) beside C tor's under the same load. Main thread."""
    lines = []
    for mode in modes:
        for kind, figures in (("saturated", report[mode]), ("paced", report[mode].get("paced"))):
            lines += _perf_lines(f"ours {mode}, {kind}", figures)
    for kind, figures in (report.get("c_tor_same_load") or {}).items():
        lines += _perf_lines(f"C tor, {kind}", figures, thread="its main thread")
    tor = report.get("c_tor")
    if tor is not None:
        for who, figures in (("C tor", tor), ("ours", tor["ours_same_position"])):
            lines += _perf_lines(f"{who}, tornet middle", figures)
    if lines:
        print("where the CPU per relayed cell goes (perf, medians; us per cell):", file=out)
        for line in lines:
            print(line, file=out)


def main(argv: list[str] | None = None) -> int:
    """Run everything, print the report; 1 when a measurement failed. Main thread."""
    args = parse_args(argv)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="relaybench-") as scratch:
        try:
            report = run(args, Path(scratch))
        except (LoadFailed, RelayStartError, RuntimeError) as exc:
            print(f"relay bench failed: {exc}", file=sys.stderr)
            return 1
    report["seconds"] = time.monotonic() - started
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print_table(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
