"""Side by side: the worker pool against the designs a user would pick instead, in one run.

What is measured
----------------
Two workloads (:mod:`benchmarks.workload`), 200 circuits each by default:

* ``relay_forward``: a middle relay decrypting cells with Kf, checking ``recognized`` and
  passing them on (none is for it);
* ``origin``: a client encrypting relay payloads for hop 2 of 3 (digest + three AES layers).

Six designs (:mod:`benchmarks.designs`, :mod:`benchmarks.designs_asyncio`), all with the same C
kernel:

* the headline pair, both on an asyncio loop: ``pool_asyncio`` (:class:`workers.pool.WorkerPool`,
  2 workers, its reply queue woken through an eventfd with ``add_reader``) against
  ``executor_batch`` (what an asyncio user would write: ``ThreadPoolExecutor`` with 2
  threads, ONE job per circuit batch with all the circuit's pending chunks, one job in flight
  per circuit, the same kernel call as the pool's process function);
* ``pool`` (the same pool on a pyuv Reactor) and ``inline`` (the loop thread crypts);
* context, the naive designs that mostly measure per-cell Python: ``futures_per_cell``
  (``ThreadPoolExecutor``, one submit per cell) and ``cpuworker_socketpair`` (per-cell messages
  over socketpairs to 2 worker threads).

How
---
The loop thread (a :class:`reactor.Reactor`) is producer and consumer: it hands arrivals
(chunks of 32 cells of one circuit) to the design from an Idle callback, ``burst`` arrivals per
loop iteration, keeping at most ``window`` cells in flight, and checks every result against the
pure-Python reference ``tor1.reference`` as it comes back (a wrong byte fails the run).
See :mod:`benchmarks.driver`. For each design and workload:

* ``cells_per_s``: cells divided by the time from the first submit to the last result, both on
  the loop thread;
* ``lateness_p50_ms`` / ``lateness_p99_ms``: how late a repeating 1 ms timer on the loop fires
  while the design runs (the loop's responsiveness);
* pool only: ``wakeups_per_cell`` (``uv.Async`` sends by workers per cell: how often the loop
  is woken), ``notifies_per_cell`` (Condition notifies to workers), ``batch_mean`` (cells per
  kernel call).

Each figure is the median of ``--repetitions`` runs (5; at least 5 unless ``--quick``, which
uses 3) inside this one invocation; the repetitions rotate through the designs so that machine
noise hits all of them alike. Each ratio (pool_asyncio/executor_batch, the headline, in the JSON
under ``headline.<workload>`` and as ``vs_executor_batch`` in ``workloads.<w>.pool_asyncio``;
pool/executor_batch, pool/inline, pool/cpuworker, pool/futures) is the median of the ratios
within each repetition, with their spread (``<key>_spread``: [min, max]). The pool's relay_forward
rate is also given as a fraction of ``openssl speed -evp aes-128-ctr -bytes 512`` on one core
(bytes/s divided by the 509-byte payload: the AES ceiling).

Run::

    python -m benchmarks.pipeline [--quick] [--json] [--plot FILE.png] [options]

The pool runs with its own defaults (batch cap, scheduling: the workers beyond CPUs - 1 run in
Linux's SCHED_IDLE class so that the loop never waits for a worker's time slice).
``--worker-sched idle`` puts every worker in SCHED_IDLE instead (see
:func:`benchmarks.designs.sched_idle_worker`): the loop then always wins, but other processes'
CPU load starves the crypto.

The defaults finish in a few minutes on the 2-core development VM. Numbers from a shared
machine are noisy: the header shows the load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from benchmarks.designs import DESIGNS, WORKER_SCHED_CHOICES, WORKER_THREADS, make_design
from benchmarks.driver import as_dict, idle_lateness, load_average, run_design
from benchmarks.workload import WORKLOADS, Workload, build
from tor1 import CELL_PAYLOAD_LEN

#: The headline: the pool on asyncio against what an asyncio user would write with the same
#: kernel (one executor job per circuit batch).
HEADLINE = ("pool_asyncio", "executor_batch")
#: Ratios reported, as (key, design, other design): each the median over the repetitions of
#: the ratio within one repetition, with its spread (min, max) under ``<key>_spread``.
RATIO_KEYS = (
    ("vs_executor_batch", "pool_asyncio", "executor_batch"),
    ("vs_executor_batch", "pool", "executor_batch"),
    ("vs_inline", "pool", "inline"),
    ("vs_cpuworker_socketpair", "pool", "cpuworker_socketpair"),
    ("vs_futures_per_cell", "pool", "futures_per_cell"),
)
#: Repetitions without ``--quick``: ratios are medians of at least this many runs.
MIN_REPETITIONS = 5
#: Figures reported as the median over repetitions (the others come from the median run).
MEDIAN_KEYS = (
    "cells_per_s",
    "lateness_p50_ms",
    "lateness_p99_ms",
    "lateness_max_ms",
    "seconds",
    "wakeups_per_cell",
    "notifies_per_cell",
    "batch_mean",
    "loop_busy",
    "cpus_busy",
    "others_cpus_busy",
    "loop_cpu_ns_per_cell",
    "process_cpu_ns_per_cell",
)


@dataclass(frozen=True)
class Config:
    """Everything that shapes a pipeline run."""

    circuits: int
    cells_per_circuit: int
    chunk_cells: int
    window: int
    burst: int
    repetitions: int
    batch_cells: int | None
    reply_max_batch: int | None
    worker_sched: str
    switch_interval: float
    workloads: tuple[str, ...]
    designs: tuple[str, ...]
    openssl: bool


def measure(config: Config, log: Any = None) -> dict[str, Any]:
    """Run every design on every workload; return the JSON document (see the module doc)."""
    previous_interval = sys.getswitchinterval()
    sys.setswitchinterval(config.switch_interval)
    results: dict[str, Any] = {}
    try:
        for name in config.workloads:
            workload = build(name, config.circuits, config.cells_per_circuit,
                             config.chunk_cells)
            results[name] = measure_workload(workload, config, log)
    finally:  # the interval is process-wide: a caller (or a test) must get its own back
        sys.setswitchinterval(previous_interval)
    ceiling = openssl_cells_per_s() if config.openssl else None
    add_ratios(results, ceiling)
    document: dict[str, Any] = {"workloads": results}
    headline = headline_ratios(results)
    if headline:
        document["headline"] = headline
    return document


def measure_workload(workload: Workload, config: Config, log: Any = None) -> dict[str, Any]:
    """Median figures per design for one workload; repetitions rotate through the designs."""
    runs: dict[str, list[dict[str, Any]]] = {design: [] for design in config.designs}
    for repetition in range(config.repetitions):
        for design in config.designs:
            figures = run_design(
                workload,
                make_design(
                    design,
                    batch_cells=config.batch_cells,
                    reply_max_batch=config.reply_max_batch,
                    worker_sched=config.worker_sched,
                ),
                window=config.window,
                burst=config.burst,
            )
            runs[design].append(as_dict(figures))
            if log is not None:
                print(
                    f"  {workload.name:<14} {design:<22} run {repetition + 1}: "
                    f"{figures.cells_per_s:>12,.0f} cells/s",
                    file=log,
                    flush=True,
                )
    return {design: summarize(design_runs) for design, design_runs in runs.items()}


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median of each figure over the runs, plus the per-run rates and the check verdict."""
    summary: dict[str, Any] = {}
    for key in MEDIAN_KEYS:
        if key in runs[0]:
            summary[key] = statistics.median(run[key] for run in runs)
    summary["cells"] = runs[0]["cells"]
    summary["repetitions"] = len(runs)
    summary["runs_cells_per_s"] = [run["cells_per_s"] for run in runs]
    summary["lateness_samples"] = sum(run["lateness_samples"] for run in runs)
    summary["output_check"] = "passed"  # a mismatch raises before we get here
    return summary


