"""A link's TLS record crypto through relay.tlspipe: on a real WorkerPool, small pieces inline.

One end of each connection is a TlsPipe over a real 2-worker pool (its results delivered on
this thread, as the loop would); the other end is a plain session on this thread. What is
checked: both directions' bytes come out as sent and in order, while pieces go inline or to the
pool at random (sizes around the inline bound, and the pool busy or not); a corrupt record
kills its pipe alone, once; the decrypt backlog bound stops and restarts reading; close gives a
close_notify the peer sees, or nothing when work was still on the pool.
"""

from __future__ import annotations

import os
import random

import pytest
from support_tls import credentials, handshake
from test_pool_support import Collector

from relay.tls import TlsClientSession, TlsError, TlsServerContext, TlsServerSession
from relay.tlspipe import TlsPipe
from workers.pool import WorkerPool

pytestmark = pytest.mark.timeout(120)

INLINE = 4096


@pytest.fixture(scope="module")
def context() -> TlsServerContext:
    return TlsServerContext(*credentials())


@pytest.fixture
def pool() -> WorkerPool:
    sink = Collector()
    pool = WorkerPool(sink, threads=2, lanes=3, group_circuits=8)
    pool.sink = sink  # type: ignore[attr-defined]
    pool.start()
    yield pool
    pool.close()


class End:
    """A pipe over a client session, and its peer: a server session on this thread."""

    def __init__(self, pool: WorkerPool, context: TlsServerContext,
                 read_limit: int = 1 << 20) -> None:
        self.client, self.server = TlsClientSession(), TlsServerSession(context)
        handshake(self.client, self.server)
        self.plain: list[bytes] = []
        self.records: list[bytes] = []
        self.errors: list[TlsError] = []
        self.full: list[bool] = []
        self.pipe = TlsPipe(pool, self.client, on_plain=self.plain.append,
                            on_records=self.records.append, on_error=self.errors.append,
                            on_read_full=self.full.append, inline_bytes=INLINE,
                            read_limit=read_limit)


def pump(pool: WorkerPool, until: object) -> None:
    pool.sink.pump(pool, until)  # type: ignore[attr-defined]


def sizes(rng: random.Random, n: int) -> list[int]:
    """Sizes around the inline bound and far past it."""
    return [rng.choice((1, 514, INLINE - 1, INLINE, INLINE + 1, 20_000, 70_000))
            for _ in range(n)]


@pytest.mark.parametrize("seed", range(4))
def test_both_directions_in_order_inline_and_on_the_pool(pool: WorkerPool,
                                                         context: TlsServerContext,
                                                         seed: int) -> None:
    rng = random.Random(seed)
    ends = [End(pool, context) for _ in range(3)]
    sent_out = {id(e): bytearray() for e in ends}  # through pipe.encrypt
    sent_in = {id(e): bytearray() for e in ends}  # from the peer, through pipe.decrypt
    for _ in range(120):
        end = rng.choice(ends)
        if rng.random() < 0.5:
            size = sizes(rng, 1)[0]
            data = os.urandom(size)
            cut = rng.randrange(size + 1)
            end.pipe.encrypt([data[:cut], data[cut:]], size)
            sent_out[id(end)] += data
        else:
            data = os.urandom(sizes(rng, 1)[0])
            records = end.server.encrypt(data)
            sent_in[id(end)] += data
            offset = 0
            while offset < len(records):  # the socket cuts records anywhere
                step = rng.choice((1, 100, 3000, INLINE, 50_000))
                end.pipe.decrypt(records[offset:offset + step])
                offset += step
        if rng.random() < 0.2:  # sometimes let results come back, so the pipes go idle
            for reply in pool.sink.take(0.001):  # type: ignore[attr-defined]
                pool.deliver(reply)

    def done() -> bool:
        return all(e.pipe.idle for e in ends)

    pump(pool, done)
    for end in ends:
        assert not end.errors
        assert b"".join(end.plain) == bytes(sent_in[id(end)])
        assert end.server.decrypt(b"".join(end.records)) == bytes(sent_out[id(end)])
    assert sum(e.pipe.inline_jobs for e in ends) > 0
    assert sum(e.pipe.pool_jobs for e in ends) > 0


