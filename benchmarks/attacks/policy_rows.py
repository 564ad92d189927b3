"""The attacks whose outcome is a refusal: exits and extends to where tor does not go, endless
RELAY_EARLY and extends to itself, and a next hop's malformed CREATED2.

Each function starts its own relay processes (fresh state), runs a blocking client on this
thread and returns an :class:`AttackResult`; nothing here depends on timing, so these rows
hold or fail the same way on any machine.

Threads: main thread only.
"""

from __future__ import annotations

import os
import struct
import time

from benchmarks.attacks.circuit import (
    FIRST_CIRC_ID,
    Circuit,
    Destroyed,
    one_hop,
    open_peer,
    specifiers,
)
from benchmarks.attacks.harness import DOS_OFF, PRIVATE_EXTENDS, AttackContext, AttackResult
from benchmarks.attacks.services import (
    FakeNextRelay,
    closed_port,
    good_created2,
    secret_service,
    silent_port,
)
from relay.cells import CellCommand, DestroyReason, RelayCommand
from relay.circuits import END_REASON_CONNECTREFUSED, END_REASON_EXITPOLICY
from relay.handshakes import NTOR_ONIONSKIN_LEN, NtorClient
from relay.relaylimits import MAX_RELAY_EARLY_CELLS_PER_CIRCUIT
from tor1 import CELL_PAYLOAD_LEN

__all__ = ["bad_created2", "exit_private", "extend_policy", "relay_early_loop"]

_REFUSALS = frozenset({END_REASON_EXITPOLICY, END_REASON_CONNECTREFUSED})
_SECRET_WAIT_S = 2.0


def _begin_each(ctx: AttackContext, port: int, targets: list[str]) -> list[tuple[str, int]]:
    """One circuit, a BEGIN per target in turn: ``(answer, END reason or bytes of DATA read)``
    per target, answer ``"END"`` or ``"CONNECTED"`` (then the DATA read within 2 s)."""
    peer = open_peer(ctx.stack, port)
    circuit = one_hop(peer, FIRST_CIRC_ID)
    answers: list[tuple[str, int]] = []
    for stream_id, target in enumerate(targets, start=1):
        circuit.send(RelayCommand.BEGIN, stream_id, target.encode() + b"\0")
        while True:
            _, command, got_id, data = circuit.next_relay()
            if got_id != stream_id:
                continue
            if command == RelayCommand.END:
                answers.append(("END", data[0] if data else 0))
                break
            if command == RelayCommand.CONNECTED:
                answers.append(("CONNECTED", _read_stream(circuit, stream_id)))
                circuit.send(RelayCommand.END, stream_id, bytes((6,)))
                break
    return answers


def _read_stream(circuit: Circuit, stream_id: int) -> int:
    """Bytes of DATA on ``stream_id`` within a couple of seconds (what leaked)."""
    total = 0
    circuit.peer.sock.settimeout(0.2)
    deadline = time.monotonic() + _SECRET_WAIT_S
    try:
        while time.monotonic() < deadline:
            try:
                _, command, got_id, data = circuit.next_relay()
            except TimeoutError:
                continue
            if got_id == stream_id and command == RelayCommand.DATA:
                total += len(data)
            elif got_id == stream_id and command == RelayCommand.END:
                break
    finally:
        circuit.peer.sock.settimeout(10)
    return total


def exit_private(ctx: AttackContext) -> AttackResult:
    """BEGINs through an exit that accepts everything (``ExitPolicy accept *:*`` with tor's
    ``ExitPolicyRejectPrivate 1``) to loopback services, the relay's own ORPort and private
    forms of them; then the same through a relay without an exit policy."""
    exit_relay = ctx.relay("exitall", ("--exit-policy", "accept *:*", *DOS_OFF))
    non_exit = ctx.relay("nonexit", DOS_OFF)
    services = [secret_service(host) for host in ("127.0.0.1", "127.0.0.2", "::1")]
    for service in services:
        ctx.stack.callback(service.close)
    p4, p42, p6 = (service.port for service in services)
    targets = [f"127.0.0.1:{p4}", f"127.0.0.2:{p42}", f"[::1]:{p6}",
               f"[::ffff:127.0.0.1]:{p4}", f"0.0.0.0:{p4}", f"localhost:{p4}",
               f"127.0.0.1:{exit_relay.port}", f"127.0.0.1:{non_exit.port}"]
    answers = _begin_each(ctx, exit_relay.port, targets)
    plain = _begin_each(ctx, non_exit.port, [f"127.0.0.1:{p4}", f"[::1]:{p6}"])
    loops = exit_relay.stats()["links_accepted"] - 1 + non_exit.stats()["links_accepted"] - 1
    reached = sum(kind == "CONNECTED" for kind, _ in answers + plain)
    refused = sum(kind == "END" and value in _REFUSALS for kind, value in answers)
    plain_refused = sum(kind == "END" and value == END_REASON_EXITPOLICY for kind, value in plain)
    figure = {
        "targets": len(targets),
        "refused": refused,
        "reached": reached,
        "secret_connections": sum(service.accepted for service in services),
        "secret_bytes_read": sum(value for kind, value in answers + plain if kind == "CONNECTED"),
        "orport_loop_links": loops,
        "non_exit_refused": plain_refused,
    }
    limit = {"refused": len(targets), "reached": 0, "secret_connections": 0,
             "secret_bytes_read": 0, "orport_loop_links": 0, "non_exit_refused": len(plain)}
    held = all(figure[key] == value for key, value in limit.items())
    detail = ", ".join(f"{target} {kind} {value}" for target, (kind, value)
                       in zip(targets, answers, strict=True))
    return AttackResult(held, figure, limit,
                        config="--exit-policy 'accept *:*' (ExitPolicyRejectPrivate 1, tor's "
                               "default); a second relay without --exit-policy; DoS limits "
                               "off (not about DoS)",
                        note=f"answers: {detail}")


