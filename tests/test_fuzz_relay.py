"""Fuzzing a running relay (``relay.node.RelayNode``, real worker pool, real loopback TCP) with
hostile cell sequences from a stranger, including *correctly encrypted* relay cells so that the
fuzzed relay payloads reach the relay's exit and EXTEND2 code, not just the digest check.

What is checked, and why
------------------------
A relay in this test runs in-process on one reactor with its worker pool, next to an echo
service and a well-behaved client whose one-hop circuit streams through the relay's exit. A
stranger on a blocking socket (a thread) completes the link handshake and plays a fuzzed script:
CREATE_FAST on a few circuit ids (and again on ids in use), CREATE2 with hostile bodies, RELAY
and RELAY_EARLY cells whose *plaintext* is fuzzed (BEGIN to the echo service, to closed ports,
to non-loopback and nonsense targets; DATA, END, SENDME floods beyond the windows, EXTEND2 to a
closed port, to the echo service, to the relay itself, with random bodies; random commands and
length fields above 498) encrypted with the circuit's real keys, raw cells for unknown circuits,
unknown commands and variable-length cells, and DESTROY. Its script ends with a sentinel
CREATE_FAST: the answer proves the relay dispatched everything before it. For every script:

* **nothing unexpected reaches the loop**: no reactor callback error, no traceback logged
  except the link's documented protocol errors (``CellFormatError``);
* **a malformed input closes only what it belongs to**: a circuit the relay tore down was
  answered with DESTROY and a reason byte, and its close was logged with the reason; a link the
  relay closed was closed with a logged reason; the well-behaved client's circuit keeps
  streaming, every echoed byte intact;
* **nothing leaks**: once the stranger hangs up, the relay is back to the one healthy circuit,
  the pool has no cell in flight, and no exit stream of the stranger is left open.
"""

from __future__ import annotations

import logging
import random
import socket
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import event, given
from hypothesis import strategies as st
from reliability_support import LogRecorder, fuzz_settings, recording
from support_loop import run_until

from benchmarks.rawpeer import RawPeer
from reactor import Reactor, Stream, listen
from relay.cells import CellCommand, CellFormatError, RelayCommand
from relay.circuits import pack_relay
from relay.client import Client
from relay.config import RelayConfig
from relay.dos import DosConfig
from relay.handshakes import (
    HTYPE_NTOR,
    CreateFastClient,
    Extend2Body,
    LinkSpecifier,
    NtorClient,
    encode_create2,
)
from relay.identity.keys import RelayIdentity
from relay.node import RelayNode
from relay.origin import ClientStream, OriginCircuit
from tor1 import CELL_PAYLOAD_LEN
from tor1.reference import HopKeys, OriginCrypto, UnrecognizedCell

pytestmark = pytest.mark.timeout(300)

FIXED = 5 + CELL_PAYLOAD_LEN
SLOTS = 3
FIRST_ID = 0x80000001  # slot i starts on FIRST_ID + i; a re-created slot gets a fresh id
SENTINEL_ID = 0x80001000
SENTINEL_STREAM = 0xFFFE  # a stream id the scripts never use
CLOSED_PORT_HOLDER: list[int] = []


def closed_port() -> int:
    """A loopback port with nothing listening (bound, then released)."""
    if not CLOSED_PORT_HOLDER:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            CLOSED_PORT_HOLDER.append(sock.getsockname()[1])
    return CLOSED_PORT_HOLDER[0]


# --------------------------------------------------------------------------- the script


@dataclass(frozen=True)
class Target:
    """Where a fuzzed BEGIN / EXTEND2 points, resolved when the script runs."""

    kind: str  # "echo", "relay", "closed", "remote", "text"
    text: str = ""


@dataclass(frozen=True)
class Step:
    """One action of the stranger's script."""

    kind: str  # "create", "relay", "raw", "destroy", "create2"; "expect" in fixed scripts
    slot: int = 0
    command: int = 0
    stream_id: int = 0
    body: bytes = b""
    target: Target | None = None
    early: bool = False
    length: int | None = None  # overwrite the relay length field
    circ_id: int = 0


targets = st.one_of(
    st.sampled_from([Target("echo"), Target("relay"), Target("closed"), Target("remote")]),
    st.text(max_size=12).map(lambda t: Target("text", t)),
)
relay_commands = st.one_of(
    st.sampled_from([int(c) for c in RelayCommand]),
    st.integers(0, 255),
)


