"""The attacks measured as load: a CREATE2 replay flood against a bystander's round trips, a
circuit flood from one address, and the per-cell cost of RELAY_EARLY bookkeeping.

These figures are timings (latency, handshakes per second, CPU per cell) on the machine that
runs them: the relay, the flooder and the bystander share its cores, so a busy machine moves
them. The CPU per cell is the relay's own (every thread's run time from
``/proc/PID/task/*/schedstat``, in nanoseconds), which other processes move less than
wall-clock time.

Threads: main thread only (the floods run their own threads or process).
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time

from benchmarks.attacks.circuit import FIRST_CIRC_ID, Circuit, one_hop, open_peer
from benchmarks.attacks.flood import open_circuits
from benchmarks.attacks.harness import (
    DOS_OFF,
    PRIVATE_EXTENDS,
    REPO,
    AttackContext,
    AttackResult,
    Relay,
    RssPeak,
)
from benchmarks.attacks.services import FakeNextRelay
from benchmarks.rawpeer import RawPeer, fixed_cell
from relay.cells import CellCommand, DestroyReason, RelayCommand
from relay.circuits import pack_relay
from relay.dos import DosConfig
from relay.handshakes import HTYPE_NTOR, NtorClient, encode_create2
from relay.relaylimits import MAX_RELAY_EARLY_CELLS_PER_CIRCUIT

__all__ = ["circuit_flood", "create_flood", "early_bookkeeping"]

_PROBE_TARGET = b"127.0.0.1:1\0"  # a relay that is no exit answers END at once


def _percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def _round_trips(circuit: Circuit, seconds: float, first_stream: int) -> tuple[list[float], int]:
    """BEGIN -> END round trips on ``circuit`` for ``seconds``; their durations in ms and the
    next stream id."""
    samples: list[float] = []
    stream_id = first_stream
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        started = time.perf_counter()
        circuit.send(RelayCommand.BEGIN, stream_id, _PROBE_TARGET)
        while circuit.next_relay()[2] != stream_id:
            pass
        samples.append((time.perf_counter() - started) * 1000)
        stream_id = stream_id % 0xFFFF + 1
    return samples, stream_id


def _flood_process(ctx: AttackContext, relay: Relay, links: int,
                   seconds: float) -> subprocess.Popen[str]:
    """Start ``python -m benchmarks.attacks.flood`` against ``relay`` (killed by pid if it
    outlives the attack)."""
    skin = NtorClient(relay.identity, relay.onion_key).onionskin
    body = encode_create2(HTYPE_NTOR, skin).hex()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    process = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.attacks.flood", "--port", str(relay.port),
         "--links", str(links), "--seconds", str(seconds), "--body", body],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def reap() -> None:
        if process.poll() is None:
            process.kill()
        process.wait()
        for pipe in (process.stdout, process.stderr):
            if pipe is not None:
                pipe.close()

    ctx.stack.callback(reap)
    return process


def _flood_result(process: subprocess.Popen[str], timeout: float) -> dict[str, object]:
    out, err = process.communicate(timeout=timeout)
    if process.returncode != 0:
        raise RuntimeError(f"flooder exited {process.returncode}: {err[-2000:]}")
    result: dict[str, object] = json.loads(out.strip().splitlines()[-1])
    return result


def create_flood(ctx: AttackContext) -> AttackResult:
    """A bystander's BEGIN->END round trips on an established circuit, idle and while 1 and
    then 4 links replay one CREATE2 onionskin (DESTROY after each answer, a new CREATE2 at
    once, 32 outstanding per link) from a separate process. With DoS limits off, so that
    the onion queue and worker lanes alone must protect the bystander; then a short 4-link
    flood against a relay with tor's DoS defaults counts its refusals."""
    relay = ctx.relay("target", DOS_OFF)
    peer = open_peer(ctx.stack, relay.port, timeout=15)
    bystander = one_hop(peer, FIRST_CIRC_ID)
    _, stream_id = _round_trips(bystander, 0.3, 1)  # warm-up
    idle, stream_id = _round_trips(bystander, ctx.scale(1.5, 4.0), stream_id)
    figure: dict[str, float | int] = {
        "idle_p50_ms": round(statistics.median(idle), 3),
        "idle_p99_ms": round(_percentile(idle, 0.99), 3),
    }
    flood_s, probe_s = ctx.scale(3.5, 9.0), ctx.scale(2.5, 7.0)
    for links in (1, 4):
        name = f"{links}link" if links == 1 else f"{links}links"
        children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
        flooder = _flood_process(ctx, relay, links, flood_s)
        time.sleep(0.7)  # the flooder's links open and the queue fills
        relay_before, wall_before = relay.cpu_s(), time.perf_counter()
        samples, stream_id = _round_trips(bystander, probe_s, stream_id)
        relay_cores = (relay.cpu_s() - relay_before) / (time.perf_counter() - wall_before)
        counts = _flood_result(flooder, flood_s + 60)
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        flooder_cpu = (children.ru_utime + children.ru_stime
                       - children_before.ru_utime - children_before.ru_stime)
        figure[f"flood_{name}_p50_ms"] = round(statistics.median(samples), 3)
        figure[f"flood_{name}_p99_ms"] = round(_percentile(samples, 0.99), 3)
        figure[f"handshakes_per_s_{name}"] = round(
            int(counts["created"]) / float(counts["seconds"]), 1)  # type: ignore[arg-type]
        figure[f"relay_cores_{name}"] = round(relay_cores, 2)
        figure[f"flooder_cores_{name}"] = round(
            flooder_cpu / float(counts["seconds"]), 2)  # type: ignore[arg-type]
    onion = relay.stats()["onion"]

    guarded = ctx.relay("targetdos")  # tor's defaults: DoS limits as the live consensus
    counts = _flood_result(_flood_process(ctx, guarded, 4, ctx.scale(1.5, 3.0)), 90)
    figure["dos_defaults_created"] = int(counts["created"])  # type: ignore[call-overload]
    figure["dos_defaults_refused"] = int(counts["refused"])  # type: ignore[call-overload]
    bound = round(2 * figure["idle_p50_ms"], 3)
    limit = {"flood_1link_p50_ms": bound, "flood_4links_p50_ms": bound,
             "dos_defaults_refused": 1}
    held = (figure["flood_1link_p50_ms"] <= bound and figure["flood_4links_p50_ms"] <= bound
            and figure["dos_defaults_refused"] >= 1)
    return AttackResult(
        held, figure, limit,
        config="DoS limits off for the latency runs (the onion queue alone); a second relay "
               "with tor's DoS defaults for the refusal count",
        note=f"{len(idle)} idle samples; onion queue of the first relay: "
             f"{json.dumps({k: v for k, v in onion.items() if not isinstance(v, dict)})}; "
             "limit: 2x the idle p50 (dos_defaults_refused: at least)")


