"""The relay side of one circuit: two links joined through the worker pool.

Data path
---------
An :class:`OrCircuit` is registered on its previous hop's link (``handler(command, payload)``
per cell, one dict lookup in :class:`relay.link.Link`) and, once extended, on its next hop's.
The handlers do almost nothing per cell: a RELAY payload is appended to the circuit's list for
that direction and the circuit is marked *dirty* with its relay node once. At the end of the
loop iteration the node flushes every dirty circuit: **one** ``WorkerPool.submit`` per circuit
and direction with the list of payloads as it is (the C kernel reads a list of pieces as one
joined buffer, with the GIL released; nothing is joined on the loop thread). So all cells of a
read callback -- of all the reads of an iteration, in fact -- are grouped per circuit in one
pass and submitted together.

The pool crypts each batch on a worker, with the same bytes either way:

* on the kernel backend (:class:`tor1.fast.FastRelayCrypto`, the default) the circuit
  is opened with the node's ``group`` function (:func:`relay_group_for`, built on
  :func:`tor1.fast.relay_group` with :data:`RELAY_DIRECTION_OPS`), so a worker crypts
  the batches of several circuits -- all three directions -- in ONE GIL-free
  ``crypt_group`` kernel call;
* on the reference backend (``RELAYCRYPT_PURE=1``) there is no group and the pool calls
  :func:`crypt_batch` per batch.

Per direction the work is:

* ``FORWARD`` (cells from the client side): ``forward_tagged_buf`` decrypts with Kf and flags
  the cells recognized here. The reply comes back as ``(plaintext, flags, tags)``, ``tags``
  holding the SENDME tag of each recognized cell (:mod:`relay.sendme`; nothing at a middle
  relay). If no flag is set (a middle relay's every cell) the whole batch goes to the next hop
  as one ``bytes`` built by :func:`relay.circuits.wire_cells` and one ``write``, without looking
  at any payload. Cells that are recognized are handled here: EXTEND2 by this circuit,
  BEGIN/DATA/END/SENDME by its :class:`relay.exit.ExitEdge`, which looks up the tag of one
  DATA cell in 100. A cell that is not recognized and has no next hop fails the digest check at
  the last hop: the circuit is destroyed (``PROTOCOL``).
* ``BACKWARD`` (cells from the next hop): ``backward_buf`` adds our Kb layer; written to the
  previous hop in one ``write``.
* ``ORIGINATE`` (cells this relay sends toward the client: EXTENDED2, the exit's CONNECTED,
  DATA, END, SENDME): ``originate_tagged_buf`` sets the digest with Db and encrypts with Kb,
  and returns the tags of the DATA cells the exit marked (one in 100), which go to the edge's
  record before the cells are written.

BACKWARD and ORIGINATE both advance the one Kb keystream, and the pool serves directions
independently, so their relative order is kept here: a batch of one waits in ``_kb_held`` while
cells of the other are in flight (a fence that honest traffic never trips: a middle relay
originates only EXTENDED2 before any backward cell exists, and an exit has no next hop).

Small batches
-------------
Handing a batch to a worker costs two thread wake-ups (the worker's, then the loop's through the
reply queue): tens to hundreds of microseconds on a virtual machine, against about 0.1 µs of AES
per cell. So a flush of a circuit holds at most ``host.inline_cells`` cells (8 by default) and
the circuit has nothing in the pool, its cells are crypted on the loop thread, with the same
process function, and the results handled at once: an idle circuit's cell crosses the relay
without waiting for any thread, and a busy circuit's (whose cells are in the pool) still queues
behind them, so the order per direction holds. Under load, batches grow and circuits have cells
in flight: the pool does the work (docs/tuning.md has the measurements).

RELAY_EARLY is passed on as RELAY_EARLY: the circuit remembers the forward index of each one
(there are at most a few per circuit), so the common batch needs no per-cell command.

Teardown
--------
DESTROY from either side closes the circuit and is passed to the other side; a link that
closes delivers a DESTROY to each of its circuits (``relay.link``), so the rest of the circuit
is torn down the same way. :meth:`OrCircuit.close` cancels the circuit's queued crypto (results
in flight are discarded by the pool), closes its exit streams and releases every read gate it
held.

Back-pressure
-------------
The pool's per-circuit high-water signal holds the read gates of both links of the circuit
until the low-water signal. Writes go through the node, which pauses the source of a write
(the other link, or the exit's targets) while the destination link's write buffer is above its
high watermark -- except that a link to another relay is never paused because a link to yet
another relay is full: around a ring of relays (A->B->C->A, which the network's circuits form)
such pauses could wait on each other forever. A client link or an exit target is always a
valid source to pause, and a client link always a valid destination to wait for (the client
keeps reading), so every chain of waits ends; between relays, the SENDME windows bound what
can queue.

Threads: loop thread only, except :func:`crypt_batch` and the ``group`` function, which run on a
worker that owns the circuit(s); :func:`relay_group_for` may be called from any thread.
"""

from __future__ import annotations

import logging
import time
from bisect import bisect_left
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any, Protocol