@st.composite
def relay_steps(draw: st.DrawFn) -> Step:
    command = draw(st.one_of(
        st.sampled_from([RelayCommand.BEGIN, RelayCommand.DATA, RelayCommand.DATA,
                         RelayCommand.SENDME, RelayCommand.END, RelayCommand.EXTEND2]),
        relay_commands,
    ))
    needs_target = command in (RelayCommand.BEGIN, RelayCommand.EXTEND2)
    return Step(
        "relay",
        slot=draw(st.integers(0, SLOTS - 1)),
        command=int(command),
        stream_id=draw(st.sampled_from([0, 1, 2, 0xFFFF])),
        body=draw(st.binary(max_size=60)),
        target=draw(targets) if needs_target and draw(st.integers(0, 4)) else None,
        early=draw(st.booleans()),
        length=draw(st.sampled_from([None, None, None, 0, 498, 499, 0xFFFF])),
    )


steps = st.one_of(
    st.builds(Step, st.just("create"), slot=st.integers(0, SLOTS - 1)),
    relay_steps(),
    relay_steps(),
    relay_steps(),
    relay_steps(),
    st.builds(Step, st.just("create2"), circ_id=st.sampled_from([0x80000100, 5]),
              body=st.binary(max_size=100)),
    st.builds(Step, st.just("destroy"), slot=st.integers(0, SLOTS - 1)),
)
raw_steps = st.builds(Step, st.just("raw"),
                      circ_id=st.sampled_from([0, 0x80000001, 0x80000200, 7]),
                      command=st.integers(0, 255), body=st.binary(max_size=40))
scripts = st.builds(
    lambda opening, middle, raw: opening + middle + raw,
    st.sampled_from([[], [Step("create", slot=0)],
                     [Step("create", slot=0), Step("create", slot=1)]]),
    st.lists(steps, min_size=1, max_size=12),
    st.lists(raw_steps, max_size=1),  # a raw cell may close the link: at the end, rarely
)


# --------------------------------------------------------------------------- the stranger


@dataclass
class StrangerReport:
    """What the stranger saw."""

    destroys: dict[int, int] = field(default_factory=dict)  # circ id -> reason byte
    created: set[int] = field(default_factory=set)
    link_closed_by_relay: bool = False
    sentinel_answered: bool = False
    circuits_drained: set[int] = field(default_factory=set)
    relay_commands: list[int] = field(default_factory=list)
    error: str | None = None