def circuit_flood(ctx: AttackContext) -> AttackResult:
    """8 links from 127.0.0.1, each sending its CREATE_FASTs at once, against a relay with
    tor's DoS defaults; then a burst of new connections from the same address."""
    relay = ctx.relay("target")  # tor's defaults: DoS limits as the live consensus
    dos = DosConfig()
    links, per_link = 8, ctx.scale(512, 4096)
    with RssPeak(relay.pid) as rss:
        counts = open_circuits(relay.port, links, per_link, ctx.scale(30.0, 90.0))
        time.sleep(0.3)  # the relay settles before the last sample
    stats = relay.stats()
    burst = ctx.scale(dos.connection_connect_burst + 20, dos.connection_connect_burst + 60)
    opened: list[RawPeer] = []
    refused_seen = 0
    for _ in range(burst):
        try:
            extra = RawPeer(relay.port, timeout=3)
            opened.append(extra)
            extra.handshake()
        except (OSError, EOFError, AssertionError):
            refused_seen += 1
    for extra in opened:
        extra.close()
    after = relay.stats()
    allowed = dos.circuit_creation_burst + dos.circuit_creation_rate * int(counts.seconds + 1)
    figure = {
        "circuits_attempted": links * per_link,
        "circuits_created": counts.created,
        "circuits_refused": counts.refused,
        "refused_resourcelimit": counts.reasons.get(int(DestroyReason.RESOURCELIMIT), 0),
        "circuits_open_at_relay": stats["circuits_open"],
        "flood_s": round(counts.seconds, 2),
        "rss_growth_mib": round(rss.growth_mib, 1),
        "connections_attempted": burst,
        "connections_refused": after["connections_refused_dos"],
        "connections_failed_seen": refused_seen,
    }
    limit = {"circuits_created": allowed, "connections_refused": 1}
    held = (counts.created <= allowed and counts.refused > 0
            and after["connections_refused_dos"] >= 1)
    return AttackResult(
        held, figure, limit,
        config="tor's defaults: DoSCircuitCreation rate "
               f"{dos.circuit_creation_rate}/s burst {dos.circuit_creation_burst} (with "
               f">= {dos.circuit_creation_min_connections} connections), DoSConnection "
               f"{dos.connection_max_concurrent_count} concurrent, connect burst "
               f"{dos.connection_connect_burst} at {dos.connection_connect_rate}/s",
        note="limit: the circuit-creation burst plus its refill over the flood's seconds; "
             "connections_refused: at least")


