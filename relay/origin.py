"""The origin side of one circuit: building it hop by hop, its streams, its SENDME windows.

Building (tor-spec 5)
---------------------
An :class:`OriginCircuit` starts on an open link to its guard with CREATE_FAST and checks
CREATED_FAST's KH; then, for every further hop, it sends EXTEND2 in a RELAY_EARLY cell to the
current last hop, with the next relay's address and identity as link specifiers and an ntor
onionskin for its identity and onion key; EXTENDED2 completes the ntor handshake (AUTH checked)
and adds the hop. ``on_open(circuit)`` follows, or ``on_close(circuit, reason)`` with why it
failed (a build timeout included).

Streams and flow control
------------------------
:meth:`OriginCircuit.open_stream` sends BEGIN to the last hop (:meth:`OriginCircuit.open_dir_stream`
BEGIN_DIR, for the relay's directory); ``on_connected`` follows CONNECTED.
:meth:`ClientStream.write` queues bytes; they leave as RELAY_DATA cells while the circuit's
package window (1000 cells) and the stream's (500) allow and the guard link's write buffer is
below its high watermark; SENDMEs from the exit reopen the windows. Received DATA is handed to
``on_data`` at once, so the circuit sends a circuit SENDME every 100 DATA cells and a stream
SENDME every 50 (see :mod:`relay.circuits`). :meth:`ClientStream.end` sends END after the
queued bytes.

Circuit SENDMEs are version 1 both ways, as tor 0.4.9 requires (:mod:`relay.sendme`): the
circuit marks its 100th, 200th, ... DATA cell to the exit, keeps the tags the encryption
returns for them, and checks every circuit SENDME from the exit against the oldest (a
version-0, unparseable, unexpected or mismatching one, or one from another hop, closes the
circuit: DESTROY, PROTOCOL); its own circuit SENDMEs carry the tag of the exit's DATA cell that
triggered them (the exit hop's backward digest after that cell). Stream SENDMEs stay empty,
and one that would raise a stream's package window above 500 closes the circuit, as in tor.

Crypto and batching
-------------------
The origin crypto (``tor1.backend.origin_crypto_for``, the C kernel by default) runs
inline on the loop thread, in batches: the link handler only appends RELAY payloads, and at the
end of the loop iteration (the owner calls :meth:`OriginCircuit.flush_in`) the circuit
decrypts them with one ``decrypt_buf`` call and handles them in order. DATA takes a short path:
bytes gathered per stream, one ``on_data`` per stream, windows charged per batch. The cells the
circuit sends in one step are encrypted with one ``encrypt_buf`` call and written with one
``write``.

Failure
-------
A DESTROY from the guard (relays pass one back when a later hop or its link dies), the guard
link closing (``relay.link`` then delivers DESTROY to every circuit on it), a cell no hop
recognizes, or a protocol error closes the circuit: every open stream gets ``on_end`` with the
reason and ``on_close`` runs once.

Threads: loop thread only.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

from reactor import TimerHandle
from relay.cells import CellCommand, DestroyReason
from relay.cells import RelayCommand as RC
from relay.circuits import (
    CIRCWINDOW_INCREMENT,
    CIRCWINDOW_START,
    END_REASON_DONE,
    RELAY_HEADER,
    STREAMWINDOW_INCREMENT,
    STREAMWINDOW_START,
    data_runs,
    pack_data_cells,
    pack_relay,
    wire_cells,
)
from relay.directory import RelayDescriptor
from relay.handshakes import (
    HTYPE_NTOR,
    BodyError,
    CreateFastClient,
    Extend2Body,
    HandshakeError,
    LinkSpecifier,
    NtorClient,
    decode_extended2,
)
from relay.sendme import SendmeTags, encode_sendme_v1, mark_cell, sendme_due
from tor1 import CELL_PAYLOAD_LEN, RELAY_DATA_MAX, RELAY_HEADER_LEN, SENDME_TAG_LEN
from tor1.backend import OriginCryptoLike, UnrecognizedCell, origin_crypto_for
from tor1.reference import HopKeys

if TYPE_CHECKING:
    from reactor import Reactor
    from relay.link import Link

__all__ = ["CircuitOwner", "ClientStream", "OriginCircuit"]

log = logging.getLogger("relay.client")

_SIZE = CELL_PAYLOAD_LEN
_RELAY = int(CellCommand.RELAY)


class CircuitOwner(Protocol):
    """What an origin circuit needs from the client that owns it (``relay.client.Client``)."""

    reactor: Reactor
    circuits_built: int

    def mark_dirty(self, circuit: OriginCircuit) -> None:
        """Flush ``circuit`` at the end of this loop iteration. Loop thread only."""
        ...

    def link_congested(self, circuit: OriginCircuit) -> bool:
        """True while ``circuit``'s guard link is above its high watermark. Loop thread only."""
        ...

    def block_on_link(self, circuit: OriginCircuit) -> None:
        """Call ``circuit.unblock()`` when its guard link drains. Loop thread only."""
        ...

    def circuit_closed(self, circuit: OriginCircuit) -> None:
        """Forget a closed circuit. Loop thread only."""
        ...



