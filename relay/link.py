"""A Tor link (a "channel"): cells over a reactor ``Stream``, optionally inside TLS.

Layers
------
::

    Stream (TCP bytes) --on_data--> [TlsClientSession.feed] --plaintext--> cell framer
        --> handshake state machine, then per-circuit handlers (O(1) dict lookup)
    send_cell / write_cells --> [TlsClientSession.encrypt] --> Stream.write

Framing is incremental and cheap: a read callback's bytes are appended to the (short) leftover of
the previous one and every complete cell in them is cut out with one ``struct.unpack_from`` and
one slice, so a 64 KiB read yields ~127 cells in one pass with no per-cell object but the
payload ``bytes``. Which commands are variable-length, and the circuit id width, come from
``workers.cells`` (``is_var_length``, ``circ_id_len``); the handshake cells are framed by
``workers.cells.parse_cell`` itself, because the link version changes in the middle of them.

The link handshake (tor-spec 4)
-------------------------------
Initiator (:meth:`Link.connect`, optionally over TLS to a real tor): send ``VERSIONS`` offering
``versions`` (default 4 and 5) with a 2-byte circuit id; the responder answers ``VERSIONS``
(a first cell that is anything else means the peer is not Tor) and the highest common version
wins (none in common: closed as ``UNSUPPORTED_VERSION``). From then on cells use the negotiated
format (4-byte circuit ids). A tor responder then sends ``CERTS`` (parsed with
``relay.torcerts``; over TLS it must authenticate the TLS certificate and gives
:attr:`Link.peer_fingerprint`), ``AUTH_CHALLENGE`` (ignored: a client need not authenticate)
and ``NETINFO``; the initiator answers ``NETINFO`` and the link is open.

Responder (:meth:`Link.accept`, plain TCP between this project's own relays): wait for
``VERSIONS``, answer ``VERSIONS`` and ``NETINFO`` (no certificates: our relays trust the
loopback), and open when the initiator's ``NETINFO`` arrives.

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
import ipaddress
import logging
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from reactor import CloseReason, Reactor, Stream, TimerHandle, connect
from relay.tls import TlsClientSession, TlsError
from relay.torcerts import CertsError, RelayCerts, parse_certs_cell
from workers.cells import (
    CELL_PAYLOAD_LEN,
    CellCommand,
    CellFormatError,
    DestroyReason,
    encode_versions,
    highest_common_version,
    is_var_length,
    parse_cell,
    parse_versions,
)

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

CellHandler = Callable[[int, bytes], object]
"""A circuit's handler on one link: ``handler(command, payload)``."""

_HEADER = struct.Struct(">IB")
_VAR_LENGTH = struct.Struct(">H")
_FIXED_CELL_LEN = 5 + CELL_PAYLOAD_LEN
_HIGH_BIT = 0x80000000
_ID_SPACE = 0x7FFFFFFF
_VERSIONS_PREFIX = b"\x00\x00\x07"
_ADDR_IPV4 = 4
_ADDR_IPV6 = 6
_IGNORED_IN_HANDSHAKE = frozenset({CellCommand.PADDING, CellCommand.VPADDING})


class CloseKind(enum.Enum):
    """Why a link ended, as a category (``Link.close_reason`` has the words)."""

    LOCAL = "local"  # close() on this side
    PEER_CLOSED = "peer-closed"  # the peer hung up or reset after the handshake
    CONNECT_FAILED = "connect-failed"  # TCP connect did not succeed
    NOT_TOR = "not-tor"  # the peer does not speak the Tor link protocol
    TLS_FAILED = "tls-failed"  # TLS handshake or record failure
    UNSUPPORTED_VERSION = "unsupported-version"  # no link protocol in common
    AUTH_FAILED = "auth-failed"  # CERTS missing or not binding the TLS certificate
    PROTOCOL = "protocol"  # a malformed or unexpected cell, or a handler that raised
    TIMEOUT = "timeout"  # the handshake did not finish in time


