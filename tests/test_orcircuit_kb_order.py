"""A circuit's Kb stream: cells this relay originates and cells it relays toward the client
share one keystream, so their batches must never be in the pool at the same time in
different lanes (``relay/orcircuit.py``, "BACKWARD and ORIGINATE").

The case that broke it: a small flush crypted on the loop thread (``_crypt_small``) whose
forward half makes the relay originate a cell (as an exit edge answering a BEGIN does) while
its backward half is crypted inline. Here the circuit is a real ``OrCircuit`` on a real
reactor and worker pool; only its links and node are stand-ins that record what is written.
"""

from __future__ import annotations

import os
from typing import Any

from reactor import Reactor, ReplyQueue
from relay.circuits import pack_relay
from relay.orcircuit import BACKWARD, ORIGINATE, OrCircuit, Peer, crypt_batch
from relay.relaylimits import CellQueueCaps
from tests.support_loop import run_until_met
from tor1 import CELL_PAYLOAD_LEN
from tor1.backend import relay_crypto_for
from tor1.reference import HopKeys
from workers.pool import WorkerPool

PAYLOAD = CELL_PAYLOAD_LEN


class _Link:
    """What a Peer and an OrCircuit use of a link: registration and writes, recorded."""

    is_open = True
    name = "stand-in"
    relay_link = True
    peer_identity = None

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.cells_out = 0

    def add_circuit(self, handler: Any, circ_id: int | None = None, batch: Any = None) -> int:
        return circ_id or 1

    def write_cells(self, data: bytes, count: int = 0) -> None:
        self.written.append(bytes(data))

    def send_cells(self, data: bytes, count: int) -> None:
        self.written.append(bytes(data))

    def remove_circuit(self, circ_id: int) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


class _Host:
    """The node's side of a circuit, minus everything this test does not reach."""

    inline_cells = 8
    circuit_pressure_pauses = 0

    def __init__(self, pool: WorkerPool) -> None:
        self.pool = pool
        self.cells_crypted = self.cells_crypted_inline = self.inline_crypto_errors = 0
        self.dirty: list[OrCircuit] = []

    def mark_dirty(self, circuit: OrCircuit) -> None:
        self.dirty.append(circuit)

    def cell_queue_caps(self) -> CellQueueCaps:
        return CellQueueCaps()

    def queued_changed(self, circuit: OrCircuit) -> None:
        pass


class _AnsweringCircuit(OrCircuit):
    """Every forward batch makes this relay originate one cell toward the client, as an exit
    edge answering a BEGIN would (synchronously, inside the forward half of a flush)."""

    __slots__ = ()

    def _forward_done(self, out: bytes, flags: bytes, tags: bytes) -> None:
        self._fwd_delivered += len(flags)
        self.originate([pack_relay(3, 1, b"answer")])


def _flush(host: _Host) -> list[tuple[Any, int, Any, int]]:
    """One end-of-iteration flush of the dirty circuits, as the node's ``_flush`` does;
    the entries submitted to the pool."""
    work: list[tuple[Any, int, Any, int]] = []
    dirty, host.dirty = host.dirty, []
    for circuit in dirty:
        circuit.take_submits(work)
    return work


def test_an_origin_cell_made_during_an_inline_flush_keeps_the_kb_fence() -> None:
    keys = HopKeys.from_material(os.urandom(72))
    with Reactor() as reactor:
        pool = WorkerPool(None, threads=1, lanes=3, process=crypt_batch)
        pool.set_replies(ReplyQueue(reactor, pool.deliver), owned=True)
        pool.start()
        try:
            host = _Host(pool)
            prev = Peer(_Link())  # type: ignore[arg-type]
            circuit = _AnsweringCircuit(host, prev, 5, relay_crypto_for(keys))
            # one flush: a forward cell (its handling originates a cell) and a backward cell
            circuit._relay_from_prev(os.urandom(PAYLOAD), 1, None)
            circuit._relay_from_next(os.urandom(PAYLOAD), 1, None)
            assert _flush(host) == []  # both crypted inline, nothing for the pool yet
            assert len(prev.link.written) == 1  # the backward cell went out at once
            # the originated cell waits for the next round of the flush, in the ORIGINATE lane;
            # 20 backward cells arrive before that round
            circuit._relay_from_next(os.urandom(PAYLOAD * 20), 20, None)
            for _ in range(4):  # rounds until everything is written
                work = _flush(host)
                lanes = {lane for _, lane, _, _ in work}
                assert not {BACKWARD, ORIGINATE} <= lanes, "both Kb lanes in the pool at once"
                if work:
                    pool.submit_many(work)
                run_until_met(reactor, lambda: bool(host.dirty) or len(prev.link.written) == 3,
                              10)
                if len(prev.link.written) == 3:
                    break
            sizes = [len(data) // 514 for data in prev.link.written]
            assert sizes == [1, 1, 20]  # backward, then the originated cell, then 20 backward
        finally:
            pool.close()