def run_ratios(mine: dict[str, Any], other: dict[str, Any]) -> list[float]:
    """The ratio of two designs' cells/s within each repetition (they ran side by side)."""
    return [a / b for a, b in zip(mine["runs_cells_per_s"], other["runs_cells_per_s"],
                                  strict=True)]


def add_ratios(results: dict[str, Any], ceiling: float | None) -> None:
    """Add the ratios of :data:`RATIO_KEYS` into each design's dict: ``<key>`` (median of the
    per-repetition ratios) and ``<key>_spread`` ([min, max]); and the openssl fraction for
    relay_forward into the pool's."""
    for name, designs in results.items():
        for key, design, other in RATIO_KEYS:
            if design in designs and other in designs:
                ratios = run_ratios(designs[design], designs[other])
                designs[design][key] = statistics.median(ratios)
                designs[design][f"{key}_spread"] = [min(ratios), max(ratios)]
        pool = designs.get("pool")
        if pool is None:
            continue
        if name == "relay_forward" and ceiling:
            pool["openssl_cells_per_s"] = ceiling
            pool["openssl_fraction"] = pool["cells_per_s"] / ceiling


def headline_ratios(results: dict[str, Any]) -> dict[str, Any]:
    """Per workload: ``pool_asyncio`` / ``executor_batch`` cells/s, median of the repetitions
    with the spread, when both ran."""
    mine, other = HEADLINE
    headline: dict[str, Any] = {}
    for name, designs in results.items():
        if mine in designs and other in designs:
            ratios = run_ratios(designs[mine], designs[other])
            headline[name] = {
                "design": mine,
                "baseline": other,
                "ratio": statistics.median(ratios),
                "ratio_min": min(ratios),
                "ratio_max": max(ratios),
                "runs": len(ratios),
                "cells_per_s": designs[mine]["cells_per_s"],
                "baseline_cells_per_s": designs[other]["cells_per_s"],
            }
    return headline