class Stranger:
    """A hostile Tor link initiator over a ``RawPeer`` (a blocking socket), run in a thread."""

    def __init__(self, port: int, relay_keys: RelayIdentity, relay_port: int,
                 echo_port: int) -> None:
        self.peer = RawPeer(port, timeout=15)
        self.peer.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.keys = relay_keys
        self.relay_port = relay_port
        self.echo_port = echo_port
        self.crypto: dict[int, OriginCrypto] = {}
        # The circuit id each slot uses now. Ids are never reused, so a late DESTROY or reply
        # can only belong to the circuit it names.
        self.slot_ids = [FIRST_ID + i for i in range(SLOTS)]
        self.next_id = FIRST_ID + SLOTS
        # Relay commands (and stream ids) received per circuit, whoever was waiting.
        self.seen: dict[int, set[tuple[int, int]]] = {}
        self.report = StrangerReport()

    # ------------------------------------------------------------------ wire

    def send_cell(self, circ_id: int, command: int, payload: bytes = b"") -> None:
        """A variable-length cell for VERSIONS and commands >= 128; otherwise a fixed cell,
        ``payload`` cut to 509 bytes."""
        if command == CellCommand.VERSIONS or command >= 128:
            self.peer.sock.sendall(struct.pack(">IBH", circ_id, command, len(payload)) + payload)
        else:
            self.peer.send_cell(circ_id, command, payload[:CELL_PAYLOAD_LEN])

    def recv_cell(self) -> tuple[int, int, bytes]:
        """The next cell, noted in the report (DESTROYs) and in ``seen`` (relay commands)."""
        circ_id, command, payload = self.peer.recv_cell()
        if command == CellCommand.DESTROY:
            self.report.destroys[circ_id] = payload[0]
            self.crypto.pop(circ_id, None)
        elif command == CellCommand.RELAY and circ_id in self.crypto:
            try:
                _, payload = self.crypto[circ_id].decrypt(payload)
            except UnrecognizedCell:
                self.report.error = f"the relay sent an unrecognizable cell on {circ_id:#x}"
                raise
            self.report.relay_commands.append(payload[0])
            self.seen.setdefault(circ_id, set()).add(
                (payload[0], int.from_bytes(payload[3:5], "big")))
        return circ_id, command, payload

    def wait_relay(self, circ_id: int, command: int, stream_id: int | None = None) -> None:
        """Read cells until ``command`` (on ``stream_id`` if given) has come back on
        ``circ_id``, or the circuit was destroyed."""
        def arrived() -> bool:
            return any(c == command and stream_id in (None, s)
                       for c, s in self.seen.get(circ_id, ()))
        while circ_id in self.crypto and not arrived():
            self.recv_cell()

    def wait_for(self, circ_id: int, command: int) -> bytes | None:
        """Read cells until ``command`` on ``circ_id`` (its payload) or a DESTROY of it."""
        while True:
            got_id, got_command, payload = self.recv_cell()
            if got_id != circ_id:
                continue
            if got_command == command:
                return payload
            if got_command == CellCommand.DESTROY:
                return None

    # ------------------------------------------------------------------ script

    def address(self, target: Target) -> tuple[str, int] | str:
        if target.kind == "echo":
            return "127.0.0.1", self.echo_port
        if target.kind == "relay":
            return "127.0.0.1", self.relay_port
        if target.kind == "closed":
            return "127.0.0.1", closed_port()
        if target.kind == "remote":
            return "192.0.2.1", 80  # TEST-NET-1: refused by the loopback-only exit policy
        return target.text

    def relay_body(self, step: Step) -> bytes:
        if step.target is None:
            return step.body
        where = self.address(step.target)
        if step.command == RelayCommand.BEGIN:
            text = where if isinstance(where, str) else f"{where[0]}:{where[1]}"
            return text.encode("utf-8", "replace")[:200] + b"\0"
        if isinstance(where, str):
            return step.body
        skin = NtorClient(self.keys.identity_digest, self.keys.ntor_onion_key).onionskin
        # The relay's own identity for itself (refused: extending to ourselves), a stranger's
        # for anything else (dialed, then found not to be a relay).
        identity = self.keys.identity_digest if step.target.kind == "relay" else bytes(
            range(20))
        return Extend2Body((LinkSpecifier.ipv4(*where), LinkSpecifier.legacy_id(identity)),
                           HTYPE_NTOR, skin).encode()

    def create_fast(self, circ_id: int) -> None:
        client = CreateFastClient()
        self.send_cell(circ_id, CellCommand.CREATE_FAST, client.onionskin)
        reply = self.wait_for(circ_id, CellCommand.CREATED_FAST)
        if reply is not None:
            self.report.created.add(circ_id)
            self.crypto[circ_id] = OriginCrypto([HopKeys.from_material(client.complete(reply))])

    def play(self, script: list[Step]) -> None:
        for step in script:
            circ_id = self.slot_ids[step.slot]
            if step.kind == "create":
                if circ_id in self.crypto:
                    self.send_cell(circ_id, CellCommand.CREATE_FAST, bytes(20))  # id in use
                    self.crypto.pop(circ_id)  # the relay must close it; we stop using it
                    self.fresh_id(step.slot)
                elif circ_id in self.report.created or circ_id in self.report.destroys:
                    self.create_fast(self.fresh_id(step.slot))
                else:
                    self.create_fast(circ_id)
            elif step.kind == "relay":
                payload = bytearray(pack_relay(step.command, step.stream_id,
                                               self.relay_body(step)[:498]))
                if step.length is not None:
                    struct.pack_into(">H", payload, 9, step.length)
                crypto = self.crypto.get(circ_id)
                cell = crypto.encrypt(bytes(payload), 0) if crypto else bytes(payload)
                command = CellCommand.RELAY_EARLY if step.early else CellCommand.RELAY
                self.send_cell(circ_id, command, cell)
            elif step.kind == "create2":
                self.send_cell(step.circ_id, CellCommand.CREATE2,
                               encode_create2(HTYPE_NTOR, step.body))
            elif step.kind == "raw":
                self.send_cell(step.circ_id, step.command, step.body)
            elif step.kind == "expect":  # read until this relay command comes back
                self.wait_relay(circ_id, step.command)
            elif step.kind == "destroy":
                self.send_cell(circ_id, CellCommand.DESTROY, b"\x03")
                self.crypto.pop(circ_id, None)
                self.fresh_id(step.slot)
        self.drain_circuits()
        self.create_fast(SENTINEL_ID)
        self.report.sentinel_answered = SENTINEL_ID in self.report.created

    def fresh_id(self, slot: int) -> int:
        """Move ``slot`` to a circuit id never used on this link."""
        self.slot_ids[slot] = self.next_id
        self.next_id += 1
        return self.next_id - 1

    def drain_circuits(self) -> None:
        """On every circuit still open, send a BEGIN the exit must refuse at once (no NUL) and
        wait for its END (or a DESTROY): then every relay cell sent before it on that circuit
        went through the pool and was handled."""
        live = list(self.crypto)
        for circ_id in live:
            payload = pack_relay(RelayCommand.BEGIN, SENTINEL_STREAM, b"not a target")
            self.send_cell(circ_id, CellCommand.RELAY, self.crypto[circ_id].encrypt(payload, 0))
        for circ_id in live:
            self.wait_relay(circ_id, RelayCommand.END, SENTINEL_STREAM)
            self.report.circuits_drained.add(circ_id)

    def run(self, script: list[Step]) -> None:
        """Thread body: handshake, script, sentinel, hang up."""
        try:
            self.peer.handshake()
            self.play(script)
        except EOFError:
            self.report.link_closed_by_relay = True
        except TimeoutError:
            self.report.error = "the relay stopped answering (socket timeout): a hang"
        except OSError:  # reset: the relay closed the link with our cells still unread
            self.report.link_closed_by_relay = True
        except Exception as exc:  # a reply the stranger could not make sense of
            self.report.error = f"{exc!r}"
        finally:
            self.peer.close()