def extend_policy(ctx: AttackContext) -> AttackResult:
    """EXTEND2 to loopback addresses, the relay itself, a closed port, a silent open port,
    [::1], without an identity: with tor's default (ExtendAllowPrivateAddresses 0) and, to
    check the self and identity rules on their own, with private addresses allowed."""
    default = ctx.relay("extdefault", DOS_OFF)
    private = ctx.relay("extprivate", (*DOS_OFF, *PRIVATE_EXTENDS))
    silent = [silent_port(host) for host in ("127.0.0.1", "127.0.0.2", "::1")]
    for service in silent:
        ctx.stack.callback(service.close)
    s4, s42, s6 = (service.port for service in silent)
    closed = closed_port()
    stranger = os.urandom(20)
    protocol, failed = int(DestroyReason.PROTOCOL), int(DestroyReason.CONNECTFAILED)
    cases = {
        default: [
            ("itself", "127.0.0.1", default.port, default.identity, {protocol, failed}),
            ("closed port", "127.0.0.1", closed, stranger, {protocol}),
            ("silent open port", "127.0.0.1", s4, stranger, {protocol}),
            ("127.0.0.2", "127.0.0.2", s42, stranger, {protocol}),
            ("[::1]", "::1", s6, stranger, {protocol, failed}),
            ("no identity", "127.0.0.1", s4, None, {protocol}),
            ("all-zero identity", "127.0.0.1", s4, bytes(20), {protocol}),
        ],
        private: [
            ("itself", "127.0.0.1", private.port, private.identity, {failed}),
            ("own ORPort, other identity", "127.0.0.1", private.port, stranger, {failed}),
            ("no identity", "127.0.0.1", s4, None, {protocol}),
            ("all-zero identity", "127.0.0.1", s4, bytes(20), {protocol}),
            ("[::1] (no IPv6 ORPort)", "::1", s6, stranger, {failed}),
        ],
    }
    outcomes: list[str] = []
    refused = total = 0
    for relay, relay_cases in cases.items():
        peer = open_peer(ctx.stack, relay.port)
        for index, (label, host, port, identity, reasons) in enumerate(relay_cases):
            total += 1
            circuit = one_hop(peer, FIRST_CIRC_ID + index)
            skin = NtorClient(identity or stranger, relay.onion_key).onionskin
            try:
                circuit.try_extend(specifiers(host, port, identity), skin)
                outcomes.append(f"{relay.name} {label}: EXTENDED2")
            except Destroyed as exc:
                refused += exc.reason in reasons
                outcomes.append(f"{relay.name} {label}: DESTROY {exc.reason}")
            except TimeoutError:
                outcomes.append(f"{relay.name} {label}: no answer in 10 s")
    dials = default.stats()["links_opened"] + private.stats()["links_opened"]
    figure = {"extends": total, "refused": refused, "relay_dials": dials,
              "silent_port_connections": sum(service.accepted for service in silent)}
    limit = {"refused": total, "relay_dials": 0, "silent_port_connections": 0}
    held = all(figure[key] == value for key, value in limit.items())
    return AttackResult(held, figure, limit,
                        config="tor's defaults (ExtendAllowPrivateAddresses 0), and a relay with "
                               "--extend-allow-private-addresses 1 for the self/identity rules; "
                               "DoS limits off (not about DoS)",
                        note="; ".join(outcomes))