def _early_cells(circuit: Circuit, cells: int, mixed: bool) -> bytes:
    """The wire bytes of ``cells`` relay cells on ``circuit`` (hop 0 the relay, hop 1 a fake
    next relay): every 10th a DROP for the relay (recognized there), the rest for hop 1
    (passed on); with ``mixed``, 7 of those passed on go as RELAY_EARLY, spread out (with the
    EXTEND2 that built the circuit, the 8 tor allows)."""
    early_at = {50 + 100 * k for k in range(MAX_RELAY_EARLY_CELLS_PER_CIRCUIT - 1)} if mixed \
        else set()
    filler = pack_relay(RelayCommand.DATA, 1, os.urandom(400))
    parts: list[bytes] = []
    for index in range(cells):
        if index % 10 == 9:
            parts.append(circuit.wire(RelayCommand.DROP, hop=0))
        else:
            payload = circuit.crypto.encrypt(filler, 1)
            command = CellCommand.RELAY_EARLY if index in early_at else CellCommand.RELAY
            parts.append(fixed_cell(circuit.circ_id, command, payload))
    return b"".join(parts)


def _wait_for_cells(fake: FakeNextRelay, expected: int, stall_s: float = 10.0) -> None:
    """Wait until ``fake`` has counted ``expected`` relay cells; RuntimeError if its count
    stops moving for ``stall_s`` before that (circuits closed on the way)."""
    seen, since = fake.total_relay_cells, time.monotonic()
    while fake.total_relay_cells < expected:
        if fake.total_relay_cells != seen:
            seen, since = fake.total_relay_cells, time.monotonic()
        elif time.monotonic() - since > stall_s:
            raise RuntimeError(f"the next hop got {seen} of {expected} cells")
        time.sleep(0.005)


def early_bookkeeping(ctx: AttackContext) -> AttackResult:
    """The relay's CPU per cell for circuits whose cells mix RELAY_EARLY (8 per circuit, the
    most tor allows) with cells recognized at the relay, against the same cells all RELAY;
    the runs alternate on one relay and the median of each is kept."""
    relay = ctx.relay("middle", (*DOS_OFF, *PRIVATE_EXTENDS))
    fake = FakeNextRelay(ctx.identity("sink"))
    ctx.stack.callback(fake.close)
    peer = open_peer(ctx.stack, relay.port, timeout=30)
    circuits_per_run, cells = ctx.scale(24, 48), 800
    passed = cells - cells // 10
    per_cell: dict[bool, list[float]] = {False: [], True: []}
    next_id = FIRST_CIRC_ID
    for mixed in [False, True] * ctx.scale(3, 5):
        circuits = []
        for _ in range(circuits_per_run):
            circuit = one_hop(peer, next_id)
            next_id += 1
            circuit.extend_to_fake(fake.port, fake.rsa_id)
            circuits.append(circuit)
        wire = b"".join(_early_cells(circuit, cells, mixed) for circuit in circuits)
        expected = fake.total_relay_cells + circuits_per_run * passed
        before = relay.cpu_s()
        peer.sock.sendall(wire)
        _wait_for_cells(fake, expected)
        used = relay.cpu_s() - before
        per_cell[mixed].append(used / (circuits_per_run * cells) * 1e6)
        peer.sock.sendall(b"".join(fixed_cell(circuit.circ_id, CellCommand.DESTROY, b"\x00")
                                   for circuit in circuits))
    plain, mixed_cost = statistics.median(per_cell[False]), statistics.median(per_cell[True])
    ratio = mixed_cost / plain
    figure = {"plain_us_per_cell": round(plain, 3), "mixed_us_per_cell": round(mixed_cost, 3),
              "ratio": round(ratio, 3), "cells_per_run": circuits_per_run * cells,
              "early_cells_forwarded": fake.early_cells}
    limit = {"ratio": 1.5}
    return AttackResult(
        ratio <= 1.5, figure, limit,
        config="--extend-allow-private-addresses 1 (the next hop, played here, is on "
               "loopback); DoS limits off (not about DoS)",
        note=f"{circuits_per_run} circuits x {cells} cells per run, every 10th recognized at "
             f"the relay; runs {[round(x, 3) for x in per_cell[False]]} plain, "
             f"{[round(x, 3) for x in per_cell[True]]} mixed (us per cell)")

