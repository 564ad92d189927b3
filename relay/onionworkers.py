"""CREATE2 handshakes on the worker pool, behind tor's onion queue: the job tor's cpuworkers were
built for, on the email's pool.

A relay answers every CREATE2 with an ntor server handshake (three X25519 multiplications,
~120 µs). On the loop thread a flood of them stalls every circuit; ``cryptography``'s X25519
keeps the GIL, so a worker thread running the Python handshake would stall it all the same.
:class:`OnionHandshakes` therefore:

* queues each onionskin in an :class:`relay.onionqueue.OnionQueue` (tor's discipline: refused
  when the estimated wait exceeds ``MaxOnionQueueDelay``, culled after
  ``onion_queue_wait_cutoff``; both answered by the caller with DESTROY RESOURCELIMIT);
* opens one *handshake lane* per worker thread: a pool circuit at priority class 0, above the
  relay-cell crypto (class 1), whose process function answers a batch of up to ``batch``
  onionskins with ONE call of the C kernel (``relay._ntor.ntor_server_batch``), the GIL
  released for the whole batch; each lane has at most one batch in flight, so between batches
  a worker's next pick is relay crypto when any waits, and a bystander circuit waits for at
  most one batch of handshakes;
* hands each answer back on the loop thread (``on_answer``), with the measured cost fed back
  to the queue's estimate.

Without the C kernel (not built) the lanes run ``relay.handshakes.ntor_server`` (same bytes,
GIL held): the queue discipline still bounds the work.

Threads: everything is loop thread only, except :meth:`OnionHandshakes._answer`, the lanes'
process function, which runs on a worker that owns the lane.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from relay.handshakes import (
    HTYPE_NTOR,
    NTOR_ONIONSKIN_LEN,
    HandshakeError,
    NtorServerKey,
    ntor_onion_key_named,
    ntor_server,
)
from relay.onionqueue import OnionEntry, OnionQueue
from tor1.reference import HOP_MATERIAL_LEN
from workers.circuit import Circuit
from workers.pool import PoolClosedError, WorkerPool

try:
    from relay import _ntor
    _ntor.NtorKey  # noqa: B018 - loads the extension now, or raises ImportError
except ImportError:  # pragma: no cover - the extension is not built: the Python handshake
    _ntor = None  # type: ignore[assignment]

__all__ = ["HANDSHAKE_PRIORITY", "OnionHandshakes", "PendingCreate"]

log = logging.getLogger("relay.onion")

HANDSHAKE_PRIORITY = 0
"""The pool priority class of the handshake lanes: above relay crypto (the pool's default 1)."""
DEFAULT_BATCH = 8
"""Onionskins per kernel call: one batch is ~1 ms of a worker, what a bystander may wait."""

AnswerFn = Callable[["PendingCreate", "bytes | None", "bytes | None", "str | None"], None]
"""``on_answer(pending, reply, material, error)``: ``reply`` (CREATED2 HDATA) and ``material``
(72 bytes of hop keys), or ``error`` (the handshake failed: DESTROY PROTOCOL)."""


class PendingCreate:
    """One CREATE2 waiting for its handshake: where it came from, and its queue entry."""

    __slots__ = ("cancelled", "circ_id", "entry", "hdata", "peer")

    def __init__(self, peer: Any, circ_id: int, hdata: bytes) -> None:
        """A CREATE2 from ``peer`` on ``circ_id`` with onionskin ``hdata``. Loop thread only."""
        self.peer = peer
        self.circ_id = circ_id
        self.hdata = hdata
        self.entry: OnionEntry | None = None
        self.cancelled = False

    def __repr__(self) -> str:
        return f"<PendingCreate {self.circ_id:#x}{' cancelled' if self.cancelled else ''}>"


class _Keys:
    """What a lane's worker reads once per batch: the onion keys valid now (replaced, never
    mutated, on rotation)."""

    __slots__ = ("kernel", "python")

    def __init__(self, python: tuple[NtorServerKey, ...], kernel: tuple[Any, ...]) -> None:
        self.python = python
        self.kernel = kernel


class OnionHandshakes:
    """CREATE2 onionskins queued, answered on the pool, handed back. See the module doc."""

    def __init__(self, pool: WorkerPool, keys: Callable[[], Sequence[NtorServerKey]],
                 on_answer: AnswerFn, *, lanes: int, batch: int = DEFAULT_BATCH,
                 queue: OnionQueue | None = None) -> None:
        """``keys()`` gives the ntor keys valid now (current first); ``lanes`` is normally the
        pool's worker count. Lanes are opened by :meth:`start`. Loop thread only."""
        self._pool = pool
        self._keys_fn = keys
        self._on_answer = on_answer
        self._batch = batch
        self.queue = queue if queue is not None else OnionQueue(max(1, lanes))
        self._lane_count = max(1, lanes)
        self._keys = self._load_keys()
        self._idle: list[Circuit] = []
        self._lanes: list[Circuit] = []
        self.answered = 0
        self.failed = 0
        self.batches = 0

    def start(self) -> None:
        """Open the handshake lanes on the (started) pool. Loop thread only."""
        for index in range(self._lane_count):
            lane = self._pool.open_circuit(self, process=OnionHandshakes._answer,
                                           joined=False, priority=HANDSHAKE_PRIORITY,
                                           on_result=self._on_result, on_error=self._on_error,
                                           context=index)
            self._lanes.append(lane)
            self._idle.append(lane)

    @property
    def kernel(self) -> bool:
        """True when the C kernel answers the handshakes. Any thread."""
        return _ntor is not None

    def refresh_keys(self) -> None:
        """The onion keys rotated: later batches use the new set. Loop thread only."""
        self._keys = self._load_keys()

    def _load_keys(self) -> _Keys:
        python = tuple(self._keys_fn())
        kernel: tuple[Any, ...] = ()
        if _ntor is not None:
            kernel = tuple(_ntor.NtorKey(k.onion_key.private_bytes_raw(), k.identity_digest)
                           for k in python)
        return _Keys(python, kernel)

    # ------------------------------------------------------------------ loop side

    def add(self, pending: PendingCreate) -> list[PendingCreate]:
        """Queue a CREATE2; returns what must be answered with DESTROY RESOURCELIMIT now:
        onionskins culled for waiting too long and, when refused, ``pending`` itself.
        Loop thread only."""
        result = self.queue.add(HTYPE_NTOR, pending)
        drop = [entry.item for entry in result.culled]
        if result.refused:
            drop.append(pending)
        else:
            pending.entry = result.entry
            self._feed()
        return drop

    def cancel(self, pending: PendingCreate) -> None:
        """The circuit went away before its answer: skip it. Loop thread only."""
        pending.cancelled = True
        if pending.entry is not None:
            self.queue.cancel(pending.entry)

    def close(self) -> list[PendingCreate]:
        """Take every queued onionskin out (shutdown); returns them. Loop thread only."""
        return [entry.item for entry in self.queue.drain()]

    def stats(self) -> dict[str, Any]:
        """Counters (JSON-ready). Loop thread only."""
        return {"answered": self.answered, "failed": self.failed, "batches": self.batches,
                "kernel": self.kernel, "lanes": len(self._lanes), **{
                    f"queue_{k}": v for k, v in self.queue.stats().items()
                    if isinstance(v, int | float)}}

    def _feed(self) -> None:
        while self._idle:
            entries = self.queue.take(self._batch)
            if not entries:
                return
            lane = self._idle.pop()
            try:
                self._pool.submit(lane, 0, [entry.item for entry in entries])
            except PoolClosedError:
                return

    def _on_result(self, lane: Circuit, _: int, result: Any) -> None:
        batch, answers, seconds = result
        self.queue.record_cost(HTYPE_NTOR, len(batch), seconds)
        self.batches += 1
        self._idle.append(lane)
        for pending, answer in zip(batch, answers, strict=True):
            if pending.cancelled:
                continue
            if isinstance(answer, BaseException):
                self.failed += 1
                self._on_answer(pending, None, None, str(answer))
            else:
                self.answered += 1
                reply, material = answer
                self._on_answer(pending, reply, material[:HOP_MATERIAL_LEN], None)
        self._feed()

    def _on_error(self, lane: Circuit, _: int, exc: BaseException) -> None:
        log.error("handshake lane %s failed: %r", lane.context, exc)

    # ------------------------------------------------------------------ worker side

    @staticmethod
    def _answer(self: OnionHandshakes, _: int, batch: list[PendingCreate]) -> Any:
        """One batch of onionskins, answered in one kernel call. Worker thread (owns the
        lane); reads only the immutable key set and each onionskin."""
        keys = self._keys
        started = time.perf_counter()
        if _ntor is not None:
            answers = _ntor.ntor_server_batch([(keys.kernel, p.hdata) for p in batch])
        else:
            answers = [_python_answer(keys.python, p.hdata) for p in batch]
        return batch, answers, time.perf_counter() - started


def _python_answer(keys: tuple[NtorServerKey, ...], hdata: bytes) -> Any:
    """The Python handshake with the key the onionskin names (the kernel's fallback)."""
    wanted = ntor_onion_key_named(hdata) if len(hdata) >= NTOR_ONIONSKIN_LEN else b""
    for key in keys:
        if key.onion_key_public == wanted:
            try:
                return ntor_server(key, hdata)
            except HandshakeError as exc:
                return exc
    return HandshakeError("ntor: onionskin names an onion key we do not have")
