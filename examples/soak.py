"""Soak the relay network: ``python -m examples.soak --minutes 3`` (``make soak``).

What it does
------------
Starts the local network of ``examples.network`` (an echo service and ``--relays`` relay
processes) and runs echo transfers through it back to back for the whole duration: every round
builds ``--circuits`` fresh three-hop circuits, echoes ``--bytes`` bytes on each, checks every
byte, and tears everything down (the client closes its links). So circuits, streams, links,
pool circuits and exit connections are created and destroyed continuously, which is what leaks
show up under.

What it measures, and the bounds it checks
------------------------------------------
Every ``--interval`` seconds it reads each relay's resident memory (RSS), thread count and open
file descriptors from ``/proc``. At the end of every round, once the round's circuits are gone
(a *quiet point*), it samples again and asks each relay for its counters (SIGUSR1 -> STATS).
After a warm-up (the first ``--warmup`` rounds: allocator pools, code paths and relay-to-relay
links settle), the run is flat when, for every relay:

* **threads** are the same at every sample (the worker pool is fixed: no thread per circuit or
  per connection, none left behind);
* **open fds** at every quiet point are at most the first quiet point after warm-up plus
  ``--fd-slack`` (a link or exit connection closing late, never a growing number);
* **RSS** at every quiet point is at most the first quiet point after warm-up plus
  ``--rss-slack-mb`` MiB (default 16: a leak of one small object per circuit, or of one cell per
  round, would cross it over a few minutes of rounds);
* **circuits** open at every quiet point are 0, and the pool has no cell in flight;

and every round echoed every byte intact (cells lost: zero). The summary (``--json``: one JSON
object) lists the samples and the verdicts; the exit status is 0 only if everything held.

Threads: the main thread runs the reactor (the client) and owns the network; the network's
reader threads only record the children's lines.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

from examples.client import EchoTransfer, parse_size
from examples.network import ChildProcess, LocalNetwork
from reactor import Reactor

__all__ = ["ProcessSample", "SoakRun", "main", "process_sample"]


@dataclass(frozen=True)
class ProcessSample:
    """One look at a process: resident memory, threads, open file descriptors."""

    rss_bytes: int
    threads: int
    fds: int


def process_sample(pid: int) -> ProcessSample:
    """Read RSS, thread count and open fds of ``pid`` from ``/proc`` (Linux). Any thread."""
    rss = threads = 0
    with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
            elif line.startswith("Threads:"):
                threads = int(line.split()[1])
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    return ProcessSample(rss, threads, fds)


def live_stats(child: ChildProcess, timeout: float = 10.0) -> dict[str, Any]:
    """A relay's live counters: SIGUSR1, then wait for its STATS line. Owner thread (blocks a
    few milliseconds)."""
    before = child.stats
    child.kill(signal.SIGUSR1)
    deadline = time.monotonic() + timeout
    while child.stats is before:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{child.name} sent no STATS after SIGUSR1")
        time.sleep(0.005)
    assert child.stats is not None
    return child.stats


class SoakRun:
    """Back-to-back echo rounds on one reactor, sampling the relays. Loop thread only."""

    def __init__(self, reactor: Reactor, net: LocalNetwork, args: argparse.Namespace) -> None:
        self.reactor = reactor
        self.net = net
        self.args = args
        self.deadline = time.monotonic() + args.seconds
        self.started = time.monotonic()
        self.round = 0
        self.rounds: list[dict[str, Any]] = []
        self.samples: list[dict[str, Any]] = []  # periodic
        self.quiet: list[dict[str, Any]] = []  # end of each round
        self.transfer: EchoTransfer | None = None
        self.finished = False

    def start(self) -> None:
        """Start the first round and the periodic sampler. Loop thread only."""
        self._sample_periodic()
        self._start_round()

    def _relays(self) -> list[ChildProcess]:
        return [child for child in self.net.relays if child.alive]

    def _sample(self) -> dict[str, Any]:
        at = round(time.monotonic() - self.started, 3)
        return {"t": at, "round": self.round,
                "relays": {c.name: asdict(process_sample(c.pid)) for c in self._relays()}}

    def _sample_periodic(self) -> None:
        if self.finished:
            return
        self.samples.append(self._sample())
        self.reactor.call_later(self.args.interval, self._sample_periodic)

    def _start_round(self) -> None:
        self.round += 1
        self.transfer = EchoTransfer(
            self.reactor, self.net.descriptors, self.net.echo_address,
            circuits=self.args.circuits, bytes_per_circuit=self.args.bytes, hops=3,
            seed=self.round, probes=0, stall_timeout=30.0, on_finished=self._round_done)
        self.transfer.start()

    def _round_done(self, transfer: EchoTransfer) -> None:
        results = transfer.results()
        self.rounds.append({key: results[key] for key in (
            "circuits", "circuits_ok", "circuits_failed", "bytes_echoed_intact",
            "transfer_seconds", "mbytes_per_s", "ok")} | {"failures": results["failures"]})
        # Let the relays see the closes (DESTROYs, link closes), then take a quiet sample.
        self.reactor.call_later(self.args.settle, self._quiet_point)

    def _quiet_point(self) -> None:
        sample = self._sample()
        sample["stats"] = {}
        for child in self._relays():
            stats = live_stats(child)
            sample["stats"][child.name] = {key: stats.get(key) for key in (
                "circuits_open", "circuits_created", "cells_crypted", "pool_cancelled",
                "pool_discarded", "pool_errors", "worker_threads_alive", "threads")}
        self.quiet.append(sample)
        if time.monotonic() < self.deadline and self.rounds[-1]["ok"]:
            self._start_round()
        else:
            self.finished = True
            self.reactor.stop()

    # ------------------------------------------------------------------ verdict

    def verdict(self) -> dict[str, Any]:
        """The checks described in the module docstring, per relay. Loop thread only."""
        args = self.args
        warm = min(args.warmup, max(len(self.quiet) - 1, 0))
        after = self.quiet[warm:]
        checks: dict[str, Any] = {}
        ok = bool(self.rounds) and all(r["ok"] for r in self.rounds)
        ok = ok and len(self.rounds) > args.warmup and len(self.net.relays) == len(
            self._relays())
        for child in self.net.relays:
            name = child.name
            quiet = [q for q in after if name in q["relays"]]
            periodic = [s["relays"][name] for s in self.samples if name in s["relays"]]
            if not quiet:
                checks[name] = {"ok": False, "why": "no quiet sample"}
                ok = False
                continue
            base = quiet[0]["relays"][name]
            rss = [q["relays"][name]["rss_bytes"] for q in quiet]
            fds = [q["relays"][name]["fds"] for q in quiet]
            threads = {p["threads"] for p in periodic} | {
                q["relays"][name]["threads"] for q in self.quiet if name in q["relays"]}
            open_circuits = [q["stats"][name]["circuits_open"] for q in self.quiet]
            rss_bound = base["rss_bytes"] + args.rss_slack_mb * 2**20
            fd_bound = base["fds"] + args.fd_slack
            check = {
                "rss_quiet_first_mb": round(rss[0] / 2**20, 2),
                "rss_quiet_last_mb": round(rss[-1] / 2**20, 2),
                "rss_quiet_max_mb": round(max(rss) / 2**20, 2),
                "rss_bound_mb": round(rss_bound / 2**20, 2),
                "rss_any_sample_max_mb": round(max(p["rss_bytes"] for p in periodic) / 2**20, 2),
                "fds_quiet": [min(fds), max(fds)],
                "fd_bound": fd_bound,
                "threads_seen": sorted(threads),
                "circuits_open_at_quiet_points": sorted(set(open_circuits)),
            }
            check["ok"] = (max(rss) <= rss_bound and max(fds) <= fd_bound
                           and len(threads) == 1 and set(open_circuits) == {0})
            ok = ok and check["ok"]
            checks[name] = check
        return {"ok": ok, "checks": checks}

    def summary(self) -> dict[str, Any]:
        """Everything as a JSON-ready dict. Loop thread only."""
        verdict = self.verdict()
        return {
            "ok": verdict["ok"],
            "seconds": round(time.monotonic() - self.started, 1),
            "rounds": len(self.rounds),
            "circuits": sum(r["circuits"] for r in self.rounds),
            "circuits_failed": sum(r["circuits_failed"] for r in self.rounds),
            "bytes_echoed_intact": sum(r["bytes_echoed_intact"] for r in self.rounds),
            "bounds": {"rss_slack_mb": self.args.rss_slack_mb, "fd_slack": self.args.fd_slack,
                       "threads": "constant", "circuits_open_at_quiet_points": 0,
                       "warmup_rounds": self.args.warmup},
            "relays": verdict["checks"],
            "failures": [f for r in self.rounds for f in r["failures"]],
            "quiet_points": self.quiet,
            "samples": self.samples,
        }


def _print_summary(summary: dict[str, Any]) -> None:
    print(f"{'OK' if summary['ok'] else 'FAILED'}: {summary['rounds']} rounds, "
          f"{summary['circuits']} circuits ({summary['circuits_failed']} failed), "
          f"{summary['bytes_echoed_intact'] / 1e6:.1f} MB echoed intact in "
          f"{summary['seconds']:.0f} s")
    for name, check in summary["relays"].items():
        print(f"  {name}: {'flat' if check.get('ok') else 'NOT FLAT'}; quiet RSS "
              f"{check.get('rss_quiet_first_mb')} -> {check.get('rss_quiet_last_mb')} MiB "
              f"(max {check.get('rss_quiet_max_mb')}, bound {check.get('rss_bound_mb')}), "
              f"fds {check.get('fds_quiet')} (bound {check.get('fd_bound')}), threads "
              f"{check.get('threads_seen')}, circuits open at quiet points "
              f"{check.get('circuits_open_at_quiet_points')}")
    for failure in summary["failures"][:10]:
        print(f"  FAILED circuit {failure['circuit']}: {failure['reason']}")


def main(argv: list[str] | None = None) -> int:
    """Run the soak; print the summary; exit 0 if it held. Main thread."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=3.0, help="duration (default 3)")
    parser.add_argument("--seconds", type=float, default=None, help="duration in seconds "
                        "(overrides --minutes)")
    parser.add_argument("--relays", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="worker threads per relay")
    parser.add_argument("--circuits", type=int, default=16, help="circuits per round")
    parser.add_argument("--bytes", type=parse_size, default=256 * 1024,
                        help="bytes echoed per circuit per round (default 256KiB)")
    parser.add_argument("--interval", type=float, default=2.0, help="sampling period, s")
    parser.add_argument("--settle", type=float, default=0.5,
                        help="wait after a round before the quiet sample, s")
    parser.add_argument("--warmup", type=int, default=3, help="warm-up rounds (default 3)")
    parser.add_argument("--rss-slack-mb", type=float, default=16.0)
    parser.add_argument("--fd-slack", type=int, default=4)
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument("--log-level", default="WARNING")
    args = parser.parse_args(argv)
    if args.seconds is None:
        args.seconds = args.minutes * 60
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr)
    net = LocalNetwork(args.relays, threads=args.threads,
                       relay_args=["--log-level", args.log_level])
    try:
        net.start()
        with Reactor() as reactor:
            run = SoakRun(reactor, net, args)
            reactor.add_signal_handler(signal.SIGINT, reactor.stop)
            run.start()
            reactor.run()
            run.finished = True
            summary = run.summary()
    finally:
        net.stop()
        net.cleanup()
    if args.json:
        print(json.dumps(summary))
    else:
        _print_summary(summary)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
