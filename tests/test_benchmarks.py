"""The benchmarks run, print the JSON the issue asks for, and catch a wrong byte.

What is checked (never speed: these run on a shared machine):

* ``python -m benchmarks.pipeline --quick --json`` exits 0 and prints
  ``{"workloads": {<both workloads>: {<all six designs>: {...}}}, "headline": {...}}`` with
  ``cells_per_s`` and ``lateness_p99_ms`` for every design, ``wakeups_per_cell`` and
  ``batch_mean`` for the pools and ``executor_batch``, the ratios (median of the runs, with
  their spread), and the headline pool_asyncio / executor_batch per workload, every result
  having passed the byte check; without ``--quick`` fewer than 5 repetitions are refused;
* ``python -m benchmarks.scaling --quick --json`` and ``python -m benchmarks.tuning --quick
  --json`` exit 0 with their keys;
* the byte check itself: a design that flips one bit of one cell, or drops a cell, fails the
  run with :class:`benchmarks.workload.OutputMismatch` / ``RunFailed``; the unmodified design
  passes on the same workload;
* the workload's expected bytes are the reference's (recomputed here independently for one
  circuit).

The CLI runs happen in child processes (``sys.executable -m ...``) with the repository as the
working directory, exactly as a user would run them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from benchmarks.designs import DESIGNS, InlineDesign, PoolDesign
from benchmarks.designs_asyncio import ExecutorBatchDesign, PoolAsyncioDesign
from benchmarks.driver import Arrival, ResultSink, RunFailed, run_design
from benchmarks.workload import OutputMismatch, Workload, build
from reactor import Reactor
from tor1 import CELL_PAYLOAD_LEN
from tor1.reference import OriginCrypto, RelayCrypto

REPO = Path(__file__).resolve().parent.parent
WORKLOAD_NAMES = ("relay_forward", "origin")
CHILD_TIMEOUT_S = 300


def run_module(module: str, *args: str) -> Any:
    """Run ``python -m module args`` from the repository root; return its parsed JSON."""
    done = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT_S,
        check=False,
    )
    assert done.returncode == 0, f"{module} failed:\n{done.stderr}"
    return json.loads(done.stdout)


def test_pipeline_quick_json_has_the_issue_keys() -> None:
    document = run_module("benchmarks.pipeline", "--quick", "--json")
    assert set(document) == {"workloads", "headline"}
    assert set(document["workloads"]) == set(WORKLOAD_NAMES)
    assert set(document["headline"]) == set(WORKLOAD_NAMES)
    for name, designs in document["workloads"].items():
        assert set(designs) == set(DESIGNS)
        for figures in designs.values():
            assert figures["cells_per_s"] > 0
            assert figures["lateness_p99_ms"] >= 0
            assert figures["lateness_p50_ms"] <= figures["lateness_p99_ms"]
            assert figures["output_check"] == "passed"
            assert figures["repetitions"] == 3
            assert len(figures["runs_cells_per_s"]) == 3
        for design in ("pool", "pool_asyncio", "executor_batch"):
            assert designs[design]["wakeups_per_cell"] > 0
            assert designs[design]["batch_mean"] > 0
        pool = designs["pool"]
        for key in ("vs_executor_batch", "vs_inline", "vs_cpuworker_socketpair",
                    "vs_futures_per_cell"):
            low, high = pool[f"{key}_spread"]
            assert 0 < low <= pool[key] <= high
        pool_asyncio = designs["pool_asyncio"]
        low, high = pool_asyncio["vs_executor_batch_spread"]
        assert 0 < low <= pool_asyncio["vs_executor_batch"] <= high
        head = document["headline"][name]
        assert (head["design"], head["baseline"]) == ("pool_asyncio", "executor_batch")
        assert head["ratio"] == pool_asyncio["vs_executor_batch"]
        assert head["ratio_min"] <= head["ratio"] <= head["ratio_max"]
        assert head["runs"] == 3
        # The ratio is of the two designs' runs side by side, not of unrelated medians.
        ratios = sorted(a / b for a, b in zip(pool_asyncio["runs_cells_per_s"],
                                              designs["executor_batch"]["runs_cells_per_s"],
                                              strict=True))
        assert head["ratio"] == ratios[1]


def test_pipeline_refuses_fewer_than_five_runs_without_quick() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.pipeline", "--repetitions", "3", "--json"],
        cwd=REPO, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S, check=False,
    )
    assert done.returncode == 2
    assert "at least 5 runs" in done.stderr


def test_pipeline_plot(tmp_path: Path) -> None:
    path = tmp_path / "pipeline.png"
    run_module(
        "benchmarks.pipeline", "--quick", "--json", "--repetitions", "1", "--plot", str(path)
    )
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_scaling_quick_json() -> None:
    document = run_module("benchmarks.scaling", "--quick", "--json")
    rows = document["counts"]
    assert [row["circuits"] for row in rows] == [10, 1000]
    for row in rows:
        assert row["cells_per_s"] > 0
        assert row["traced_bytes_per_circuit"] > 0
        assert "rss_bytes_per_circuit" in row
    assert document["rate_ratio_largest_vs_smallest"] > 0
    assert document["bytes_per_idle_circuit_at_largest"] > 0


def test_tuning_quick_json() -> None:
    document = run_module("benchmarks.tuning", "--quick", "--json", "--repetitions", "1")
    assert set(document) == set(WORKLOAD_NAMES)
    for body in document.values():
        for rows in body["switch_interval_ms"].values():
            assert set(rows) == {"inline", "cap_32", "cap_256"}
            assert all(row["cells_per_s"] > 0 for row in rows.values())


# --------------------------------------------------------------------------- the byte check


@pytest.fixture(scope="module", params=WORKLOAD_NAMES)
def small_workload(request: pytest.FixtureRequest) -> Workload:
    return build(request.param, circuits=6, cells_per_circuit=32, chunk_cells=8)


class _Tamper:
    """Wraps a sink: changes one result of one circuit before the driver sees it."""

    def __init__(self, sink: ResultSink, mode: str) -> None:
        self.sink = sink
        self.mode = mode
        self.done = False

    def result(self, circuit: int, out: bytes, flags: bytes, cells: int) -> None:
        if not self.done and circuit == 3:
            self.done = True
            if self.mode == "flip":
                damaged = bytearray(out)
                damaged[CELL_PAYLOAD_LEN + 100] ^= 0x01  # one bit of the second cell
                out = bytes(damaged)
            elif self.mode == "drop":
                # Drop the first cell but count it: the stream now continues one cell early.
                out, flags = out[CELL_PAYLOAD_LEN:], flags[1:]
            elif self.mode == "flag":
                flags = b"\x01" + flags[1:]
        self.sink.result(circuit, out, flags, cells)


class _Tampered:
    """Mixin for a design: its results pass through a :class:`_Tamper` on their way to the
    driver."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode

    def open(self, reactor: Any, workload: Workload, sink: ResultSink) -> None:
        super().open(reactor, workload, _Tamper(sink, self.mode))  # type: ignore[misc]