from relay.cells import CellCommand, DestroyReason, RelayCommand
from relay.circuitmux import LinkScheduler, OutQueue
from relay.circuits import ReadGate, crypt_frame, pack_relay, relay_body, wire_cells
from relay.exit import ExitEdge, TagLookup
from relay.handshakes import (
    BodyError,
    Extend2Body,
    decode_created2,
    encode_create2,
    encode_extended2,
)
from relay.relaylimits import (
    MAX_RELAY_EARLY_CELLS_PER_CIRCUIT,
    RELAY_CIRC_CELL_QUEUE_SIZE_MIN,
    CellQueueCaps,
)
from tor1 import CELL_PAYLOAD_LEN, SENDME_TAG_LEN
from workers.circuit import Circuit, GroupFn
from workers.pool import WorkerPool

if TYPE_CHECKING:
    from reactor import Reactor, TimerHandle
    from relay.link import Link

__all__ = [
    "BACKWARD",
    "FORWARD",
    "ORIGINATE",
    "RELAY_DIRECTION_OPS",
    "CircuitHost",
    "ExtendRequest",
    "OrCircuit",
    "Peer",
    "crypt_batch",
    "new_relay_group",
    "relay_group_for",
]

log = logging.getLogger("relay.circuit")

EDGE_READ_HIGH = 256
"""Cells held for the client at which an exit stops reading its targets (tor's
``CELL_QUEUE_HIGHWATER_SIZE``)."""
EDGE_READ_LOW = 64
"""... and resumes (tor's ``CELL_QUEUE_LOWWATER_SIZE``)."""

FORWARD = 0
BACKWARD = 1
ORIGINATE = 2

_RELAY = int(CellCommand.RELAY)
_RELAY_EARLY = int(CellCommand.RELAY_EARLY)
_DESTROY = int(CellCommand.DESTROY)
_PADDINGS = (int(CellCommand.PADDING), int(CellCommand.VPADDING))
_EXTEND2 = int(RelayCommand.EXTEND2)
_EXTEND = int(RelayCommand.EXTEND)
_DROP = int(RelayCommand.DROP)
_SIZE = CELL_PAYLOAD_LEN

_OPEN = "open"
_EXTENDING = "extending"
_CLOSED = "closed"


_fast: ModuleType | None
try:
    from tor1 import fast as _fast
except ImportError:  # pragma: no cover - the C extension is not built: reference backend only
    _fast = None

#: Kernel op per pool direction, indexed by FORWARD, BACKWARD, ORIGINATE: the ops that
#: ``forward_tagged_buf``, ``backward_buf`` and ``originate_tagged_buf`` run
#: (``tor1.fast.RELAY_TAGGED_OPS`` is ordered the same way; tests/test_relay_group.py checks
#: the bytes). Empty without the kernel.
RELAY_DIRECTION_OPS: tuple[int, ...] = _fast.RELAY_TAGGED_OPS if _fast is not None else ()


def crypt_batch(state: Any, direction: int, batch: Any) -> Any:
    """The pool's process function: one kernel call for the whole batch, with the SENDME
    tags where there are digests. Worker thread."""
    if direction == FORWARD:
        return state.forward_tagged_buf(batch)
    if direction == BACKWARD:
        return state.backward_buf(batch)
    return state.originate_tagged_buf(batch)


def relay_group_for(crypto: Any, shared: GroupFn | None) -> GroupFn | None:
    """The ``group`` function a circuit with ``crypto`` state is opened with: ``shared`` (one
    :func:`tor1.fast.relay_group` per node, so that the pool puts all the node's
    circuits in the same ``crypt_group`` call) when ``crypto`` is the kernel's
    ``FastRelayCrypto``, else None (the reference backend has no group: ``crypt_batch`` per
    batch). Any thread."""
    if shared is not None and _fast is not None and isinstance(crypto, _fast.FastRelayCrypto):
        return shared
    return None


def new_relay_group() -> GroupFn | None:
    """A fresh ``group`` function for a node's circuits (kernel op per direction from
    :data:`RELAY_DIRECTION_OPS`), or None without the kernel extension. Any thread."""
    if _fast is None:
        return None
    return _fast.relay_group(RELAY_DIRECTION_OPS)


class Peer:
    """The relay node's view of one link: its read gate and its write scheduler."""

    __slots__ = (
        "address", "claimed_relay", "client_ip", "dos_ticket", "gate", "identity",
        "idle_timeout", "idle_timer", "link", "open_waiters", "scheduler",
    )

    def __init__(self, link: Link, address: tuple[str, int] | None = None,
                 identity: bytes | None = None) -> None:
        """Wrap ``link``; ``address`` and ``identity`` (RSA digest) name the relay a link we
        opened was dialed for. Loop thread only."""
        self.link = link
        self.gate = ReadGate(link)
        self.address = address  # set for links this relay opened (reused by EXTEND2)
        self.identity = identity
        self.claimed_relay = False  # a plain demo link that carried CREATE2 (proves nothing)
        self.client_ip: str | None = None  # an accepted link's peer address (DoS accounting)
        self.dos_ticket: object | None = None
        self.scheduler = LinkScheduler(link)  # circuits' cells waiting for this link
        self.idle_timer: TimerHandle | None = None  # closes the link if it stays unused
        self.idle_timeout = 0.0  # drawn when the link first goes idle
        self.open_waiters: list[OrCircuit] = []  # circuits waiting for this link to open

    @property
    def relay_link(self) -> bool:
        """A link to another relay: one we opened, or one whose initiator authenticated as a
        relay (its CREATEs are not a client's for the DoS limits). Loop thread only."""
        if self.address is not None or self.claimed_relay:
            return True
        peer = self.link.peer_identity
        return peer is not None and peer.authenticated

    def __repr__(self) -> str:
        return f"<Peer {self.link.name}>"


