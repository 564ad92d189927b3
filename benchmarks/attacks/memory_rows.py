"""The attacks on a relay's memory and descriptors: a next hop that stops reading, a sniper
that never reads, and a thousand streams that never connect.

The memory figure of each is the growth of the relay's RSS over the attack (sampled every
20 ms), held against MaxMemInQueues: tor's bound on what a relay may hold in queues, which
the relay reports in its counters. Without ``--max-mem-in-queues`` on the relay's command line
that is tor's default for this machine's RAM (the note of the row says which).

Threads: main thread only (the RSS sampler and the services run their own threads).
"""

from __future__ import annotations

import os
import time
from collections import Counter
from dataclasses import dataclass, field

from benchmarks.attacks.circuit import FIRST_CIRC_ID, Circuit, one_hop, open_peer
from benchmarks.attacks.harness import (
    DOS_OFF,
    MIB,
    PRIVATE_EXTENDS,
    RSS_BASELINE,
    SMALL_MAX_MEM_IN_QUEUES,
    AttackContext,
    AttackResult,
    RssPeak,
)
from benchmarks.attacks.services import FakeNextRelay, NeverAccepting, endless_source
from benchmarks.rawpeer import CellPump, RawPeer
from relay.cells import RELAY_HEADER, CellCommand, DestroyReason, RelayCommand
from relay.circuits import (
    CIRCWINDOW_INCREMENT,
    CIRCWINDOW_START,
    END_REASON_RESOURCELIMIT,
    pack_relay,
    relay_body,
    wire_cells,
)
from relay.exit import EARLY_CHUNK_OVERHEAD
from tor1 import CELL_PAYLOAD_LEN, RELAY_DATA_MAX

__all__ = ["next_hop_queue", "sniper", "streams_fds"]

_LOOPBACK_EXIT = ("--exit-policy", "accept 127.0.0.1:*, reject *:*",
                  "--exit-policy-reject-private", "0")
_READ_CHUNK = 65536  # the most one read of an exit's target hands over
_FD_LIMIT = 1024  # streams_fds: a common default of ulimit -n


