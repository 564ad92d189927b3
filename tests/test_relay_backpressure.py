"""Back-pressure inside relays: tiny pool, circuit and link watermarks, and still every byte.

Three ``RelayNode``s, the echo service and the client share one reactor in this process (the
relays are the same code the relay processes run; here their counters can be read directly).
With high-water marks of a few cells, the pool and circuit signals pause and resume the links
many times during the transfer; nothing may be lost, reordered or left paused. A next hop that
stops reading makes the relay's write buffer toward it cross its high watermark: the relay
stops reading the client's link until the next hop reads again, and then every cell arrives.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
import socket
import threading
from collections.abc import Iterator

import pytest
from support_loop import run_until_met

from benchmarks.rawpeer import RawPeer
from examples.client import EchoTransfer
from examples.echo import EchoServer
from reactor import Reactor
from relay.cells import CellCommand, DestroyReason, RelayCommand
from relay.circuits import pack_relay, relay_body, wire_cells
from relay.config import RelayConfig
from relay.handshakes import HTYPE_NTOR, Extend2Body, LinkSpecifier, encode_created2
from relay.identity.keys import RelayIdentity
from relay.node import RelayNode
from relay.orcircuit import OrCircuit
from relay.relaylimits import CellQueueCaps
from tor1 import CELL_PAYLOAD_LEN


@pytest.fixture(scope="module")
def relay_keys(tmp_path_factory: pytest.TempPathFactory) -> list[RelayIdentity]:
    base = tmp_path_factory.mktemp("keys")
    return [RelayIdentity.load_or_create(base / f"r{i}", f"r{i}") for i in range(4)]


def config(nickname: str, threads: int = 2) -> RelayConfig:
    """An exit to the loopback echo service, as the demos run."""
    return RelayConfig(nickname=nickname, threads=threads,
                       exit_policy=("accept 127.0.0.1:*", "reject *:*"),
                       testing_network=True)


@pytest.fixture
def reactor() -> Iterator[Reactor]:
    with Reactor() as loop:
        yield loop


def run_until_closed(reactor: Reactor, nodes: list[RelayNode]) -> None:
    """Run the loop until the client's DESTROYs have torn down every relay circuit."""
    run_until_met(reactor, lambda: all(node.circuits_open == 0 for node in nodes), 30)


def run_transfer(reactor: Reactor, nodes: list[RelayNode], echo: EchoServer,
                 circuits: int, size: int) -> EchoTransfer:
    transfer = EchoTransfer(reactor, [n.descriptor() for n in nodes], echo.address,
                            circuits=circuits, bytes_per_circuit=size, stall_timeout=20,
                            on_finished=lambda t: reactor.stop())
    guard = reactor.call_later(120, transfer.abort, "test timeout")
    transfer.start()
    reactor.run()
    guard.cancel()
    return transfer


@contextlib.contextmanager
def echo_network(reactor: Reactor, nodes: list[RelayNode]) -> Iterator[EchoServer]:
    """Start ``nodes`` and an echo service for their exits; close them all afterwards."""
    for node in nodes:
        node.start()
    echo = EchoServer(reactor)
    try:
        yield echo
    finally:
        for node in nodes:
            node.close()
        echo.close()


def assert_echoed_intact(transfer: EchoTransfer, total: int) -> None:
    """Every circuit finished and ``total`` bytes came back as sent."""
    results = transfer.results()
    assert results["ok"], results["failures"]
    assert results["bytes_echoed_intact"] == total


def test_tiny_watermarks_pause_and_resume_without_loss(
    reactor: Reactor, relay_keys: list[RelayIdentity]
) -> None:
    nodes = [
        RelayNode(reactor, keys, config(f"bp{i}"), batch_cells=16,
                  pool_high_water=16, circuit_high_water=6, link_write_water=(4096, 1024))
        for i, keys in enumerate(relay_keys[:3])
    ]
    with echo_network(reactor, nodes) as echo:
        transfer = run_transfer(reactor, nodes, echo, circuits=4, size=300_000)
        assert_echoed_intact(transfer, 4 * 300_000)
        stats = [node.stats() for node in nodes]
        assert sum(s["pool_pauses"] for s in stats) > 0
        assert sum(s["circuit_pressure_pauses"] for s in stats) > 0
        for s in stats:
            assert s["pool_errors"] == 0
        # Once the client's DESTROYs tore the circuits down, nothing is left paused: every
        # live link reads again and nothing is in flight.
        run_until_closed(reactor, nodes)
        for node in nodes:
            assert node.pool.in_flight == 0
            for peer in node._peers.values():
                assert not peer.gate.paused, peer


