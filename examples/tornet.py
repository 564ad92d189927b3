"""A private Tor network of real tor processes with external relays in every position.

``python -m examples.tornet`` (``make tornet``) builds a :class:`tornet.network.TorNet` -- one
directory authority, three tor relays (t1, t2, t3, exits to the echo service only), a tor client,
an echo service -- plus two *external relays* started with ``--relay-command``: ``xrelay`` (an
exit to the echo service) and ``xbridge`` (a bridge, with a bridge client of its own). The
default command is relaycrypt's relay, ``python -m examples.relay``; ``--relay-command "python
-m tornet.standin"`` runs a real tor configured from the same options in its place.

Then it pushes ``--size`` MiB to the echo service and back through circuits pinned hop by hop
(``EXTENDCIRCUIT`` + ``ATTACHSTREAM`` on the client's control port), one per position:

    all_tor  client -> t1 -> t2 -> t3 -> echo            (tor relays only, for comparison)
    guard    client -> xrelay -> t2 -> t3 -> echo
    middle   client -> t1 -> xrelay -> t3 -> echo
    exit     client -> t1 -> t2 -> xrelay -> echo
    bridge   bridge client -> xbridge -> t2 -> t3 -> echo

and compares every byte that comes back. It prints the bootstrap time and one table: per
position the MB/s (10^6 bytes sent per second, first byte out to last byte back) and, for each
relay on the path, CPU microseconds per relayed cell. A *relayed cell* is counted as the stream
bytes that crossed the relay in both directions divided by 498 (a full RELAY_DATA cell), so
SENDMEs and circuit set-up are not counted as cells but their CPU is; CPU is the relay's
process tree's user+system time from /proc over the transfer, in clock ticks (10 ms).

``--json`` prints one object instead: ``{"ok", "bootstrap_s", "where", "positions":
{POSITION: {"bytes_sent", "bytes_echoed_intact", "mb_per_s", "path", "seconds", "cells",
"first_mismatch", "stream_retries", "cpu_us_per_cell": {relay: us}}}, "cpu_us_per_cell":
{"external": {POSITION: us}, "tor": {"guard"|"middle"|"exit": us}}, "cell_definition",
"timeline", "error"}`` (``cpu_us_per_cell.tor`` is from the all_tor push;
``stream_retries``: streams that did not open before the push's did, see ``TorNet.push``).
Exit status: 0 when every byte of every push came back intact, 1 otherwise (or a push failed),
2 when the network did not start, 130 on SIGINT/SIGTERM before the pushes ended. Every process
it started is stopped in every case. ``--keep`` leaves the network running (and its files)
after the pushes until Ctrl-C (which then ends it with the pushes' status).

Threads: main thread only.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, TextIO

from tornet.external import DEFAULT_RELAY_COMMAND
from tornet.network import POSITIONS, PushResult, TorNet
from tornet.procs import Interrupted, NetworkFailed, signals_interrupt
from tornet.push import PinError

__all__ = ["CELL_DEFINITION", "main"]

MIB = 1024 * 1024
ALL_POSITIONS = ("all_tor", *POSITIONS)
CELL_DEFINITION = ("relayed cells = stream bytes that crossed the relay, both directions, "
                   "/ 498 (one full RELAY_DATA cell); CPU = user+system of the relay's process "
                   "tree from /proc during the transfer (10 ms ticks)")
_EXTERNAL = {"guard": "xrelay", "middle": "xrelay", "exit": "xrelay", "bridge": "xbridge"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line. Main thread."""
    parser = argparse.ArgumentParser(prog="python -m examples.tornet",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--relay-command", default=DEFAULT_RELAY_COMMAND,
                        help=f"external relay program (default: {DEFAULT_RELAY_COMMAND!r})")
    parser.add_argument("--size", type=float, default=16.0,
                        help="MiB pushed per position (default 16)")
    parser.add_argument("--positions", default=",".join(ALL_POSITIONS),
                        help="comma-separated subset of " + ",".join(ALL_POSITIONS))
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--keep", action="store_true",
                        help="leave the network running (and its files) until Ctrl-C")
    parser.add_argument("--no-namespace", action="store_true",
                        help="use the host's loopback even when a namespace is possible")
    parser.add_argument("--timeout", type=float, default=150.0,
                        help="seconds allowed for bootstrap (default 150)")
    parser.add_argument("--tor-log-level", default="notice",
                        help="log level of every tor (notice, info, debug)")
    args = parser.parse_args(argv)
    args.positions = [p for p in args.positions.split(",") if p]
    unknown = set(args.positions) - set(ALL_POSITIONS)
    if unknown:
        parser.error(f"unknown positions: {', '.join(sorted(unknown))}")
    if args.size <= 0:
        parser.error("--size must be positive")
    return args


def _position_record(push: PushResult) -> dict[str, Any]:
    result = push.result
    return {
        "bytes_sent": result.bytes_sent,
        "bytes_echoed_intact": result.bytes_echoed_intact,
        "mb_per_s": round(result.mb_per_s, 3),
        "path": push.path,
        "seconds": round(result.seconds, 3),
        "cells": push.cells,
        "first_mismatch": result.first_mismatch,
        "stream_retries": len(push.refusals),
        "cpu_us_per_cell": {name: round(push.cpu_us_per_cell(name), 2) for name in push.path},
    }


