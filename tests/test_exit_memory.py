"""What an exit's streams hold, counted toward MaxMemInQueues (``ExitEdge.buffered_bytes``).

Before, the count summed every buffered chunk of every stream on each ask (the node asks on
every flush and crypted batch: quadratic under a flood of optimistic data), counted an early
DATA chunk as its 498 payload bytes although it allocates about 550, and did not count the
streams at all. Now it is a running count of what each piece allocates (``STREAM_COST`` per
stream, ``EARLY_CHUNK_OVERHEAD`` per early chunk, a pending buffer's capacity), and these tests
check that it stays equal to a recount through real streams opening, buffering, connecting,
failing and closing, that it returns to 0, that it is no lower than what Python allocates,
and that the node's OOM handler closes the flooding circuit, not an older idle one.
"""

from __future__ import annotations

import random
import socket
import threading
import tracemalloc
from collections import Counter
from collections.abc import Iterator

import pytest
from reliability_support import memory_limited_exit
from support_loop import run_until, run_until_met

from benchmarks.rawpeer import RawPeer
from examples.echo import EchoServer
from reactor import Reactor, Stream, listen
from relay.cells import CellCommand, DestroyReason, RelayCommand
from relay.circuits import pack_relay, relay_body
from relay.exit import EARLY_CHUNK_OVERHEAD, STREAM_COST, ExitEdge
from relay.exitpolicy import ExitVerdict
from tor1 import RELAY_DATA_MAX

pytestmark = pytest.mark.timeout(120)

_REFUSED_PORT = 9  # the policy below refuses it before any connect
_CLOSING_BYTES = 200_000  # what the closing target writes before it closes (~400 cells)


@pytest.fixture
def reactor() -> Iterator[Reactor]:
    with Reactor() as loop:
        yield loop


def _policy(address: str, port: int) -> ExitVerdict:
    return ExitVerdict(port != _REFUSED_PORT, 4, "test policy")


def _never_accepting() -> socket.socket:
    """A listener with a backlog of 0 that never accepts: connects to it stay half-open."""
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(0)
    return hole


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def _feed(edge: ExitEdge, payloads: list[bytes]) -> None:
    """Hand ``payloads`` to ``edge`` as one recognized batch, as its circuit would."""
    plain = b"".join(payloads)
    edge.handle(plain, range(0, len(plain), len(payloads[0])), lambda offset: bytes(20))


def _begin(stream_id: int, port: int) -> bytes:
    return pack_relay(RelayCommand.BEGIN, stream_id, f"127.0.0.1:{port}".encode() + b"\0")


def test_an_early_chunk_and_a_half_open_stream_count_what_they_allocate(
    reactor: Reactor,
) -> None:
    hole = _never_accepting()
    violations: list[str] = []
    edge = ExitEdge(reactor, lambda payloads: None, violations.append, check=_policy,
                    is_exit=True)
    try:
        _feed(edge, [_begin(1, hole.getsockname()[1])])
        assert edge.buffered_bytes == STREAM_COST and edge.buffered_since is None
        _feed(edge, [pack_relay(RelayCommand.DATA, 1, bytes(RELAY_DATA_MAX))] * 3
              + [pack_relay(RelayCommand.DATA, 1, b"x")])
        early = 3 * (RELAY_DATA_MAX + EARLY_CHUNK_OVERHEAD) + 1 + EARLY_CHUNK_OVERHEAD
        assert edge.buffered_bytes == STREAM_COST + early == edge.recount()
        assert edge.buffered_since is not None
        _feed(edge, [pack_relay(RelayCommand.END, 1, b"\x06")])
        assert edge.buffered_bytes == 0 == edge.recount() and edge.buffered_since is None
        assert not violations
    finally:
        edge.close()
        hole.close()


