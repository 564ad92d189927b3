"""The pool's knobs side by side: batch cap and GIL switch interval against throughput and lateness.

What is measured
----------------
For each ``sys.setswitchinterval`` value (default 5 ms, CPython's default, and 0.5 ms) and
each pool batch cap (``WorkerPool(batch_cells=...)``: the most cells a worker takes from one
circuit per turn, i.e. per kernel call), the ``pool`` design of :mod:`benchmarks.pipeline` runs
both workloads; ``inline`` runs once per switch interval as the yardstick. Reported per cell:
cells/s (median of ``--repetitions``), the ratio to inline at the same switch interval, the 1 ms
timer's lateness p50/p99, the mean batch, and how busy the loop thread and the process were
(see :mod:`benchmarks.driver`).

Why these two knobs: a worker that releases the GIL for a kernel call must take it back when
the call returns. If another thread holds it and does not give it up by itself, the worker waits
up to one switch interval (the convoy effect, docs/tuning.md). A larger batch means fewer
returns per cell; a shorter interval means shorter waits but more forced switches for
everyone (including the loop thread). Same workload model, arrivals, window and byte check as
the pipeline benchmark; every configuration runs in this one invocation, repetitions rotating
through the configurations.

Run::

    python -m benchmarks.tuning [--quick] [--json] [--caps 64,256,1024] [--intervals 5,0.5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

from benchmarks.designs import WORKER_SCHED_CHOICES, make_design
from benchmarks.driver import as_dict, load_average, run_design
from benchmarks.workload import WORKLOADS, build

DEFAULT_CAPS = "32,128,256,1024,4096"
DEFAULT_INTERVALS_MS = "5,0.5"
_REPORTED = ("cells_per_s", "lateness_p50_ms", "lateness_p99_ms", "batch_mean", "loop_busy",
             "cpus_busy", "others_cpus_busy", "wakeups_per_cell")


def measure(args: argparse.Namespace, log: Any = None) -> dict[str, Any]:
    """{workload: {"switch_interval_ms": {interval: {"inline": {...}, "cap_N": {...}}}}}."""
    caps = [int(cap) for cap in args.caps.split(",") if cap]
    intervals = [float(ms) for ms in args.intervals.split(",") if ms]
    previous = sys.getswitchinterval()
    document: dict[str, Any] = {}
    try:
        for name in args.workloads.split(","):
            workload = build(name, args.circuits, args.cells_per_circuit, args.chunk_cells)
            configs = [(ms, None) for ms in intervals] + [
                (ms, cap) for ms in intervals for cap in caps
            ]
            runs: dict[tuple[float, int | None], list[dict[str, Any]]] = {c: [] for c in configs}
            for _ in range(args.repetitions):
                for interval_ms, cap in configs:
                    sys.setswitchinterval(interval_ms / 1000)
                    design = make_design(
                        "inline" if cap is None else "pool",
                        batch_cells=cap,
                        worker_sched=args.worker_sched,
                    )
                    figures = as_dict(
                        run_design(workload, design, window=args.window, burst=args.burst)
                    )
                    runs[(interval_ms, cap)].append(figures)
                    if log is not None:
                        label = "inline" if cap is None else f"cap {cap}"
                        print(f"  {name} {interval_ms:g} ms {label}: "
                              f"{figures['cells_per_s']:,.0f} cells/s", file=log, flush=True)
            table: dict[str, Any] = {}
            for (interval_ms, cap), config_runs in runs.items():
                row = {
                    key: statistics.median(run[key] for run in config_runs)
                    for key in _REPORTED
                    if key in config_runs[0]
                }
                table.setdefault(f"{interval_ms:g}", {})[
                    "inline" if cap is None else f"cap_{cap}"
                ] = row
            for rows in table.values():
                inline_rate = rows["inline"]["cells_per_s"]
                for row in rows.values():
                    row["vs_inline"] = row["cells_per_s"] / inline_rate
            document[name] = {"switch_interval_ms": table}
    finally:
        sys.setswitchinterval(previous)
    return document


def render(document: dict[str, Any], header: list[str]) -> str:
    """One table per workload."""
    lines = list(header)
    for name, body in document.items():
        lines.append("")
        lines.append(name)
        lines.append(
            f"  {'switch':>7} {'config':<10} {'cells/s':>12} {'x inline':>9} {'late p50':>9}"
            f" {'late p99':>9} {'batch':>7} {'loop':>5} {'cpus':>5} {'others':>6}"
        )
        for interval, rows in body["switch_interval_ms"].items():
            for config, row in rows.items():
                batch = row.get("batch_mean")
                lines.append(
                    f"  {interval + ' ms':>7} {config:<10} {row['cells_per_s']:>12,.0f}"
                    f" {row['vs_inline']:>9.2f} {row['lateness_p50_ms']:>7.2f}ms"
                    f" {row['lateness_p99_ms']:>7.2f}ms"
                    f" {'-' if batch is None else f'{batch:.0f}':>7}"
                    f" {row['loop_busy']:>5.2f} {row['cpus_busy']:>5.2f}"
                    f" {row['others_cpus_busy']:>6.2f}"
                )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny run for tests")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--caps", default=DEFAULT_CAPS, help="pool batch caps, cells")
    parser.add_argument("--intervals", default=DEFAULT_INTERVALS_MS,
                        help="switch intervals, milliseconds")
    parser.add_argument("--worker-sched", choices=WORKER_SCHED_CHOICES, default="default",
                        help="pool workers' scheduling: the pool's default, or every worker in "
                        "SCHED_IDLE (Linux)")
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--circuits", type=int, default=200)
    parser.add_argument("--cells-per-circuit", type=int, default=1536)
    parser.add_argument("--chunk-cells", type=int, default=32)
    parser.add_argument("--window", type=int, default=65536)
    parser.add_argument("--burst", type=int, default=16)
    parser.add_argument("--repetitions", type=int, default=3)
    args = parser.parse_args(argv)
    if args.quick:
        args.circuits, args.cells_per_circuit, args.chunk_cells = 20, 64, 16
        args.window, args.caps = 4096, "32,256"
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run and print the table (or JSON)."""
    args = parse_args(argv)
    load_before = load_average()
    started = time.perf_counter()
    document = measure(args, None if args.json else sys.stderr)
    if args.json:
        print(json.dumps(document, indent=2))
        return 0
    header = [
        "relaycrypt pool tuning: batch cap x GIL switch interval (pool: 2 workers)",
        f"{args.circuits} circuits x {args.cells_per_circuit} cells, arrivals of "
        f"{args.chunk_cells} cells, window {args.window:,}, burst {args.burst}, "
        f"median of {args.repetitions}; pool worker scheduling {args.worker_sched}; every "
        "result checked against the reference",
        f"load average before: {load_before}, after: {load_average()}; "
        f"took {time.perf_counter() - started:.0f} s",
    ]
    print(render(document, header))
    return 0


if __name__ == "__main__":
    sys.exit(main())