class ClientStream:
    """One stream of an :class:`OriginCircuit`. Loop thread only."""

    __slots__ = (
        "bytes_received",
        "bytes_sent",
        "circuit",
        "connected",
        "deliver_window",
        "end_requested",
        "ended",
        "on_connected",
        "on_data",
        "on_end",
        "on_sent",
        "package_window",
        "pending",
        "stream_id",
    )

    def __init__(
        self,
        circuit: OriginCircuit,
        stream_id: int,
        on_connected: Callable[[ClientStream], None] | None,
        on_data: Callable[[ClientStream, bytes], None] | None,
        on_end: Callable[[ClientStream, str], None] | None,
    ) -> None:
        """Made by :meth:`OriginCircuit.open_stream`. Loop thread only."""
        self.circuit = circuit
        self.stream_id = stream_id
        self.on_connected = on_connected
        self.on_data = on_data
        self.on_end = on_end
        self.on_sent: Callable[[ClientStream, int], None] | None = None
        self.connected = False
        self.ended = False
        self.end_requested = False
        self.package_window = STREAMWINDOW_START
        self.deliver_window = STREAMWINDOW_START
        self.pending = bytearray()
        self.bytes_sent = 0
        self.bytes_received = 0

    def write(self, data: bytes) -> None:
        """Queue ``data``; it is sent as the windows allow. Loop thread only."""
        if self.ended or self.end_requested:
            raise RuntimeError(f"stream {self.stream_id} is ended")
        self.pending += data
        if self.connected:
            self.circuit._package(self)
            self.circuit._send_out()

    def end(self) -> None:
        """Send END once the queued bytes are sent. Loop thread only. Idempotent."""
        if self.ended or self.end_requested:
            return
        self.end_requested = True
        if self.connected:
            self.circuit._package(self)
            self.circuit._send_out()

    @property
    def queued(self) -> int:
        """Bytes written but not yet sent. Loop thread only."""
        return len(self.pending)