class _TamperedInline(_Tampered, InlineDesign):
    pass


class _TamperedPool(_Tampered, PoolDesign):
    pass


class _TamperedPoolAsyncio(_Tampered, PoolAsyncioDesign):
    pass


class _TamperedExecutorBatch(_Tampered, ExecutorBatchDesign):
    pass


@pytest.mark.parametrize("design_class", [_TamperedInline, _TamperedPool, _TamperedPoolAsyncio,
                                          _TamperedExecutorBatch])
def test_a_flipped_bit_fails_the_run(small_workload: Workload, design_class: type) -> None:
    with pytest.raises(OutputMismatch, match="circuit 3: cell 1 differs"):
        run_design(small_workload, design_class("flip"), window=64, burst=2, stall_seconds=5)


def test_a_dropped_cell_fails_the_run(small_workload: Workload) -> None:
    with pytest.raises(OutputMismatch, match="circuit 3"):
        run_design(small_workload, _TamperedInline("drop"), window=64, burst=2, stall_seconds=5)


def test_a_wrong_recognized_flag_fails_the_run() -> None:
    workload = build("relay_forward", circuits=6, cells_per_circuit=32, chunk_cells=8)
    with pytest.raises(OutputMismatch, match="recognized flags differ"):
        run_design(workload, _TamperedInline("flag"), window=64, burst=2, stall_seconds=5)


@pytest.mark.parametrize("design", DESIGNS)
def test_every_design_passes_the_check(small_workload: Workload, design: str) -> None:
    from benchmarks.designs import make_design

    figures = run_design(small_workload, make_design(design), window=64, burst=2)
    assert figures.cells == small_workload.total_cells


class _LosesACell(InlineDesign):
    """Never returns the last arrival: the watchdog must fail the run, not hang it."""

    def submit(self, arrivals: Sequence[Arrival]) -> None:
        assert self._states
        super().submit([a for a in arrivals if not (a[0] == 5 and a is self._last)])

    def open(self, reactor: Reactor, workload: Workload, sink: ResultSink) -> None:
        super().open(reactor, workload, sink)
        self._last = workload.arrivals[-1]


def test_a_lost_cell_fails_the_run_instead_of_hanging() -> None:
    workload = build("origin", circuits=6, cells_per_circuit=16, chunk_cells=8)
    with pytest.raises(RunFailed, match="no result for"):
        run_design(workload, _LosesACell(), window=64, burst=2, stall_seconds=1)


def test_expected_bytes_are_the_reference(small_workload: Workload) -> None:
    """Recompute circuit 0 with the reference, cell by cell (no batch forms)."""
    keys = small_workload.keys[0]
    data = b"".join(cells for c, cells, _ in small_workload.arrivals if c == 0)
    cells = [data[i : i + CELL_PAYLOAD_LEN] for i in range(0, len(data), CELL_PAYLOAD_LEN)]
    if small_workload.name == "origin":
        client = OriginCrypto(list(keys))
        want = b"".join(client.encrypt(cell, 2) for cell in cells)
        assert small_workload.expected_flags[0] == b""
    else:
        middle = RelayCrypto(keys[1])
        results = [middle.forward(cell) for cell in cells]
        want = b"".join(out for _, out in results)
        assert not any(recognized for recognized, _ in results)
        assert small_workload.expected_flags[0] == bytes(len(cells))
        # The exit recognizes every one of them: the middle's input is real onion traffic.
        exit_relay = RelayCrypto(keys[2])
        assert all(exit_relay.forward(out)[0] for _, out in results)
    assert small_workload.expected_out[0] == want
