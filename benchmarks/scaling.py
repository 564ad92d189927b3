"""Pool throughput and memory per idle circuit at 100, 1,000, 10,000 and 100,000 open circuits.

What is measured
----------------
A relay holds many circuits and few of them are busy at any moment. For each circuit count N:

* **Throughput.** N circuits are open in a :class:`workers.pool.WorkerPool` (2 workers), each
  with its own kernel crypto state; a fixed busy set of ``--active`` (100) of them, spread
  evenly over the N, carries the pipeline benchmark's ``relay_forward`` traffic (same loop-side
  driver, arrivals, window and per-result byte check against ``tor1.reference``, see
  :mod:`benchmarks.driver`). cells/s is the median of ``--repetitions`` (5) runs of 8,192
  cells per busy circuit (about 0.1 s each: short runs are at the mercy of the machine; the
  CPU other processes used meanwhile is reported too). The pool's work per cell must not
  grow with N (docs/design.md, invariant 5: nothing iterates over all circuits); what can still
  grow is cache and TLB pressure and the cyclic GC walking more objects.
* **Memory per idle circuit**, two ways, both over exactly what a relay keeps per idle circuit:
  the pool's ``Circuit`` (with its per-direction pending lists), the ``FastRelayCrypto`` with its
  kernel ``RelayState``, the ``HopKeys`` it references and a list slot:

  - ``rss_bytes_per_circuit``: the growth of the process's resident set (``/proc/self/statm``)
    while opening the N circuits, divided by N. It counts what the OS really gave: malloc
    headers, pymalloc arenas, fragmentation. Page-granular, so meaningless for small N.
  - ``traced_bytes_per_circuit``: the growth of ``tracemalloc``'s traced memory while opening
    ``min(N, 20,000)`` more circuits, divided by their number: exactly the bytes Python's
    allocators handed out (objects, including the kernel state, which lives inside its Python
    object), without allocator overhead. tracemalloc is off for everything else, because it
    slows allocation and its own bookkeeping would inflate the RSS figure.

  The 2 KB target is judged on the larger of the two at 100,000 circuits.

Each N runs in a fresh child process (``--one N``), so that memory freed by a smaller run is
not silently reused by a larger one and every RSS delta starts from the same state.

Run::

    python -m benchmarks.scaling [--quick] [--json] [--counts 100,1000,10000,100000]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Sequence
from typing import Any

from benchmarks.designs import PoolDesign
from benchmarks.driver import ResultSink, load_average, run_design
from benchmarks.workload import Workload, build
from reactor import Reactor
from tor1 import CELL_PAYLOAD_LEN
from tor1.fast import FastRelayCrypto
from tor1.reference import HOP_MATERIAL_LEN, HopKeys
from workers.circuit import Circuit
from workers.pool import WorkerPool

DEFAULT_COUNTS = "100,1000,10000,100000"
TRACED_SAMPLE_MAX = 20_000
_PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    """Resident set size of this process, from /proc/self/statm."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * _PAGE


def idle_keys(count: int) -> list[HopKeys]:
    """Random hop keys for idle circuits (their content does not matter)."""
    material = os.urandom(HOP_MATERIAL_LEN * count)
    return [HopKeys.from_material(material[i * HOP_MATERIAL_LEN : (i + 1) * HOP_MATERIAL_LEN])
            for i in range(count)]


def _no_result(circuit: Circuit, direction: int, result: Any) -> None:
    raise AssertionError("an idle circuit produced a result")


def open_idle(pool: WorkerPool, keys: list[HopKeys]) -> list[Circuit]:
    """Open one idle circuit per key, as a relay would hold it. Loop thread."""
    return [
        pool.open_circuit(FastRelayCrypto(hop), on_result=_no_result, context=index)
        for index, hop in enumerate(keys)
    ]


def _unstarted_pool() -> WorkerPool:
    def process(state: Any, direction: int, batch: bytes) -> Any:
        raise AssertionError("memory-only pool")

    return WorkerPool(None, threads=2, process=process, joined=True,
                      cell_size=CELL_PAYLOAD_LEN)