def relay_early_loop(ctx: AttackContext) -> AttackResult:
    """Extends to itself; RELAY_EARLY cells on one circuit until the relay objects (each
    followed by a BEGIN that the relay answers while the circuit lives); the longest circuit
    through a ring of three relays (tor refuses only extends to the previous hop or itself,
    so the RELAY_EARLY budget is what bounds it)."""
    options = (*DOS_OFF, *PRIVATE_EXTENDS)
    first = ctx.relay("ring0", options)
    peer = open_peer(ctx.stack, first.port)
    self_refused = 0
    for index, identity in enumerate((first.identity, os.urandom(20))):
        circuit = one_hop(peer, FIRST_CIRC_ID + index)
        skin = NtorClient(identity, first.onion_key).onionskin
        try:
            circuit.try_extend(specifiers("127.0.0.1", first.port, identity), skin)
        except Destroyed as exc:
            self_refused += exc.reason == DestroyReason.CONNECTFAILED
    self_dials = first.stats()["links_opened"]

    most = ctx.scale(32, 250)
    circuit = one_hop(peer, FIRST_CIRC_ID + 2)
    accepted = 0
    for stream_id in range(1, most + 1):
        circuit.send(RelayCommand.DROP, early=True)
        circuit.send(RelayCommand.BEGIN, stream_id, b"127.0.0.1:1\0")
        try:
            while circuit.next_relay()[2] != stream_id:
                pass
        except Destroyed:
            break
        accepted += 1

    ring = [ctx.relay("ring1", options), ctx.relay("ring2", options), first]
    longest = one_hop(peer, FIRST_CIRC_ID + 3)
    started = time.perf_counter()
    for index in range(ctx.scale(24, 250) - 1):
        nxt = ring[index % len(ring)]
        try:
            longest.extend_to_relay("127.0.0.1", nxt.port, nxt.identity, nxt.onion_key)
        except Destroyed:
            break
    seconds = time.perf_counter() - started
    figure = {"relay_early_accepted": accepted, "longest_circuit_hops": longest.hops,
              "self_extends_refused": self_refused, "self_extend_dials": self_dials,
              "build_s": round(seconds, 3)}
    most_hops = MAX_RELAY_EARLY_CELLS_PER_CIRCUIT + 1  # CREATE_FAST, then one EXTEND2 per cell
    limit = {"relay_early_accepted": MAX_RELAY_EARLY_CELLS_PER_CIRCUIT,
             "longest_circuit_hops": most_hops, "self_extends_refused": 2,
             "self_extend_dials": 0}
    held = (accepted <= MAX_RELAY_EARLY_CELLS_PER_CIRCUIT and longest.hops <= most_hops
            and self_refused == 2 and self_dials == 0)
    return AttackResult(held, figure, limit,
                        config="--extend-allow-private-addresses 1 (so that the self rule, not "
                               "the private-address rule, refuses); three relays for the ring; "
                               "DoS limits off (not about DoS)",
                        note=f"tried up to {most} RELAY_EARLY cells and "
                             f"{ctx.scale(24, 250)} hops")


def _bad_created2(hlen: int) -> bytes:
    """A CREATED2 payload whose HLEN is ``hlen`` (HDATA zero bytes)."""
    return struct.pack(">H", hlen) + bytes(hlen)


def bad_created2(ctx: AttackContext) -> AttackResult:
    """A next hop answers a good CREATED2 for one circuit, then CREATED2s with HLEN 497 and
    507 (an EXTENDED2 holds at most 496) for two more on the same link: only those close."""
    middle = ctx.relay("mid", (*DOS_OFF, *PRIVATE_EXTENDS))
    bad_lengths = (497, 507)
    fake = FakeNextRelay(ctx.identity("next"), created2=lambda index: (
        good_created2(index) if index == 0 else _bad_created2(bad_lengths[index - 1])))
    ctx.stack.callback(fake.close)
    peer = open_peer(ctx.stack, middle.port)
    good = one_hop(peer, FIRST_CIRC_ID)
    good.extend_to_fake(fake.port, fake.rsa_id)
    destroyed: list[int] = []
    for index, _ in enumerate(bad_lengths, start=1):
        circuit = one_hop(peer, FIRST_CIRC_ID + index)
        try:
            circuit.try_extend(specifiers("127.0.0.1", fake.port, fake.rsa_id),
                               os.urandom(NTOR_ONIONSKIN_LEN))
        except Destroyed as exc:
            destroyed.append(exc.reason)
    # The first circuit still carries cells both ways over the same two links.
    good.send(RelayCommand.DATA, 1, b"still here?")
    deadline = time.monotonic() + 10
    while not fake.relay_cells[fake.create_ids[0]] and time.monotonic() < deadline:
        time.sleep(0.01)
    forward = fake.relay_cells[fake.create_ids[0]]
    fake.send(fake.create_ids[0], CellCommand.RELAY, os.urandom(CELL_PAYLOAD_LEN))
    backward = 0
    try:
        command, _ = good.next_cell()
        backward = int(command == CellCommand.RELAY)
    except (TimeoutError, EOFError):
        pass
    figure = {"bad_circuits_destroyed": len(destroyed), "other_circuit_cells_forward": forward,
              "other_circuit_cells_backward": backward, "next_hop_links": fake.links,
              "next_hop_links_closed": fake.links_ended}
    limit = {"bad_circuits_destroyed": len(bad_lengths), "other_circuit_cells_forward": 1,
             "other_circuit_cells_backward": 1, "next_hop_links": 1, "next_hop_links_closed": 0}
    held = all(figure[key] == value for key, value in limit.items())
    return AttackResult(held, figure, limit,
                        config="--extend-allow-private-addresses 1 (the next hop is on "
                               "loopback); DoS limits off (not about DoS)",
                        note=f"DESTROY reasons of the bad circuits: {destroyed}")