# --------------------------------------------------------------------------- the relay


class RelayBench:
    """An in-process relay, an echo service, and a healthy client streaming through the relay."""

    def __init__(self, reactor: Reactor, log: LogRecorder, keys_dir: Path) -> None:
        self.reactor = reactor
        self.log = log
        self.keys = RelayIdentity.load_or_create(keys_dir, "fuzzed")
        # Hundreds of strangers, all from 127.0.0.1: tor's per-IP DoS limits would refuse them
        # (tests/test_relay_dos.py covers those); the fuzzing is about what each one sends.
        config = RelayConfig(nickname="fuzzed", exit_policy=("accept 127.0.0.1:*", "reject *:*"),
                             testing_network=True,
                             dos=DosConfig(connection_enabled=False,
                                           circuit_creation_enabled=False))
        self.node = RelayNode(reactor, self.keys, config, handshake_timeout=5.0)
        self.node.start()
        self.echo = listen(reactor, "127.0.0.1", 0, self._echo)
        self.client = Client(reactor, build_timeout=10.0)
        self.echoed = bytearray()
        self.sent = bytearray()
        self.stream: ClientStream | None = None
        self.circuit: OriginCircuit = self.client.build_circuit(
            [self.node.descriptor()], on_open=self._open)
        assert run_until(reactor, lambda: self.stream is not None and self.stream.connected)
        self.baseline_circuits = self.node.circuits_open
        assert self.baseline_circuits == 1

    def _echo(self, stream: Stream) -> None:
        stream.on_data = stream.write

    def _open(self, circuit: OriginCircuit) -> None:
        host, port = self.echo.address
        self.stream = circuit.open_stream(
            host, port, on_data=lambda s, data: self.echoed.extend(data))

    def check_healthy(self, rng: random.Random) -> None:
        """The healthy circuit still echoes a fresh chunk, every byte intact."""
        assert self.circuit.is_open, self.circuit.close_reason
        assert self.stream is not None and not self.stream.ended
        chunk = rng.randbytes(rng.randint(1, 6000))
        self.sent += chunk
        self.stream.write(chunk)
        total = len(self.sent)
        assert run_until(self.reactor, lambda: len(self.echoed) >= total)
        assert self.echoed == self.sent

    def check_no_leak(self) -> None:
        """Back to the healthy circuit alone, nothing in flight."""
        node = self.node
        assert run_until(self.reactor, lambda: node.circuits_open == self.baseline_circuits
                         and node.pool.in_flight == 0), node.stats()

    def check_logs(self) -> None:
        unexpected = [r for r in list(self.log.records)
                      if r.exc_info and not isinstance(r.exc_info[1], CellFormatError)]
        assert not unexpected, [r.getMessage() for r in unexpected]
        assert self.reactor.stats()["callback_errors"] == 0


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RelayBench]:
    with recording("reactor", "relay", "workers", level=logging.DEBUG) as recorder:
        reactor = Reactor()
        try:
            bench = RelayBench(reactor, recorder, tmp_path_factory.mktemp("fuzzed"))
            yield bench
            bench.node.close()
        finally:
            reactor.close()


