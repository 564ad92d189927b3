"""Flow control v1 in a relay network of real processes: authenticated SENDMEs both ways, and
what a relay does with a client that sends SENDMEs it cannot have earned.

* Our client (``relay.client``) moves several MiB each way through 3-hop circuits; every
  circuit SENDME both ways is version 1 and checked, and the counts match exactly on both ends.
* A hand-played client (``benchmarks.rawpeer.RawPeer`` with the reference crypto and SENDME bodies
  written out here, not with ``relay.sendme``) exchanges v1 SENDMEs with an exit byte for
  byte, then sends one SENDME more than it was owed: the exit closes the circuit.
* Our client refuses an exit's version-0 or forged SENDME (a relay process whose SENDME
  encoder is replaced, ``forging_relay.py``).
* A client that reads the exit's cells but never acknowledges them gets exactly the package
  window (1000 DATA cells) out of an endless source, then a blind version-0 SENDME closes the
  circuit; one that stops reading and sends a v1 SENDME with a wrong tag is closed too. Each
  time the reason is in the relay's log, the exit read at most a window's worth from its
  target, and an honest circuit through the same exit echoes every byte meanwhile.

Checks are on bytes and counts (DESTROY reasons, log lines, the relays' counters).
"""

from __future__ import annotations

import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from reliability_support import EchoJobs, EndlessSource, relay_stats
from support_loop import run_until

from benchmarks.rawpeer import RawPeer, fixed_cell
from examples.network import ChildProcess, LocalNetwork
from reactor import Reactor
from relay.cells import CellCommand, DestroyReason, RelayCommand
from relay.circuits import pack_data_cells, pack_relay, relay_body
from relay.client import Client
from relay.directory import RelayDescriptor
from relay.origin import ClientStream, OriginCircuit
from tor1.reference import OriginCrypto

pytestmark = pytest.mark.timeout(240)

OUR_HALF = 0x80000000
MIB = 1 << 20
WINDOW_CELLS = 1000
DATA_MAX = 498
READ_CHUNK = 65536  # the most one read callback of an exit's target hands over


@pytest.fixture(scope="module")
def network() -> Iterator[LocalNetwork]:
    net = LocalNetwork(3, threads=2, relay_args=["--log-level", "INFO"])
    net.start()
    try:
        yield net
    finally:
        net.stop()
        net.cleanup()


@pytest.fixture
def reactor() -> Iterator[Reactor]:
    r = Reactor()
    yield r
    r.close()


def exit_totals(net: LocalNetwork, index: int) -> dict[str, int]:
    """The exit counters of relay ``index`` (summed over its closed circuits)."""
    totals: dict[str, int] = relay_stats(net.relays[index])["exit"]
    return totals


def delta(after: dict[str, int], before: dict[str, int], key: str) -> int:
    return after.get(key, 0) - before.get(key, 0)


def wait_closed_circuits(net: LocalNetwork, index: int, closed: int) -> dict[str, Any]:
    """Poll relay ``index`` until it has closed ``closed`` circuits in all; its stats."""
    deadline = time.monotonic() + 20
    while True:
        stats = relay_stats(net.relays[index])
        if stats["circuits_closed"] >= closed or time.monotonic() > deadline:
            return stats
        time.sleep(0.05)


def relay_log(net: LocalNetwork, index: int) -> str:
    return net.relays[index].log_path.read_text(errors="replace")


# --------------------------------------------------------------------------- our client