class LinkError(RuntimeError):
    """Misuse of a link: sending circuit cells before it is open or after it closed, or an
    invalid circuit id."""


class _State(enum.Enum):
    CONNECTING = "connecting"
    TLS = "tls-handshake"
    VERSIONS = "awaiting-versions"
    NETINFO = "awaiting-netinfo"
    OPEN = "open"
    CLOSED = "closed"


# --------------------------------------------------------------------------- NETINFO


@dataclass(frozen=True)
class NetInfo:
    """A NETINFO cell: the sender's clock, the address it sees us at, and its own addresses."""

    timestamp: int
    other_address: str | None
    my_addresses: tuple[str, ...] = field(default=())


def _encode_address(address: str | None) -> bytes:
    if address is None:
        return bytes((_ADDR_IPV4, 4)) + bytes(4)
    ip = ipaddress.ip_address(address)
    atype = _ADDR_IPV4 if ip.version == 4 else _ADDR_IPV6
    return bytes((atype, len(ip.packed))) + ip.packed


def encode_netinfo(info: NetInfo) -> bytes:
    """The NETINFO payload (unpadded). Any thread (pure)."""
    parts = [struct.pack(">I", info.timestamp & 0xFFFFFFFF), _encode_address(info.other_address),
             bytes((len(info.my_addresses),))]
    parts.extend(_encode_address(a) for a in info.my_addresses)
    return b"".join(parts)


def decode_netinfo(payload: bytes) -> NetInfo:
    """Parse a NETINFO payload (trailing padding ignored); ``CellFormatError`` if truncated.
    Unknown address types are skipped. Any thread (pure)."""

    def address(offset: int) -> tuple[str | None, int]:
        if offset + 2 > len(payload):
            raise CellFormatError("NETINFO truncated in an address header")
        atype, alen = payload[offset], payload[offset + 1]
        end = offset + 2 + alen
        if end > len(payload):
            raise CellFormatError("NETINFO truncated in an address")
        raw = payload[offset + 2 : end]
        if (atype, alen) == (_ADDR_IPV4, 4):
            return str(ipaddress.IPv4Address(raw)), end
        if (atype, alen) == (_ADDR_IPV6, 16):
            return str(ipaddress.IPv6Address(raw)), end
        return None, end

    if len(payload) < 5:
        raise CellFormatError("NETINFO shorter than its timestamp")
    (timestamp,) = struct.unpack_from(">I", payload, 0)
    other, offset = address(4)
    if offset >= len(payload):
        raise CellFormatError("NETINFO truncated before its address count")
    count = payload[offset]
    offset += 1
    mine: list[str] = []
    for _ in range(count):
        addr, offset = address(offset)
        if addr is not None:
            mine.append(addr)
    return NetInfo(timestamp, other, tuple(mine))


# --------------------------------------------------------------------------- the link


