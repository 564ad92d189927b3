"""``python -m benchmarks.attacks``: run the hostile-peer attacks, print the table or the JSON.

Each attack (:data:`ATTACKS`, in the issue's order) starts its own relay processes, so that no
state (DoS marks, circuits, memory) leaks from one into the next, and stops them when it ends,
also on error or Ctrl-C. A row that fails to run is reported with ``held`` false and its
error. Before anything starts, the program moves into a private network namespace when it
may (:func:`benchmarks.attacks.harness.enter_private_network`).

Output: without ``--json`` a table (attack, held, figure, limit, before the hardening) and the
notes; with ``--json`` one object::

    {"attacks": {NAME: {"held": bool, "figure": ..., "limit": ..., "config": str,
                        "before": str, ["note": str], ["error": str]}},
     "quick": bool, "network": str, "cpus": int, "load_1min": float}

Exit status 0 when every attack ran (held or not), 1 when one could not run, 130 on Ctrl-C.

Threads: main thread only.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.attacks.harness import (
    AttackContext,
    AttackResult,
    Figure,
    enter_private_network,
    relay_has_option,
)
from benchmarks.attacks.load_rows import circuit_flood, create_flood, early_bookkeeping
from benchmarks.attacks.memory_rows import next_hop_queue, sniper, streams_fds
from benchmarks.attacks.policy_rows import (
    bad_created2,
    exit_private,
    extend_policy,
    relay_early_loop,
)

__all__ = ["ATTACKS", "Attack", "main", "run_attacks"]


@dataclass(frozen=True)
class Attack:
    """One row of the issue: the function that runs it, what the peer does, and what the
    relay did before it was hardened (measured then on this project's 2-core machine)."""

    run: Callable[[AttackContext], AttackResult]
    what: str
    before: str


ATTACKS: dict[str, Attack] = {
    "exit_private": Attack(exit_private, "BEGIN to loopback services through the exit",
                           "read the secret, reached every loopback target"),
    "extend_policy": Attack(extend_policy, "EXTEND2 to arbitrary addresses/ports, itself",
                            "dialed anything (port scan)"),
    "next_hop_queue": Attack(next_hop_queue, "cells for a next hop that stops reading",
                             "294 MiB pushed in 4 s, RSS 35 -> 344 MiB"),
    "sniper": Attack(sniper, "download, never read, blind v0 SENDMEs",
                     "guard RSS 36 -> 95 MiB in 16 s and growing"),
    "create_flood": Attack(create_flood, "one CREATE2 onionskin replayed, DESTROY, repeat",
                           "bystander RTT 0.5 ms -> 106 ms (1 link), 7-9 s (4 links)"),
    "relay_early_loop": Attack(relay_early_loop, "RELAY_EARLY + EXTEND2 to itself",
                               "a 200-hop circuit through one relay in 3.8 s"),
    "streams_fds": Attack(streams_fds, "1,100 BEGINs to a port that never accepts + DATA",
                          "fd exhaustion, new honest peer dropped silently, +115 MiB"),
    "circuit_flood": Attack(circuit_flood, "8 links x 4,096 circuits from one IP",
                            "32,768 circuits in 2.9 s, +105 MiB"),
    "early_bookkeeping": Attack(early_bookkeeping, "RELAY_EARLY mixed with recognized cells",
                                "2.2 -> 11.8 us per cell (quadratic)"),
    "bad_created2": Attack(bad_created2, "next hop answers CREATED2 with HLEN > 496",
                           "the whole link closed"),
}


def run_attacks(names: list[str], *, quick: bool, workdir: Path,
                progress: Callable[[str], None]) -> dict[str, dict[str, Any]]:
    """Run the named attacks in order; each row's JSON. Main thread."""
    has_max_mem = relay_has_option("--max-mem-in-queues")
    rows: dict[str, dict[str, Any]] = {}
    for name in names:
        attack = ATTACKS[name]
        progress(f"{name}: {attack.what} ...")
        context = AttackContext(quick=quick, workdir=workdir / name,
                                has_max_mem_option=has_max_mem)
        started = time.perf_counter()
        try:
            result = attack.run(context)
        except Exception as exc:  # one row's failure is reported in that row
            result = AttackResult(False, {}, {}, config="", error=(
                f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=6)}"
                f"relay logs:\n{context.log_tails()}"))
        finally:
            context.close()
        row = result.to_json()
        row["before"] = attack.before
        row["seconds"] = round(time.perf_counter() - started, 2)
        rows[name] = row
        progress(f"{name}: {'held' if result.held else 'NOT HELD'} ({row['seconds']} s)")
    return rows


def _show(value: Figure) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{key} {_number(v)}" for key, v in value.items())
    return _number(value)


def _number(value: float | int) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:,.0f}"
    return f"{value:,}"


def print_table(report: dict[str, Any]) -> None:
    """The human table, then the configuration and notes of each row. Main thread."""
    print(f"{len(report['attacks'])} attacks, {'quick' if report['quick'] else 'full'} run, "
          f"{report['network']}, {report['cpus']} CPUs, load {report['load_1min']:.2f}\n")
    for name, row in report["attacks"].items():
        print(f"{name:18} {'held' if row['held'] else 'NOT HELD':8}  before: {row['before']}")
        print(f"{'':18} figure: {_show(row['figure'])}")
        print(f"{'':18} limit:  {_show(row['limit'])}")
        if row.get("error"):
            print(f"{'':18} error:  {row['error'].splitlines()[0]}")
    print()
    for name, row in report["attacks"].items():
        print(f"{name}: {row['config']}")
        if row.get("note"):
            print(f"  {row['note']}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line. Any thread."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--quick", action="store_true", help="smaller, shorter attacks")
    parser.add_argument("--only", default="",
                        help=f"comma-separated attacks to run (default all: {', '.join(ATTACKS)})")
    parser.add_argument("--host-network", action="store_true",
                        help="stay on the host's loopback (no private network namespace)")
    parser.add_argument("--keep", metavar="DIR",
                        help="work directory to keep (relay logs, keys); default a temporary one")
    args = parser.parse_args(argv)
    names = [name.strip() for name in args.only.split(",") if name.strip()] or list(ATTACKS)
    unknown = [name for name in names if name not in ATTACKS]
    if unknown:
        parser.error(f"unknown attack(s): {', '.join(unknown)}")
    args.names = names
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the attacks and print the report. Main thread."""
    args = parse_args(argv)
    network = ("host loopback (--host-network)" if args.host_network
               else enter_private_network())

    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="relaycrypt-attacks-") as tmp:
        workdir = Path(args.keep) if args.keep else Path(tmp)
        try:
            rows = run_attacks(args.names, quick=args.quick, workdir=workdir,
                               progress=progress)
        except KeyboardInterrupt:
            progress("interrupted: every process started was stopped")
            return 130
    report = {"attacks": rows, "quick": args.quick, "network": network,
              "cpus": os.cpu_count() or 0, "load_1min": os.getloadavg()[0]}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_table(report)
    return 1 if any(row.get("error") for row in rows.values()) else 0