class EchoRun:
    """Echo ``data`` through a circuit, then one more small echo (so the exit has handled every
    SENDME sent before it) before the caller closes the circuit. Loop thread only."""

    def __init__(self, client: Client, path: list[RelayDescriptor], echo: tuple[str, int],
                 data: bytes) -> None:
        self.data = data
        self.echo = echo
        self.received = bytearray()
        self.written = 0
        self.done = False
        self.failure: str | None = None
        self.stream: ClientStream | None = None
        self.circuit: OriginCircuit = client.build_circuit(
            path, on_open=self._open, on_close=lambda c, why: self._fail(f"closed: {why}"))

    def _open(self, circuit: OriginCircuit) -> None:
        self.stream = circuit.open_stream(*self.echo, on_connected=lambda s: self._more(),
                                          on_data=self._data,
                                          on_end=lambda s, why: self._fail(f"ended: {why}"))

    def _more(self) -> None:
        assert self.stream is not None
        while self.written < len(self.data) and self.written - len(self.received) < 256 * 1024:
            end = min(self.written + 32 * 1024, len(self.data))
            self.stream.write(self.data[self.written : end])
            self.written = end

    def _data(self, stream: ClientStream, data: bytes) -> None:
        self.received += data
        if len(self.received) == len(self.data):
            stream.write(b"last")  # after every SENDME this client has sent
        elif len(self.received) == len(self.data) + 4:
            self.done = True
        else:
            self._more()

    def _fail(self, why: str) -> None:
        if not self.done and self.failure is None:
            self.failure = why