class OriginCircuit:
    """One circuit built by this client. Loop thread only."""

    def __init__(
        self,
        client: CircuitOwner,
        path: Sequence[RelayDescriptor],
        on_open: Callable[[OriginCircuit], None] | None,
        on_close: Callable[[OriginCircuit, str], None] | None,
    ) -> None:
        """Made by :meth:`Client.build_circuit`. Loop thread only."""
        if not path:
            raise ValueError("a circuit needs at least one hop")
        self.client = client
        self.path = list(path)
        self.on_open = on_open
        self.on_close = on_close
        self.state = "connecting"
        self.close_reason: str | None = None
        self.link: Link | None = None
        self.circ_id = 0
        self.crypto: OriginCryptoLike | None = None
        self.package_window = CIRCWINDOW_START
        self.deliver_window = CIRCWINDOW_START
        self.streams: dict[int, ClientStream] = {}
        self.cells_sent = 0
        self.cells_received = 0
        self.data_cells_sent = 0
        self.data_cells_received = 0
        self.sendmes_sent = 0
        self._sendme = SendmeTags()  # tags of our DATA cells the exit's SENDMEs must carry
        self._next_stream_id = 1
        self._handshake: CreateFastClient | NtorClient | None = None
        self._incoming: list[bytes] = []
        self._dirty = False
        self._out: list[bytes] = []
        self._blocked: dict[ClientStream, None] = {}
        self._timer: TimerHandle | None = None

    def __repr__(self) -> str:
        names = ",".join(d.nickname for d in self.path)
        return f"<OriginCircuit {self.circ_id:#x} [{names}] {self.state}>"

    @property
    def is_open(self) -> bool:
        """True once every hop is added and until it closes. Loop thread only."""
        return self.state == "open"

    @property
    def exit_hop(self) -> int:
        """Index of the last hop. Loop thread only."""
        return len(self.path) - 1

    # ------------------------------------------------------------------ building

    def start(self, link: Link, build_timeout: float) -> None:
        """Register on the open guard ``link`` and send CREATE_FAST. Loop thread only (the
        owning client calls it)."""
        self.link = link
        self.circ_id = link.add_circuit(self._on_cell, batch=self._relay_batch)
        self.state = "building"
        self._timer = self.client.reactor.call_later(
            build_timeout, self._build_timed_out, build_timeout
        )
        handshake = CreateFastClient()
        self._handshake = handshake
        link.send_cell(self.circ_id, CellCommand.CREATE_FAST, handshake.onionskin)

    def _build_timed_out(self, seconds: float) -> None:
        self._timer = None
        if self.state in ("connecting", "building"):
            self.close(f"circuit not built after {seconds} s")

    def _add_hop(self, material: bytes) -> None:
        keys = HopKeys.from_material(material)
        if self.crypto is None:
            self.crypto = origin_crypto_for([keys])
        else:
            self.crypto.add_hop(keys)
        hops = self.crypto.n_hops
        if hops < len(self.path):
            self._extend_to(self.path[hops])
            return
        self.state = "open"
        self._handshake = None
        self.client.circuits_built += 1
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.on_open is not None:
            self.on_open(self)

    def _extend_to(self, relay: RelayDescriptor) -> None:
        assert self.crypto is not None
        handshake = NtorClient(relay.identity_digest, relay.ntor_onion_key)
        self._handshake = handshake
        body = Extend2Body(
            (LinkSpecifier.ipv4(relay.address, relay.port),
             LinkSpecifier.legacy_id(relay.identity_digest)),
            HTYPE_NTOR,
            handshake.onionskin,
        ).encode()
        payload = pack_relay(RC.EXTEND2, 0, body)
        self._write([payload], self.crypto.n_hops - 1, CellCommand.RELAY_EARLY)

    # ------------------------------------------------------------------ cells in

    def _relay_batch(self, payloads: bytes, count: int, early: tuple[int, ...] | None) -> None:
        """A read's RELAY cells from the guard, payloads joined (the link's framer groups
        them per circuit in C); a RELAY_EARLY among them closes the circuit, as tor's clients
        do (nothing of the read is handled: the close drops what is queued)."""
        if early is not None:
            self._on_cell(CellCommand.RELAY_EARLY, b"")
            return
        self._incoming.append(payloads)
        if not self._dirty:
            self._dirty = True
            self.client.mark_dirty(self)

    def _on_cell(self, command: int, payload: bytes) -> None:
        if command == _RELAY:  # not grouped (a direct call)
            self._relay_batch(payload, 1, None)
            return
        if command == CellCommand.DESTROY:
            reason = payload[0] if payload else 0
            self.close(f"DESTROY from the guard (reason {reason})", send_destroy=False)
        elif command == CellCommand.CREATED_FAST and isinstance(self._handshake, CreateFastClient):
            try:
                material = self._handshake.complete(payload)
            except HandshakeError as exc:
                self.close(f"CREATE_FAST failed: {exc}")
                return
            self._add_hop(material)
        elif command not in (CellCommand.PADDING, CellCommand.VPADDING):
            self.close(f"unexpected cell command {command} from the guard")

    def flush_in(self) -> None:
        """Decrypt and handle the RELAY cells received this iteration (one kernel call).
        Loop thread only (the owning client calls it at the end of the iteration).

        DATA cells take a short path: their bytes are gathered per stream and handed over
        with one ``on_data`` call per stream, and the deliver windows are charged per batch
        (the SENDMEs due are sent with this batch's answers). Any other cell first hands over
        the DATA gathered before it, so the order within a stream is kept."""
        self._dirty = False
        cells, self._incoming = self._incoming, []
        if self.state == "closed" or not cells:
            return
        if self.crypto is None:
            self.close("RELAY cell before the circuit was created")
            return
        joined = b"".join(cells)  # one piece: that piece, not a copy
        try:
            plain, hops, tags = self.crypto.decrypt_tagged_buf(joined)
        except UnrecognizedCell:
            self.close("a relay cell no hop recognized (digest mismatch)",
                       destroy_reason=DestroyReason.PROTOCOL)
            return
        self.cells_received += len(joined) // _SIZE
        data_cells = 0
        # The DATA cell that takes the deliver window to 900 gets a SENDME with its tag.
        due = self.deliver_window - (CIRCWINDOW_START - CIRCWINDOW_INCREMENT)
        triggers: list[int] = []
        offset, size = 0, len(plain)
        while offset < size:
            end, run_cells, runs = data_runs(plain, offset)  # a run of DATA cells, per stream
            if run_cells:
                if due > data_cells:  # one DATA cell in 100
                    while due <= data_cells + run_cells:
                        triggers.append(offset + (due - data_cells - 1) * _SIZE)
                        due += CIRCWINDOW_INCREMENT
                data_cells += run_cells
                self._deliver(runs)
                if self.state == "closed":  # by a stream's reader, say: these were received
                    self.data_cells_received += data_cells
                    return
                offset = end
            else:  # any other cell, after the DATA before it
                self._handle(plain, offset, hops[offset // _SIZE])
                if self.state == "closed":
                    return
                offset += _SIZE
        self.data_cells_received += data_cells
        if data_cells and self.state != "closed":
            self.deliver_window -= data_cells
            if self.deliver_window < 0:
                self.close("DATA beyond the circuit deliver window",
                           destroy_reason=DestroyReason.PROTOCOL)
                return
            for offset in triggers:
                rank = offset // _SIZE  # every decrypted cell has a tag
                tag = tags[rank * SENDME_TAG_LEN : (rank + 1) * SENDME_TAG_LEN]
                self.deliver_window += CIRCWINDOW_INCREMENT
                self._out.append(pack_relay(RC.SENDME, 0, encode_sendme_v1(tag)))
                self.sendmes_sent += 1
        self._send_out()

    def _deliver(self, runs: list[tuple[int, bytes, int]]) -> None:
        """Hand each stream its DATA bytes (``(stream_id, data, cells)``); charge and refill
        its deliver window."""
        for stream_id, data, cells in runs:
            stream = self.streams.get(stream_id)
            if stream is None or stream.ended:
                continue  # a stream we ended: its late DATA only counts for the circuit
            stream.deliver_window -= cells
            if stream.deliver_window < 0:
                self.close(f"DATA beyond stream {stream_id}'s deliver window")
                return
            while stream.deliver_window <= STREAMWINDOW_START - STREAMWINDOW_INCREMENT:
                stream.deliver_window += STREAMWINDOW_INCREMENT
                self._out.append(pack_relay(RC.SENDME, stream_id))
            stream.bytes_received += len(data)
            if stream.on_data is not None:
                stream.on_data(stream, data)
            if self.state == "closed":
                return

    def _handle(self, plain: bytes, offset: int, hop: int) -> None:
        """Handle one relay cell other than DATA."""
        command, _, stream_id, _, length = RELAY_HEADER.unpack_from(plain, offset)
        if length > RELAY_DATA_MAX:
            self.close(f"relay length field {length} exceeds {RELAY_DATA_MAX}")
            return
        start = offset + RELAY_HEADER_LEN
        if command == RC.SENDME:
            self._on_sendme(stream_id, plain[start : start + length], hop)
        elif command == RC.CONNECTED:
            stream = self.streams.get(stream_id)
            if stream is not None and not stream.connected:
                stream.connected = True
                if stream.on_connected is not None:
                    stream.on_connected(stream)
                self._package(stream)
        elif command == RC.END:
            reason = plain[start] if length else 0
            stream = self.streams.pop(stream_id, None)
            if stream is not None:
                self._stream_ended(stream, f"END from the exit (reason {reason})")
        elif command == RC.EXTENDED2 and isinstance(self._handshake, NtorClient):
            try:
                material = self._handshake.complete(decode_extended2(plain[start : start + length]))
            except (HandshakeError, BodyError) as exc:
                self.close(f"EXTEND2 failed: {exc}")
                return
            self._add_hop(material)
        elif command == RC.TRUNCATED:
            self.close("TRUNCATED from a relay")
        elif command != RC.DROP:
            log.info("%r: ignoring relay command %d from hop %d", self, command, hop)

    def _on_sendme(self, stream_id: int, body: bytes, hop: int) -> None:
        if stream_id == 0:
            why: str | None
            if hop != self.exit_hop:
                why = f"circuit SENDME from hop {hop}, which gets no DATA from us"
            else:
                why = self._sendme.check(body)
                if why is None and (self.package_window + CIRCWINDOW_INCREMENT
                                    > CIRCWINDOW_START):
                    why = "unexpected SENDME: beyond the package window"
                elif why is not None:
                    why = f"circuit {why}"
            if why is not None:
                log.warning("%r: %s; closing the circuit", self, why)
                self.close(why, destroy_reason=DestroyReason.PROTOCOL)
                return
            self.package_window += CIRCWINDOW_INCREMENT
            blocked, self._blocked = self._blocked, {}
            for stream in blocked:
                self._package(stream)
            return
        stream = self.streams.get(stream_id)
        if stream is not None:
            if stream.package_window + STREAMWINDOW_INCREMENT > STREAMWINDOW_START:
                self.close(f"stream {stream_id} SENDME beyond the package window",
                           destroy_reason=DestroyReason.PROTOCOL)
                return
            stream.package_window += STREAMWINDOW_INCREMENT
            self._package(stream)

    @property
    def sendmes_accepted(self) -> int:
        """Circuit SENDMEs from the exit whose tag matched. Loop thread only."""
        return self._sendme.accepted

    # ------------------------------------------------------------------ cells out

    def open_stream(
        self,
        host: str,
        port: int,
        *,
        on_connected: Callable[[ClientStream], None] | None = None,
        on_data: Callable[[ClientStream, bytes], None] | None = None,
        on_end: Callable[[ClientStream, str], None] | None = None,
    ) -> ClientStream:
        """Send BEGIN ``host:port`` to the last hop. Loop thread only."""
        target = f"[{host}]" if ":" in host else host
        return self._open(RC.BEGIN, f"{target}:{port}".encode() + b"\0", on_connected,
                          on_data, on_end)

    def open_dir_stream(
        self,
        *,
        on_connected: Callable[[ClientStream], None] | None = None,
        on_data: Callable[[ClientStream, bytes], None] | None = None,
        on_end: Callable[[ClientStream, str], None] | None = None,
    ) -> ClientStream:
        """Send BEGIN_DIR to the last hop: a stream to that relay's own directory server
        (HTTP/1.0 requests for directory documents; tor serves them on a one-hop circuit).
        Loop thread only."""
        return self._open(RC.BEGIN_DIR, b"", on_connected, on_data, on_end)

    def _open(
        self,
        command: int,
        body: bytes,
        on_connected: Callable[[ClientStream], None] | None,
        on_data: Callable[[ClientStream, bytes], None] | None,
        on_end: Callable[[ClientStream, str], None] | None,
    ) -> ClientStream:
        if not self.is_open:
            raise RuntimeError(f"{self!r} is not open")
        stream_id = self._next_stream_id
        self._next_stream_id = stream_id % 0xFFFF + 1
        stream = ClientStream(self, stream_id, on_connected, on_data, on_end)
        self.streams[stream_id] = stream
        self._out.append(pack_relay(command, stream_id, body))
        self._send_out()
        return stream

    def _package(self, stream: ClientStream) -> None:
        """Turn queued stream bytes into DATA payloads while every window allows."""
        if stream.ended or not stream.connected or self.state != "open":
            return
        pending = stream.pending
        if pending:
            if self.client.link_congested(self):
                self.client.block_on_link(self)
                self._blocked[stream] = None
                return
            cells = min(-(-len(pending) // RELAY_DATA_MAX), self.package_window,
                        stream.package_window)
            if cells > 0:
                end = min(len(pending), cells * RELAY_DATA_MAX)
                out = self._out
                first = len(out)
                out.extend(pack_data_cells(stream.stream_id, pending[:end]))
                for index in sendme_due(self.data_cells_sent, cells):  # one cell in 100
                    out[first + index] = mark_cell(out[first + index])
                self.data_cells_sent += cells
                del pending[:end]
                self.package_window -= cells
                stream.package_window -= cells
                stream.bytes_sent += end
                if stream.on_sent is not None:
                    stream.on_sent(stream, stream.bytes_sent)
            if pending:
                if self.package_window <= 0:
                    self._blocked[stream] = None
                return
        if stream.end_requested:
            self._out.append(pack_relay(RC.END, stream.stream_id, bytes((END_REASON_DONE,))))
            self.streams.pop(stream.stream_id, None)
            self._stream_ended(stream, "ended locally")

    def unblock(self) -> None:
        """The guard link drained: package the streams that waited for it. Loop thread
        only."""
        blocked, self._blocked = self._blocked, {}
        for stream in blocked:
            self._package(stream)
        self._send_out()

    def _send_out(self) -> None:
        if self._out and self.state == "open":
            out, self._out = self._out, []
            self._write(out, self.exit_hop, _RELAY)

    def _write(self, payloads: list[bytes], hop: int, command: int) -> None:
        assert self.crypto is not None and self.link is not None
        if not self.link.is_open:
            return
        encrypted, tags = self.crypto.encrypt_tagged_buf(payloads, hop)
        if tags:  # marked DATA cells: their SENDMEs may come as soon as they leave
            self._sendme.record(tags)
        self.link.write_cells(wire_cells(self.circ_id, command, encrypted), len(payloads))
        self.cells_sent += len(payloads)

    # ------------------------------------------------------------------ closing

    def _stream_ended(self, stream: ClientStream, why: str) -> None:
        if stream.ended:
            return
        stream.ended = True
        self._blocked.pop(stream, None)
        if stream.on_end is not None:
            stream.on_end(stream, why)

    def close(self, reason: str = "closed by the client", *, send_destroy: bool = True,
              destroy_reason: int = DestroyReason.REQUESTED) -> None:
        """Close the circuit (DESTROY with ``destroy_reason`` to the guard unless it sent one);
        every open stream ends with ``reason``; ``on_close`` runs once. Idempotent. Loop
        thread only."""
        if self.state == "closed":
            return
        self.state = "closed"
        self.close_reason = reason
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._incoming.clear()
        self._out.clear()
        if self.link is not None and self.circ_id:
            if send_destroy:
                self.link.destroy_circuit(self.circ_id, destroy_reason)
            else:
                self.link.remove_circuit(self.circ_id)
        streams, self.streams = self.streams, {}
        for stream in streams.values():
            self._stream_ended(stream, reason)
        self.client.circuit_closed(self)
        if self.on_close is not None:
            self.on_close(self, reason)
