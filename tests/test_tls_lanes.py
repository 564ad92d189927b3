"""TLS record work on a real WorkerPool (relay.tlslanes): links' sessions as pool circuits.

Several links, each end's session one circuit with a decrypt and an encrypt lane, crypted by
the pool's worker threads (grouped: several links per tls_group call) while both lanes of a
circuit have work at once. What is checked: every byte comes out as sent, in order, with the
TLS streams re-cut at arbitrary points between the lanes; the pool never puts two workers on
one session (no RuntimeError ever reaches a circuit); group calls really hold several links;
a corrupt record fails its link alone, with TlsError.
"""

from __future__ import annotations

import itertools
import os
import random
from collections import defaultdict
from typing import Any

import pytest
from support_tls import credentials, handshake
from test_pool_support import Collector

from relay import tlslanes
from relay.tls import TlsClientSession, TlsError, TlsServerContext, TlsServerSession
from workers.circuit import Circuit
from workers.pool import WorkerPool

pytestmark = pytest.mark.timeout(120)

CELL = 514
LINKS = 6


class Links:
    """LINKS connected session pairs on a 2-worker pool (started by the test), each session a
    grouped circuit; results gathered per (circuit, lane) in delivery order, errors per
    circuit."""

    def __init__(self) -> None:
        context = TlsServerContext(*credentials())
        self.sink = Collector()
        self.pool = WorkerPool(self.sink, threads=2, lanes=2, group_circuits=16)
        self.results: dict[tuple[int, int], list[bytes]] = defaultdict(list)
        self.errors: dict[int, list[BaseException]] = defaultdict(list)
        self.group_sizes: list[int] = []
        self.pairs: list[tuple[Circuit, Circuit]] = []
        for _ in range(LINKS):
            client, server = TlsClientSession(), TlsServerSession(context)
            handshake(client, server)  # on this (loop) thread, as a link does
            self.pairs.append((self._open(client), self._open(server)))

    def _group(self, jobs: list[tuple[Any, int, Any]]) -> list[Any]:
        self.group_sizes.append(len({id(session) for session, _, _ in jobs}))
        return tlslanes.group(jobs)

    def _open(self, session: Any) -> Circuit:
        return self.pool.open_circuit(
            session, process=tlslanes.process, group=self._group, joined=True,
            on_result=lambda c, lane, result: self.results[id(c), lane].append(result),
            on_error=lambda c, lane, exc: self.errors[id(c)].append(exc))

    def submit(self, work: list[tuple[Circuit, int, Any]]) -> None:
        for circuit, lane, item in work:
            self.pool.submit(circuit, lane, item, count=tlslanes.count(item))

    def out(self, circuit: Circuit, lane: int) -> bytes:
        return b"".join(self.results[id(circuit), lane])

    def wait(self) -> None:
        """Deliver until every submitted item has its result (the pool may join several items
        of a lane into one batch, so results are counted in cells, not calls)."""
        self.sink.pump(self.pool, lambda: self.pool.in_flight == 0, limit=60)

    def close(self) -> None:
        self.pool.close()


def cut(stream: bytes, rng: random.Random, pieces: int) -> list[bytes]:
    """``stream`` cut at ``pieces - 1`` random offsets (records split anywhere)."""
    offsets = sorted(rng.sample(range(1, len(stream)), min(pieces - 1, len(stream) - 1)))
    bounds = [0, *offsets, len(stream)]
    return [stream[a:b] for a, b in itertools.pairwise(bounds)]


def test_links_on_the_pool_byte_for_byte() -> None:
    rng = random.Random(514)
    links = Links()
    try:
        up = [[os.urandom(CELL * rng.randint(1, 127)) for _ in range(8)] for _ in range(LINKS)]
        down = [[os.urandom(CELL * rng.randint(1, 127)) for _ in range(8)] for _ in range(LINKS)]
        # Both directions of every link encrypted at once; a list item is a loop iteration's
        # cells as pieces.
        work: list[tuple[Circuit, int, Any]] = []
        for (client, server), u, d in zip(links.pairs, up, down, strict=True):
            for i in range(8):
                work.append((client, tlslanes.LANE_ENCRYPT, u[i] if i % 2 else [u[i][:CELL],
                                                                                 u[i][CELL:]]))
                work.append((server, tlslanes.LANE_ENCRYPT, d[i]))
        links.submit(work)
        links.pool.start()  # every circuit is queued already: the first turns are grouped
        links.wait()
        sent_before = {id(c): len(links.out(c, tlslanes.LANE_ENCRYPT))
                       for pair in links.pairs for c in pair}
        # Each record stream re-cut anywhere goes to the other end's decrypt lane, while that
        # end's encrypt lane gets more work: both lanes of one session busy at once.
        more = [os.urandom(CELL * 50) for _ in range(LINKS)]
        work = []
        for (client, server), extra in zip(links.pairs, more, strict=True):
            to_server = links.out(client, tlslanes.LANE_ENCRYPT)
            to_client = links.out(server, tlslanes.LANE_ENCRYPT)
            for piece in cut(to_server, rng, 9):
                work.append((server, tlslanes.LANE_DECRYPT, piece))
                work.append((server, tlslanes.LANE_ENCRYPT, extra[: CELL * 5]))
            for piece in cut(to_client, rng, 9):
                work.append((client, tlslanes.LANE_DECRYPT, piece))
        links.submit(work)
        links.wait()
        assert not links.errors, dict(links.errors)
        for (client, server), u, d in zip(links.pairs, up, down, strict=True):
            assert links.out(server, tlslanes.LANE_DECRYPT) == b"".join(u)
            assert links.out(client, tlslanes.LANE_DECRYPT) == b"".join(d)
        # The server's later records still decrypt on the client, after everything before.
        for (client, server), extra in zip(links.pairs, more, strict=True):
            tail = links.out(server, tlslanes.LANE_ENCRYPT)[sent_before[id(server)] :]
            assert client.state.decrypt(tail) == extra[: CELL * 5] * 9
        assert max(links.group_sizes) > 1  # several links crypted by one tls_group call
    finally:
        links.close()


def test_a_corrupt_record_fails_its_link_alone() -> None:
    links = Links()
    try:
        (bad_client, bad_server), (good_client, good_server) = links.pairs[:2]
        records = bad_client.state.encrypt(os.urandom(CELL * 20))
        corrupt = bytearray(records)
        corrupt[len(corrupt) // 2] ^= 1
        good = good_client.state.encrypt(b"fine" * 100)
        links.submit([(bad_server, tlslanes.LANE_DECRYPT, bytes(corrupt)),
                      (good_server, tlslanes.LANE_DECRYPT, good)])
        links.pool.start()
        links.wait()
        assert links.out(good_server, tlslanes.LANE_DECRYPT) == b"fine" * 100
        [error] = links.errors[id(bad_server)]
        assert isinstance(error, TlsError) and "TLS record error" in str(error)
        assert bad_server.state.closed and not good_server.state.closed
        assert set(links.errors) == {id(bad_server)}
    finally:
        links.close()


def test_count() -> None:
    assert tlslanes.count(b"") == 1
    assert tlslanes.count(bytes(514 * 3 + 100)) == 3
    assert tlslanes.count([bytes(514), bytes(1028)]) == 2  # the pool counts list elements
