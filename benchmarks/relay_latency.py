"""Where an idle single-cell round trip through 3 relays spends its time, stage by stage.

``python -m benchmarks.relay_latency [--plain-links] [--samples N] [--gap S] [--json]``

Runs the network of :mod:`benchmarks.relay_rtt` (an echo service and three relays, each a
process running the project's unmodified code) with every process traced by
:mod:`benchmarks.relay_trace` -- the relays and the echo service as
``python -m benchmarks.relay_trace OUT relay|echo ARGS``, the prober in this process -- sends
``samples`` single cells one at a time (``gap`` seconds apart) and merges all events on the
one monotonic clock. Every probe's time, from the prober's write to the last echoed byte, is
cut at each recorded event into *segments*; a segment is named by its two ends
(``relay1:submitted(L) -> relay1:worker(W)``) and put in a *stage* (:data:`STAGES`: e.g. a
worker's wake-up, the loop's wake-up by the reply queue, the deferral of the flush to the end
of the loop iteration, TCP between processes). The report gives, per stage and per segment,
the median over probes of the time it took in a probe and its share of the median round trip.

The switches of :mod:`benchmarks.relay_trace` (``RELAYTRACE_IDLE_WORKERS``,
``RELAYTRACE_SWITCH_INTERVAL``) apply to the relays when set in this program's environment;
``--inline-cells N`` is passed to the relays (0: every batch through the pool, so the pool's
stages show; by default an idle probe's cell is crypted on each relay's loop thread).

Threads: main thread only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from bisect import bisect_left, bisect_right
from collections import defaultdict
from itertools import pairwise
from pathlib import Path
from typing import Any

from benchmarks import relay_trace
from benchmarks.relay_rtt import Prober, measure_rtt
from examples.network import ChildProcess, LocalNetwork
from reactor import Reactor
from relay.directory import RelayDescriptor, write_directory

__all__ = ["STAGES", "VARIANTS", "TracedNetwork", "analyse", "compare", "main", "run_traced"]

STAGES: dict[tuple[str, str], str] = {
    ("read", "tls_in"): "TLS decrypt",
    ("tls_in", "cell"): "framing, to the circuit",
    ("read", "cell"): "framing, to the circuit",
    ("cell", "after_io"): "flush deferred to the end of the iteration",
    ("after_io", "flush"): "flush deferred to the end of the iteration",
    ("flush", "submitted"): "submit to the pool",
    ("submitted", "worker"): "worker wake-up",
    ("worker", "crypt"): "worker before the kernel",
    ("crypt", "crypted"): "relay crypto (kernel)",
    ("crypted", "put"): "worker after the kernel",
    ("put", "woke"): "loop wake-up (reply queue)",
    ("woke", "result"): "reply to the circuit",
    ("flush", "result"): "relay crypto on the loop thread (small batch)",
    ("result", "link_write"): "reply to the circuit",
    ("link_write", "tls_out"): "TLS encrypt",
    ("tls_out", "write"): "write",
    ("link_write", "write"): "write",
    ("result", "write"): "exit: to the target stream",
    ("read", "after_io"): "exit: from the target stream",
    ("send", "link_write"): "origin crypto + package",
    ("tls_in", "after_io"): "framing + flush deferred",
    ("after_io", "client_cells"): "framing + flush deferred",
    ("client_cells", "done"): "origin crypto + deliver",
}
"""Stage of a segment within one process by its two events; segments of the prober and the
echo service are prefixed ``client:`` / ``echo:``, and every segment between two processes
(``write`` in one, ``read`` in the next) is ``TCP between processes + reader's wake-up``."""
_BETWEEN = "TCP between processes + reader's wake-up"


Event = tuple[int, str, str, str, int, int]
"""``(ns, process, event, thread, thread CPU ns, thread id)``."""


def _stage(a: Event, b: Event) -> str:
    """The stage a segment between two events belongs to. Any thread (pure)."""
    if a[1] != b[1]:
        return _BETWEEN if (a[2], b[2]) == ("write", "read") else (
            f"between processes: {a[2]} -> {b[2]}")
    name = STAGES.get((a[2], b[2]), f"other: {a[2]} -> {b[2]}")
    return name if a[1].startswith("relay") else f"{a[1]}: {name}"