@dataclass(frozen=True)
class ExtendRequest:
    """An EXTEND2 that passed tor's checks: the body (its handshake goes on in CREATE2), the
    address chosen to dial, and the identities the next hop must prove."""

    body: Extend2Body
    address: tuple[str, int]
    rsa_id: bytes
    ed25519_id: bytes | None


class CircuitHost(Protocol):
    """What a circuit needs from its relay node."""

    reactor: Reactor
    pool: WorkerPool
    circuit_pressure_pauses: int
    inline_cells: int
    """A flush of at most this many cells, of a circuit with nothing in the pool, is crypted
    on the loop thread (see "Small batches" above); 0: never."""
    cells_crypted: int
    """Relay cells crypted for this host's circuits, here or on the pool."""
    cells_crypted_inline: int
    """Of those, the cells crypted on the loop thread."""
    inline_crypto_errors: int
    """Batches whose crypto raised on the loop thread (each closed its circuit)."""

    def mark_dirty(self, circuit: OrCircuit) -> None:
        """Call ``circuit.take_submits(work)`` at the end of this loop iteration. Loop thread
        only."""
        ...

    def cell_queue_caps(self) -> CellQueueCaps:
        """The per-circuit queue caps (tor's ``circ_max_cell_queue_size*``). Loop thread
        only."""
        ...

    def queue_full(self, circuit: OrCircuit, toward_exit: bool, why: str) -> None:
        """A circuit's queue passed its cap: close it (RESOURCELIMIT), tell the DoS
        accounting. Loop thread only."""
        ...

    def queued_changed(self, circuit: OrCircuit) -> None:
        """What ``circuit`` holds queued changed (the OOM accounting); sets
        ``circuit.accounted_bytes`` to what it now accounts for it (a circuit accounted at 0
        that holds nothing skips this call after a small flush). Loop thread only."""
        ...

    def link_in_use(self, peer: Peer) -> None:
        """A circuit now uses ``peer``'s link (its idle timer stops). Loop thread only."""
        ...

    def check_extend(self, circuit: OrCircuit, body: bytes, *, early: bool,
                     stream_id: int) -> ExtendRequest | None:
        """tor's checks of an EXTEND2 body: the request to carry out, or None when the cell is
        dropped or the circuit was closed for it. Loop thread only."""
        ...

    def extend(self, circuit: OrCircuit, request: ExtendRequest) -> None:
        """Get an open link to the relay ``request`` names, then ``circuit.attach_next(peer)``
        (or ``circuit.extend_failed(why, reason)``). Loop thread only."""
        ...

    def make_edge(self, circuit: OrCircuit) -> ExitEdge:
        """A new exit edge for ``circuit``. Loop thread only."""
        ...

    def circuit_closed(self, circuit: OrCircuit, why: str) -> None:
        """Bookkeeping after ``circuit`` closed. Loop thread only."""
        ...

    def unexpected_cell(self, peer: Peer, circ_id: int, command: int) -> bool:
        """A circuit got a cell it has no use for; True: close just the circuit. Loop thread
        only."""
        ...