def test_small_pieces_of_an_idle_link_never_reach_the_pool(pool: WorkerPool,
                                                           context: TlsServerContext) -> None:
    end = End(pool, context)
    for i in range(50):
        end.pipe.encrypt([bytes([i]) * 514], 514)
        end.pipe.decrypt(end.server.encrypt(bytes([i]) * 514))
    assert end.pipe.pool_jobs == 0 and end.pipe.inline_jobs == 100
    assert b"".join(end.plain) == b"".join(bytes([i]) * 514 for i in range(50))
    assert pool.stats()["cells"] == 0


def test_a_corrupt_record_kills_its_pipe_alone(pool: WorkerPool,
                                               context: TlsServerContext) -> None:
    bad, good = End(pool, context), End(pool, context)
    records = bad.server.encrypt(os.urandom(30_000))
    corrupt = records[:100] + bytes([records[100] ^ 1]) + records[101:]
    bad.pipe.decrypt(corrupt)  # large: on the pool
    data = os.urandom(30_000)
    good.pipe.decrypt(good.server.encrypt(data))
    pump(pool, lambda: bool(bad.errors) and good.pipe.idle)
    assert len(bad.errors) == 1 and isinstance(bad.errors[0], TlsError)
    bad.pipe.decrypt(b"more")  # a dead pipe takes nothing more
    bad.pipe.encrypt([b"x"], 1)
    assert len(bad.errors) == 1 and bad.records == []
    assert bad.pipe.close() is None
    assert b"".join(good.plain) == data and not good.errors


def test_the_decrypt_backlog_stops_and_restarts_reading(pool: WorkerPool,
                                                        context: TlsServerContext) -> None:
    end = End(pool, context, read_limit=64_000)
    data = os.urandom(200_000)
    records = end.server.encrypt(data)
    for offset in range(0, len(records), 20_000):
        end.pipe.decrypt(records[offset:offset + 20_000])
    assert end.full == [True]  # past 64,000 bytes waiting: stop reading
    pump(pool, lambda: end.pipe.idle)
    assert end.full == [True, False]
    assert end.pipe.decrypting == 0
    assert b"".join(end.plain) == data


def test_close_sends_close_notify_when_idle(pool: WorkerPool,
                                            context: TlsServerContext) -> None:
    end = End(pool, context)
    alert = end.pipe.close()
    assert alert
    assert end.server.decrypt(alert) == b"" and end.server.peer_closed
    assert end.pipe.close() is None  # idempotent


def test_close_with_work_on_the_pool_abandons_it(pool: WorkerPool,
                                                 context: TlsServerContext) -> None:
    end = End(pool, context)
    end.pipe.encrypt([os.urandom(500_000)], 500_000)
    assert not end.pipe.idle
    assert end.pipe.close() is None
    pump(pool, lambda: pool.in_flight == 0)
    assert end.records == [] and not end.errors  # the abandoned result is not delivered


def test_a_pool_closing_without_draining_leaves_the_pipe_consistent(
        context: TlsServerContext) -> None:
    sink = Collector()
    pool = WorkerPool(sink, threads=1, lanes=3, batch_cells=64)
    pool.start()
    end = End(pool, context)
    sent = b""
    for _ in range(20):  # far more than one batch: most wait in the pool's queue
        data = os.urandom(60_000)
        sent += data
        end.pipe.encrypt([data], 60_000)
        end.pipe.decrypt(end.server.encrypt(os.urandom(60_000)))
    pool.close(drain=False, timeout=10.0)  # cancels what waits; results already put remain
    for reply in sink.take(0.1):
        pool.deliver(reply)  # the results of the batches a worker had taken
    assert not end.errors
    assert end.pipe.decrypting >= 0 and end.pipe.encrypting >= 0
    out = end.server.decrypt(b"".join(end.records))  # whole records, in order: a prefix
    assert sent.startswith(out)