def next_hop_queue(ctx: AttackContext) -> AttackResult:
    """Circuits extended to a next relay (played here) that stops reading, then junk cells
    pushed on all of them as fast as the relay takes them, until every circuit is destroyed
    or the budget is spent."""
    relay = ctx.relay("middle", (*DOS_OFF, *PRIVATE_EXTENDS, *ctx.memory_options()))
    fake = FakeNextRelay(ctx.identity("stalled"), rcvbuf=4096)
    ctx.stack.callback(fake.close)
    peer = open_peer(ctx.stack, relay.port, timeout=30)
    count = ctx.scale(2, 8)
    circuits = [one_hop(peer, FIRST_CIRC_ID + index) for index in range(count)]
    for circuit in circuits:
        circuit.extend_to_fake(fake.port, fake.rsa_id)
    fake.stall()
    junk = os.urandom(CELL_PAYLOAD_LEN * 64)
    blocks = {c.circ_id: wire_cells(c.circ_id, CellCommand.RELAY, junk) for c in circuits}
    destroyed: dict[int, int] = {}

    def on_cell(circ_id: int, command: int, payload: bytes) -> None:
        if command == CellCommand.DESTROY and circ_id in blocks and circ_id not in destroyed:
            destroyed[circ_id] = payload[0]

    pump = CellPump(peer, on_cell)
    budget = ctx.scale(64, 512) * MIB
    queued = 0
    started = time.perf_counter()
    deadline = time.monotonic() + ctx.scale(8.0, 20.0)
    with RssPeak(relay.pid) as rss:
        while time.monotonic() < deadline and len(destroyed) < count and queued < budget:
            for circ_id, block in blocks.items():
                if circ_id not in destroyed and pump.unsent < 2 * MIB:
                    pump.queue(block)
                    queued += len(block)
            pump.run(lambda: pump.unsent < MIB or len(destroyed) == count,
                     min(deadline, time.monotonic() + 0.5))
        seconds = time.perf_counter() - started
        pump.run(lambda: False, time.monotonic() + 0.5)  # answers in flight; RSS settles
    stats = relay.stats()
    limit_bytes = stats["max_mem_in_queues"]
    resource = sum(reason == DestroyReason.RESOURCELIMIT for reason in destroyed.values())
    figure = {
        "circuits": count,
        "closed_resourcelimit": resource,
        "pushed_mib": round(pump.sent_bytes / MIB, 1),
        "push_s": round(seconds, 2),
        "rss_baseline_mib": round(rss.baseline_mib, 1),
        "rss_growth_mib": round(rss.growth_mib, 1),
        "queued_bytes_after": stats["queued_bytes"],
    }
    limit = {"closed_resourcelimit": count,
             "rss_growth_mib": (limit_bytes + RSS_BASELINE) // MIB}
    held = resource == count and rss.growth_mib <= (limit_bytes + RSS_BASELINE) / MIB
    return AttackResult(
        held, figure, limit,
        config="--extend-allow-private-addresses 1 (the next hop is on loopback); DoS limits "
               f"off (not about DoS); {ctx.memory_note(limit_bytes)}",
        note=f"circuits closed for their queue (relay's count): "
             f"{stats['circuits_closed_queue']}, by the OOM handler: {stats['oom_closes']}")


def _drain_until_destroy(circuit: Circuit, timeout: float) -> tuple[int | None, int]:
    """Read the circuit's cells until its DESTROY (reason) or ``timeout``; relay cells
    counted."""
    relay_cells = 0
    circuit.peer.sock.settimeout(0.5)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            command, payload = circuit.next_cell()
        except TimeoutError:
            continue
        except (EOFError, OSError):
            return None, relay_cells
        if command == CellCommand.DESTROY:
            return payload[0], relay_cells
        relay_cells += command == CellCommand.RELAY
    return None, relay_cells


def sniper(ctx: AttackContext) -> AttackResult:
    """Through a guard and an exit, a download from an endless loopback source; the client
    stops reading at once and sends blind version-0 circuit SENDMEs (and stream SENDMEs) to
    the exit, ten a second, while the guard's RSS is sampled."""
    guard = ctx.relay("guard", (*DOS_OFF, *PRIVATE_EXTENDS, *ctx.memory_options()))
    exit_relay = ctx.relay("exit", (*_LOOPBACK_EXIT, *DOS_OFF))
    source = endless_source("127.0.0.1")
    ctx.stack.callback(source.close)
    peer = open_peer(ctx.stack, guard.port, timeout=10, rcvbuf=4096)
    circuit = one_hop(peer, FIRST_CIRC_ID)
    circuit.extend_to_relay("127.0.0.1", exit_relay.port, exit_relay.identity,
                            exit_relay.onion_key)
    circuit.send(RelayCommand.BEGIN, 1, f"127.0.0.1:{source.port}".encode() + b"\0")
    while True:
        _, command, stream_id, _ = circuit.next_relay()
        if stream_id == 1 and command in (RelayCommand.CONNECTED, RelayCommand.END):
            break
    if command != RelayCommand.CONNECTED:
        raise RuntimeError("the exit refused the stream to the source")
    seconds = ctx.scale(3.0, 16.0)
    sendmes = 0
    blocked = False
    with RssPeak(guard.pid) as rss:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            if not blocked:
                try:
                    circuit.send(RelayCommand.SENDME, 0, b"", hop=1)  # version 0: no tag
                    circuit.send(RelayCommand.SENDME, 1, b"", hop=1)
                    sendmes += 1
                except TimeoutError:
                    blocked = True  # the guard stopped reading us: nothing more to send
            time.sleep(0.1)
    reason, _ = _drain_until_destroy(circuit, 10.0)
    exit_stats = exit_relay.stats()
    from_source = exit_stats["exit"].get("bytes_from_targets", 0)
    guard_stats = guard.stats()
    limit_bytes = guard_stats["max_mem_in_queues"]
    window_kib = (CIRCWINDOW_START * RELAY_DATA_MAX + _READ_CHUNK) / 1024
    figure = {
        "seconds_not_reading": seconds,
        "v0_sendmes_sent": sendmes,
        "circuit_destroyed": int(reason is not None),
        "exit_read_from_source_kib": round(from_source / 1024, 1),
        "source_wrote_kib": round(source.bytes_sent / 1024, 1),
        "guard_rss_growth_mib": round(rss.growth_mib, 1),
    }
    limit = {"circuit_destroyed": 1, "exit_read_from_source_kib": round(window_kib, 1),
             "guard_rss_growth_mib": (limit_bytes + RSS_BASELINE) // MIB}
    held = (reason is not None and from_source / 1024 <= window_kib
            and rss.growth_mib <= (limit_bytes + RSS_BASELINE) / MIB)
    return AttackResult(
        held, figure, limit,
        config="guard: --extend-allow-private-addresses 1; exit: --exit-policy 'accept "
               "127.0.0.1:*, reject *:*' --exit-policy-reject-private 0 (the source is on "
               f"loopback); DoS limits off (not about DoS); {ctx.memory_note(limit_bytes)}",
        note=f"DESTROY reason seen by the client: {reason}; exit read limit: one package "
             "window (1000 cells of 498 bytes) plus one 64 KiB read")


def _honest_link(port: int) -> tuple[int, str]:
    """Can a new peer open a link and a circuit? ``(1, "")`` or ``(0, why not)``."""
    try:
        honest = RawPeer(port, timeout=5)
    except OSError as exc:
        return 0, f"connect: {exc}"
    try:
        honest.handshake()
        one_hop(honest, FIRST_CIRC_ID)
        return 1, ""
    except (OSError, EOFError, AssertionError) as exc:
        return 0, f"{type(exc).__name__}: {exc}"
    finally:
        honest.close()


def _with_stream(payload: bytes, stream_id: int) -> bytes:
    """A relay payload with its stream id field set to ``stream_id``. Any thread (pure)."""
    command, recognized, _, digest, length = RELAY_HEADER.unpack_from(payload)
    return (RELAY_HEADER.pack(command, recognized, stream_id, digest, length)
            + payload[RELAY_HEADER.size :])


@dataclass
class _StreamFlood:
    """What one circuit's streams got: answers by kind, END reasons, DATA cells sent."""

    sent: int = 0
    streams: int = 0
    connected: int = 0
    sendmes: int = 0
    destroyed: int = 0
    ends: Counter[int] = field(default_factory=Counter)
    push_s: float = 0.0


def _flood_streams(peer: RawPeer, circuit: Circuit, port: int, streams: int, data_cells: int,
                   deadline: float) -> _StreamFlood:
    """``streams`` BEGINs to 127.0.0.1:``port`` on ``circuit``, each followed by
    ``data_cells`` DATA cells before any CONNECTED. The client stays within tor's windows (at
    most half a circuit window of DATA not yet acknowledged by the exit's SENDMEs), so only
    what the exit does with the streams can stop it."""
    flood = _StreamFlood()

    def on_cell(circ_id: int, command: int, payload: bytes) -> None:
        if circ_id != circuit.circ_id:
            return
        if command == CellCommand.DESTROY:
            flood.destroyed += 1
        elif command == CellCommand.RELAY:
            relay_command, stream_id, data = relay_body(circuit.crypto.decrypt(payload)[1])
            flood.connected += relay_command == RelayCommand.CONNECTED
            flood.sendmes += relay_command == RelayCommand.SENDME and stream_id == 0
            if relay_command == RelayCommand.END:
                flood.ends[data[0] if data else 0] += 1

    def window_open() -> bool:
        return flood.sent - CIRCWINDOW_INCREMENT * flood.sendmes <= CIRCWINDOW_START // 2

    target = f"127.0.0.1:{port}".encode() + b"\0"
    data = [pack_relay(RelayCommand.DATA, 0, bytes(RELAY_DATA_MAX))] * data_cells
    pump = CellPump(peer, on_cell)
    started = time.perf_counter()
    for stream_id in range(1, streams + 1):
        if not pump.run(lambda: window_open() or flood.destroyed > 0, deadline) \
                or flood.destroyed:
            break
        payloads = [pack_relay(RelayCommand.BEGIN, stream_id, target)]
        payloads += [_with_stream(cell, stream_id) for cell in data]
        sealed = circuit.crypto.encrypt_many(payloads, 0)
        pump.queue(wire_cells(circuit.circ_id, CellCommand.RELAY, b"".join(sealed)))
        flood.sent += data_cells
        flood.streams += 1
    pump.run(lambda: pump.unsent == 0, deadline)
    flood.push_s = time.perf_counter() - started
    pump.run(lambda: False, time.monotonic() + 1.0)  # the relay settles; answers arrive
    return flood


@dataclass
class _ExitRun:
    """One exit under ``streams_fds``: its MaxMemInQueues, both floods, what the honest peer
    got, and the exit's own figures."""

    limit_bytes: int
    fds_flood: _StreamFlood
    relay_fds: int
    accepted: int
    why: str
    memory: _StreamFlood
    cpu_s: float
    oom_closes: int
    rss_baseline_mib: float
    rss_growth_mib: float
    alive: bool

    @property
    def within(self) -> bool:
        """RSS grew at most MaxMemInQueues plus the fixed baseline."""
        return self.rss_growth_mib <= (self.limit_bytes + RSS_BASELINE) / MIB


def _exit_under_streams(ctx: AttackContext, name: str, limit: int, data_cells: int,
                        deadline: float) -> _ExitRun:
    """One exit with MaxMemInQueues ``limit`` through both floods of :func:`streams_fds`."""
    fd_limit, streams = _FD_LIMIT, 1100
    relay = ctx.relay(name, (*_LOOPBACK_EXIT, *DOS_OFF, *ctx.memory_options(limit)),
                      nofile=fd_limit)
    hole = NeverAccepting()
    ctx.stack.callback(hole.close)
    peer = open_peer(ctx.stack, relay.port, timeout=30)
    with RssPeak(relay.pid) as rss:
        first = one_hop(peer, FIRST_CIRC_ID)
        fds_flood = _flood_streams(peer, first, hole.port, streams, 4, deadline)
        fds = relay.fds()
        accepted, why = _honest_link(relay.port)
        peer.sock.setblocking(True)
        peer.send_cell(first.circ_id, CellCommand.DESTROY, b"\x00")
        second = one_hop(peer, FIRST_CIRC_ID + 1)
        cpu_before = relay.cpu_s()
        memory = _flood_streams(peer, second, hole.port, streams, data_cells, deadline)
        cpu = relay.cpu_s() - cpu_before
    stats = relay.stats()
    return _ExitRun(stats["max_mem_in_queues"], fds_flood, fds, accepted, why, memory, cpu,
                    stats["oom_closes"], rss.baseline_mib, rss.growth_mib, relay.alive)


def streams_fds(ctx: AttackContext) -> AttackResult:
    """An exit run with a descriptor limit of 1024 (a common default), a loopback port that
    never accepts. Descriptors: 1,100 BEGINs on one circuit, 4 DATA cells each before any
    CONNECTED, then a new honest peer opens a link and a circuit, then the circuit is
    destroyed. Memory: on a second circuit, 1,100 BEGINs with 20 (quick) or 200 DATA cells
    each (optimistic data, which counts toward MaxMemInQueues). The full run repeats both on
    a second exit with twice the limit and twice the DATA, so that what RSS grows beyond the
    limit is seen not to scale with it."""
    deadline = time.monotonic() + ctx.scale(90.0, 400.0)
    data_cells = ctx.scale(20, 200)
    runs = [_exit_under_streams(ctx, "exit", SMALL_MAX_MEM_IN_QUEUES, data_cells, deadline)]
    if not ctx.quick:
        runs.append(_exit_under_streams(ctx, "exit2x", 2 * SMALL_MAX_MEM_IN_QUEUES,
                                        2 * data_cells, deadline))
    run = runs[0]
    figure = {
        "fd_limit": _FD_LIMIT,
        "streams_begun": run.fds_flood.streams,
        "streams_refused_resourcelimit": run.fds_flood.ends[END_REASON_RESOURCELIMIT],
        "streams_ended": sum(run.fds_flood.ends.values()),
        "relay_fds": run.relay_fds,
        "honest_link_accepted": run.accepted,
        "memory_streams_begun": run.memory.streams,
        "optimistic_data_mib": round(run.memory.sent * RELAY_DATA_MAX / MIB, 1),
        "memory_push_s": round(run.memory.push_s, 2),
        "memory_relay_cpu_s": round(run.cpu_s, 2),
        "oom_closes": run.oom_closes,
        "rss_growth_mib": round(run.rss_growth_mib, 1),
    }
    limit = {"honest_link_accepted": 1,
             "rss_growth_mib": (run.limit_bytes + RSS_BASELINE) // MIB}
    for other in runs[1:]:
        figure["rss_growth_mib_2x"] = round(other.rss_growth_mib, 1)
        figure["oom_closes_2x"] = other.oom_closes
        figure["memory_streams_begun_2x"] = other.memory.streams
        figure["optimistic_data_mib_2x"] = round(other.memory.sent * RELAY_DATA_MAX / MIB, 1)
        if other.memory.sent > run.memory.sent:
            figure["rss_per_early_chunk_b"] = round(
                (other.rss_growth_mib - run.rss_growth_mib) * MIB
                / (other.memory.sent - run.memory.sent))
            limit["rss_per_early_chunk_b"] = RELAY_DATA_MAX + EARLY_CHUNK_OVERHEAD
        limit["rss_growth_mib_2x"] = (other.limit_bytes + RSS_BASELINE) // MIB
    held = all(r.accepted == 1 and r.within and r.alive for r in runs)
    if "rss_per_early_chunk_b" in figure:  # the count keeps up with what a chunk costs
        held = held and figure["rss_per_early_chunk_b"] <= 1.02 * limit["rss_per_early_chunk_b"]
    beyond = ", ".join(f"{r.rss_growth_mib - r.limit_bytes / MIB:+.1f} MiB at "
                       f"{r.limit_bytes // MIB} MiB" for r in runs)
    return AttackResult(
        held, figure, limit,
        config=f"descriptor limit {_FD_LIMIT} (ulimit -n, soft and hard; ConnLimit 1000, "
               "tor's default); --exit-policy 'accept 127.0.0.1:*, reject *:*' "
               "--exit-policy-reject-private 0 (the target is on loopback); DoS limits off "
               f"(not about DoS); {ctx.memory_note(run.limit_bytes)}; RSS may grow the limit "
               f"plus a fixed {RSS_BASELINE // MIB} MiB",
        note=(f"honest peer: {run.why}; " if run.why else "")
        + f"END reasons on the descriptor circuit: {dict(run.fds_flood.ends)}; memory "
          f"circuit destroyed: {run.memory.destroyed}; relay alive: {run.alive}; RSS "
          f"baseline {run.rss_baseline_mib:.1f} MiB; RSS growth beyond the limit: {beyond}")