def test_the_running_count_equals_a_recount_through_random_stream_operations(
    reactor: Reactor,
) -> None:
    """Streams to an echo server, to a target that writes ~400 cells and closes, to a port that
    never accepts, to a closed port, to a refused port; DATA before and after CONNECTED, END,
    stream SENDMEs, loop runs between; after every step the running count equals a recount,
    and ending every stream brings it to 0."""
    echo = EchoServer(reactor)
    hole = _never_accepting()
    targets: list[Stream] = []

    def write_and_close(stream: Stream) -> None:
        targets.append(stream)
        stream.write(bytes(_CLOSING_BYTES))
        stream.close("done")

    closing = listen(reactor, "127.0.0.1", 0, write_and_close)
    ports = [echo.address[1], closing.address[1], hole.getsockname()[1], _closed_port(),
             _REFUSED_PORT]
    out: list[bytes] = []
    violations: list[str] = []
    edge = ExitEdge(reactor, out.extend, violations.append, check=_policy, is_exit=True)
    rng = random.Random(1414)
    sent: Counter[int] = Counter()  # DATA cells sent per stream (kept below its window)
    sendmes: Counter[int] = Counter()  # stream SENDMEs sent per stream
    begun: list[int] = []
    checks = 0
    try:
        for _ in range(400):
            op = rng.random()
            if op < 0.2 or not begun:
                stream_id = len(begun) + 1
                begun.append(stream_id)
                _feed(edge, [_begin(stream_id, rng.choice(ports))])
            elif op < 0.55:
                stream_id = rng.choice(begun)
                cells = min(rng.randint(1, 30), 400 - sent[stream_id])
                if cells > 0:
                    sent[stream_id] += cells
                    _feed(edge, [pack_relay(RelayCommand.DATA, stream_id,
                                            bytes(rng.randint(1, RELAY_DATA_MAX)))] * cells)
            elif op < 0.65:
                _feed(edge, [pack_relay(RelayCommand.END, rng.choice(begun), b"\x06")])
            elif op < 0.75:
                stream_id = rng.choice(begun)
                packaged = sum(1 for p in out if p[0] == RelayCommand.DATA
                               and int.from_bytes(p[3:5], "big") == stream_id)
                if packaged - 50 * sendmes[stream_id] >= 50:  # within its package window
                    sendmes[stream_id] += 1
                    _feed(edge, [pack_relay(RelayCommand.SENDME, stream_id)])
            else:
                run_until(reactor, lambda: False, rng.choice((0.005, 0.02, 0.05)))
            assert edge.buffered_bytes == edge.recount()
            checks += 1
        run_until(reactor, lambda: False, 0.3)
        assert edge.buffered_bytes == edge.recount()
        answered = Counter(p[0] for p in out)
        assert answered[RelayCommand.CONNECTED] and answered[RelayCommand.END]
        assert targets, "the closing target was reached"
        assert edge.open_streams > 0 and edge.buffered_bytes >= STREAM_COST * edge.open_streams
        _feed(edge, [pack_relay(RelayCommand.END, stream_id, b"\x06") for stream_id in begun])
        assert edge.open_streams == 0
        assert edge.buffered_bytes == 0 == edge.recount() and edge.buffered_since is None
        assert not violations and checks == 400
    finally:
        edge.close()
        closing.close()
        echo.close()
        hole.close()
        run_until(reactor, lambda: False, 0.05)


def test_closing_the_edge_forgets_everything(reactor: Reactor) -> None:
    hole = _never_accepting()
    edge = ExitEdge(reactor, lambda payloads: None, lambda why: None, check=_policy,
                    is_exit=True)
    try:
        port = hole.getsockname()[1]
        _feed(edge, [_begin(stream_id, port) for stream_id in range(1, 11)])
        _feed(edge, [pack_relay(RelayCommand.DATA, 5, bytes(100))] * 4)
        assert edge.buffered_bytes == 10 * STREAM_COST + 4 * (100 + EARLY_CHUNK_OVERHEAD)
        edge.close()
        assert edge.buffered_bytes == 0 == edge.recount() and edge.buffered_since is None
    finally:
        hole.close()
        run_until(reactor, lambda: False, 0.05)


def test_the_count_is_no_lower_than_what_python_allocates(reactor: Reactor) -> None:
    """Half-open streams with early DATA: the count covers what tracemalloc sees them
    allocate (libuv's part and the kernel's are not seen here; ``benchmarks.exit_costs``
    measures RSS)."""
    hole = _never_accepting()
    edge = ExitEdge(reactor, lambda payloads: None, lambda why: None, check=_policy,
                    is_exit=True)
    port = hole.getsockname()[1]
    data = [pack_relay(RelayCommand.DATA, 0, bytes(RELAY_DATA_MAX))] * 20
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for stream_id in range(1, 201):
            _feed(edge, [_begin(stream_id, port)]
                  + [p[:3] + stream_id.to_bytes(2, "big") + p[5:] for p in data])
        run_until(reactor, lambda: False, 0.1)
        allocated = tracemalloc.get_traced_memory()[0] - before
        assert edge.open_streams == 200
        assert allocated <= edge.buffered_bytes == edge.recount()
    finally:
        tracemalloc.stop()
        edge.close()
        hole.close()
        run_until(reactor, lambda: False, 0.05)