def test_relays_in_one_process_echo_with_default_marks(
    reactor: Reactor, relay_keys: list[RelayIdentity]
) -> None:
    nodes = [RelayNode(reactor, keys, config(f"n{i}", threads=1))
             for i, keys in enumerate(relay_keys[:3])]
    with echo_network(reactor, nodes) as echo:
        transfer = run_transfer(reactor, nodes, echo, circuits=3, size=200_000)
        assert transfer.ok, transfer.failures()
        run_until_closed(reactor, nodes)  # the client's DESTROYs reach every hop
        for node in nodes:
            stats = node.stats()
            assert stats["circuits_created"] == 3  # every relay is on every 3-hop circuit
            assert stats["circuits_closed"] == 3 and stats["circuits_open"] == 0
            assert stats["pool_pauses"] == 0
            # each relay is the exit of one circuit
            assert stats["exit"]["streams_opened"] == 1
            assert stats["exit"]["bytes_to_targets"] == 200_000
            assert stats["exit"]["bytes_from_targets"] == 200_000


@pytest.mark.parametrize("inline_cells", [0, 8, 1 << 30], ids=["pool", "small", "all-idle"])
def test_inline_and_pooled_crypto_echo_the_same_bytes(
    reactor: Reactor, relay_keys: list[RelayIdentity], inline_cells: int
) -> None:
    """A small batch of a circuit with nothing on the pool is crypted on the loop thread: with
    none (0), some (8) or every such batch (no size limit) crypted there, and the rest on the
    pool, every byte comes back in order and the counters say which thread crypted what."""
    nodes = [RelayNode(reactor, keys, config(f"in{i}"), inline_cells=inline_cells)
             for i, keys in enumerate(relay_keys[:3])]
    with echo_network(reactor, nodes) as echo:
        transfer = run_transfer(reactor, nodes, echo, circuits=4, size=150_000)
        assert_echoed_intact(transfer, 4 * 150_000)
        run_until_closed(reactor, nodes)
        for node in nodes:
            stats = node.stats()
            # 150,000 bytes each way per circuit are at least 2 x 300 DATA cells at every hop
            assert stats["cells_crypted"] >= 4 * 2 * 300
            assert stats["pool_errors"] == stats["inline_crypto_errors"] == 0
            inline = stats["cells_crypted_inline"]
            if inline_cells == 0:
                assert inline == 0
            else:
                assert 0 < inline <= stats["cells_crypted"]
            assert node.pool.in_flight == 0