def measure_memory(count: int) -> dict[str, float]:
    """RSS growth per circuit over ``count`` circuits, then tracemalloc growth on a sample."""
    keys = idle_keys(count)
    pool = _unstarted_pool()
    gc.collect()
    before = rss_bytes()
    started = time.perf_counter()
    circuits = open_idle(pool, keys)
    open_seconds = time.perf_counter() - started
    rss_per_circuit = (rss_bytes() - before) / count
    sample = min(count, TRACED_SAMPLE_MAX)
    sample_keys = idle_keys(sample)
    sample_pool = _unstarted_pool()
    gc.collect()
    tracemalloc.start()
    traced_before = tracemalloc.get_traced_memory()[0]
    sample_circuits = open_idle(sample_pool, sample_keys)
    traced_per_circuit = (tracemalloc.get_traced_memory()[0] - traced_before) / sample
    tracemalloc.stop()
    del sample_circuits, circuits
    return {
        "rss_bytes_per_circuit": rss_per_circuit,
        "traced_bytes_per_circuit": traced_per_circuit,
        "traced_sample": float(sample),
        "open_us_per_circuit": open_seconds * 1e6 / count,
    }


class ScaledPoolDesign(PoolDesign):
    """The pipeline's pool design with ``total`` circuits open; the workload's circuits are
    spread evenly among them and all others stay idle for the whole run."""

    name = "pool"

    def __init__(self, total: int, **options: Any) -> None:
        """``total`` >= the workload's circuit count."""
        super().__init__(**options)
        self.total = total
        self._all_circuits: list[Circuit] = []
        self._busy: list[Circuit] = []

    def open(self, reactor: Reactor, workload: Workload, sink: ResultSink) -> None:
        """Open the busy circuits, then the idle ones between them. Loop thread."""
        super().open(reactor, workload, sink)
        assert self._pool is not None
        busy = self._circuits
        step = self.total // workload.circuits
        idle_needed = self.total - workload.circuits
        idle = open_idle(self._pool, idle_keys(idle_needed))
        # One list of all circuits, busy ones at every `step`-th slot, so that the busy set's
        # objects are interleaved in memory with idle ones as in a long-running relay.
        everything: list[Circuit] = []
        idle_iter = iter(idle)
        for index in range(self.total):
            if index % step == 0 and index // step < len(busy):
                everything.append(busy[index // step])
            else:
                everything.append(next(idle_iter))
        self._all_circuits = everything
        self._busy = busy

    def close(self) -> None:
        """Close the pool and drop every circuit. Loop thread."""
        super().close()
        self._all_circuits = []
        self._busy = []


def measure_one(count: int, args: argparse.Namespace) -> dict[str, Any]:
    """Memory and throughput at ``count`` open circuits (run in a fresh process)."""
    memory = measure_memory(count)
    active = min(args.active, count)
    workload = build("relay_forward", active, args.cells_per_circuit, args.chunk_cells)
    rates = []
    others = []
    for _ in range(args.repetitions):
        figures = run_design(
            workload,
            ScaledPoolDesign(count, batch_cells=args.batch_cells),
            window=args.window,
            burst=args.burst,
        )
        rates.append(figures.cells_per_s)
        others.append(figures.extra["others_cpus_busy"])
    result: dict[str, Any] = {"circuits": count, "active": active}
    result["cells_per_s"] = statistics.median(rates)
    result["runs_cells_per_s"] = rates
    result["others_cpus_busy"] = statistics.median(others)
    result.update(memory)
    return result


def run_child(count: int, args: argparse.Namespace) -> dict[str, Any]:
    """Run ``--one count`` in a fresh interpreter and return its JSON."""
    command = [
        sys.executable, "-m", "benchmarks.scaling", "--one", str(count), "--json",
        "--active", str(args.active), "--cells-per-circuit", str(args.cells_per_circuit),
        "--chunk-cells", str(args.chunk_cells), "--window", str(args.window),
        "--burst", str(args.burst), "--repetitions", str(args.repetitions),
    ]
    if args.batch_cells is not None:
        command += ["--batch-cells", str(args.batch_cells)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"scaling child for {count} circuits failed:\n{done.stderr}")
    return json.loads(done.stdout)


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The document: rows plus the ratio of the largest count's rate to the smallest's."""
    first, last = rows[0], rows[-1]
    worst_memory = max(last["rss_bytes_per_circuit"], last["traced_bytes_per_circuit"])
    return {
        "counts": rows,
        "rate_ratio_largest_vs_smallest": last["cells_per_s"] / first["cells_per_s"],
        "bytes_per_idle_circuit_at_largest": worst_memory,
    }


def render(document: dict[str, Any], header: list[str]) -> str:
    """The table and the targets."""
    lines = list(header)
    lines.append("")
    lines.append(
        f"  {'circuits':>9} {'active':>6} {'cells/s':>12} {'x first':>8} {'RSS B/circ':>11}"
        f" {'traced B/circ':>14} {'open us/circ':>13} {'others':>6}   runs (cells/s)"
    )
    first_rate = document["counts"][0]["cells_per_s"]
    for row in document["counts"]:
        runs = ", ".join(f"{rate:,.0f}" for rate in row["runs_cells_per_s"])
        lines.append(
            f"  {row['circuits']:>9,.0f} {row['active']:>6.0f} {row['cells_per_s']:>12,.0f}"
            f" {row['cells_per_s'] / first_rate:>8.2f} {row['rss_bytes_per_circuit']:>11,.0f}"
            f" {row['traced_bytes_per_circuit']:>14,.0f} {row['open_us_per_circuit']:>13.1f}"
            f" {row['others_cpus_busy']:>6.2f}   {runs}"
        )
    ratio = document["rate_ratio_largest_vs_smallest"]
    memory = document["bytes_per_idle_circuit_at_largest"]
    largest = document["counts"][-1]["circuits"]
    smallest = document["counts"][0]["circuits"]
    lines.append("")
    lines.append("others: CPU other processes used during the runs (median, in cores)")
    lines.append("")
    lines.append("targets")
    lines.append(
        f"  [{'HOLDS' if ratio >= 0.8 else 'FAILS'}] cells/s at {largest:,.0f} circuits >= 0.8x "
        f"at {smallest:,.0f}: {ratio:.2f}x"
    )
    lines.append(
        f"  [{'HOLDS' if memory <= 2048 else 'FAILS'}] <= 2 KB per idle circuit (larger of RSS "
        f"and traced at {largest:,.0f}): {memory:,.0f} B"
    )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny run for tests")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--counts", default=DEFAULT_COUNTS, help="circuit counts to measure")
    parser.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--active", type=int, default=100, help="busy circuits")
    parser.add_argument("--cells-per-circuit", type=int, default=8192,
                        help="cells per busy circuit per run")
    parser.add_argument("--chunk-cells", type=int, default=32)
    parser.add_argument("--window", type=int, default=65536)
    parser.add_argument("--burst", type=int, default=16)
    parser.add_argument("--repetitions", type=int, default=5)
    parser.add_argument("--batch-cells", type=int, default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.counts, args.active, args.cells_per_circuit = "10,1000", 10, 64
        args.chunk_cells, args.window = 16, 4096
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run every count in its own process and print the table (or JSON)."""
    args = parse_args(argv)
    if args.one is not None:
        print(json.dumps(measure_one(args.one, args)))
        return 0
    load_before = load_average()
    started = time.perf_counter()
    rows = []
    for count in (int(c) for c in args.counts.split(",") if c):
        rows.append(run_child(count, args))
        if not args.json:
            print(f"  {count:,} circuits: {rows[-1]['cells_per_s']:,.0f} cells/s",
                  file=sys.stderr, flush=True)
    document = summarize(rows)
    if args.json:
        print(json.dumps(document, indent=2))
        return 0
    header = [
        "relaycrypt scaling: pool (2 workers) relay_forward cells/s and memory per idle circuit",
        f"{args.active} busy circuits x {args.cells_per_circuit} cells per run among N open; "
        f"arrivals of {args.chunk_cells} cells, window {args.window:,}, median of "
        f"{args.repetitions}; every result checked against the reference; each N in a fresh "
        "process",
        f"load average before: {load_before}, after: {load_average()}; "
        f"took {time.perf_counter() - started:.0f} s",
    ]
    print(render(document, header))
    return 0


if __name__ == "__main__":
    sys.exit(main())