def run_stranger(bench: RelayBench, script: list[Step]) -> StrangerReport:
    _, port = bench.node.address
    stranger = Stranger(port, bench.keys, port, bench.echo.address[1])
    thread = threading.Thread(target=stranger.run, args=(script,), name="stranger")
    thread.start()
    assert run_until(bench.reactor, lambda: not thread.is_alive(), 60.0)
    thread.join()
    return stranger.report


@fuzz_settings(150)
@given(script=scripts, seed=st.integers(0, 2**32 - 1))
def test_fuzzed_scripts_against_a_running_relay(
    bench: RelayBench, script: list[Step], seed: int
) -> None:
    bench.log.clear()
    closed_before = bench.node.circuits_closed
    report = run_stranger(bench, script)
    assert report.error is None, report
    bench.check_logs()
    debug = bench.log.messages(logging.DEBUG)
    if report.link_closed_by_relay:
        event("the relay closed the stranger's link")
        assert any("closing:" in m or "closed (" in m for m in debug), debug[-20:]
    else:
        assert report.sentinel_answered, report
        event("the link survived the script")
        if report.relay_commands:
            event("the stranger got relay cells back (the exit answered)")
    for circ_id, reason in report.destroys.items():
        assert 0 <= reason <= 12, (circ_id, reason)
    torn_down = [c for c in report.destroys if c in report.created]
    event(f"circuits the relay tore down: {min(len(torn_down), 3)}")
    assert bench.node.circuits_closed - closed_before >= len(torn_down)
    closes = [m for m in debug if " closed: " in m]
    assert len(closes) >= len(torn_down), closes
    bench.check_no_leak()
    bench.check_healthy(random.Random(seed))


def test_an_encrypted_begin_reaches_the_exit(bench: RelayBench) -> None:
    """The stranger's keys are real: a BEGIN to the echo service is answered with CONNECTED,
    then blind circuit SENDMEs (version 0: an empty body) are a protocol violation that
    DESTROYs the circuit, since flow control v1 is required (so the fuzz above reaches the
    exit's parser, not only the digest check)."""
    script = [Step("create", slot=0),
              Step("relay", slot=0, command=RelayCommand.BEGIN, stream_id=1,
                   target=Target("echo")),
              Step("expect", slot=0, command=RelayCommand.CONNECTED)]
    script += [Step("relay", slot=0, command=RelayCommand.SENDME, stream_id=0)] * 3
    report = run_stranger(bench, script)
    assert report.sentinel_answered
    assert FIRST_ID in report.created
    assert RelayCommand.CONNECTED in report.relay_commands
    assert report.destroys.get(FIRST_ID) is not None
    assert any("circuit SENDME version 0 refused" in m for m in bench.log.messages())
    bench.check_logs()
    bench.check_no_leak()
    bench.check_healthy(random.Random(1))


def test_links_to_unknown_payload_shapes_do_not_leak_outgoing_links(bench: RelayBench) -> None:
    """EXTEND2 to the echo service (not a Tor relay) and to a closed port: the circuits fail
    with DESTROY, and the links the relay opened for them end (TLS failure, refusal)."""
    node = bench.node
    links_before = open_links(node)  # the healthy client's, and relay links the fuzz left
    closes_before = dict(node.link_closes)
    opened_before = node.links_opened
    script = [Step("create", slot=0),
              Step("relay", slot=0, command=RelayCommand.EXTEND2, target=Target("closed"),
                   early=True),
              Step("create", slot=1),
              Step("relay", slot=1, command=RelayCommand.EXTEND2, target=Target("echo"),
                   early=True)]
    report = run_stranger(bench, script)
    assert report.sentinel_answered
    assert FIRST_ID in report.destroys  # the extend to a closed port failed at once
    bench.check_logs()
    bench.check_no_leak()
    assert node.links_opened == opened_before + 2
    # Every link of this script ends: the stranger's when it hangs up, the two the relay
    # opened toward non-relays at once (refused) or within their handshake timeout (5 s).
    assert run_until(bench.reactor, lambda: open_links(node) == links_before, 20.0), (
        node.stats())
    new_closes = {kind: n - closes_before.get(kind, 0) for kind, n in node.link_closes.items()}
    assert new_closes.get("connect-failed", 0) >= 1, new_closes
    # the echo service echoes our TLS ClientHello: not TLS (or, on plain links, not Tor)
    assert sum(new_closes.get(kind, 0) for kind in ("timeout", "not-tor", "tls-failed")) >= 1, (
        new_closes)
    bench.check_healthy(random.Random(2))


def open_links(node: RelayNode) -> int:
    """Links of the relay not yet closed, from its public counters."""
    return node.links_accepted + node.links_opened - sum(node.link_closes.values())
