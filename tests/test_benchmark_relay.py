"""The relay benchmark (``python -m benchmarks.relay``) and its parts: shapes, counts, splits.

What is checked (never speed: the machine is shared):

* ``python -m benchmarks.relay --quick --json`` exits 0 and prints ``{"tls": M, "plain": M,
  "c_tor": ..., "c_tor_same_load": ...}``: every figure of ``M`` (and of its paced run) a
  positive finite number, the loop thread's and the workers' CPU each at most the relay's
  total, p50 <= p99, MB/s = cells/s x 514 bytes, the spreads bracketing the medians, the
  per-run records (one CPU share per worker, the relay's pool size of workers, no circuit
  lost); ``c_tor`` / ``c_tor_same_load`` either null with the reason, or C tor's and our CPU
  per relayed cell at the middle of a tornet circuit with every byte intact, and C tor's under
  the same load generator, saturated and paced, with the ratios to ours;
* the load generator's cells are the relay's: after the load stops and drains, the relay's
  ``cells_crypted`` counter equals the cells that reached the two far ends plus what built
  each circuit (EXTEND2 in, EXTENDED2 out, and the CREATE2 onionskin, which the counter also
  counts), over TLS and plain links, saturating or paced;
* the CPU split files each task under loop (TID == PID), workers or other;
* the latency tracer: a traced network records every stage of a cell's way through each relay,
  and the analysis cuts each probe into segments whose sum is the probe's round trip.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from benchmarks.cpu_profile import GROUPS, unavailable
from benchmarks.relay_latency import analyse, run_traced
from benchmarks.relay_load import RelayLoad
from benchmarks.relay_proc import CLOCK_TICKS, CpuSplit, RelayProcess, ThreadTimes
from benchmarks.relay_tor import tor_missing
from reactor import Reactor, ReplyQueue

REPO = Path(__file__).resolve().parent.parent
FIGURES = ("loop_cpu_us_per_cell", "workers_cpu_us_per_cell", "cpu_us_per_cell",
           "cells_per_s", "mb_per_s", "rtt_idle_p50_ms", "rtt_idle_p99_ms",
           "rtt_load_p50_ms", "rtt_load_p99_ms")

pytestmark = pytest.mark.timeout(900)


def _positive(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


NO_PERF = unavailable()


@pytest.fixture(scope="module")
def quick_report() -> dict[str, Any]:
    perf = [] if NO_PERF else ["--perf"]  # where the CPU goes, too, when perf runs here
    done = subprocess.run([sys.executable, "-m", "benchmarks.relay", "--quick", "--json", *perf],
                          cwd=REPO, capture_output=True, text=True, timeout=850, check=False)
    assert done.returncode == 0, f"benchmarks.relay failed:\n{done.stderr[-3000:]}"
    return json.loads(done.stdout)


def test_quick_json_has_both_modes_and_c_tor(quick_report: dict[str, Any]) -> None:
    assert {"tls", "plain", "c_tor"} <= set(quick_report)
    for mode in ("tls", "plain"):
        figures = quick_report[mode]
        for key in FIGURES:
            assert _positive(figures[key]), (mode, key, figures[key])
            low, high = figures["spread"][key]
            assert low <= figures[key] <= high
        assert figures["loop_cpu_us_per_cell"] <= figures["cpu_us_per_cell"]
        assert figures["workers_cpu_us_per_cell"] <= figures["cpu_us_per_cell"]
        assert figures["rtt_idle_p50_ms"] <= figures["rtt_idle_p99_ms"]
        assert figures["rtt_load_p50_ms"] <= figures["rtt_load_p99_ms"]
        assert figures["mb_per_s"] == pytest.approx(figures["cells_per_s"] * 514 / 1e6)
        [cpu_run] = figures["runs"]["cpu"]
        assert cpu_run["steady"] and cpu_run["circuits_closed_by_relay"] == 0
        assert cpu_run["cells"] > 0 and cpu_run["load_cells"] > 0
        assert len(cpu_run["per_worker_cpu_s"]) == cpu_run["threads"] == 2
        assert cpu_run["loop_cpu_s"] + cpu_run["workers_cpu_s"] <= cpu_run["cpu_s"] + 1e-9
        paced = figures["paced"]
        assert paced["offered_cells_per_s"] == quick_report["settings"]["paced_rate"] > 0
        for key in ("loop_cpu_us_per_cell", "cpu_us_per_cell", "cells_per_s"):
            assert _positive(paced[key]), (mode, "paced", key)
        assert paced["loop_cpu_us_per_cell"] <= paced["cpu_us_per_cell"]
        [paced_run] = paced["runs"]
        assert paced_run["steady"] and paced_run["circuits_closed_by_relay"] == 0
        [rtt_run] = figures["runs"]["rtt"]
        assert rtt_run["idle"]["samples"] == quick_report["settings"]["rtt_samples"]
        assert rtt_run["load"]["samples"] > 0 and rtt_run["load"]["middle_cells_per_s"] > 0


@pytest.mark.skipif(NO_PERF is not None, reason=f"perf: {NO_PERF}")
def test_quick_json_splits_every_cpu_figure_by_library(quick_report: dict[str, Any]) -> None:
    """With --perf: each CPU figure (ours saturated and paced, C tor's under the same load and
    in tornet) comes with its split by library, which adds up to it, and its floor."""
    figures = [quick_report["tls"], quick_report["tls"]["paced"], quick_report["plain"]]
    if quick_report["c_tor"] is not None:
        figures += list(quick_report["c_tor_same_load"].values())
        figures += [quick_report["c_tor"], quick_report["c_tor"]["ours_same_position"]]
    for figure in figures:
        groups = figure["cpu_by_group_us_per_cell"]
        assert set(groups) == set(GROUPS)
        assert figure["floor_us_per_cell"] == pytest.approx(groups["kernel"] + groups["openssl"])
        assert 0 < figure["floor_us_per_cell"] < figure["cpu_us_per_cell"] * 1.05
    for run in quick_report["tls"]["runs"]["cpu"]:  # one run's split is its own CPU per cell
        assert math.fsum(run["cpu_by_group_us_per_cell"].values()) == pytest.approx(
            run["cpu_us_per_cell"], rel=0.01)
    assert quick_report["tls"]["cpu_by_group_us_per_cell"]["python"] > 0
    # ours and C tor's under the same load also split their loop (main) thread's CPU
    loops = [quick_report["tls"], quick_report["tls"]["paced"]]
    if quick_report["c_tor"] is not None:
        loops += list(quick_report["c_tor_same_load"].values())
    for figure in loops:
        loop = figure["loop_cpu_by_group_us_per_cell"]
        assert set(loop) == set(GROUPS) and loop["kernel"] == figure["loop_kernel_us_per_cell"]
    for run in quick_report["tls"]["runs"]["cpu"]:
        assert math.fsum(run["loop_cpu_by_group_us_per_cell"].values()) == pytest.approx(
            run["loop_cpu_us_per_cell"], rel=0.01)
    if quick_report["c_tor"] is not None:
        tor = quick_report["c_tor_same_load"]["saturated"]["cpu_by_group_us_per_cell"]
        assert tor["tor"] > 0 and tor["python"] == 0


def test_quick_json_c_tor_is_measured_or_explained(quick_report: dict[str, Any]) -> None:
    tor = quick_report["c_tor"]
    if tor_missing() is not None:
        assert tor is None and quick_report["c_tor_skipped"] == tor_missing()
        assert quick_report["c_tor_same_load"] is None
        return
    same = quick_report["c_tor_same_load"]
    assert set(same) == {"saturated", "paced"}
    for kind, figures in same.items():
        [run] = figures["runs"]
        assert run["relay"] == "tor" and run["steady"]
        assert _positive(figures["cpu_us_per_cell"]) and _positive(figures["cells_per_s"])
        # tor relays cells on its main thread: the "loop" share is nearly all of it
        assert figures["loop_cpu_us_per_cell"] <= figures["cpu_us_per_cell"]
        ours = (quick_report["tls"] if kind == "saturated" else quick_report["tls"]["paced"])
        assert figures["ratio_ours_to_tor"] == pytest.approx(ours["cpu_us_per_cell"]
                                                             / figures["cpu_us_per_cell"])
    assert tor is not None, quick_report.get("c_tor_error")
    assert tor["position"] == "middle" and tor["intact"]
    assert _positive(tor["cpu_us_per_cell"])
    ours = tor["ours_same_position"]
    assert _positive(ours["cpu_us_per_cell"]) and _positive(ours["loop_cpu_us_per_cell"])
    assert ours["ratio_to_tor"] == pytest.approx(ours["cpu_us_per_cell"]
                                                 / tor["cpu_us_per_cell"])


@pytest.mark.parametrize(("tls", "rate"), [(True, 0.0), (False, 0.0), (False, 20_000.0)],
                         ids=["tls", "plain", "plain-paced"])
def test_load_cells_are_the_relays_relayed_cells(tmp_path: Path, tls: bool,
                                                 rate: float) -> None:
    relay = RelayProcess(tmp_path / "relay", tls=tls, threads=2)
    relay.start()
    circuits, target = 8, 20_000
    outcome: dict[str, Any] = {}
    try:
        with Reactor() as reactor:
            assert relay.descriptor is not None

            def watch() -> None:
                if load.failures:
                    reactor.stop()
                elif load.running and load.delivered >= target:
                    load.stop_sending()
                elif not load.running and load.all_open and load.in_flight == 0:
                    outcome["delivered"] = load.delivered
                    outcome["stats"] = relay.stats()
                    reactor.stop()
                    return
                reactor.call_later(0.02, watch)

            load = RelayLoad(reactor, relay.descriptor, relay.address, tls=tls,
                             workdir=tmp_path / "load", circuits=circuits, links=2,
                             window=200, chunk=32, rate=rate, on_open=lambda _: watch())
            load.start()
            reactor.call_later(120.0, reactor.stop)
            reactor.run()
            failures = list(load.failures)
            load.close()
    finally:
        relay.stop()
    assert not failures
    assert outcome["delivered"] >= target
    stats = outcome["stats"]
    # Beyond the relayed cells, per circuit: one EXTEND2 (forward) and one EXTENDED2
    # (originated); the pool also counted the CREATE2 onionskins it answered (one per
    # circuit), and not the cells crypted on the loop thread.
    assert stats["onion"]["answered"] == circuits
    assert stats["cells_crypted"] == outcome["delivered"] + 2 * circuits
    # (TLS records are crypted on the loop thread by default: the pool counts none)
    assert stats["pool_cells"] == stats["cells_crypted"] - stats["cells_crypted_inline"] + circuits
    assert stats["circuits_created"] == circuits
    assert stats["circuits_closed_queue"] == 0


def test_cpu_split_files_each_task() -> None:
    before = {100: ThreadTimes(0, 0), 101: ThreadTimes(0, 0), 102: ThreadTimes(0, 0),
              103: ThreadTimes(0, 0)}
    after = {100: ThreadTimes(3_000_000_000, 300), 101: ThreadTimes(1_000_000_000, 100),
             102: ThreadTimes(500_000_000, 50), 103: ThreadTimes(250_000_000, 25),
             104: ThreadTimes(9_000_000_000, 900)}  # born after the first sample: not counted
    split = CpuSplit.between(100, frozenset({101, 102}), before, after)
    assert (split.loop_s, split.workers_s, split.other_s) == (3.0, 1.5, 0.25)
    assert split.per_worker_s == (1.0, 0.5)
    assert split.total_s == 4.75
    assert split.ticks_s == pytest.approx(475 / CLOCK_TICKS)


def test_analyse_cuts_probes_into_segments_that_sum_to_the_round_trip() -> None:
    # one probe: client 0 -> relay read at 10 us -> ... -> back at 100 us
    traces = [
        {"name": "client", "events": [[2_000, "write", "L", 0, 1]]},
        {"name": "relay0", "events": [[10_000, "read", "L", 0, 7], [25_000, "cell", "L", 9_000, 7],
                                      [40_000, "submitted", "L", 20_000, 7],
                                      [70_000, "worker", "W", 0, 8],
                                      [90_000, "write", "L", 30_000, 7]]},
    ]
    report = analyse([(0.0, 100e-6)], traces, skip=0)
    assert report["probes"] == 1 and report["rtt_median_us"] == pytest.approx(100.0)
    assert sum(row["median_us"] for row in report["stages"].values()) == pytest.approx(100.0)
    segments = report["segments"]
    assert segments["client:write(L) -> relay0:read(L)"]["median_us"] == pytest.approx(8.0)
    assert segments["relay0:read(L) -> relay0:cell(L)"]["cpu_median_us"] == pytest.approx(9.0)
    assert "cpu_median_us" not in segments["relay0:submitted(L) -> relay0:worker(W)"]
    assert report["stages"]["worker wake-up"]["median_us"] == pytest.approx(30.0)
    assert report["stages"]["TCP between processes + reader's wake-up"]["median_us"] == (
        pytest.approx(8.0))


POOL_STAGES = {"submitted", "worker", "crypt", "crypted", "put", "woke"}


@pytest.mark.parametrize("tls,inline", [(True, 0), (False, 0), (True, 8)],
                         ids=["tls-pool", "plain-pool", "tls-inline"])
def test_traced_network_records_every_stage_in_each_relay(tmp_path: Path, tls: bool,
                                                          inline: int) -> None:
    marks, traces = run_traced(tmp_path, tls=tls, samples=8, gap=0.002,
                               relay_args=["--inline-cells", str(inline)])
    assert len(marks) == 8 and all(back > sent for sent, back in marks)
    # the probes of this process are gone again (a traced put would slow every later test)
    assert ReplyQueue.put.__qualname__ == "ReplyQueue.put"
    names = {trace["name"] for trace in traces}
    assert names == {"client", "echo", "relay0", "relay1", "relay2"}
    stages = {"read", "cell", "after_io", "flush", "result", "write"}
    by_name = {trace["name"]: trace["events"] for trace in traces}
    for sent, back in marks:
        t0, t1 = int(sent * 1e9), int(back * 1e9)
        for relay in ("relay0", "relay1", "relay2"):
            seen = {event for ns, event, *_ in by_name[relay] if t0 <= ns <= t1}
            assert stages <= seen, (relay, stages - seen)
            if inline:
                # an idle probe's lone cell is crypted on each relay's loop thread: no worker
                # took it, nothing came back through the reply queue
                assert not POOL_STAGES & seen, (relay, POOL_STAGES & seen)
            else:
                # every relay handed the probe's cell to a worker and got it back
                assert POOL_STAGES <= seen, (relay, POOL_STAGES - seen)
    report = analyse(marks, traces, skip=0)
    assert report["probes"] == len(marks)
    assert sum(row["mean_us"] for row in report["stages"].values()) == pytest.approx(
        report["rtt_mean_us"])
    assert ("tls_in" in {e[1] for t in traces for e in t["events"]}) == tls