_LIMIT = 2 << 20
_STREAMS = 300
_CELLS = 12  # 300 x 12 x 498 B = 1.71 MiB of payload: under 2 MiB; as allocated, over


def test_the_oom_handler_counts_streams_and_chunk_overhead_and_spares_an_older_idle_circuit(
    reactor: Reactor, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """An honest circuit with an idle stream to an echo server, opened first; then a circuit
    with 300 half-open streams and 12 early DATA cells each. Counted as payload the flood
    stays under the 2 MiB limit; counted as allocated it passes it, and the OOM handler closes
    the flooding circuit (its buffers are the oldest), not the older honest one, whose stream
    still echoes."""
    node = memory_limited_exit(reactor, tmp_path_factory.mktemp("oom") / "r", "exitoom", _LIMIT)
    echo = EchoServer(reactor)
    hole = _never_accepting()
    seen: dict[str, object] = {}

    def client() -> None:
        peer = RawPeer(node.address[1])
        honest_id, flood_id = 0x80000001, 0x80000002
        try:
            peer.handshake()
            honest = peer.create_fast(honest_id)
            peer.send_cell(honest_id, CellCommand.RELAY,
                           honest.encrypt(_begin(1, echo.address[1]), 0))
            _, _, payload = peer.recv_cell()
            seen["honest_connected"] = relay_body(honest.decrypt(payload)[1])[0]
            flood = peer.create_fast(flood_id)
            sent = sendmes = 0

            def read_one() -> None:
                nonlocal sendmes
                circ_id, command, payload = peer.recv_cell()
                if circ_id != flood_id:
                    return
                if command == CellCommand.DESTROY:
                    seen["flood_destroyed"] = payload[0]
                elif command == CellCommand.RELAY:
                    relay_command, stream_id, _ = relay_body(flood.decrypt(payload)[1])
                    sendmes += relay_command == RelayCommand.SENDME and stream_id == 0

            for stream_id in range(1, _STREAMS + 1):
                # within half a circuit window of what the exit acknowledged, as tor's client:
                # the cells reach the exit, not tor's cap on a circuit's queue (1,000 cells)
                while sent - 100 * sendmes > 500 and "flood_destroyed" not in seen:
                    read_one()
                if "flood_destroyed" in seen:
                    break
                cells = [_begin(stream_id, hole.getsockname()[1])]
                cells += [pack_relay(RelayCommand.DATA, stream_id, bytes(RELAY_DATA_MAX))] * _CELLS
                for cell in cells:
                    peer.send_cell(flood_id, CellCommand.RELAY, flood.encrypt(cell, 0))
                sent += _CELLS
            while "flood_destroyed" not in seen:
                read_one()
            peer.send_cell(honest_id, CellCommand.RELAY,
                           honest.encrypt(pack_relay(RelayCommand.DATA, 1, b"still here"), 0))
            while True:
                circ_id, _, payload = peer.recv_cell()
                if circ_id == honest_id:
                    seen["honest_echo"] = relay_body(honest.decrypt(payload)[1])
                    break
        except (OSError, EOFError) as exc:
            seen["error"] = repr(exc)
        finally:
            peer.close()

    thread = threading.Thread(target=client, daemon=True)
    thread.start()
    try:
        run_until_met(reactor, lambda: not thread.is_alive(), 90)
        assert "error" not in seen, seen
        assert seen["honest_connected"] == RelayCommand.CONNECTED
        assert seen["flood_destroyed"] == DestroyReason.RESOURCELIMIT
        assert node.oom_closes == 1, (node.oom_closes, seen)
        assert seen["honest_echo"] == (RelayCommand.DATA, 1, b"still here")
        assert _STREAMS * _CELLS * RELAY_DATA_MAX < _LIMIT  # the old count would not fire
    finally:
        node.close()
        echo.close()
        hole.close()