class OrCircuit:
    """One circuit at a relay: previous hop, optional next hop, crypto on the pool."""

    __slots__ = (
        "_backward_crypt",
        "_bwd",
        "_bwd_cells",
        "_crypto",
        "_dirty",
        "_earlies",
        "_early",
        "_edge_paused",
        "_extend",
        "_forward_crypt",
        "_fwd",
        "_fwd_cells",
        "_fwd_delivered",
        "_fwd_flight",
        "_fwd_submitted",
        "_kb_flight",
        "_kb_held",
        "_kb_in_flight",
        "_kb_lane",
        "_kb_ready",
        "_pressure",
        "_to_next",
        "_to_prev",
        "accounted_bytes",
        "edge",
        "host",
        "next",
        "next_id",
        "pool_circuit",
        "prev",
        "prev_id",
        "state",
    )

    def __init__(
        self,
        host: CircuitHost,
        prev: Peer,
        prev_id: int,
        crypto: Any,
        *,
        group: GroupFn | None = None,
    ) -> None:
        """Register on ``prev`` under the peer's ``prev_id`` (``LinkError`` if not allowed)
        and open the circuit on the pool, grouped with ``group`` when given (it must give
        :func:`crypt_batch`'s results for ``crypto``: see :func:`relay_group_for`). Loop thread
        only."""
        self.host = host
        self.prev = prev
        self.prev_id = prev.link.add_circuit(self._from_prev, prev_id, batch=self._relay_from_prev)
        self.next: Peer | None = None
        self.next_id = 0
        self.state = _OPEN
        self._crypto = crypto
        # the kernel calls of small batches (see _crypt_small), looked up once: the kernel's
        # own methods when it has them, else the backend's
        methods = getattr(crypto, "kernel_batch_methods", None)
        self._forward_crypt, self._backward_crypt = (
            methods if methods is not None else (crypto.forward_tagged_buf, crypto.backward_buf))
        self.pool_circuit: Circuit = host.pool.open_circuit(
            crypto,
            process=crypt_batch,
            group=group,
            on_result=self._on_result,
            on_error=self._on_error,
            on_pressure=self._on_pressure,
            context=self,
        )
        # cells gathered since the last flush, per direction: joined payloads, as read
        self._fwd: list[bytes] = []
        self._fwd_cells = 0
        self._bwd: list[bytes] = []
        self._bwd_cells = 0
        self._dirty = False
        self._early: deque[int] = deque()
        self._earlies = 0  # RELAY_EARLY cells received (tor allows 8)
        self._fwd_submitted = 0
        self._fwd_delivered = 0
        # (time submitted, cells) per batch in the pool, in delivery order: the OOM handler
        # needs the age of a circuit's oldest queued cell
        self._fwd_flight: deque[tuple[float, int]] = deque()
        self._kb_flight: deque[tuple[float, int]] = deque()
        self._to_prev = OutQueue(prev.scheduler, self._sent_toward_client)
        self._to_next: OutQueue | None = None
        self._edge_paused = False
        self._kb_lane = BACKWARD
        self._kb_in_flight = 0
        self._kb_ready: list[tuple[Circuit, int, Any, int]] = []
        self._kb_held: deque[tuple[int, Any, int]] = deque()
        self._extend: ExtendRequest | None = None
        self._pressure = False
        self.edge: ExitEdge | None = None
        self.accounted_bytes = 0
        """What the host's MaxMemInQueues accounting holds for this circuit (its
        ``queued_changed`` sets it): a flush that leaves a circuit accounted at 0 holding
        nothing skips that call."""

    def __repr__(self) -> str:
        return f"<OrCircuit {self.prev_id:#x} on {self.prev.link.name} {self.state}>"

    @property
    def closed(self) -> bool:
        """True once closed. Loop thread only."""
        return self.state is _CLOSED

    # ------------------------------------------------------------------ cells from the links

    def _relay_from_prev(self, payloads: bytes, count: int,
                         early: tuple[int, ...] | None) -> None:
        """A read's RELAY/RELAY_EARLY cells from the previous hop (joined payloads)."""
        if self.state is _CLOSED:
            return
        if early is not None:
            self._earlies += len(early)
            if self._earlies > MAX_RELAY_EARLY_CELLS_PER_CIRCUIT:
                log.info("%r: more than %d RELAY_EARLY cells; closing the circuit", self,
                         MAX_RELAY_EARLY_CELLS_PER_CIRCUIT)
                self.close(f"more than {MAX_RELAY_EARLY_CELLS_PER_CIRCUIT} RELAY_EARLY "
                           "cells", DestroyReason.PROTOCOL)
                return
            base = self._fwd_submitted + self._fwd_cells
            self._early.extend(base + position for position in early)
        self._fwd.append(payloads)
        self._fwd_cells += count
        if not self._dirty:
            self._dirty = True
            self.host.mark_dirty(self)

    def _relay_from_next(self, payloads: bytes, count: int,
                         early: tuple[int, ...] | None) -> None:
        """A read's RELAY/RELAY_EARLY cells from the next hop (joined payloads)."""
        if self.state is _CLOSED:
            return
        if early is not None:  # tor: RELAY_EARLY toward the client is a protocol violation
            self.close("RELAY_EARLY cell from the next hop", DestroyReason.PROTOCOL)
            return
        self._bwd.append(payloads)
        self._bwd_cells += count
        if not self._dirty:
            self._dirty = True
            self.host.mark_dirty(self)

    def _from_prev(self, command: int, payload: bytes) -> None:
        if command == _RELAY or command == _RELAY_EARLY:  # not grouped (e.g. a direct call)
            self._relay_from_prev(payload, 1, (0,) if command == _RELAY_EARLY else None)
        elif command == _DESTROY:
            self.close("DESTROY from the previous hop", _reason(payload), tell_prev=False)
        elif command not in _PADDINGS and self.host.unexpected_cell(
            self.prev, self.prev_id, command
        ):
            self.close(f"unexpected cell command {command} from the previous hop")

    def _from_next(self, command: int, payload: bytes) -> None:
        if command == _RELAY or command == _RELAY_EARLY:  # not grouped (e.g. a direct call)
            self._relay_from_next(payload, 1, (0,) if command == _RELAY_EARLY else None)
        elif command == _DESTROY:
            self.close("DESTROY from the next hop", _reason(payload), tell_next=False)
        elif command == CellCommand.CREATED2 and self.state is _EXTENDING:
            try:
                extended2 = pack_relay(RelayCommand.EXTENDED2, 0,
                                       encode_extended2(decode_created2(payload)))
            except BodyError as exc:  # e.g. HLEN too long for an EXTENDED2: this circuit only
                self.close(f"bad CREATED2 from the next hop: {exc}", DestroyReason.PROTOCOL)
                return
            self.state = _OPEN
            self.originate([extended2])
        elif command not in _PADDINGS:
            assert self.next is not None
            if self.host.unexpected_cell(self.next, self.next_id, command):
                self.close(f"unexpected cell command {command} from the next hop")

    def take_submits(self, out: list[tuple[Circuit, int, Any, int]]) -> None:
        """Move the batches gathered since the last flush to ``out`` as ``(pool circuit, lane,
        cells, count)`` entries, at most one per lane, for the node's one ``submit_many``.
        Loop thread only (the node calls it at the end of the loop iteration)."""
        self._dirty = False
        if self.state is _CLOSED:
            self._fwd.clear()
            self._bwd.clear()
            self._fwd_cells = self._bwd_cells = 0
            self._kb_ready.clear()
            return
        # nothing of this circuit in the pool, in any lane (the pool's own count, which it
        # lowers before it delivers a result)
        idle = self.pool_circuit.in_flight == 0
        new = self._fwd_cells + self._bwd_cells
        small = idle and not self._kb_ready and new <= self.host.inline_cells
        # The caps cannot be reached by fewer new cells than the smallest cap tor allows when
        # nothing else is queued: skip building the two queue figures then.
        if (not (small and new <= RELAY_CIRC_CELL_QUEUE_SIZE_MIN and self._queues_empty())
                and not self._within_caps()):
            return
        if small:
            # nothing in the pool and nothing ready: no Kb batch is held or in flight either
            self._crypt_small()
            if self.state is not _CLOSED and (self.accounted_bytes or self.edge is not None
                                              or not self._queues_empty()):
                self.host.queued_changed(self)  # else it would account 0 bytes, as before
            return
        now = time.monotonic()
        entries: list[tuple[Circuit, int, Any, int]] = []
        if self._fwd:
            pieces, self._fwd = self._fwd, []
            count, self._fwd_cells = self._fwd_cells, 0
            self._fwd_submitted += count
            self._fwd_flight.append((now, count))
            # (a join of one piece is that piece: a read's group is not copied)
            entries.append((self.pool_circuit, FORWARD, b"".join(pieces), count))
        if self._bwd:
            pieces, self._bwd = self._bwd, []
            count, self._bwd_cells = self._bwd_cells, 0
            self._queue_kb(BACKWARD, b"".join(pieces), count)
        if self._kb_ready:
            for entry in self._kb_ready:
                self._kb_flight.append((now, entry[3]))
            entries.extend(self._kb_ready)
            self._kb_ready.clear()
        if idle and entries and sum(e[3] for e in entries) <= self.host.inline_cells:
            self._crypt_here(entries)
            if self.state is _CLOSED:
                return
        else:
            out.extend(entries)
        self.host.queued_changed(self)

    def _crypt_here(self, entries: list[tuple[Circuit, int, Any, int]]) -> None:
        """Crypt a small flush on the loop thread that :meth:`_crypt_small` does not take
        (one with Kb batches made ready: originated cells, or backward cells released from
        ``_kb_held``), through the pool's entries and delivery. Loop thread only."""
        host = self.host
        for _, lane, cells, count in entries:  # this circuit's own pool circuit
            try:
                result = crypt_batch(self._crypto, lane, cells)
            except Exception as exc:
                self._crypt_failed_here(lane, exc)
                return
            host.cells_crypted_inline += count
            self._deliver(lane, result)
            if self.state is _CLOSED:
                return

    def _crypt_failed_here(self, lane: int, exc: Exception) -> None:
        """A crypt on the loop thread raised: as a worker's exception, this circuit only."""
        self.host.inline_crypto_errors += 1
        self._on_error(self.pool_circuit, lane, exc, where="the loop thread")

    def _crypt_small(self) -> None:
        """Crypt a small flush on the loop thread, with the kernel calls of the pool's process
        function (``crypt_batch``), and pass the results on at once, forward first, as the
        pool would deliver them. Only called while none of this circuit's cells are in the pool
        or ready for it, so no worker holds its crypto state and the results keep their order
        (see "Small batches" above); the batches never enter the flight records. A batch with
        nothing for this relay is crypted and framed in one call (``crypt_frame``). Loop
        thread only."""
        host = self.host
        if self._fwd:
            pieces, self._fwd = self._fwd, []
            count, self._fwd_cells = self._fwd_cells, 0
            self._fwd_submitted += count
            try:
                if self._early or self.next is None or self.state is not _OPEN:
                    result = self._forward_crypt(b"".join(pieces))
                else:  # bytes when nothing is for this relay: wire cells for the next hop
                    result = crypt_frame(self._forward_crypt, b"".join(pieces), self.next_id)
            except Exception as exc:
                self._crypt_failed_here(FORWARD, exc)
                return
            host.cells_crypted_inline += count
            host.cells_crypted += count
            if result.__class__ is bytes:  # wire cells for the next hop, nothing for us
                self._fwd_delivered += count
                assert self.next is not None and self._to_next is not None
                self.next.scheduler.send(self._to_next, result, count)
            else:
                self._forward_done(*result)
            if self.state is _CLOSED:
                return
        if self._bwd:
            pieces, self._bwd = self._bwd, []
            count, self._bwd_cells = self._bwd_cells, 0
            # _kb_lane is left alone: these cells are crypted and sent now, and cells the
            # forward half made this relay originate may be waiting in _kb_ready under it
            try:
                wire = crypt_frame(self._backward_crypt, b"".join(pieces), self.prev_id)
            except Exception as exc:
                self._crypt_failed_here(BACKWARD, exc)
                return
            host.cells_crypted_inline += count
            host.cells_crypted += count
            # _send_toward_client written out: benchmarks.relay_trace counts a call of it as a
            # batch's result, which crypt_frame already was
            self.prev.scheduler.send(self._to_prev, wire, count)
            if self.edge is not None:
                self._consider_edge_reading()

    # ------------------------------------------------------------------ queue accounting

    def _queues_empty(self) -> bool:
        """No cell of this circuit waits in the pool, behind the Kb fence or in a link's
        queue (cells gathered for the next flush aside). Loop thread only."""
        return (self._fwd_submitted == self._fwd_delivered and not self._kb_in_flight
                and not self._kb_held and not self._to_prev.cells
                and (self._to_next is None or not self._to_next.cells))

    @property
    def queued_toward_exit(self) -> int:
        """Cells from the previous hop not yet written to the next: waiting for the flush,
        in the pool, or in the queue for the next link. Loop thread only."""
        ahead = self._to_next.cells if self._to_next is not None else 0
        return self._fwd_cells + self._fwd_submitted - self._fwd_delivered + ahead

    @property
    def queued_toward_client(self) -> int:
        """Cells for the previous hop not yet written to it (from the next hop or made
        here). Loop thread only."""
        held = sum(count for _, _, count in self._kb_held) if self._kb_held else 0
        return self._bwd_cells + self._kb_in_flight + held + self._to_prev.cells

    def oldest_queued(self) -> float | None:
        """When the oldest cell this circuit still holds was queued (monotonic seconds), or
        None: what the OOM handler orders circuits by. Loop thread only."""
        heads = [self._fwd_flight[0][0] if self._fwd_flight else None,
                 self._kb_flight[0][0] if self._kb_flight else None,
                 self._to_prev.oldest,
                 self._to_next.oldest if self._to_next is not None else None]
        known = [t for t in heads if t is not None]
        return min(known) if known else None

    def _within_caps(self) -> bool:
        """tor's per-circuit queue caps, checked once per flush: a circuit holding more than
        its cap is closed (RESOURCELIMIT). Honest circuits stay far below: SENDME windows
        bound what a circuit may have in flight. Loop thread only."""
        caps = self.host.cell_queue_caps()
        outbound, inbound = self.queued_toward_exit, self.queued_toward_client
        if outbound <= caps.toward_exit and inbound <= caps.toward_client:
            return True  # the common case, without building verdicts
        for queued, toward_exit in ((outbound, True), (inbound, False)):
            verdict = caps.check(queued, toward_exit, 0)
            if not verdict.allowed:
                self.host.queue_full(self, toward_exit, verdict.why)
                return False
        return True

    def originate(self, payloads: list[bytes]) -> None:
        """Send relay payloads from this relay toward the client (digest, Kb), with the next
        flush. Loop thread only."""
        if self.state is _CLOSED or not payloads:
            return
        self._queue_kb(ORIGINATE, payloads, len(payloads))
        self._mark_dirty()

    def _mark_dirty(self) -> None:
        if not self._dirty:
            self._dirty = True
            self.host.mark_dirty(self)

    def _queue_kb(self, lane: int, cells: Any, count: int) -> None:
        """Queue a Kb batch (joined payloads or a list) for the next flush, unless the other Kb
        lane has cells in flight (then it is held until they are delivered: see "BACKWARD and
        ORIGINATE" above)."""
        if self._kb_held or (self._kb_in_flight and self._kb_lane != lane):
            self._kb_held.append((lane, cells, count))
            return
        self._kb_lane = lane
        self._kb_in_flight += count
        self._kb_ready.append((self.pool_circuit, lane, cells, count))

    def _kb_delivered(self, count: int) -> None:
        self._kb_in_flight -= count
        held = self._kb_held
        if self._kb_in_flight or not held:
            return
        lane = held[0][0]
        while held and held[0][0] == lane:
            _, cells, count = held.popleft()
            self._kb_lane = lane
            self._kb_in_flight += count
            self._kb_ready.append((self.pool_circuit, lane, cells, count))
        self._mark_dirty()

    # ------------------------------------------------------------------ results

    def _on_result(self, pool_circuit: Circuit, direction: int, result: Any) -> None:
        self._deliver(direction, result)
        if self.state is not _CLOSED:
            self.host.queued_changed(self)

    def _deliver(self, direction: int, result: Any) -> None:
        """A crypted batch, from the pool or from :meth:`_crypt_here`: pass it on. The caller
        accounts the queues afterwards."""
        if direction == FORWARD:
            out, flags, tags = result
            self.host.cells_crypted += len(flags)
            _pop_flight(self._fwd_flight, len(flags))
            self._forward_done(out, flags, tags)
            return
        if direction == BACKWARD:
            out = result
        else:
            out, tags = result
            if tags and self.edge is not None and self.state is not _CLOSED:
                self.edge.record_tags(tags)  # before the cells leave: a SENDME can follow
        count = len(out) // _SIZE
        self.host.cells_crypted += count
        _pop_flight(self._kb_flight, count)
        self._kb_delivered(count)
        if self.state is _CLOSED:
            return
        self._send_toward_client(wire_cells(self.prev_id, _RELAY, out), count)

    def _send_toward_client(self, wire: bytes, count: int) -> None:
        """Crypted cells for the previous hop, framed: to its link, or its queue. Loop thread
        only."""
        self.prev.scheduler.send(self._to_prev, wire, count)
        if self.edge is not None:
            self._consider_edge_reading()

    def _sent_toward_client(self, cells: int) -> None:
        """Queued cells for the previous hop were written. Loop thread only."""
        if self.state is not _CLOSED:
            self._consider_edge_reading()
            self.host.queued_changed(self)

    def _sent_toward_exit(self, cells: int) -> None:
        """Queued cells for the next hop were written. Loop thread only."""
        if self.state is not _CLOSED:
            self.host.queued_changed(self)

    def _consider_edge_reading(self) -> None:
        """Stop reading the exit's targets while this circuit holds at least
        ``EDGE_READ_HIGH`` cells for the client, resume at ``EDGE_READ_LOW`` or fewer (tor's
        ``CELL_QUEUE_HIGHWATER_SIZE`` / ``CELL_QUEUE_LOWWATER_SIZE``). Loop thread only."""
        edge = self.edge
        if edge is None:
            return
        backlog = self.queued_toward_client
        if not self._edge_paused and backlog >= EDGE_READ_HIGH:
            self._edge_paused = True
            edge.pause_reading()
        elif self._edge_paused and backlog <= EDGE_READ_LOW:
            self._edge_paused = False
            edge.resume_reading()

    def _forward_done(self, out: bytes, flags: bytes, tags: bytes) -> None:
        count = len(flags)
        base = self._fwd_delivered
        self._fwd_delivered = base + count
        early: set[int] = set()
        while self._early and self._early[0] < base + count:
            early.add(self._early.popleft() - base)
        if 1 not in flags:
            self._pass_on(out, count, early)
            return
        local: Sequence[int]
        if 0 not in flags:  # an exit's usual batch: every cell is for this relay
            local = range(count)
        else:
            local = []
            passing: list[int] = []
            for index, flag in enumerate(flags):
                (local if flag else passing).append(index)
            joined = b"".join(out[i * _SIZE : (i + 1) * _SIZE] for i in passing)
            if early:  # positions of the RELAY_EARLY cells among those passed on: one pass
                position = {index: rank for rank, index in enumerate(passing)}
                early = {position[i] for i in early if i in position}
            self._pass_on(joined, len(passing), early)
            if self.state is _CLOSED:
                return
        self._handle_local(out, local, early, _tag_lookup(tags, local))

    def _pass_on(self, out: bytes, count: int, early: set[int]) -> None:
        """Send unrecognized forward cells to the next hop (RELAY_EARLY kept as such)."""
        nxt = self.next
        if nxt is None or self.state is not _OPEN:
            why = ("a relay cell not recognized at the last hop (digest mismatch)"
                   if nxt is None else "relay cells before the extension finished")
            log.warning("%r: %s; destroying the circuit", self, why)
            self.close(why, DestroyReason.PROTOCOL)
            return
        data = wire_cells(self.next_id, _RELAY, out, tuple(early) if early else None)
        assert self._to_next is not None
        nxt.scheduler.send(self._to_next, data, count)

    def _handle_local(self, out: bytes, indices: Sequence[int], early: set[int],
                      tag_of: TagLookup) -> None:
        """Handle the forward cells recognized here, in order."""
        edge_offsets: list[int] = []
        for index in indices:
            offset = index * _SIZE
            command = out[offset]
            if command == _EXTEND2:
                if edge_offsets:
                    self._to_edge(out, edge_offsets, tag_of)
                    edge_offsets = []
                self._on_extend2(out, offset, index in early)
            elif command == _EXTEND:
                self.close("EXTEND (TAP) is not supported", DestroyReason.PROTOCOL)
            elif command != _DROP:
                edge_offsets.append(offset)
            if self.state is _CLOSED:
                return
        if edge_offsets:
            self._to_edge(out, edge_offsets, tag_of)

    def _to_edge(self, out: bytes, offsets: list[int], tag_of: TagLookup) -> None:
        if self.edge is None:
            self.edge = self.host.make_edge(self)
        self.edge.handle(out, offsets, tag_of)

    def _on_extend2(self, out: bytes, offset: int, early: bool) -> None:
        try:
            _, stream_id, body = relay_body(out, offset)
        except ValueError as exc:
            self.close(f"bad EXTEND2: {exc}", DestroyReason.PROTOCOL)
            return
        request = self.host.check_extend(self, body, early=early, stream_id=stream_id)
        if request is None or self.state is _CLOSED:
            return  # dropped, or refused (the host closed the circuit)
        self.state = _EXTENDING
        self._extend = request
        self.host.extend(self, request)

    @property
    def extended(self) -> bool:
        """True once the circuit has, or is getting, a next hop, or carries exit streams: an
        EXTEND2 now is a protocol violation. Loop thread only."""
        return self.next is not None or self.state is not _OPEN or self.edge is not None

    @property
    def extend_request(self) -> ExtendRequest | None:
        """The EXTEND2 this circuit is waiting to carry out, if any. Loop thread only."""
        return self._extend if self.state is _EXTENDING else None

    def attach_next(self, peer: Peer) -> None:
        """The link to the next hop is open: register there and send CREATE2. Loop thread
        only (the node calls it)."""
        if self.state is not _EXTENDING or self._extend is None:
            return
        request, self._extend = self._extend, None
        extend = request.body
        self.next = peer
        self.next_id = peer.link.add_circuit(self._from_next, batch=self._relay_from_next)
        self.host.link_in_use(peer)
        self._to_next = OutQueue(peer.scheduler, self._sent_toward_exit)
        if self._pressure:
            peer.gate.hold(self)
        peer.link.send_cell(self.next_id, CellCommand.CREATE2,
                            encode_create2(extend.htype, extend.hdata))

    def extend_failed(self, why: str, reason: int = DestroyReason.CONNECTFAILED) -> None:
        """The next hop could not be reached (or must not be). Loop thread only."""
        self.close(f"extend failed: {why}", reason)

    def _on_error(self, pool_circuit: Circuit, direction: int, exc: BaseException,
                  where: str = "a worker") -> None:
        log.error("%r: crypto failed on %s: %r", self, where, exc)
        self.close(f"crypto error: {exc!r}", DestroyReason.INTERNAL)

    def _on_pressure(self, pool_circuit: Circuit, over: bool) -> None:
        self._pressure = over
        if over:
            self.host.circuit_pressure_pauses += 1
        for peer in (self.prev, self.next):
            if peer is not None:
                if over:
                    peer.gate.hold(self)
                else:
                    peer.gate.release(self)

    # ------------------------------------------------------------------ teardown

    def close(
        self,
        why: str,
        reason: int = DestroyReason.FINISHED,
        *,
        tell_prev: bool = True,
        tell_next: bool = True,
    ) -> None:
        """Tear the circuit down: DESTROY to the hops that did not ask for it, cancel crypto,
        close exit streams, release gates. Idempotent. Loop thread only."""
        if self.state is _CLOSED:
            return
        self.state = _CLOSED
        self.host.pool.close_circuit(self.pool_circuit)
        self._fwd.clear()
        self._bwd.clear()
        self._fwd_cells = self._bwd_cells = 0
        self._kb_held.clear()
        self._kb_ready.clear()
        self._fwd_flight.clear()
        self._kb_flight.clear()
        self._to_prev.clear()
        if self._to_next is not None:
            self._to_next.clear()
        for peer, circ_id, tell in ((self.prev, self.prev_id, tell_prev),
                                    (self.next, self.next_id, tell_next)):
            if peer is None:
                continue
            peer.gate.release(self)
            if tell:
                peer.link.destroy_circuit(circ_id, reason)
            else:
                peer.link.remove_circuit(circ_id)
        if self.edge is not None:
            self.edge.close()
        self.host.circuit_closed(self, why)


def _pop_flight(flight: deque[tuple[float, int]], cells: int) -> None:
    """Take ``cells`` delivered cells off the front of a flight record. Loop thread only."""
    while cells > 0 and flight:
        at, held = flight[0]
        if held > cells:
            flight[0] = (at, held - cells)
            return
        flight.popleft()
        cells -= held


def _reason(payload: bytes) -> int:
    return payload[0] if payload else int(DestroyReason.NONE)


def _tag_lookup(tags: bytes, local: Sequence[int]) -> TagLookup:
    """``tag_of(offset)`` for a forward batch: ``tags`` holds one tag per recognized cell, in
    order, and ``local`` is the (sorted) indices of those cells. Asked once per SENDME. Any
    thread (pure)."""

    def tag_of(offset: int) -> bytes:
        rank = bisect_left(local, offset // _SIZE)
        return tags[rank * SENDME_TAG_LEN : (rank + 1) * SENDME_TAG_LEN]

    return tag_of
