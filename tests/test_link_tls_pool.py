"""Links whose TLS record crypto runs on a worker pool (relay.tlspipe), on real sockets.

A responder Link with ``tls_offload`` (its pieces above 512 bytes go to a real 2-worker pool)
against an initiator doing its TLS on the loop thread. What is checked: cells both ways arrive
complete and in order, and the pool really did the records; a peer that writes and hangs up at
once has every cell handled before the link reports the close (the socket's end arrives while
records are still on the pool); a link closed right after writing still sends every cell, then
close_notify; the link's write watermarks count what is being encrypted; a link paused while
the socket ends with records still on the pool (both workers held in a job until then, small
batches so the records come back in several deliveries) keeps every cell for its resume.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import support_loop

from reactor import Reactor, Stream, listen
from relay.cells import CellCommand
from relay.identity.keys import RelayIdentity
from relay.link import CloseKind, Link
from relay.linkauth import ServerCredentials
from relay.tlspipe import TlsOffload
from workers.pool import WorkerPool

pytestmark = pytest.mark.timeout(60)

CELLS = 3000


@pytest.fixture(scope="module")
def server_credentials(tmp_path_factory: pytest.TempPathFactory) -> ServerCredentials:
    identity = RelayIdentity.load_or_create(tmp_path_factory.mktemp("pool-tls") / "r", "r")
    return ServerCredentials.of(identity)


@pytest.fixture
def reactor() -> Iterator[Reactor]:
    r = Reactor()
    yield r
    r.close()


@pytest.fixture
def pool(reactor: Reactor) -> Iterator[WorkerPool]:
    pool = WorkerPool.attach(reactor, threads=2, lanes=2)
    yield pool
    pool.close(drain=False, timeout=10.0)


class Pair:
    """The pooled responder and a loop-thread initiator, with what each side received."""

    def __init__(self, reactor: Reactor, pool: WorkerPool,
                 credentials: ServerCredentials) -> None:
        self.server: Link | None = None
        self.closes: dict[str, tuple[CloseKind | None, str]] = {}
        self.at_server: list[tuple[int, bytes]] = []
        self.at_client: list[tuple[int, bytes]] = []

        def closed(side: str) -> Any:
            return lambda link, why: self.closes.setdefault(side, (link.close_kind, why))

        def accepted(stream: Stream) -> None:
            self.server = Link.accept(reactor, stream, server=credentials,
                                      on_close=closed("server"),
                                      tls_offload=TlsOffload(pool, inline_bytes=512))

        self.listener = listen(reactor, "127.0.0.1", 0, accepted)
        host, port = self.listener.address
        self.client = Link.connect(reactor, host, port, tls=True, on_close=closed("client"))
        support_loop.run_until_met(reactor, self.open_or_closed, 20.0)
        assert self.server is not None and self.server.is_open and self.client.is_open
        self.circ_id = self.client.add_circuit(lambda c, p: self.at_client.append((c, p)))
        self.server.add_circuit(lambda c, p: self.at_server.append((c, p)), self.circ_id)

    def open_or_closed(self) -> bool:
        return bool(self.closes) or (self.server is not None and self.server.is_open
                                     and self.client.is_open)


def payloads(n: int) -> list[bytes]:
    return [os.urandom(509) for _ in range(n)]


def test_cells_both_ways_in_order_with_the_records_on_the_pool(
        reactor: Reactor, pool: WorkerPool, server_credentials: ServerCredentials) -> None:
    pair = Pair(reactor, pool, server_credentials)
    assert pair.server is not None
    up, down = payloads(CELLS), payloads(CELLS)
    for i in range(CELLS):
        pair.client.send_cell(pair.circ_id, CellCommand.RELAY, up[i])
        pair.server.send_cell(pair.circ_id, CellCommand.RELAY, down[i])
    support_loop.run_until_met(
        reactor, lambda: len(pair.at_server) == len(pair.at_client) == CELLS, 30.0)
    assert pair.at_server == [(CellCommand.RELAY, p) for p in up]
    assert pair.at_client == [(CellCommand.RELAY, p) for p in down]
    stats = pair.server.stats()
    assert stats["tls_on_pool"] > 0  # records of both lanes went to the workers
    assert not pair.closes


def test_a_peer_that_writes_and_hangs_up_has_every_cell_handled_first(
        reactor: Reactor, pool: WorkerPool, server_credentials: ServerCredentials) -> None:
    pair = Pair(reactor, pool, server_credentials)
    up = payloads(CELLS)
    for payload in up:
        pair.client.send_cell(pair.circ_id, CellCommand.RELAY, payload)
    pair.client.close("done")  # the cells, close_notify and the socket's end at once
    support_loop.run_until_met(reactor, lambda: "server" in pair.closes, 30.0)
    # the circuit saw every cell, then the DESTROY the link's close makes
    assert pair.at_server[:-1] == [(CellCommand.RELAY, p) for p in up]
    assert pair.at_server[-1][0] == CellCommand.DESTROY
    assert pair.closes["server"][0] is CloseKind.PEER_CLOSED


def test_a_link_closed_right_after_writing_sends_every_cell_then_close_notify(
        reactor: Reactor, pool: WorkerPool, server_credentials: ServerCredentials) -> None:
    pair = Pair(reactor, pool, server_credentials)
    assert pair.server is not None
    down = payloads(CELLS)
    for payload in down:  # past the write watermark: records are on the pool at the close
        pair.server.send_cell(pair.circ_id, CellCommand.RELAY, payload)
    pair.server.close("done")
    support_loop.run_until_met(reactor, lambda: "client" in pair.closes, 30.0)
    assert pair.at_client[:-1] == [(CellCommand.RELAY, p) for p in down]
    kind, why = pair.closes["client"]
    assert kind is CloseKind.PEER_CLOSED and "close_notify" in why


def test_encrypting_bytes_count_toward_the_write_watermarks(
        reactor: Reactor, pool: WorkerPool, server_credentials: ServerCredentials) -> None:
    pair = Pair(reactor, pool, server_credentials)
    server = pair.server
    assert server is not None
    events: list[str] = []
    server.on_write_high = lambda: events.append("high")
    server.on_write_low = lambda: events.append("low")
    server.stream.set_write_watermarks(64 * 1024, 16 * 1024)
    for payload in payloads(400):  # ~200 KiB in one iteration: well past 64 KiB
        server.send_cell(pair.circ_id, CellCommand.RELAY, payload)
    assert events == ["high"]  # during the writes, before any record reached the socket
    support_loop.run_until_met(reactor, lambda: len(pair.at_client) == 400, 30.0)
    support_loop.run_until_met(reactor, lambda: events == ["high", "low"], 10.0)


@pytest.fixture
def small_batch_pool(reactor: Reactor) -> Iterator[WorkerPool]:
    """A pool that takes at most 64 cells' worth of records per batch: the decrypts of a
    burst come back in several deliveries."""
    pool = WorkerPool.attach(reactor, threads=2, lanes=2, batch_cells=64)
    yield pool
    pool.close(drain=False, timeout=10.0)


def test_cells_held_behind_a_pause_when_the_peer_hangs_up_are_handled_on_resume(
        reactor: Reactor, small_batch_pool: WorkerPool,
        server_credentials: ServerCredentials) -> None:
    pool = small_batch_pool
    pair = Pair(reactor, pool, server_credentials)
    server = pair.server
    assert server is not None
    pipe = server._pipe
    assert pipe is not None
    deliver = pipe.on_plain

    def pause_while_more_is_on_the_pool(plain: bytes) -> None:
        # the socket has ended with records still on the pool, and the link pauses (as a relay
        # does under pool or circuit pressure): the rest is decrypted into the paused framer
        if pipe.decrypting and server.stream.closed:
            server.pause_reading()
        deliver(plain)

    pipe.on_plain = pause_while_more_is_on_the_pool
    # Both workers held in a job until the socket has ended, so the decrypts are still on the
    # pool then, whatever the timing (fewer cells than the pipe's read limit: reading goes on)
    release = threading.Event()
    holding = threading.Semaphore(0)

    def hold(state: Any, lane: int, batch: Any) -> Any:
        holding.release()
        release.wait(20.0)
        return batch

    for _ in range(2):
        pool.submit(pool.open_circuit(None, process=hold, on_result=lambda *_: None), 0, [b""])
    assert holding.acquire(timeout=10.0) and holding.acquire(timeout=10.0)
    cells = 1000
    up = payloads(cells)
    for payload in up:
        pair.client.send_cell(pair.circ_id, CellCommand.RELAY, payload)
    pair.client.close("done")
    try:
        support_loop.run_until_met(reactor, lambda: server.stream.closed, 20.0)
        assert pipe.decrypting  # the socket ended with records still on the pool
    finally:
        release.set()
    support_loop.run_until_met(reactor, lambda: not pipe.decrypting, 20.0)
    assert "server" not in pair.closes  # the cells behind the pause are not dropped
    assert len(pair.at_server) < cells  # some are still behind the pause
    server.resume_reading()
    support_loop.run_until_met(reactor, lambda: "server" in pair.closes, 20.0)
    assert pair.at_server[:-1] == [(CellCommand.RELAY, p) for p in up]
    assert pair.closes["server"][0] is CloseKind.PEER_CLOSED