def test_circuits_move_mebibytes_with_v1_sendmes_both_ways(network: LocalNetwork,
                                                          reactor: Reactor) -> None:
    d = network.descriptors
    paths = [[d[0], d[1], d[2]], [d[1], d[2], d[0]], [d[2], d[0], d[1]]]  # each relay exits
    before = [exit_totals(network, i) for i in range(3)]
    closed_before = [relay_stats(child)["circuits_closed"] for child in network.relays]
    log_before = [len(relay_log(network, i)) for i in range(3)]
    client = Client(reactor)
    runs = [EchoRun(client, path, network.echo_address, bytes([i + 1]) * (2 * MIB + 1234))
            for i, path in enumerate(paths)]
    assert run_until(reactor, lambda: all(r.done or r.failure for r in runs), 120.0)
    for run in runs:
        assert run.failure is None, run.failure
        assert bytes(run.received) == run.data + b"last"
        circuit = run.circuit
        # tor's rule: one SENDME per 100 DATA cells, each way, every one checked
        assert circuit.data_cells_sent >= (2 * MIB) // DATA_MAX
        assert circuit.sendmes_accepted == circuit.data_cells_sent // 100
        assert circuit.sendmes_sent == circuit.data_cells_received // 100
        assert circuit.package_window == WINDOW_CELLS - circuit.data_cells_sent % 100
    client.close()
    assert run_until(reactor, lambda: not client.circuits, 10.0)
    for exit_index, run in ((2, runs[0]), (0, runs[1]), (1, runs[2])):
        # every relay closed its 3 circuits (guard, middle, exit of one each)
        wait_closed_circuits(network, exit_index, closed_before[exit_index] + 3)
        after = exit_totals(network, exit_index)
        circuit = run.circuit
        assert delta(after, before[exit_index], "sendmes_accepted") == circuit.sendmes_sent
        assert delta(after, before[exit_index], "sendmes_sent") == circuit.sendmes_accepted
        assert (delta(after, before[exit_index], "sendme_tags_recorded")
                == circuit.data_cells_received // 100)
        assert delta(after, before[exit_index], "data_cells_out") == circuit.data_cells_received
    for index in range(3):  # no SENDME was refused anywhere
        added = relay_log(network, index)[log_before[index]:]
        assert "SENDME" not in added, added


# --------------------------------------------------------------------------- a hand-played client


class Destroyed(Exception):
    """The relay destroyed the circuit; ``reason`` is the DESTROY cell's byte."""

    def __init__(self, reason: int) -> None:
        super().__init__(f"DESTROY reason {reason}")
        self.reason = reason


def v1_body(tag: bytes) -> bytes:
    """tor's ``sendme_cell`` version 1, written out: version 1, data_len 20 (big-endian), tag."""
    assert len(tag) == 20
    return b"\x01\x00\x14" + tag


class OneHop(RawPeer):
    """A one-hop circuit to a relay, its exit, played by hand on a blocking socket: the
    reference crypto's tagged forms give the tags; the thread that made it."""

    def __init__(self, port: int, circ_id: int = OUR_HALF | 0x51) -> None:
        super().__init__(port, timeout=30)
        self.handshake()
        self.circ_id = circ_id
        self.crypto: OriginCrypto = self.create_fast(circ_id)
        self.data_out = 0
        self.data_in = 0
        self.recorded: deque[bytes] = deque()  # tags of our 100th, 200th, ... DATA cell

    def send(self, payloads: list[bytes]) -> None:
        cells, tags = self.crypto.encrypt_tagged_many(payloads, 0)
        self.recorded.extend(tags[i : i + 20] for i in range(0, len(tags), 20))
        self.sock.sendall(b"".join(fixed_cell(self.circ_id, CellCommand.RELAY, c)
                                   for c in cells))

    def send_data(self, stream_id: int, data: bytes) -> None:
        payloads = pack_data_cells(stream_id, data)
        for index in range(len(payloads)):
            self.data_out += 1
            if self.data_out % 100 == 0:  # mark it: any non-zero digest field does
                payloads[index] = payloads[index][:5] + b"mark" + payloads[index][9:]
        self.send(payloads)

    def recv(self) -> tuple[int, int, bytes, bytes]:
        """The next relay cell on the circuit: ``(command, stream_id, data, tag)``; raises
        :class:`Destroyed` on DESTROY."""
        while True:
            circ_id, command, payload = self.recv_cell()
            if circ_id != self.circ_id:
                continue
            if command == CellCommand.DESTROY:
                raise Destroyed(payload[0])
            assert command == CellCommand.RELAY, command
            ((hop, plain),), tag = self.crypto.decrypt_tagged_many([payload])
            assert hop == 0
            command, stream_id, data = relay_body(plain)
            if command == RelayCommand.DATA:
                self.data_in += 1
            return command, stream_id, data, tag

    def begin(self, stream_id: int, target: tuple[str, int]) -> None:
        self.send([pack_relay(RelayCommand.BEGIN, stream_id,
                              f"{target[0]}:{target[1]}".encode() + b"\0")])
        command, got_stream, _, _ = self.recv()
        assert (command, got_stream) == (RelayCommand.CONNECTED, stream_id)

    def destroy_reason(self) -> int:
        """Read (and drop) cells until the relay's DESTROY; its reason."""
        try:
            while True:
                self.recv()
        except Destroyed as destroyed:
            return destroyed.reason


def in_thread(reactor: Reactor, work: Callable[[], Any], also: Callable[[], bool] = lambda: True,
              timeout: float = 120.0) -> Any:
    """Run ``work`` on a thread while the reactor runs (until both it and ``also`` are done);
    its result, or its exception re-raised here."""
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append(("ok", work()))
        except BaseException as exc:  # re-raised on the test's thread
            outcome.append(("error", exc))

    thread = threading.Thread(target=run, name="hand-played-client")
    thread.start()
    assert run_until(reactor, lambda: bool(outcome) and also(), timeout)
    thread.join(10)
    kind, value = outcome[0]
    if kind == "error":
        raise value
    return value


def test_v1_exchange_with_an_exit_byte_for_byte_then_an_extra_sendme(
        network: LocalNetwork) -> None:
    """Upload 250 DATA cells to the echo service and read the echo: the exit's SENDMEs carry
    exactly the tags this client recorded (cells 100 and 200), its own carry the tags of the
    exit's 100th, 200th ... cells and keep the circuit alive; one more is unexpected."""
    peer = OneHop(network.descriptors[1].port)
    try:
        peer.begin(1, network.echo_address)
        upload = bytes(range(256)) * 487  # 124672 bytes: 250 full DATA cells + 172 bytes
        peer.send_data(1, upload)
        expected_tags = list(peer.recorded)
        assert peer.data_out == 251 and len(expected_tags) == 2
        echoed = bytearray()
        exit_sendmes: list[bytes] = []
        deliver, stream_deliver = WINDOW_CELLS, 500
        while len(echoed) < len(upload) or len(exit_sendmes) < 2:
            command, stream_id, data, tag = peer.recv()
            if command == RelayCommand.SENDME and stream_id == 0:
                exit_sendmes.append(data)
            elif command == RelayCommand.DATA:
                echoed += data
                deliver -= 1
                if deliver <= 900:  # tor's rule: acknowledge the cell that took us to 900
                    deliver += 100
                    peer.send([pack_relay(RelayCommand.SENDME, 0, v1_body(tag))])
                stream_deliver -= 1
                if stream_deliver <= 450:
                    stream_deliver += 50
                    peer.send([pack_relay(RelayCommand.SENDME, 1)])
        assert bytes(echoed) == upload
        assert exit_sendmes == [v1_body(t) for t in expected_tags]
        assert peer.data_in >= 251
        # Every tag the exit kept has been acknowledged. One more SENDME is unexpected.
        peer.send([pack_relay(RelayCommand.SENDME, 0, v1_body(bytes(20)))])
        assert peer.destroy_reason() == DestroyReason.PROTOCOL
    finally:
        peer.close()
    assert "circuit unexpected SENDME: no DATA cell tag is waiting" in relay_log(network, 1)


def test_a_client_that_acknowledges_nothing_gets_one_window_then_a_blind_sendme_closes_it(
        network: LocalNetwork, reactor: Reactor) -> None:
    """The sniper attack's first half: the client reads (so its link never backs up) and keeps
    the stream window open with stream SENDMEs (unauthenticated, as in tor), but sends no
    circuit SENDME: the exit packages exactly 1000 DATA cells from an endless source and stops.
    A blind version-0 SENDME then closes the circuit; an honest circuit through the same exit
    echoes every byte meanwhile."""
    source = EndlessSource()
    exit_index = 2
    d = network.descriptors
    before = exit_totals(network, exit_index)
    closed_before = relay_stats(network.relays[exit_index])["circuits_closed"]
    jobs = EchoJobs(reactor, network.echo_address)
    honest = jobs.add("honest", [d[0], d[1], d[exit_index]], memoryview(bytes(range(256)) * 4096))

    def hostile() -> int:
        peer = OneHop(d[exit_index].port, OUR_HALF | 0x52)
        try:
            peer.begin(1, source.address)
            stream_deliver = 500
            while peer.data_in < WINDOW_CELLS:
                command, stream_id, _, _ = peer.recv()
                if command == RelayCommand.DATA:
                    stream_deliver -= 1
                    if stream_deliver <= 450:
                        stream_deliver += 50
                        peer.send([pack_relay(RelayCommand.SENDME, stream_id)])
            time.sleep(1.0)  # the exit has nothing more to send: the window is shut
            peer.send([pack_relay(RelayCommand.SENDME, 0)])  # blind, version 0
            reason = peer.destroy_reason()
            assert peer.data_in == WINDOW_CELLS  # nothing came after the window closed
            return reason
        finally:
            peer.close()

    try:
        reason = in_thread(reactor, hostile, also=jobs.all_finished)
        assert reason == DestroyReason.PROTOCOL
        assert honest.intact, honest.failure
        assert honest.circuit is not None
        honest_cells = honest.circuit.data_cells_received
        jobs.close()
        wait_closed_circuits(network, exit_index, closed_before + 2)
        after = exit_totals(network, exit_index)
        hostile_cells = delta(after, before, "data_cells_out") - honest_cells
        hostile_read = delta(after, before, "bytes_from_targets") - len(honest.data)
        assert hostile_cells == WINDOW_CELLS
        # read from the source: what the 1000 cells carried, at most one read more
        assert 0 < hostile_read <= WINDOW_CELLS * DATA_MAX + READ_CHUNK
    finally:
        source.close()
    log = relay_log(network, exit_index)
    assert "protocol violation: circuit SENDME version 0 refused (version 1 required)" in log


def test_a_non_reader_with_a_forged_v1_sendme_is_closed(network: LocalNetwork,
                                                          reactor: Reactor) -> None:
    """The client reads 100 DATA cells, stops reading, and sends a v1 SENDME whose tag is the
    right one with one bit flipped: the exit closes the circuit; it read no more than the
    windows allow from its endless source; an honest circuit through it is unaffected."""
    source = EndlessSource()
    exit_index = 0
    d = network.descriptors
    before = exit_totals(network, exit_index)
    closed_before = relay_stats(network.relays[exit_index])["circuits_closed"]
    jobs = EchoJobs(reactor, network.echo_address)
    honest = jobs.add("honest", [d[1], d[2], d[exit_index]], memoryview(bytes(range(256)) * 4096))

    def hostile() -> int:
        peer = OneHop(d[exit_index].port, OUR_HALF | 0x53)
        try:
            peer.begin(1, source.address)
            tag = b""
            while peer.data_in < 100:
                _, _, _, tag = peer.recv()
            forged = bytes([tag[0] ^ 0x01]) + tag[1:]
            peer.send([pack_relay(RelayCommand.SENDME, 0, v1_body(forged))])
            time.sleep(1.0)  # not reading: whatever the exit sends waits in the buffers
            return peer.destroy_reason()
        finally:
            peer.close()

    try:
        reason = in_thread(reactor, hostile, also=jobs.all_finished)
        assert reason == DestroyReason.PROTOCOL
        assert honest.intact, honest.failure
        assert honest.circuit is not None
        honest_cells = honest.circuit.data_cells_received
        jobs.close()
        wait_closed_circuits(network, exit_index, closed_before + 2)
        after = exit_totals(network, exit_index)
        hostile_cells = delta(after, before, "data_cells_out") - honest_cells
        hostile_read = delta(after, before, "bytes_from_targets") - len(honest.data)
        # the stream window (500, no stream SENDME either) is the tighter bound here
        assert 100 <= hostile_cells <= 500
        assert hostile_read <= 500 * DATA_MAX + READ_CHUNK
    finally:
        source.close()
    log = relay_log(network, exit_index)
    assert "circuit SENDME tag does not match the DATA cell it acknowledges" in log


# --------------------------------------------------------------------------- an exit that forges

FORGING_RELAY = Path(__file__).with_name("forging_relay.py")


@pytest.mark.parametrize(("mode", "why"), [
    ("v0", "circuit SENDME version 0 refused (version 1 required)"),
    ("forged", "circuit SENDME tag does not match the DATA cell it acknowledges"),
])
def test_our_client_refuses_an_exits_bad_sendme(network: LocalNetwork, reactor: Reactor,
                                                tmp_path: Path, mode: str, why: str) -> None:
    """Through an exit whose circuit SENDMEs are version 0, or version 1 with a wrong tag, our
    client closes the circuit at the first one (it uploads 100 DATA cells to get it), with the
    reason, and the DESTROY reaches the exit."""
    forging = ChildProcess(
        "forging", [sys.executable, str(FORGING_RELAY), "--sendme", mode, "--",
                    "--listen", "127.0.0.1:0", "--nickname", "forging",
                    "--data-dir", str(tmp_path / "forging"), "--log-level", "INFO",
                    "--testing-network", "--exit-policy", "accept 127.0.0.1:*, reject *:*"],
        tmp_path / "forging.log", env=network._env())
    try:
        exit_ = RelayDescriptor.from_json(forging.wait_ready(30)["descriptor"])
        client = Client(reactor)
        run = EchoRun(client, [network.descriptors[0], exit_], network.echo_address,
                      bytes(200 * DATA_MAX))
        assert run_until(reactor, lambda: run.done or run.failure is not None, 60.0)
        assert run.failure is not None and why in run.failure, run.failure
        circuit = run.circuit
        assert circuit.close_reason == why
        assert circuit.sendmes_accepted == 0 and circuit.data_cells_sent >= 100
        # The client's DESTROY reached the forging exit through the guard: it holds no
        # circuit any more.
        deadline = time.monotonic() + 10
        stats = relay_stats(forging)
        while stats["circuits_closed"] < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
            stats = relay_stats(forging)
        assert (stats["circuits_closed"], stats["circuits_open"]) == (1, 0)
        client.close()
    finally:
        forging.stop(10)