def test_a_circuit_whose_flush_raises_is_closed_and_the_others_go_on(
    reactor: Reactor, relay_keys: list[RelayIdentity], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An exception inside one circuit's end-of-iteration flush (a bug, injected here into
    the first circuit of a flush that holds several) closes that circuit only: the circuits
    after it in the same flush are still flushed, and keep moving (before, they stayed marked
    dirty and were never flushed again)."""
    nodes = [RelayNode(reactor, keys, config(f"fe{i}")) for i, keys in enumerate(relay_keys[:3])]
    middle = nodes[1]
    node_flush = middle._dirty._flush  # RelayNode._flush, bound
    original = OrCircuit.take_submits
    doomed: list[OrCircuit] = []
    raised: list[OrCircuit] = []

    def flush(dirty: list[OrCircuit]) -> None:
        if not doomed and len(dirty) >= 2 and middle.circuits_open == 4:
            doomed.append(dirty[0])  # the others come after it in this flush
        node_flush(dirty)

    def take_submits(circuit: OrCircuit, out: list) -> None:
        if doomed and circuit is doomed[0] and not raised:
            raised.append(circuit)
            raise RuntimeError("injected flush failure")
        original(circuit, out)

    monkeypatch.setattr(middle._dirty, "_flush", flush)
    monkeypatch.setattr(OrCircuit, "take_submits", take_submits)
    with echo_network(reactor, nodes) as echo:
        transfer = EchoTransfer(reactor, [n.descriptor() for n in nodes], echo.address,
                                circuits=4, bytes_per_circuit=150_000, stall_timeout=8,
                                on_finished=lambda t: reactor.stop())
        guard = reactor.call_later(60, transfer.abort, "test timeout")
        transfer.start()
        reactor.run()
        guard.cancel()
        results = transfer.results()
        assert len(raised) == 1
        assert len(results["failures"]) == 1, results["failures"]
        failed = results["failures"][0]
        assert failed["mismatched_chunks"] == 0 and failed["bytes_intact"] < 150_000
        # the three others, every byte (the doomed one may have echoed a few cells first)
        assert results["circuits_ok"] == 3
        assert results["bytes_echoed_intact"] == 3 * 150_000 + failed["bytes_intact"]
        assert middle.stats()["flush_errors"] == 1


def test_relays_with_tls_records_on_the_pool_echo_every_byte(
    reactor: Reactor, relay_keys: list[RelayIdentity]
) -> None:
    """``tls_on_pool``: every link's TLS records crypted by the pool's workers (small pieces of
    an idle link on the loop thread), with tiny watermarks so that the links pause and resume
    while records are on the pool."""
    nodes = [RelayNode(reactor, keys, config(f"tp{i}"), tls_on_pool=True, pool_high_water=64,
                       link_write_water=(8192, 2048))
             for i, keys in enumerate(relay_keys[:3])]
    with echo_network(reactor, nodes) as echo:
        transfer = run_transfer(reactor, nodes, echo, circuits=4, size=300_000)
        assert_echoed_intact(transfer, 4 * 300_000)
        run_until_closed(reactor, nodes)
        for node in nodes:
            stats = node.stats()
            assert stats["pool_errors"] == 0
            # the pool crypted more than the relay cells it was given: the links' records
            assert stats["pool_cells"] > stats["cells_crypted"] - stats["cells_crypted_inline"]


class StalledNextRelay:
    """A fake next relay on a blocking socket, with ``identity``'s certificates: answers the
    link handshake and CREATE2, then reads nothing until ``may_read`` is set, and then counts
    the RELAY cells it gets."""

    def __init__(self, expected_cells: int, identity: RelayIdentity) -> None:
        self.identity = identity
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(1)
        self.port = self.listener.getsockname()[1]
        self.expected = expected_cells
        self.may_read = threading.Event()
        self.done = threading.Event()
        self.relay_cells = 0
        self.error: BaseException | None = None
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        try:
            conn, _ = self.listener.accept()
            conn.settimeout(60)
            peer = RawPeer.serve(conn, self.identity)
            circ_id, command, _ = peer.recv_cell()
            assert command == CellCommand.CREATE2
            peer.send_cell(circ_id, CellCommand.CREATED2, encode_created2(bytes(64)))
            self.may_read.wait(60)
            while self.relay_cells < self.expected:
                got_id, command, _ = peer.recv_cell()
                assert (got_id, command) == (circ_id, CellCommand.RELAY)
                self.relay_cells += 1
            conn.close()
        except BaseException as exc:  # reported on the test thread
            self.error = exc
        finally:
            self.done.set()
            self.listener.close()


def _push_through_a_stalled_next_hop(
    reactor: Reactor, node: RelayNode, fake: StalledNextRelay, next_identity: RelayIdentity,
    cells: int, outcome: dict[str, object],
) -> threading.Event:
    """A client on a thread: one circuit through ``node`` to ``fake``, then ``cells`` relay
    cells at once; it records how the circuit ended (``outcome``) and waits for the fake."""
    client_done = threading.Event()

    def client_side() -> None:
        try:
            peer = RawPeer(node.address[1])
            peer.handshake()
            circ = 0x80000001
            crypto = peer.create_fast(circ)
            extend = Extend2Body(
                (LinkSpecifier.ipv4("127.0.0.1", fake.port),
                 LinkSpecifier.legacy_id(next_identity.identity_digest)),
                HTYPE_NTOR, bytes(84)).encode()
            peer.send_cell(circ, CellCommand.RELAY_EARLY,
                           crypto.encrypt(pack_relay(RelayCommand.EXTEND2, 0, extend), 0))
            _, command, payload = peer.recv_cell()
            assert command == CellCommand.RELAY
            assert relay_body(crypto.decrypt(payload)[1])[0] == RelayCommand.EXTENDED2
            # Random payloads are not recognized by the relay: all go on to the next hop.
            junk = random.Random(5).randbytes(CELL_PAYLOAD_LEN * cells)
            peer.sock.sendall(wire_cells(circ, CellCommand.RELAY, junk))
            peer.sock.settimeout(30)
            try:
                _, command, payload = peer.recv_cell()  # the relay's DESTROY, if it closes
                outcome["destroy"] = payload[0] if command == CellCommand.DESTROY else None
            except (TimeoutError, EOFError, OSError):
                outcome["destroy"] = None
            fake.done.wait(60)  # closing the link earlier would destroy the circuit
            peer.close()
        except BaseException as exc:
            outcome["error"] = exc
        finally:
            client_done.set()

    threading.Thread(target=client_side, daemon=True).start()
    return client_done


def test_cells_for_a_stalled_next_hop_wait_on_their_circuit_then_all_arrive(
    reactor: Reactor, relay_keys: list[RelayIdentity]
) -> None:
    """8 MB for a next hop that reads nothing yet: the chunks wait in the circuit's queue
    (the link scheduler), nothing pauses the client's link (tor never stops reading one
    connection for another's sake), and once the next hop reads every cell arrives. The cap
    is raised for this test (tor's is 1,000 cells: see the next test)."""
    cells = 16384
    roomy = dataclasses.replace(config("mid"),
                                cell_queue_caps=CellQueueCaps(toward_exit=cells + 100))
    node = RelayNode(reactor, relay_keys[0], roomy, link_write_water=(65536, 16384))
    node.start()
    fake = StalledNextRelay(cells, relay_keys[3])
    outcome: dict[str, object] = {}
    client_done = _push_through_a_stalled_next_hop(reactor, node, fake, relay_keys[3], cells,
                                                   outcome)
    try:
        run_until_met(reactor, lambda: node.stats()["queued_writes"] > 0 or fake.done.is_set()
                      or client_done.is_set(), 60)
        assert "error" not in outcome and fake.error is None, (outcome, fake.error)
        assert node.write_congestions > 0 and node.stats()["queued_writes"] > 0
        assert node.stats()["queued_bytes"] > 0
        # once the pool has crypted what it took (its own back-pressure may hold the links
        # meanwhile), the cells wait in the circuit's queue and no link is paused for them
        run_until_met(reactor, lambda: node.pool.in_flight == 0, 30)
        assert not any(p.gate.paused for p in node._peers.values())
        fake.may_read.set()
        run_until_met(reactor, lambda: fake.done.is_set() and client_done.is_set(), 60)
        assert "error" not in outcome and fake.error is None, (outcome, fake.error)
        assert fake.relay_cells == cells
        # the circuit ended only when the fake hung up (CHANNEL_CLOSED), not for its queue
        assert outcome["destroy"] != DestroyReason.RESOURCELIMIT
        assert node.stats()["circuits_closed_queue"] == 0
        run_until_met(reactor, lambda: node.stats()["queued_bytes"] == 0, 10)
    finally:
        fake.may_read.set()
        node.close()


def test_a_circuit_whose_queue_passes_tors_cap_is_closed(
    reactor: Reactor, relay_keys: list[RelayIdentity]
) -> None:
    """Before, this pushed 294 MiB into a relay in 4 s (a CREATE2-built circuit's next link was
    exempt from back-pressure). Now the circuit holds at most circ_max_cell_queue_size_out
    (1,000) cells toward the exit and is then closed with RESOURCELIMIT; nothing it sent
    stays queued."""
    cells = 16384
    node = RelayNode(reactor, relay_keys[0], config("mid"), link_write_water=(65536, 16384))
    node.start()
    fake = StalledNextRelay(0, relay_keys[3])
    outcome: dict[str, object] = {}
    client_done = _push_through_a_stalled_next_hop(reactor, node, fake, relay_keys[3], cells,
                                                   outcome)
    try:
        run_until_met(reactor, lambda: "destroy" in outcome or client_done.is_set(), 60)
        fake.may_read.set()
        run_until_met(reactor, client_done.is_set, 60)
        assert "error" not in outcome, outcome
        assert outcome["destroy"] == DestroyReason.RESOURCELIMIT
        stats = node.stats()
        assert stats["circuits_closed_queue"] == 1 and stats["circuits_open"] == 0
        assert stats["queued_bytes"] == 0
    finally:
        fake.may_read.set()
        node.close()