def summarize(pushes: dict[str, PushResult]) -> dict[str, dict[str, float]]:
    """``{"external": {position: us}, "tor": {role: us}}``: the external relay's CPU per cell in
    each position, and tor's relays' by role in the all-tor push. Any thread (pure)."""
    external = {position: round(push.cpu_us_per_cell(_EXTERNAL[position]), 2)
                for position, push in pushes.items() if position in _EXTERNAL}
    tor: dict[str, float] = {}
    if "all_tor" in pushes:
        push = pushes["all_tor"]
        for role, name in zip(("guard", "middle", "exit"), push.path, strict=True):
            tor[role] = round(push.cpu_us_per_cell(name), 2)
    return {"external": external, "tor": tor}


def print_table(report: dict[str, Any], out: TextIO) -> None:
    """The human-readable summary. Main thread."""
    print(f"tornet: {report['where']}", file=out)
    if report["bootstrap_s"] is None:
        print(f"FAILED: {report.get('error')}", file=out)
        return
    print(f"bootstrap: {report['bootstrap_s']:.1f} s (every client at 100 %, every relay "
          "usable)", file=out)
    header = f"{'position':<9} {'path':<24} {'MiB':>6} {'intact':>7} {'MB/s':>7}  CPU us/cell"
    print(header, file=out)
    for position, record in report["positions"].items():
        cpu = "  ".join(f"{name} {value:.1f}"
                        for name, value in record["cpu_us_per_cell"].items())
        intact = "yes" if record["bytes_echoed_intact"] == record["bytes_sent"] else "NO"
        print(f"{position:<9} {' > '.join(record['path']):<24} "
              f"{record['bytes_sent'] / MIB:>6.1f} {intact:>7} {record['mb_per_s']:>7.2f}  "
              f"{cpu}", file=out)
    parts = []
    for title, values in (("external relay", report["cpu_us_per_cell"].get("external")),
                          ("tor relays on the all-tor path",
                           report["cpu_us_per_cell"].get("tor"))):
        if values:
            parts.append(f"{title}: " + ", ".join(f"{k} {v:.1f}" for k, v in values.items()))
    if parts:
        print("CPU us per relayed cell: " + "; ".join(parts), file=out)
    print(CELL_DEFINITION, file=out)
    if report["error"]:
        print(f"error: {report['error']}", file=out)


def main(argv: list[str] | None = None) -> int:
    """Build the network, push through every position, report. Main thread."""
    args = parse_args(argv)

    def progress(line: str) -> None:
        print(f"tornet: {line}", file=sys.stderr, flush=True)

    report: dict[str, Any] = {"ok": False, "bootstrap_s": None, "where": "", "positions": {},
                              "cpu_us_per_cell": {}, "cell_definition": CELL_DEFINITION,
                              "timeline": [], "error": None}
    pushes: dict[str, PushResult] = {}
    status = 1
    with signals_interrupt() as quiet:
        net: TorNet | None = None
        try:
            net = TorNet(namespace=not args.no_namespace, relay_command=args.relay_command,
                         keep_files=args.keep, tor_log_level=args.tor_log_level,
                         progress=progress)
            externals = {"xrelay": net.add_external_relay("xrelay", exit=True)}
            if "bridge" in args.positions:
                externals["xbridge"] = net.add_external_relay("xbridge", exit=False,
                                                              bridge=True)
            progress(f"work directory {net.workdir}")
            try:
                report["bootstrap_s"] = round(net.start(args.timeout), 2)
            except (NetworkFailed, TimeoutError, PinError) as exc:
                report["error"] = f"the network did not start: {exc}"
                status = 2
                raise
            report["where"] = net.description
            progress(f"ready in {report['bootstrap_s']} s, in {net.description}")
            for position in args.positions:
                external = None if position == "all_tor" else externals[_EXTERNAL[position]]
                pushes[position] = net.push(position, int(args.size * MIB), external)
                record = _position_record(pushes[position])
                report["positions"][position] = record
                progress(f"{position}: {record['mb_per_s']} MB/s, "
                         f"{record['bytes_echoed_intact']}/{record['bytes_sent']} intact")
            report["ok"] = all(push.result.intact for push in pushes.values())
            status = 0 if report["ok"] else 1
            if args.keep:
                try:
                    _keep_running(net, progress)
                except Interrupted:
                    pass  # the way to end --keep: the pushes' verdict stands
        except Interrupted as exc:
            report["ok"] = False
            report["error"] = f"interrupted by {exc}"
            status = 130
        except (NetworkFailed, TimeoutError, PinError, OSError) as exc:
            report["error"] = report["error"] or f"{type(exc).__name__}: {exc}"
        finally:
            quiet.set()
            if net is not None:
                report["timeline"] = [[event, round(t, 2)] for event, t in net.timeline]
                net.stop()
    report["cpu_us_per_cell"] = summarize(pushes)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_table(report, sys.stdout)
    return status


def _keep_running(net: TorNet, progress: Any) -> None:
    """Print how to reach the network, then wait for Ctrl-C (or a process dying)."""
    import time

    assert net.client is not None and net.client.process is not None
    enter = (f"nsenter --net=/proc/{net.client.process.pid}/ns/net "
             if net.place is not None and net.place.namespace else "")
    progress(f"kept running; files in {net.workdir}")
    progress(f"SOCKS 127.0.0.1:{net.client.socks_port}, control 127.0.0.1:"
             f"{net.client.control_port} (cookie {net.client.cookie_file}); "
             f"e.g. {enter}curl --socks5 127.0.0.1:{net.client.socks_port} ...")
    progress("Ctrl-C stops it")
    while True:
        net.check()
        time.sleep(0.5)


if __name__ == "__main__":
    sys.exit(main())