class Link:
    """One Tor link over a Stream. Loop thread only. Build with :meth:`connect` (initiator)
    or :meth:`accept` (responder on plain TCP)."""

    def __init__(
        self,
        reactor: Reactor,
        stream: Stream,
        *,
        initiator: bool,
        tls: TlsClientSession | None = None,
        versions: Sequence[int] = DEFAULT_VERSIONS,
        require_certs: bool | None = None,
        handshake_timeout: float | None = 30.0,
        name: str = "",
        on_open: Callable[[Link], object] | None = None,
        on_close: Callable[[Link, str], object] | None = None,
        on_cell: Callable[[Link, int, int, bytes], object] | None = None,
    ) -> None:
        """Wrap ``stream`` (connected or connecting). Prefer :meth:`connect` / :meth:`accept`.
        ``require_certs`` defaults to True over TLS. Loop thread only."""
        if not versions or min(versions) < 4:
            raise ValueError(f"only link protocols >= 4 are supported, got {list(versions)}")
        if tls is not None and not initiator:
            raise ValueError("the TLS layer is client-side only")
        self.reactor = reactor
        self.stream = stream
        self.initiator = initiator
        self.name = name or ("link" if initiator else "peer-link")
        self.versions = tuple(sorted(set(versions)))
        self.on_open = on_open
        self.on_close = on_close
        self.on_cell = on_cell
        self._tls = tls
        self._require_certs = (tls is not None) if require_certs is None else require_certs
        self._state = _State.CONNECTING
        self.link_version = 0
        self.peer_versions: tuple[int, ...] = ()
        self.peer_certs: RelayCerts | None = None
        self.peer_cert_bindings: tuple[str, ...] = ()  # which CERTS bindings held (over TLS)
        self.peer_netinfo: NetInfo | None = None
        self.auth_challenge_seen = False
        self.close_reason: str | None = None
        self.close_kind: CloseKind | None = None
        self._circuits: dict[int, CellHandler] = {}
        self._next_id = 1
        self._id_mask = _HIGH_BIT if initiator else 0
        self._pending = b""
        self._paused = False
        self._dispatching = False
        self.cells_in = 0
        self.cells_out = 0
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
        versions: Sequence[int] = DEFAULT_VERSIONS,
        require_certs: bool | None = None,
        handshake_timeout: float | None = 30.0,
        name: str = "",
        on_open: Callable[[Link], object] | None = None,
        on_close: Callable[[Link, str], object] | None = None,
        on_cell: Callable[[Link, int, int, bytes], object] | None = None,
    ) -> Link:
        """Connect to ``host:port`` and run the initiator's handshake (TLS first if ``tls``).
        ``on_open(link)`` follows, or ``on_close(link, reason)``. Loop thread only."""
        holder: list[Link] = []

        def connected(stream: Stream) -> None:
            holder[0]._start()

        def failed(reason: CloseReason, detail: str) -> None:
            holder[0]._finish(CloseKind.CONNECT_FAILED,
                              f"connect to {host}:{port} failed ({reason.name}: {detail})")

        stream = connect(reactor, host, port, connected, failed)
        link = cls(reactor, stream, initiator=True,
                   tls=TlsClientSession() if tls else None, versions=versions,
                   require_certs=require_certs, handshake_timeout=handshake_timeout,
                   name=name or f"link to {host}:{port}", on_open=on_open, on_close=on_close,
                   on_cell=on_cell)
        holder.append(link)
        return link

    @classmethod
    def accept(
        cls,
        reactor: Reactor,
        stream: Stream,
        *,
        versions: Sequence[int] = DEFAULT_VERSIONS,
        handshake_timeout: float | None = 30.0,
        name: str = "",
        on_open: Callable[[Link], object] | None = None,
        on_close: Callable[[Link, str], object] | None = None,
        on_cell: Callable[[Link, int, int, bytes], object] | None = None,
    ) -> Link:
        """Run the responder's handshake (plain TCP) on an accepted stream. Loop thread only."""
        return cls(reactor, stream, initiator=False, versions=versions,
                   handshake_timeout=handshake_timeout, name=name or "accepted link",
                   on_open=on_open, on_close=on_close, on_cell=on_cell)

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
        return self._state.value

    @property
    def peer_fingerprint(self) -> str | None:
        """The peer's RSA identity fingerprint (40 hex) from its CERTS cell, if it sent one.
        Loop thread only."""
        return self.peer_certs.fingerprint if self.peer_certs else None

    @property
    def tls_version(self) -> str | None:
        """The TLS protocol version of the link, None without TLS. Loop thread only."""
        return self._tls.version() if self._tls else None

    def stats(self) -> dict[str, object]:
        """Counters and state as a plain dict. Loop thread only."""
        return {"state": self.state, "link_version": self.link_version,
                "cells_in": self.cells_in, "cells_out": self.cells_out,
                "circuits": len(self._circuits), "close_kind":
                self.close_kind.value if self.close_kind else None}

    def __repr__(self) -> str:
        return f"<Link {self.name} {self.state} v{self.link_version}>"

    # ------------------------------------------------------------------ circuits

    def add_circuit(self, handler: CellHandler, circ_id: int | None = None) -> int:
        """Register a circuit's ``handler(command, payload)``; return its id. ``circ_id=None``
        allocates a free id from our half (high bit set iff we initiated the link); otherwise
        ``circ_id`` must be a free, non-zero id from the peer's half (``LinkError``).
        O(1) amortized. Loop thread only."""
        circuits = self._circuits
        if circ_id is None:
            if len(circuits) >= _ID_SPACE:
                raise LinkError("no free circuit id on this link")
            while True:
                candidate = self._next_id | self._id_mask
                self._next_id = self._next_id % _ID_SPACE + 1
                if candidate not in circuits:
                    circuits[candidate] = handler
                    return candidate
        if not 0 < circ_id <= 0xFFFFFFFF:
            raise LinkError(f"circuit id {circ_id} is not a valid 4-byte non-zero id")
        if (circ_id & _HIGH_BIT) == self._id_mask:
            raise LinkError(f"circuit id {circ_id:#x} is from our half, not the peer's")
        if circ_id in circuits:
            raise LinkError(f"circuit id {circ_id:#x} is already in use")
        circuits[circ_id] = handler
        return circ_id

    def remove_circuit(self, circ_id: int) -> None:
        """Forget a circuit id (idempotent). Loop thread only."""
        self._circuits.pop(circ_id, None)

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
        self._write(_HEADER.pack(circ_id, command) + payload
                    + bytes(CELL_PAYLOAD_LEN - len(payload)))

    def send_var_cell(self, circ_id: int, command: int, payload: bytes) -> None:
        """Send one variable-length cell (e.g. VPADDING). The link must be open.
        Loop thread only."""
        self._check_open()
        if not is_var_length(command, self.link_version):
            raise LinkError(f"command {command} is not variable-length")
        self.cells_out += 1
        self._write(_HEADER.pack(circ_id, command) + _VAR_LENGTH.pack(len(payload)) + payload)

    def write_cells(self, data: bytes | bytearray | memoryview, count: int = 0) -> None:
        """Send bytes that are already whole cells in this link's format (e.g. a batch built
        with ``relay.circuits.wire_cells``); ``count`` only feeds the statistics.
        Loop thread only."""
        self._check_open()
        self.cells_out += count or len(data) // _FIXED_CELL_LEN
        self._write(data)

    def writelines(self, buffers: Sequence[bytes | bytearray | memoryview]) -> None:
        """Send several buffers of whole cells at once (one ``writev`` on plain TCP).
        Loop thread only."""
        self._check_open()
        self.cells_out += sum(len(b) for b in buffers) // _FIXED_CELL_LEN
        if self._tls is not None:
            self._write(b"".join(buffers))
        else:
            self.stream.writelines(buffers)

    def destroy_circuit(self, circ_id: int, reason: int = DestroyReason.REQUESTED) -> None:
        """Send DESTROY for ``circ_id`` and forget it. No-op on a closed link.
        Loop thread only."""
        self._circuits.pop(circ_id, None)
        if self._state is _State.OPEN:
            self.send_cell(circ_id, CellCommand.DESTROY, bytes((reason,)))

    def _check_open(self) -> None:
        if self._state is not _State.OPEN:
            raise LinkError(f"{self.name} is {self.state}, not open")

    def _write(self, data: bytes | bytearray | memoryview) -> None:
        if self._tls is not None:
            try:
                data = self._tls.encrypt(bytes(data))
            except TlsError as exc:
                self._fail(CloseKind.TLS_FAILED, str(exc))
                return
        self.stream.write(data)

    # ------------------------------------------------------------------ back-pressure

    def pause_reading(self) -> None:
        """Stop delivering cells (also those already buffered) until ``resume_reading``.
        Loop thread only."""
        self._paused = True
        if not self.stream.closed:
            self.stream.pause_reading()

    def resume_reading(self) -> None:
        """Deliver cells again, first any already buffered. Loop thread only."""
        if not self._paused:
            return
        self._paused = False
        if not self.stream.closed:
            self.stream.resume_reading()
        if self._pending and not self._dispatching and self._state is not _State.CLOSED:
            self._on_plain(b"")

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
        self.close_kind = kind
        self.close_reason = reason
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self.stream.closed:
            if self._tls is not None:
                alert = self._tls.close()
                if alert:
                    self.stream.write(alert)
            self.stream.close(reason)
        circuits, self._circuits = self._circuits, {}
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

    def _on_stream_close(self, reason: CloseReason, detail: str) -> None:
        if self._state is _State.CLOSED:
            return
        if self._state is _State.OPEN:
            if self._pending and not self._paused:
                # Not a clean end: the peer stopped inside a cell. Say so, at WARNING.
                self._fail(CloseKind.PEER_CLOSED,
                           f"peer closed the link inside a cell: {len(self._pending)} bytes "
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
        self._state = _State.VERSIONS
        self.stream.on_data = self._on_plain
        if self.initiator:
            self.stream.write(encode_versions(self.versions))

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
            self._state = _State.VERSIONS
            self._write(encode_versions(self.versions))
        if plaintext:
            self._on_plain(plaintext)
        if tls.peer_closed and self._state is not _State.CLOSED:
            self._on_stream_close(CloseReason.EOF, "TLS close_notify from the peer")

    def _handshake_cells(self, buf: bytes, offset: int) -> int:
        """Handle handshake cells one at a time (the format changes after VERSIONS)."""
        while self._state in (_State.VERSIONS, _State.NETINFO):
            if self._state is _State.VERSIONS and len(buf) - offset >= 3 and (
                buf[offset : offset + 3] != _VERSIONS_PREFIX
            ):
                self._fail(CloseKind.NOT_TOR, "peer is not a Tor relay: its first bytes "
                           f"{bytes(buf[offset:offset + 8]).hex()} are not a VERSIONS cell")
                return offset
            framed = parse_cell(buf, offset, self.link_version)
            if framed is None:
                return offset
            cell, offset = framed
            self.cells_in += 1
            try:
                self._handshake_cell(cell.circ_id, cell.command, cell.payload)
            except (CellFormatError, CertsError) as exc:
                self._fail(CloseKind.PROTOCOL,
                           f"malformed {_command_name(cell.command)} cell: {exc}")
        return offset

    def _handshake_cell(self, circ_id: int, command: int, payload: bytes) -> None:
        if self._state is _State.VERSIONS:
            self._on_versions(payload)
            return
        if command in _IGNORED_IN_HANDSHAKE:
            return
        if command == CellCommand.CERTS:
            if self.peer_certs is not None:
                raise CellFormatError("a second CERTS cell")
            certs = parse_certs_cell(payload)
            if self._tls is not None:
                try:
                    self.peer_cert_bindings = tuple(
                        certs.verify(self._tls.peer_certificate_der()))
                except CertsError as exc:
                    self._fail(CloseKind.AUTH_FAILED, f"CERTS do not authenticate the peer: {exc}")
                    return
            self.peer_certs = certs
        elif command == CellCommand.AUTH_CHALLENGE:
            self.auth_challenge_seen = True  # a client need not authenticate
        elif command == CellCommand.NETINFO:
            if self._require_certs and self.peer_certs is None:
                self._fail(CloseKind.AUTH_FAILED, "peer sent NETINFO without a CERTS cell")
                return
            self.peer_netinfo = decode_netinfo(payload)
            if self.initiator:
                self._send_netinfo()
            self._opened()
        else:
            self._fail(CloseKind.PROTOCOL, f"unexpected {_command_name(command)} cell "
                       f"(circuit {circ_id:#x}) during the link handshake")

    def _on_versions(self, payload: bytes) -> None:
        theirs = parse_versions(payload)
        self.peer_versions = tuple(theirs)
        chosen = highest_common_version(self.versions, theirs)
        if chosen is None:
            self._fail(CloseKind.UNSUPPORTED_VERSION,
                       f"no common link protocol version: we speak {list(self.versions)}, "
                       f"the peer speaks {theirs}")
            return
        if not self.initiator:
            self._write(encode_versions(self.versions))
        self.link_version = chosen
        self._state = _State.NETINFO
        if not self.initiator:
            self._send_netinfo()

    def _send_netinfo(self) -> None:
        peer = self.stream.peer_address
        local = self.stream.local_address
        info = NetInfo(
            timestamp=0 if self.initiator else int(time.time()),
            other_address=str(peer[0]) if peer else None,
            my_addresses=() if self.initiator or not local else (str(local[0]),),
        )
        payload = encode_netinfo(info)
        self.cells_out += 1
        self._write(_HEADER.pack(0, CellCommand.NETINFO) + payload
                    + bytes(CELL_PAYLOAD_LEN - len(payload)))

    def _opened(self) -> None:
        self._state = _State.OPEN
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        logger.info("%s open: link protocol %d%s", self.name, self.link_version,
                    f", peer {self.peer_fingerprint}" if self.peer_certs else "")
        if self.on_open is not None:
            self.on_open(self)

    # ------------------------------------------------------------------ the data path

    def _on_plain(self, data: bytes) -> None:
        """Frame and dispatch every complete cell; keep the partial tail for next time."""
        buf = self._pending + data if self._pending else data
        offset = 0
        self._dispatching = True
        try:
            if self._state is not _State.OPEN:
                offset = self._handshake_cells(buf, offset)
            if self._state is _State.OPEN and not self._paused:
                offset = self._open_cells(buf, offset)
        except Exception as exc:
            logger.exception("%s: error while handling a cell", self.name)
            self._fail(CloseKind.PROTOCOL, f"error while handling a cell: {exc!r}")
        finally:
            self._dispatching = False
        if self._state is _State.CLOSED:
            self._pending = b""
        else:
            self._pending = buf[offset:] if offset < len(buf) else b""

    def _open_cells(self, buf: bytes, offset: int) -> int:
        end_of_data = len(buf)
        circuits = self._circuits
        unpack = _HEADER.unpack_from
        version = self.link_version
        count = 0
        try:
            while offset + 5 <= end_of_data:
                circ_id, command = unpack(buf, offset)
                if command == 7 or command >= 128:
                    if offset + 7 > end_of_data:
                        break
                    (length,) = _VAR_LENGTH.unpack_from(buf, offset + 5)
                    end = offset + 7 + length
                    if end > end_of_data:
                        break
                    payload = buf[offset + 7 : end]
                    if not is_var_length(command, version):
                        raise CellFormatError(f"command {command} framed as variable-length")
                else:
                    end = offset + _FIXED_CELL_LEN
                    if end > end_of_data:
                        break
                    payload = buf[offset + 5 : end]
                offset = end
                count += 1
                handler = circuits.get(circ_id)
                if handler is not None:
                    handler(command, payload)
                else:
                    self._unrouted(circ_id, command, payload)
                if self._paused or self._state is not _State.OPEN:
                    break
        finally:
            self.cells_in += count
        return offset

    def _unrouted(self, circ_id: int, command: int, payload: bytes) -> None:
        """A cell for no registered circuit: link-level, or the user's (CREATE), or DESTROY."""
        if circ_id == 0:
            if command in (CellCommand.PADDING, CellCommand.VPADDING, CellCommand.NETINFO):
                return
            if command == CellCommand.VERSIONS:
                raise CellFormatError("VERSIONS cell after the handshake")
            if self.on_cell is None:
                raise CellFormatError(f"{_command_name(command)} cell on circuit id 0")
        if self.on_cell is not None:
            self.on_cell(self, circ_id, command, payload)
        elif command not in (CellCommand.DESTROY, CellCommand.PADDING, CellCommand.VPADDING):
            self.send_cell(circ_id, CellCommand.DESTROY, bytes((DestroyReason.PROTOCOL,)))


def _command_name(command: int) -> str:
    try:
        return CellCommand(command).name
    except ValueError:
        return f"command {command}"