def openssl_cells_per_s(seconds: int = 2) -> float | None:
    """``openssl speed -evp aes-128-ctr -bytes 512`` on one core, as 509-byte cells per second.

    None when the openssl binary is missing or its output cannot be read.
    """
    binary = shutil.which("openssl")
    if binary is None:
        return None
    try:
        done = subprocess.run(
            [binary, "speed", "-evp", "aes-128-ctr", "-bytes", "512", "-seconds", str(seconds)],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"^AES-128-CTR\s+([0-9.]+)k\s*$", done.stdout, re.MULTILINE | re.IGNORECASE)
    if match is None:
        return None
    return float(match.group(1)) * 1000 / CELL_PAYLOAD_LEN


# --------------------------------------------------------------------------- targets, report


def targets(document: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """The issue's targets that this document can judge: (target, measured, holds)."""
    checks: list[tuple[str, str, bool]] = []
    workloads = document["workloads"]
    for name, head in document.get("headline", {}).items():
        ratio = head["ratio"]
        checks.append((f"{name}: pool_asyncio >= 2x executor_batch (same kernel)",
                       f"{ratio:.2f}x (runs {head['ratio_min']:.2f}-{head['ratio_max']:.2f}x)",
                       ratio >= 2.0))
    floors = {"relay_forward": 1.0, "origin": 1.5}
    for name, designs in workloads.items():
        pool = designs.get("pool")
        if pool is None:
            continue
        if "vs_inline" in pool:
            floor = floors[name]
            checks.append(
                (f"{name}: pool >= {floor}x inline", f"{pool['vs_inline']:.2f}x",
                 pool["vs_inline"] >= floor)
            )
        if "vs_cpuworker_socketpair" in pool:
            ratio = pool["vs_cpuworker_socketpair"]
            checks.append((f"{name}: pool >= 10x cpuworker_socketpair", f"{ratio:.1f}x",
                           ratio >= 10))
        if "vs_futures_per_cell" in pool:
            ratio = pool["vs_futures_per_cell"]
            checks.append((f"{name}: pool >= 20x futures_per_cell", f"{ratio:.1f}x", ratio >= 20))
        p99 = pool["lateness_p99_ms"]
        checks.append((f"{name}: pool lateness p99 <= 2 ms", f"{p99:.2f} ms", p99 <= 2.0))
        wakeups = pool["wakeups_per_cell"]
        checks.append((f"{name}: pool wake-ups per cell <= 0.01", f"{wakeups:.5f}",
                       wakeups <= 0.01))
    return checks


def render(document: dict[str, Any], header: list[str]) -> str:
    """The human-readable table."""
    lines = list(header)
    headline = document.get("headline", {})
    for name, designs in document["workloads"].items():
        inline = designs.get("inline", {}).get("cells_per_s")
        lines.append("")
        lines.append(f"{name}")
        head = headline.get(name)
        if head is not None:
            lines.append(
                f"  HEADLINE pool_asyncio / executor_batch (same kernel, same {WORKER_THREADS} "
                f"threads, both on asyncio): {head['ratio']:.2f}x, median of {head['runs']} "
                f"runs (spread {head['ratio_min']:.2f}-{head['ratio_max']:.2f}x); "
                f"{head['cells_per_s']:,.0f} vs {head['baseline_cells_per_s']:,.0f} cells/s"
            )
        lines.append(
            f"  {'design':<22} {'cells/s':>12} {'x inline':>9} {'late p50':>9} {'late p99':>9}"
            f" {'wakeups/cell':>13} {'batch':>7} {'loop':>5} {'cpus':>5} {'others':>6}"
            "   runs (cells/s)"
        )
        for design, figures in designs.items():
            ratio = f"{figures['cells_per_s'] / inline:.2f}" if inline else "-"
            wakeups = figures.get("wakeups_per_cell")
            batch = figures.get("batch_mean")
            runs = ", ".join(f"{rate:,.0f}" for rate in figures["runs_cells_per_s"])
            lines.append(
                f"  {design:<22} {figures['cells_per_s']:>12,.0f} {ratio:>9}"
                f" {figures['lateness_p50_ms']:>7.2f}ms {figures['lateness_p99_ms']:>7.2f}ms"
                f" {'-' if wakeups is None else f'{wakeups:.5f}':>13}"
                f" {'-' if batch is None else f'{batch:.0f}':>7}"
                f" {figures['loop_busy']:>5.2f} {figures['cpus_busy']:>5.2f}"
                f" {figures['others_cpus_busy']:>6.2f}   {runs}"
            )
        pool = designs.get("pool", {})
        ratios = [
            f"{design}/{other} {designs[design][key]:.2f}x "
            f"({designs[design][key + '_spread'][0]:.2f}-{designs[design][key + '_spread'][1]:.2f})"
            for key, design, other in RATIO_KEYS
            if key in designs.get(design, {}) and other in designs
        ]
        if ratios:
            lines.append("  ratios (median of runs, spread): " + ", ".join(ratios))
        if "openssl_fraction" in pool:
            lines.append(
                f"  AES ceiling (openssl speed, 1 core): {pool['openssl_cells_per_s']:,.0f} "
                f"cells/s; pool reaches {pool['openssl_fraction']:.1%}"
            )
    lines.append("")
    lines.append("loop: loop-thread CPU / wall time; cpus: process CPU / wall (2 = both cores);")
    lines.append("others: CPU other processes used meanwhile (machine noise), in cores")
    lines.append("")
    lines.append("targets")
    for target, measured, holds in targets(document):
        lines.append(f"  [{'HOLDS' if holds else 'FAILS'}] {target}: {measured}")
    return "\n".join(lines)


def plot(document: dict[str, Any], path: str) -> None:
    """Bar charts of cells/s (log scale) and lateness p99 per design and workload."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = list(document["workloads"])
    designs = list(next(iter(document["workloads"].values())))
    figure, (rate_axes, late_axes) = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / len(designs)
    for index, design in enumerate(designs):
        offsets = [w + (index - (len(designs) - 1) / 2) * width for w in range(len(workloads))]
        rates = [document["workloads"][w][design]["cells_per_s"] for w in workloads]
        lateness = [document["workloads"][w][design]["lateness_p99_ms"] for w in workloads]
        rate_axes.bar(offsets, rates, width, label=design)
        late_axes.bar(offsets, lateness, width, label=design)
    rate_axes.set_yscale("log")
    rate_axes.set_ylabel("cells/s (log)")
    rate_axes.set_title("throughput, median of repetitions")
    late_axes.axhline(2.0, color="black", linestyle="--", linewidth=1, label="2 ms target")
    late_axes.set_yscale("symlog", linthresh=0.1)  # futures_per_cell is 100x the others
    late_axes.set_ylabel("1 ms timer lateness p99 (ms, log above 0.1)")
    late_axes.set_title("loop responsiveness while crypting")
    for axes in (rate_axes, late_axes):
        axes.set_xticks(range(len(workloads)), workloads)
    late_axes.legend(fontsize=8)
    figure.suptitle("relaycrypt pipeline: 2 workers on a 2-core machine")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="tiny run for tests: 20 circuits x 64 cells, no openssl")
    parser.add_argument("--json", action="store_true", help="print the JSON document only")
    parser.add_argument("--plot", metavar="FILE.png", help="draw the comparison")
    parser.add_argument("--circuits", type=int, default=200)
    parser.add_argument("--cells-per-circuit", type=int, default=1536)
    parser.add_argument("--chunk-cells", type=int, default=32,
                        help="cells per arrival (one read of one circuit's cells)")
    parser.add_argument("--window", type=int, default=65536,
                        help="cells in flight before the loop stops reading")
    parser.add_argument("--burst", type=int, default=16, help="arrivals per loop iteration")
    parser.add_argument("--repetitions", type=int, default=None,
                        help=f"runs per design (default {MIN_REPETITIONS}, or 3 with --quick; "
                        f"at least {MIN_REPETITIONS} without --quick)")
    parser.add_argument("--batch-cells", type=int, default=None,
                        help="pool batch cap (default: the pool's own)")
    parser.add_argument("--reply-max-batch", type=int, default=None,
                        help="replies handled per loop callback (default: all)")
    parser.add_argument("--worker-sched", choices=WORKER_SCHED_CHOICES, default="default",
                        help="pool workers' scheduling: the pool's default, or every worker in "
                        "SCHED_IDLE (Linux)")
    parser.add_argument("--switch-interval", type=float, default=sys.getswitchinterval(),
                        help="sys.setswitchinterval for the run (seconds)")
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--designs", default=",".join(DESIGNS))
    parser.add_argument("--no-openssl", action="store_true", help="skip the openssl ceiling")
    args = parser.parse_args(argv)
    if args.quick:
        args.circuits, args.cells_per_circuit, args.chunk_cells = 20, 64, 16
        args.window, args.no_openssl = 4096, True
        if args.repetitions is None:
            args.repetitions = 3
    elif args.repetitions is None:
        args.repetitions = MIN_REPETITIONS
    elif args.repetitions < MIN_REPETITIONS:
        parser.error(f"ratios are medians of at least {MIN_REPETITIONS} runs: "
                     f"--repetitions {args.repetitions} needs --quick")
    if args.repetitions < 1:
        parser.error("--repetitions must be >= 1")
    return args


def config_from(args: argparse.Namespace) -> Config:
    """The Config the parsed arguments describe."""
    workloads = tuple(w for w in args.workloads.split(",") if w)
    designs = tuple(d for d in args.designs.split(",") if d)
    for name in workloads:
        if name not in WORKLOADS:
            raise SystemExit(f"unknown workload {name!r}; choose from {', '.join(WORKLOADS)}")
    for name in designs:
        if name not in DESIGNS:
            raise SystemExit(f"unknown design {name!r}; choose from {', '.join(DESIGNS)}")
    return Config(
        circuits=args.circuits,
        cells_per_circuit=args.cells_per_circuit,
        chunk_cells=args.chunk_cells,
        window=args.window,
        burst=args.burst,
        repetitions=args.repetitions,
        batch_cells=args.batch_cells,
        reply_max_batch=args.reply_max_batch,
        worker_sched=args.worker_sched,
        switch_interval=args.switch_interval,
        workloads=workloads,
        designs=designs,
        openssl=not args.no_openssl,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run, print the table (or JSON), draw the plot. Exit status 1 if a run failed."""
    args = parse_args(argv)
    config = config_from(args)
    load_before = load_average()
    started = time.perf_counter()
    idle_p50, idle_p99 = idle_lateness(0.3)
    progress = None if args.json else sys.stderr
    document = measure(config, progress)
    elapsed = time.perf_counter() - started
    if args.plot:
        plot(document, args.plot)
    if args.json:
        print(json.dumps(document, indent=2))
        return 0
    header = [
        f"relaycrypt pipeline benchmark: Python {platform.python_version()}, "
        f"{os.cpu_count()} CPUs, switch interval {sys.getswitchinterval() * 1000:g} ms",
        f"{config.circuits} circuits x {config.cells_per_circuit} cells "
        f"({config.circuits * config.cells_per_circuit:,} cells per run), arrivals of "
        f"{config.chunk_cells} cells, {config.burst} arrivals per loop iteration, window "
        f"{config.window:,} cells, pool batch cap "
        f"{config.batch_cells if config.batch_cells is not None else 'default'}, "
        f"pool worker scheduling {config.worker_sched}, median of {config.repetitions}",
        "every result checked byte for byte against tor1.reference: passed",
        f"idle loop 1 ms timer lateness: p50 {idle_p50:.2f} ms, p99 {idle_p99:.2f} ms",
        f"load average before: {load_before}, after: {load_average()}; took {elapsed:.0f} s",
    ]
    print(render(document, header))
    return 0


if __name__ == "__main__":
    sys.exit(main())