class TracedNetwork(LocalNetwork):
    """:class:`examples.network.LocalNetwork` whose echo service and relays run through
    :mod:`benchmarks.relay_trace`: traced (events in ``workdir/NAME.json``) or not (``trace``
    False: only the switches in ``switches`` apply). Owner thread."""

    def __init__(self, workdir: Path, *, tls: bool, threads: int = 2, trace: bool = True,
                 switches: dict[str, str] | None = None,
                 relay_args: list[str] | None = None) -> None:
        """Configure; :meth:`start` starts it. ``relay_args`` are added to every relay's
        command line. Owner thread."""
        super().__init__(3, threads=threads, workdir=workdir, plain_links=not tls)
        self.trace = trace
        self.switches = dict(switches or {})
        self.relay_args = list(relay_args or [])

    def _out(self, name: str) -> str:
        """Where child ``name`` writes its events (``-``: untraced). Owner thread."""
        return str(self.workdir / f"{name}.json") if self.trace else "-"

    def start(self, timeout: float = 60.0) -> None:
        """Start the traced echo service and relays and wait for them. Owner thread."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        env = self._env()
        env.update(self.switches)
        trace = [sys.executable, "-m", "benchmarks.relay_trace"]
        try:
            self.echo = ChildProcess("echo", [*trace, self._out("echo"), "echo", "--port", "0"],
                                     self.workdir / "echo.log", env=env)
            for index in range(self.n_relays):
                name = f"relay{index}"
                self.relays.append(ChildProcess(name, [
                    *trace, self._out(name), "relay", "--listen", "127.0.0.1:0",
                    "--nickname", name, "--data-dir", str(self.workdir / name),
                    "--threads", str(self.threads), "--testing-network",
                    "--exit-policy", "accept 127.0.0.1:*, reject *:*",
                    "--dos-circuit-creation-enabled", "0", "--dos-connection-enabled", "0",
                    *(["--plain-links"] if self.plain_links else []), *self.relay_args],
                    self.workdir / f"{name}.log", env=env))
            info = self.echo.wait_ready(timeout)
            self.echo_address = (str(info["address"]), int(info["port"]))
            self.descriptors = [RelayDescriptor.from_json(child.wait_ready(timeout)["descriptor"])
                                for child in self.relays]
        except BaseException:
            self.stop()
            raise
        write_directory(self.directory_path, self.descriptors)

    def traces(self) -> list[dict[str, Any]]:
        """The events each traced child wrote when it stopped. Owner thread, after stop."""
        return [json.loads(path.read_text()) for name in ("echo", "relay0", "relay1", "relay2")
                if (path := self.workdir / f"{name}.json").exists()]


def run_traced(workdir: Path, *, tls: bool, samples: int, gap: float, threads: int = 2,
               relay_args: list[str] | None = None,
               ) -> tuple[list[tuple[float, float]], list[dict[str, Any]]]:
    """Run the traced network and the probes, idle; ``(probe marks, traces of every process,
    this one -- the client -- first)``. Main thread."""
    network = TracedNetwork(workdir, tls=tls, threads=threads, relay_args=relay_args)
    network.start()
    marks: list[tuple[float, float]] = []
    failures: list[str] = []
    try:
        relay_trace.install()
        try:
            marks = _probe(network, tls=tls, samples=samples, gap=gap, failures=failures)
        finally:
            relay_trace.uninstall()
    finally:
        network.stop()
    if failures:
        raise RuntimeError("; ".join(failures))
    traces = [{"name": "client", "pid": os.getpid(), "events": list(relay_trace.EVENTS)}]
    relay_trace.EVENTS.clear()
    return marks, traces + network.traces()


def _probe(network: TracedNetwork, *, tls: bool, samples: int, gap: float,
           failures: list[str]) -> list[tuple[float, float]]:
    """Send the probes through ``network``; their ``(sent, back)`` marks. Main thread."""
    with Reactor() as reactor:
        def failed(why: str) -> None:
            failures.append(why)
            reactor.stop()

        prober = Prober(reactor, network.descriptors, network.echo_address, tls=tls,
                        gap=gap, on_ready=lambda: prober.run(samples, 600.0, reactor.stop),
                        on_failure=failed)
        reactor.run()
        prober.close()
        return list(prober.marks)


VARIANTS: dict[str, tuple[dict[str, str], list[str]]] = {
    "as is": ({}, []),
    "every batch on the pool (--inline-cells 0)": ({}, ["--inline-cells", "0"]),
    "no SCHED_IDLE worker": ({"RELAYTRACE_IDLE_WORKERS": "0"}, []),
    "GIL switch interval 0.5 ms": ({"RELAYTRACE_SWITCH_INTERVAL": "0.0005"}, []),
}
"""What :func:`compare` runs side by side: per variant the :mod:`benchmarks.relay_trace`
switches (environment) and extra relay arguments."""


def compare(workdir: Path, *, tls: bool, rounds: int, samples: int, gap: float,
            load_seconds: float, threads: int = 2) -> dict[str, Any]:
    """Round trips idle and under load (:func:`benchmarks.relay_rtt.measure_rtt`, untraced)
    for each of :data:`VARIANTS`, the variants interleaved in each of ``rounds`` rounds so that
    the host's changing load spreads over all of them; per variant the median over rounds.
    Main thread."""
    runs: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for round_index in range(rounds):
        for index, (name, (switches, relay_args)) in enumerate(VARIANTS.items()):
            network = TracedNetwork(workdir / f"r{round_index}-v{index}", tls=tls,
                                    threads=threads, trace=False, switches=switches,
                                    relay_args=relay_args)
            runs[name].append(measure_rtt(tls, workdir, samples=samples, gap=gap,
                                          load_seconds=load_seconds, network=network))
    out: dict[str, Any] = {}
    for name, results in runs.items():
        out[name] = {
            "idle_p50_ms": statistics.median(r["idle"]["p50_ms"] for r in results),
            "idle_p99_ms": statistics.median(r["idle"]["p99_ms"] for r in results),
            "load_p50_ms": statistics.median(r["load"]["p50_ms"] for r in results),
            "load_p99_ms": statistics.median(r["load"]["p99_ms"] for r in results),
            "load_middle_cells_per_s": statistics.median(r["load"]["middle_cells_per_s"]
                                                         for r in results),
            "runs": results,
        }
    return out


def analyse(marks: list[tuple[float, float]], traces: list[dict[str, Any]],
            skip: int = 20) -> dict[str, Any]:
    """Median per stage and per segment over the probes (the first ``skip`` are warm-up); for
    a segment between two events of one thread, also the CPU time that thread used in it.
    Any thread (pure)."""
    events: list[Event] = sorted((ns, trace["name"], event, thread, cpu, tid)
                                 for trace in traces
                                 for ns, event, thread, cpu, tid in trace["events"])
    times = [event[0] for event in events]
    per_stage: dict[str, list[float]] = defaultdict(list)
    per_segment: dict[str, list[float]] = defaultdict(list)
    segment_cpu: dict[str, list[float]] = defaultdict(list)
    order: dict[str, int] = {}
    rtts: list[float] = []
    probes = marks[skip:] if len(marks) > skip else marks
    for sent, back in probes:
        t0, t1 = int(sent * 1e9), int(back * 1e9)
        inside = events[bisect_left(times, t0):bisect_right(times, t1)]
        line: list[Event] = [(t0, "client", "send", "L", -1, -1), *inside,
                             (t1, "client", "done", "L", -1, -1)]
        stage_sum: dict[str, float] = defaultdict(float)
        segment_sum: dict[str, float] = defaultdict(float)
        cpu_sum: dict[str, float] = defaultdict(float)
        for a, b in pairwise(line):
            us = (b[0] - a[0]) / 1e3
            stage_sum[_stage(a, b)] += us
            label = f"{a[1]}:{a[2]}({a[3]}) -> {b[1]}:{b[2]}({b[3]})"
            segment_sum[label] += us
            if a[1] == b[1] and a[5] == b[5] and a[4] >= 0:
                cpu_sum[label] += (b[4] - a[4]) / 1e3
            order.setdefault(label, len(order))
        for name, value in stage_sum.items():
            per_stage[name].append(value)
        for name, value in segment_sum.items():
            per_segment[name].append(value)
        for name, value in cpu_sum.items():
            segment_cpu[name].append(value)
        rtts.append((t1 - t0) / 1e3)
    count = len(probes)

    def summary(values: list[float]) -> dict[str, float]:
        padded = values + [0.0] * (count - len(values))  # absent in a probe: 0
        return {"median_us": statistics.median(padded),
                "mean_us": statistics.fmean(padded),
                "p90_us": sorted(padded)[int(0.9 * (len(padded) - 1))],
                "in_probes": len(values)}

    stages = {name: summary(values) for name, values in per_stage.items()}
    segments = {}
    for name, values in sorted(per_segment.items(), key=lambda item: order[item[0]]):
        segments[name] = summary(values)
        if name in segment_cpu:
            segments[name]["cpu_median_us"] = summary(segment_cpu[name])["median_us"]
    return {"probes": count, "rtt_median_us": statistics.median(rtts) if rtts else 0.0,
            "rtt_mean_us": statistics.fmean(rtts) if rtts else 0.0,
            "stages": dict(sorted(stages.items(), key=lambda item: -item[1]["mean_us"])),
            "segments": segments}


def _print(report: dict[str, Any]) -> None:
    """The stage and segment tables. Main thread."""
    mean = report["rtt_mean_us"] or 1.0
    print(f"{report['probes']} probes: round trip median {report['rtt_median_us']:.0f} us, "
          f"mean {mean:.0f} us")
    print(f"{'stage (sum over the path, per probe)':<48} {'median':>8} {'mean':>8} "
          f"{'p90':>8} {'share':>6}")
    for name, row in report["stages"].items():
        print(f"{name:<48} {row['median_us']:>8.0f} {row['mean_us']:>8.0f} "
              f"{row['p90_us']:>8.0f} {row['mean_us'] / mean:>6.1%}")
    print(f"\n{'segments in path order (us per probe)':<66} {'median':>7} {'mean':>7} "
          f"{'p90':>7} {'on-CPU':>7}")
    for name, row in report["segments"].items():
        if row["mean_us"] >= 1.0:
            cpu = row.get("cpu_median_us")
            print(f"  {name:<64} {row['median_us']:>7.0f} {row['mean_us']:>7.0f} "
                  f"{row['p90_us']:>7.0f} {'' if cpu is None else f'{cpu:7.0f}':>7}")


def _print_compare(report: dict[str, Any]) -> None:
    """The table of :func:`compare`. Main thread."""
    print(f"{'variant':<44} {'idle p50':>9} {'idle p99':>9} {'load p50':>9} {'load p99':>9} "
          f"{'load cells/s':>12}")
    for name, row in report.items():
        print(f"{name:<44} {row['idle_p50_ms']:>9.2f} {row['idle_p99_ms']:>9.2f} "
              f"{row['load_p50_ms']:>9.2f} {row['load_p99_ms']:>9.2f} "
              f"{row['load_middle_cells_per_s']:>12.0f}")


def main(argv: list[str] | None = None) -> int:
    """Trace the probes and print where the time went (or ``--compare`` the switches). Main
    thread."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plain-links", action="store_true")
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument("--gap", type=float, default=0.002,
                        help="seconds between a probe's echo and the next probe")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compare", action="store_true",
                        help="untraced round trips, idle and under load, for each variant "
                             "(VARIANTS), side by side")
    parser.add_argument("--inline-cells", type=int,
                        help="the relays' --inline-cells (default: theirs)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of --compare")
    parser.add_argument("--load-seconds", type=float, default=4.0)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--keep", help="keep the traces in this directory")
    args = parser.parse_args(argv)
    tls = not args.plain_links
    with tempfile.TemporaryDirectory(prefix="relaylatency-") as scratch:
        workdir = Path(args.keep) if args.keep else Path(scratch)
        if args.compare:
            report = compare(workdir, tls=tls, rounds=args.rounds, samples=args.samples,
                             gap=args.gap, load_seconds=args.load_seconds, threads=args.threads)
            if args.json:
                print(json.dumps(report, indent=1))
            else:
                _print_compare(report)
            return 0
        relay_args = [] if args.inline_cells is None else ["--inline-cells",
                                                            str(args.inline_cells)]
        marks, traces = run_traced(workdir, tls=tls, samples=args.samples, gap=args.gap,
                                   threads=args.threads, relay_args=relay_args)
    report = analyse(marks, traces)
    report.update({"tls": tls, "gap_s": args.gap, "threads": args.threads})
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        _print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
