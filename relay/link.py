"""A Tor link (a "channel"): cells over a reactor ``Stream``, optionally inside TLS.

Layers, one module each
-----------------------
::

    Stream (TCP bytes) --on_data--> [TLS: session.feed, or the pool] --plaintext--> Link._on_plain
        --> relay.linkhandshake.LinkHandshake (one cell at a time, until done)
        --> relay.framing.CellFramer (RELAY cells grouped per circuit in C, other cells one by one)
    send_cell / write_cells --> gathered per iteration --> [TLS: session.encrypt, or the pool]
        --> Stream.write

* :mod:`relay.linkhandshake`: the tor-spec 4 handshake (VERSIONS, CERTS, AUTH_CHALLENGE,
  NETINFO) as a state machine without I/O of its own; the initiator side is
  :meth:`Link.connect` (optionally over TLS to a real tor, giving :attr:`Link.peer_fingerprint`),
  the responder side :meth:`Link.accept` (plain TCP between this project's relays);
* :mod:`relay.framing`: the incremental framing of an open link's cells (a read's RELAY cells
  grouped per circuit in one C call, each control cell to its circuit's handler);
* :mod:`relay.tlspipe`: an open link's TLS record crypto on the worker pool (when the link is
  given one: ``tls_pool``), small pieces on the loop thread;
* :mod:`relay.netinfo`: the NETINFO body codec; :mod:`relay.linkerrors`: :class:`CloseKind`
  and :class:`LinkError`;
* this module: the :class:`Link` itself -- the transport (TCP, TLS), the link's state, circuit
  ids, sending cells, back-pressure and closing. It re-exports the names above, so
  ``from relay.link import Link, CloseKind, LinkError, NetInfo, encode_netinfo,
  decode_netinfo, CellHandler, DEFAULT_VERSIONS`` is the one import users need.

Circuit ids (tor-spec 5.1.1)
----------------------------
On link protocol 4 and later ids are 4 bytes and the side that *initiated the connection* sets
the high bit on the ids it allocates; the other side leaves it clear; zero is never a circuit.
:meth:`Link.add_circuit` allocates one from our half (or registers one the peer chose, checking
it is from the peer's half) with a handler ``handler(command, payload)``; an incoming cell goes
to its circuit's handler through one dict lookup. Cells for unregistered non-zero ids go to
``on_cell(link, circ_id, command, payload)`` (a relay answers CREATE there); with no
``on_cell`` they are answered with ``DESTROY``. When the link closes, every circuit still
registered gets a synthesized ``DESTROY`` (reason ``CHANNEL_CLOSED``) before ``on_close``.

Writing
-------
What a link sends during one loop iteration (cells of many circuits' results, DESTROYs,
padding) is gathered and leaves at the end of the iteration (``Reactor.call_after_io``, after
the relay's flush of its circuits) in one piece: one TLS
``encrypt`` of the whole list (so full records, not one per batch) and one libuv write. The
order of the bytes is the order of the calls. What is gathered counts as written for the
stream's high watermark: once gathered plus unsent bytes pass it, they are sent at once, so
``on_write_high`` fires during the write that passed it, as it would without gathering (the
circuit scheduler, ``relay.circuitmux``, relies on that to stop writing). Closing the link
writes what is gathered before TLS close_notify. With the TLS records on the pool, the socket
closes once the pool has handed back the last records (at most :data:`TLS_CLOSE_LINGER`
seconds), and when the peer's socket ends, what it sent before is handled first.

Write watermarks: :attr:`Link.on_write_high` runs when the link's output backlog (gathered,
being TLS-encrypted on the pool, and not yet taken by the kernel) passes the stream's high
watermark, :attr:`Link.on_write_low` when it is back at or below the low one and the stream's
own buffer is too.

Errors
------
Everything that ends a link ends up in ``on_close(link, reason)`` once, with a human reason and
:attr:`Link.close_kind` (a :class:`CloseKind`): the peer is not Tor, TLS failed, no common
version, a malformed or unexpected cell, a handler that raised (logged with its traceback), a
handshake timeout, a connect failure, the peer hanging up, or a local ``close``. Errors are
logged on ``relay.link`` with the reason; nothing is raised into the loop.

Threads: a Link lives on the loop thread; every method is "Loop thread only".
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable, Sequence

from reactor import CloseReason, Reactor, Stream, TimerHandle, connect
from relay.cells import CellCommand, CellFormatError, DestroyReason, is_var_length
from relay.framing import (
    FIXED_CELL_LEN,
    BatchHandler,
    CellFramer,
    CellHandler,
    fixed_cell,
    var_cell,
)
from relay.linkauth import LinkCredentials, PeerIdentity, ServerCredentials
from relay.linkerrors import CloseKind, LinkError
from relay.linkhandshake import HandshakeFailed, LinkHandshake, command_name
from relay.netinfo import NetInfo, decode_netinfo, encode_netinfo
from relay.padding import LinkPadding, decode_padding_negotiate
from relay.tls import TlsClientContext, TlsClientSession, TlsError, TlsServerSession
from relay.tlspipe import TlsOffload, TlsPipe
from relay.torcerts import RelayCerts
from tor1 import CELL_PAYLOAD_LEN

__all__ = [
    "DEFAULT_VERSIONS",
    "CellHandler",
    "CloseKind",
    "Link",
    "LinkError",
    "NetInfo",
    "decode_netinfo",
    "encode_netinfo",
]

logger = logging.getLogger("relay.link")

DEFAULT_VERSIONS: tuple[int, ...] = (4, 5)
"""Link protocols we speak: both have 4-byte circuit ids and the same cell formats."""

TLS_CLOSE_LINGER = 1.0
"""Seconds a closing link waits for its TLS work on the pool (the last cells' records) before
it closes the socket without close_notify."""

_HIGH_BIT = 0x80000000
_ID_SPACE = 0x7FFFFFFF


class _State(enum.Enum):
    CONNECTING = "connecting"
    TLS = "tls-handshake"
    HANDSHAKE = "handshake"  # Link.state shows the handshake's phase instead
    OPEN = "open"
    CLOSED = "closed"


class Link:
    """One Tor link over a Stream. Loop thread only. Build with :meth:`connect` (initiator)
    or :meth:`accept` (responder on plain TCP)."""

    def __init__(
        self,
        reactor: Reactor,
        stream: Stream,
        *,
        initiator: bool,
        tls: TlsClientSession | TlsServerSession | None = None,
        credentials: LinkCredentials | None = None,
        versions: Sequence[int] = DEFAULT_VERSIONS,
        require_certs: bool | None = None,
        handshake_timeout: float | None = 30.0,
        name: str = "",
        on_open: Callable[[Link], object] | None = None,
        on_close: Callable[[Link, str], object] | None = None,
        on_cell: Callable[[Link, int, int, bytes], object] | None = None,
        tls_offload: TlsOffload | None = None,
    ) -> None:
        """Wrap ``stream`` (connected or connecting). Prefer :meth:`connect` / :meth:`accept`.
        ``require_certs`` (initiator) defaults to True over TLS; ``credentials`` make this side
        authenticate as a relay (TLS only). With ``tls_offload``, the TLS record crypto of the
        open link runs on its pool (:mod:`relay.tlspipe`). Loop thread only."""
        if not versions or min(versions) < 4:
            raise ValueError(f"only link protocols >= 4 are supported, got {list(versions)}")
        if tls is not None and isinstance(tls, TlsServerSession) == initiator:
            raise ValueError("an initiator needs a TLS client session, a responder a server one")
        self.reactor = reactor
        self.stream = stream
        self.initiator = initiator
        self.name = name or ("link" if initiator else "peer-link")
        self.versions = tuple(sorted(set(versions)))
        self.on_open = on_open
        self.on_close = on_close
        self.on_cell = on_cell
        self._tls = tls
        self._state = _State.CONNECTING
        self._handshake = LinkHandshake(
            initiator=initiator,
            versions=self.versions,
            require_certs=(tls is not None) if require_certs is None else require_certs,
            send=self._send_handshake,
            addresses=self._addresses,
            tls=tls,
            credentials=credentials,
        )
        self.close_reason: str | None = None
        self.close_kind: CloseKind | None = None
        self._circuits: dict[int, CellHandler] = {}
        self._batches: dict[int, BatchHandler] = {}
        self._next_id = 1
        self._id_mask = _HIGH_BIT if initiator else 0
        self._framer = CellFramer(self._circuits, self._unrouted, self._batches)
        self._paused = False
        self._padding: LinkPadding | None = None
        self._dispatching = False
        self._handshake_cells_in = 0
        self.cells_out = 0
        self.writes = 0  # libuv writes of gathered output (see "Writing")
        self._out: list[bytes | bytearray | memoryview] = []
        self._out_bytes = 0
        self._tls_offload = tls_offload if tls is not None else None
        self._pipe: TlsPipe | None = None
        self._eof: tuple[CloseReason, str] | None = None  # the socket ended; decrypts pending
        self._closing: str | None = None  # closed; the socket waits for the pipe to drain
        self._linger: TimerHandle | None = None
        self.on_write_high: Callable[[], object] | None = None
        self.on_write_low: Callable[[], object] | None = None
        self._write_high = False  # on_write_high ran, on_write_low not yet
        self._stream_high = False
        stream.on_write_high = self._on_stream_high
        stream.on_write_low = self._on_stream_low
        self._timer: TimerHandle | None = None
        if handshake_timeout is not None:
            self._timer = reactor.call_later(handshake_timeout, self._on_handshake_timeout,
                                             handshake_timeout)
        stream.on_close = self._on_stream_close
        if stream.connected:
            self._start()

    # ------------------------------------------------------------------ construction

    @classmethod
    def connect(
        cls,
        reactor: Reactor,
        host: str,
        port: int,
        *,
        tls: bool = False,
        credentials: LinkCredentials | None = None,
        versions: Sequence[int] = DEFAULT_VERSIONS,
        require_certs: bool | None = None,
        handshake_timeout: float | None = 30.0,
        name: str = "",
        on_open: Callable[[Link], object] | None = None,
        on_close: Callable[[Link, str], object] | None = None,
        on_cell: Callable[[Link, int, int, bytes], object] | None = None,
        tls_context: TlsClientContext | None = None,
        tls_offload: TlsOffload | None = None,
    ) -> Link:
        """Connect to ``host:port`` and run the initiator's handshake (TLS first if ``tls``,
        with ``tls_context`` when given: one per relay saves building one per link; with
        ``credentials`` this side authenticates as that relay). ``on_open(link)`` follows, or
        ``on_close(link, reason)``. ``tls_offload``: see the constructor. Loop thread only."""
        holder: list[Link] = []

        def connected(stream: Stream) -> None:
            holder[0]._start()

        def failed(reason: CloseReason, detail: str) -> None:
            holder[0]._finish(CloseKind.CONNECT_FAILED,
                              f"connect to {host}:{port} failed ({reason.name}: {detail})")

        stream = connect(reactor, host, port, connected, failed)
        link = cls(reactor, stream, initiator=True,
                   tls=TlsClientSession(context=tls_context) if tls else None,
                   credentials=credentials, versions=versions,
                   require_certs=require_certs, handshake_timeout=handshake_timeout,
                   name=name or f"link to {host}:{port}", on_open=on_open, on_close=on_close,
                   on_cell=on_cell, tls_offload=tls_offload)
        holder.append(link)
        return link

    @classmethod
    def accept(
        cls,
        reactor: Reactor,
        stream: Stream,
        *,
        server: ServerCredentials | None = None,
        versions: Sequence[int] = DEFAULT_VERSIONS,
        handshake_timeout: float | None = 30.0,
        name: str = "",
        on_open: Callable[[Link], object] | None = None,
        on_close: Callable[[Link, str], object] | None = None,
        on_cell: Callable[[Link, int, int, bytes], object] | None = None,
        tls_offload: TlsOffload | None = None,
    ) -> Link:
        """Run the responder's handshake on an accepted stream: over TLS with ``server``'s
        context, sending its CERTS and AUTH_CHALLENGE; without ``server``, plain TCP and no
        certificates (only for the in-process demos and tests). ``tls_offload``: see the
        constructor. Loop thread only."""
        return cls(reactor, stream, initiator=False,
                   tls=TlsServerSession(server.tls) if server is not None else None,
                   credentials=server.link if server is not None else None,
                   versions=versions, handshake_timeout=handshake_timeout,
                   name=name or "accepted link", on_open=on_open, on_close=on_close,
                   on_cell=on_cell, tls_offload=tls_offload)

    # ------------------------------------------------------------------ state

    @property
    def is_open(self) -> bool:
        """True between the end of the handshake and the close. Loop thread only."""
        return self._state is _State.OPEN

    @property
    def closed(self) -> bool:
        """True once the link has closed (``on_close`` has run or is running). Loop thread
        only."""
        return self._state is _State.CLOSED

    @property
    def state(self) -> str:
        """Where the handshake is: ``connecting``, ``tls-handshake``, ``awaiting-versions``,
        ``awaiting-netinfo``, ``open``, ``closed``. Loop thread only."""
        if self._state is _State.HANDSHAKE:
            return self._handshake.phase
        return self._state.value

    @property
    def link_version(self) -> int:
        """The negotiated link protocol (0 before VERSIONS). Loop thread only."""
        return self._handshake.link_version

    @property
    def peer_versions(self) -> tuple[int, ...]:
        """The link protocols the peer's VERSIONS listed. Loop thread only."""
        return self._handshake.peer_versions

    @property
    def peer_certs(self) -> RelayCerts | None:
        """The peer's parsed CERTS cell, if it sent one. Loop thread only."""
        return self._handshake.peer_certs

    @property
    def peer_cert_bindings(self) -> tuple[str, ...]:
        """Which CERTS bindings to the TLS certificate held (over TLS). Loop thread only."""
        return self._handshake.peer_cert_bindings

    @property
    def peer_netinfo(self) -> NetInfo | None:
        """The peer's NETINFO, once received. Loop thread only."""
        return self._handshake.peer_netinfo

    @property
    def auth_challenge_seen(self) -> bool:
        """True if the peer sent AUTH_CHALLENGE (a client need not answer it; a relay does).
        Loop thread only."""
        return self._handshake.auth_challenge_seen

    @property
    def cells_in(self) -> int:
        """Cells received: handshake cells and cells framed on the open link. Loop thread
        only."""
        return self._handshake_cells_in + self._framer.cells

    @property
    def peer_fingerprint(self) -> str | None:
        """The peer's RSA identity fingerprint (40 hex) from its CERTS cell, if it sent one.
        Loop thread only."""
        certs = self._handshake.peer_certs
        return certs.fingerprint if certs else None

    @property
    def peer_identity(self) -> PeerIdentity | None:
        """Who the peer proved to be (see :class:`relay.linkauth.PeerIdentity`): a responder
        through its CERTS, an initiator only through AUTHENTICATE; None for a client.
        Loop thread only."""
        return self._handshake.peer_identity

    @property
    def authenticate_sent(self) -> bool:
        """True if this side (an initiator) authenticated as a relay. Loop thread only."""
        return self._handshake.authenticate_sent

    @property
    def tls_version(self) -> str | None:
        """The TLS protocol version of the link, None without TLS. Loop thread only."""
        return self._tls.version() if self._tls else None

    def stats(self) -> dict[str, object]:
        """Counters and state as a plain dict. Loop thread only."""
        return {"state": self.state, "link_version": self.link_version,
                "cells_in": self.cells_in, "cells_out": self.cells_out, "writes": self.writes,
                "tls_on_pool": self._pipe.pool_jobs if self._pipe else 0,
                "tls_inline": self._pipe.inline_jobs if self._pipe else 0,
                "circuits": len(self._circuits), "close_kind":
                self.close_kind.value if self.close_kind else None}

    def __repr__(self) -> str:
        return f"<Link {self.name} {self.state} v{self.link_version}>"

    # ------------------------------------------------------------------ circuits

    def add_circuit(self, handler: CellHandler, circ_id: int | None = None,
                    batch: BatchHandler | None = None) -> int:
        """Register a circuit's ``handler(command, payload)``; return its id. ``circ_id=None``
        allocates a free id from our half (high bit set iff we initiated the link); otherwise
        ``circ_id`` must be a free, non-zero id from the peer's half (``LinkError``). With
        ``batch``, the circuit's RELAY and RELAY_EARLY cells go to ``batch(payloads, count,
        early)`` per read instead (:mod:`relay.framing`). O(1) amortized. Loop thread only."""
        circuits = self._circuits
        if circ_id is None:
            if len(circuits) >= _ID_SPACE:
                raise LinkError("no free circuit id on this link")
            while True:
                candidate = self._next_id | self._id_mask
                self._next_id = self._next_id % _ID_SPACE + 1
                if candidate not in circuits:
                    circuits[candidate] = handler
                    if batch is not None:
                        self._batches[candidate] = batch
                    return candidate
        if not 0 < circ_id <= 0xFFFFFFFF:
            raise LinkError(f"circuit id {circ_id} is not a valid 4-byte non-zero id")
        if (circ_id & _HIGH_BIT) == self._id_mask:
            raise LinkError(f"circuit id {circ_id:#x} is from our half, not the peer's")
        if circ_id in circuits:
            raise LinkError(f"circuit id {circ_id:#x} is already in use")
        circuits[circ_id] = handler
        if batch is not None:
            self._batches[circ_id] = batch
        return circ_id

    def remove_circuit(self, circ_id: int) -> None:
        """Forget a circuit id (idempotent). Loop thread only."""
        self._circuits.pop(circ_id, None)
        self._batches.pop(circ_id, None)

    def circuit_handler(self, circ_id: int) -> CellHandler | None:
        """The handler registered for ``circ_id``, or None. Loop thread only."""
        return self._circuits.get(circ_id)

    @property
    def circuit_count(self) -> int:
        """Circuits registered on this link. Loop thread only."""
        return len(self._circuits)

    # ------------------------------------------------------------------ sending

    def send_cell(self, circ_id: int, command: int, payload: bytes = b"") -> None:
        """Send one fixed-size cell (payload zero-padded to 509 bytes). The link must be open.
        Loop thread only."""
        self._check_open()
        if len(payload) > CELL_PAYLOAD_LEN:
            raise LinkError(f"fixed cell payload is at most {CELL_PAYLOAD_LEN} bytes")
        self.cells_out += 1
        self._write(fixed_cell(circ_id, command, payload))

    def send_var_cell(self, circ_id: int, command: int, payload: bytes) -> None:
        """Send one variable-length cell (e.g. VPADDING). The link must be open.
        Loop thread only."""
        self._check_open()
        if not is_var_length(command, self.link_version):
            raise LinkError(f"command {command} is not variable-length")
        self.cells_out += 1
        self._write(var_cell(circ_id, command, payload))

    def write_cells(self, data: bytes | bytearray | memoryview, count: int = 0) -> None:
        """Send bytes that are already whole cells in this link's format (e.g. a batch built
        with ``relay.circuits.wire_cells``); ``count`` only feeds the statistics.
        Loop thread only."""
        if self._state is not _State.OPEN:
            self._check_open()  # raises
        self.cells_out += count or len(data) // FIXED_CELL_LEN
        self._write(data)

    def send_cells(self, data: bytes | bytearray | memoryview, count: int) -> None:
        """:meth:`write_cells` for a sender that may find the link no longer open: then
        nothing is sent (its circuits are being closed). Loop thread only."""
        if self._state is _State.OPEN:
            self.cells_out += count
            self._write(data)

    def writelines(self, buffers: Sequence[bytes | bytearray | memoryview]) -> None:
        """Send several buffers of whole cells at once. The buffers are sent as they are,
        without a copy: do not change a mutable one afterwards. Loop thread only."""
        self._check_open()
        self.cells_out += sum(len(b) for b in buffers) // FIXED_CELL_LEN
        for buffer in buffers:
            self._write(buffer)

    def destroy_circuit(self, circ_id: int, reason: int = DestroyReason.REQUESTED) -> None:
        """Send DESTROY for ``circ_id`` and forget it. No-op on a closed link.
        Loop thread only."""
        self._circuits.pop(circ_id, None)
        self._batches.pop(circ_id, None)
        if self._state is _State.OPEN:
            self.send_cell(circ_id, CellCommand.DESTROY, bytes((reason,)))

    def _check_open(self) -> None:
        if self._state is not _State.OPEN:
            raise LinkError(f"{self.name} is {self.state}, not open")

    def _write(self, data: bytes | bytearray | memoryview) -> None:
        """Gather ``data`` for :meth:`_send_gathered` (see "Writing")."""
        out = self._out
        out.append(data)
        if len(out) == 1:
            self.reactor.call_after_io(self._send_gathered)
        self._out_bytes += len(data)
        if self.stream.above_high(self._out_bytes):
            self._send_gathered()  # past the high watermark: on_write_high now, not later
            if not self._write_high:
                self._check_backlog()
        elif not self._write_high and (self._stream_high or self._pipe is not None):
            # below the mark, gathered bytes alone cannot cross it: only the stream's own
            # state or the bytes being encrypted can
            self._check_backlog()

    def _send_gathered(self) -> None:
        """Send what :meth:`_write` gathered: one encrypt, one write. Also called by
        :meth:`_finish` before close_notify; a call with nothing gathered does nothing."""
        out, self._out = self._out, []
        size, self._out_bytes = self._out_bytes, 0
        if not out or self.stream.closed:
            return
        self.writes += 1
        if self._pipe is not None:
            self._pipe.encrypt(out, size)  # records come to _on_records
        elif self._tls is not None:
            try:
                records = self._tls.encrypt(out)
            except TlsError as exc:
                self._fail(CloseKind.TLS_FAILED, str(exc))
                return
            self.stream.write(records)
        elif len(out) == 1:
            self.stream.write(out[0])
        else:
            self.stream.writelines(out)
        if self._write_high:
            self._check_backlog()  # the gathered bytes left: maybe below the low mark now

    def _send_handshake(self, data: bytes, cells: int) -> None:
        """What the handshake sends (VERSIONS, NETINFO), through TLS if any."""
        self.cells_out += cells
        self._write(data)

    def _addresses(self) -> tuple[tuple[object, ...] | None, tuple[object, ...] | None]:
        return self.stream.peer_address, self.stream.local_address

    # ------------------------------------------------------------------ back-pressure

    def pause_reading(self) -> None:
        """Stop delivering cells (also those already buffered) until ``resume_reading``.
        Loop thread only."""
        self._paused = True
        self._framer.running = False
        self._update_reading()

    def resume_reading(self) -> None:
        """Deliver cells again, first any already buffered. Loop thread only."""
        if not self._paused:
            return
        self._paused = False
        self._framer.running = self._state is _State.OPEN
        self._update_reading()
        if self._framer.pending and not self._dispatching and self._state is not _State.CLOSED:
            self._on_plain(b"")
        if self._eof is not None and self._state is _State.OPEN:
            self._end_of_input()

    def _update_reading(self) -> None:
        """Read from the socket unless paused, the TLS decrypt backlog is full, or the link is
        closed (a closing link's socket lingers for its last records)."""
        if self.stream.closed or self._state is _State.CLOSED:
            return
        if self._paused or (self._pipe is not None and self._pipe.read_full):
            self.stream.pause_reading()
        else:
            self.stream.resume_reading()

    def _on_read_full(self, full: bool) -> None:
        self._update_reading()  # reads the pipe's read_full

    # ------------------------------------------------------------------ write watermarks

    def _check_backlog(self) -> None:
        """Run on_write_high / on_write_low as the output backlog crosses the watermarks."""
        encrypting = self._pipe.encrypting if self._pipe is not None else 0
        high, low = self.stream.write_watermarks
        if not self._write_high:
            if self._stream_high or self._out_bytes + encrypting > high:
                self._write_high = True
                if self.on_write_high is not None:
                    self.on_write_high()
        elif not self._stream_high and self._out_bytes + encrypting <= low:
            self._write_high = False
            if self.on_write_low is not None:
                self.on_write_low()

    def _on_stream_high(self) -> None:
        self._stream_high = True
        self._check_backlog()

    def _on_stream_low(self) -> None:
        self._stream_high = False
        self._check_backlog()

    # ------------------------------------------------------------------ closing

    def close(self, reason: str = "closed locally") -> None:
        """Close the link (TLS close_notify, then the stream). ``on_close`` runs once.
        Idempotent. Loop thread only."""
        self._finish(CloseKind.LOCAL, reason)

    def _fail(self, kind: CloseKind, reason: str) -> None:
        logger.warning("%s: closing: %s", self.name, reason)
        self._finish(kind, reason)

    def _finish(self, kind: CloseKind, reason: str) -> None:
        if self._state is _State.CLOSED:
            return
        was_open = self._state is _State.OPEN
        self._state = _State.CLOSED
        if self._padding is not None:
            self._padding.stop()
        self._framer.running = False
        self._framer.closed = True
        self.close_kind = kind
        self.close_reason = reason
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        pipe = self._pipe
        if pipe is None:
            if not self.stream.closed:
                self._send_gathered()
            if not self.stream.closed:
                if self._tls is not None:
                    alert = self._tls.close()
                    if alert:
                        self.stream.write(alert)
                self.stream.close(reason)
        elif self.stream.closed:
            pipe.close()  # nothing can be sent: the pool's work for this link is dropped
        else:
            # What was written before the close still goes out, through the pipe; the socket
            # closes (after close_notify) once the pipe is idle, or after TLS_CLOSE_LINGER.
            self.stream.pause_reading()
            self._closing = reason
            self._send_gathered()
            if not pipe.busy:
                self._close_after_pipe()
            else:
                self._linger = self.reactor.call_later(TLS_CLOSE_LINGER,
                                                       self._close_after_pipe)
        # The framer holds the same dict: empty it in place, after taking the entries.
        circuits = dict(self._circuits)
        self._circuits.clear()
        self._batches.clear()
        destroy = bytes((DestroyReason.CHANNEL_CLOSED,))
        for circ_id, handler in circuits.items():
            try:
                handler(CellCommand.DESTROY, destroy)
            except Exception:
                logger.exception("%s: circuit %#x handler raised on link close", self.name,
                                 circ_id)
        logger.log(logging.INFO if kind is CloseKind.LOCAL or was_open else logging.WARNING,
                   "%s closed (%s): %s", self.name, kind.value, reason)
        if self.on_close is not None:
            try:
                self.on_close(self, reason)
            except Exception:
                logger.exception("%s: on_close raised", self.name)

    def _close_after_pipe(self) -> None:
        """The closed link's last records are written (or the linger ran out): close_notify if
        the session is idle, then the socket."""
        reason, self._closing = self._closing, None
        if reason is None or self._pipe is None:
            return
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
        alert = self._pipe.close()  # None if work is still on the pool: it is dropped
        if not self.stream.closed:
            if alert:
                self.stream.write(alert)
            self.stream.close(reason)

    def _on_stream_close(self, reason: CloseReason, detail: str) -> None:
        if self._state is _State.CLOSED:
            return
        if self._pipe is not None and self._state is _State.OPEN and (
                self._pipe.decrypting or (self._paused and self._framer.pending)):
            # What the peer sent before it hung up is still being decrypted, or waits behind a
            # pause: handle it first (_end_of_input)
            self._eof = (reason, detail)
            return
        if self._state is _State.OPEN:
            pending = self._framer.pending
            if pending and not self._paused:
                # Not a clean end: the peer stopped inside a cell. Say so, at WARNING.
                self._fail(CloseKind.PEER_CLOSED,
                           f"peer closed the link inside a cell: {len(pending)} bytes "
                           f"of a truncated cell dropped ({reason.name}: {detail})")
                return
            self._finish(CloseKind.PEER_CLOSED, f"peer closed the link ({reason.name}: {detail})")
        elif self._state is _State.TLS:
            self._fail(CloseKind.TLS_FAILED,
                       f"connection ended during the TLS handshake ({reason.name}: {detail})")
        else:
            self._fail(CloseKind.NOT_TOR,
                       f"connection ended during the link handshake ({self.state}; "
                       f"{reason.name}: {detail}): the peer is not a Tor relay or refused us")

    def _on_handshake_timeout(self, seconds: float) -> None:
        self._timer = None
        if self._state is not _State.OPEN:
            self._fail(CloseKind.TIMEOUT, f"link handshake not finished after {seconds} s "
                                          f"(stuck in {self.state}): is the peer a Tor relay?")

    # ------------------------------------------------------------------ handshake

    def _start(self) -> None:
        if self._state is not _State.CONNECTING:
            return
        if self._tls is not None:
            self._state = _State.TLS
            self.stream.on_data = self._on_tls_data
            try:
                hello = self._tls.start()
            except TlsError as exc:
                self._fail(CloseKind.TLS_FAILED, str(exc))
                return
            self.stream.write(hello)
            return
        self._state = _State.HANDSHAKE
        self.stream.on_data = self._on_plain
        self._handshake.begin()

    def _on_tls_data(self, data: bytes) -> None:
        tls = self._tls
        assert tls is not None
        try:
            plaintext, to_write = tls.feed(data)
        except TlsError as exc:
            self._fail(CloseKind.TLS_FAILED, str(exc))
            return
        if to_write:
            self.stream.write(to_write)
        if self._state is _State.TLS and tls.handshake_done:
            self._state = _State.HANDSHAKE
            self._handshake.begin()
        if plaintext:
            self._on_plain(plaintext)
        if tls.peer_closed and self._state is not _State.CLOSED:
            self._on_stream_close(CloseReason.EOF, "TLS close_notify from the peer")

    def _handshake_cells(self, buf: bytes, offset: int) -> int:
        """Handle handshake cells one at a time (the format changes after VERSIONS)."""
        handshake = self._handshake
        while self._state is _State.HANDSHAKE:
            try:
                framed = handshake.next_cell(buf, offset)
                if framed is None:
                    return offset
                cell, offset = framed
                self._handshake_cells_in += 1
                done = handshake.handle(cell.circ_id, cell.command, cell.payload)
            except HandshakeFailed as exc:
                self._fail(exc.kind, exc.reason)
                return offset
            if done and self._state is _State.HANDSHAKE:
                self._opened()
        return offset

    def _opened(self) -> None:
        if self._tls is not None and self._tls_offload is not None:
            self._start_pipe(self._tls, self._tls_offload)
        self._state = _State.OPEN
        self._framer.version = self.link_version
        self._framer.running = not self._paused
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        logger.info("%s open: link protocol %d%s", self.name, self.link_version,
                    f", peer {self.peer_fingerprint}" if self.peer_certs else "")
        if self.on_open is not None:
            self.on_open(self)

    def _start_pipe(self, session: TlsClientSession | TlsServerSession,
                    offload: TlsOffload) -> None:
        """From now on the session's record crypto goes through the pool (the handshake, and
        everything the link authentication reads of the session, is done)."""
        self._pipe = TlsPipe(offload.pool, session, on_plain=self._on_decrypted,
                             on_records=self._on_records, on_error=self._on_pipe_error,
                             on_read_full=self._on_read_full, inline_bytes=offload.inline_bytes,
                             read_limit=offload.read_limit)
        self.stream.on_data = self._pipe.decrypt

    def _on_decrypted(self, plain: bytes) -> None:
        if self._state is _State.CLOSED:
            if self._closing is not None and self._pipe is not None and not self._pipe.busy:
                self._close_after_pipe()
            return
        if plain:
            self._on_plain(plain)
        pipe = self._pipe
        if pipe is None or self._state is _State.CLOSED:
            return
        if self._eof is None and pipe.session.peer_closed:
            self._eof = (CloseReason.EOF, "TLS close_notify from the peer")
        if self._eof is not None:
            self._end_of_input()
        elif pipe.session.wants_write and not self._out:
            self._write(b"")  # TLS bytes made while reading (an alert, say) go out next

    def _end_of_input(self) -> None:
        """The peer's input ended (socket or close_notify): close once every cell it sent
        before is handled -- nothing left to decrypt, and none buffered behind a pause (that
        waits for :meth:`resume_reading`)."""
        pipe = self._pipe
        if self._eof is None or (pipe is not None and pipe.decrypting):
            return
        if self._paused and self._framer.pending:
            return
        reason, detail = self._eof
        self._eof = None
        self._on_stream_close(reason, detail)

    def _on_records(self, records: bytes) -> None:
        if records and not self.stream.closed:
            self.stream.write(records)
        if self._closing is not None:
            if self._pipe is not None and not self._pipe.busy:
                self._close_after_pipe()
            return
        self._check_backlog()

    def _on_pipe_error(self, exc: TlsError) -> None:
        if self._closing is not None:
            self._close_after_pipe()  # the session is dead: no close_notify
            return
        self._fail(CloseKind.TLS_FAILED, str(exc))

    # ------------------------------------------------------------------ the data path

    def _on_plain(self, data: bytes) -> None:
        """Frame and dispatch every complete cell; keep the partial tail for next time."""
        framer = self._framer
        buf = framer.take(data)
        offset = 0
        self._dispatching = True
        try:
            if self._state is _State.HANDSHAKE:
                offset = self._handshake_cells(buf, offset)
            if framer.running:
                offset = framer.dispatch(buf, offset)
        except Exception as exc:
            logger.exception("%s: error while handling a cell", self.name)
            self._fail(CloseKind.PROTOCOL, f"error while handling a cell: {exc!r}")
        finally:
            self._dispatching = False
        if self._state is _State.CLOSED:
            framer.pending = b""
        else:
            framer.keep(buf, offset)

    def _on_padding_negotiate(self, payload: bytes) -> None:
        """A client's channel padding request (:mod:`relay.padding`). Only a responder pads:
        relays do not take padding orders from the relays they connect to."""
        try:
            request = decode_padding_negotiate(payload)
        except ValueError as exc:
            raise CellFormatError(f"bad PADDING_NEGOTIATE: {exc}") from exc
        if self.initiator:
            return
        if self._padding is None:
            self._padding = LinkPadding(self.reactor, lambda: self.cells_out,
                                        self._send_padding)
        self._padding.negotiate(request)

    def _send_padding(self) -> None:
        if self._state is _State.OPEN:
            self.send_cell(0, CellCommand.PADDING)

    @property
    def padding_active(self) -> bool:
        """True while this link pads at a client's request. Loop thread only."""
        return self._padding is not None and self._padding.active

    @property
    def padding_sent(self) -> int:
        """PADDING cells sent at the client's request. Loop thread only."""
        return self._padding.padding_sent if self._padding is not None else 0

    def _unrouted(self, circ_id: int, command: int, payload: bytes) -> None:
        """A cell for no registered circuit: link-level, or the user's (CREATE), or DESTROY."""
        if circ_id == 0:
            if command in (CellCommand.PADDING, CellCommand.VPADDING, CellCommand.NETINFO):
                return
            if command == CellCommand.PADDING_NEGOTIATE:
                self._on_padding_negotiate(payload)
                return
            if command == CellCommand.VERSIONS:
                raise CellFormatError("VERSIONS cell after the handshake")
            if self.on_cell is None:
                raise CellFormatError(f"{command_name(command)} cell on circuit id 0")
        if self.on_cell is not None:
            self.on_cell(self, circ_id, command, payload)
        elif command not in (CellCommand.DESTROY, CellCommand.PADDING, CellCommand.VPADDING):
            self.send_cell(circ_id, CellCommand.DESTROY, bytes((DestroyReason.PROTOCOL,)))
