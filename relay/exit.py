"""The exit side of one circuit: BEGIN / DATA / END / SENDME to TCP targets on loopback.

What it does
------------
An :class:`ExitEdge` belongs to one relay circuit whose cells are recognized at this relay. The
circuit hands it the plaintext of those cells (one joined buffer, the offsets of the cells, in
order, and a lookup of each cell's SENDME tag) through :meth:`ExitEdge.handle`; the edge
answers by *originating* relay payloads
toward the client through the ``originate`` callback it was given, once per call (the circuit
joins them, has the worker pool set the digest and encrypt them, and writes them to the
previous hop).

* ``BEGIN addr:port``: a host name is resolved first (:func:`reactor.resolve.resolve`, at most
  ``max_lookups`` at once per relay: ``END RESOLVEFAILED`` beyond, or when the name does not
  resolve); if the exit policy (``check``, tor's: :mod:`relay.exitpolicy`) allows the address
  the edge connects with ``reactor.net.connect`` and answers ``CONNECTED`` (IPv4 address and
  TTL), else ``END`` with tor's reason (EXITPOLICY, CONNECTREFUSED for a relay's ORPort, ...).
  DATA that arrives before the connection is up is kept and written once it is: tor clients
  send optimistic data, and it counts against the stream's window like any other.
* ``RESOLVE name``: ``RESOLVED`` with the addresses (IPv4 and IPv6, TTL 300), or an error
  answer (type 0xF0 transient, 0xF1 not); a relay that is not an exit refuses every lookup.
* ``BEGIN_DIR``: with a directory server (``dir_server``), ``CONNECTED`` and the request is
  answered in process (:mod:`relay.dirstream`); without, ``END NOTDIRECTORY``.
* ``DATA``: written to the target; many DATA cells of one stream in one call are written with
  one ``writelines``.
* ``END``: the target is closed after its buffered bytes are sent.
* The target's bytes are cut into DATA payloads while both the circuit's and the stream's
  package windows allow; the rest waits in the stream's buffer and the target's reading is
  paused until a SENDME opens the window. When the target closes, what is buffered is sent
  first, then ``END``.

Flow control (see :mod:`relay.circuits`): deliver windows of 1000 (circuit) and 500 (stream)
cells; a circuit SENDME every 100 DATA cells received and a stream SENDME every 50, the latter
withheld while the target's write buffer is above its high watermark and sent when it drains.
A client that sends DATA beyond a deliver window breaks the protocol: the circuit is closed.

Circuit SENDMEs are version 1 both ways (:mod:`relay.sendme`): the edge marks its 100th, 200th,
... DATA cell when it packages it, the circuit hands back the tags of the marked cells once
they are crypted (:meth:`ExitEdge.record_tags`, before the cells leave), and each circuit
SENDME from the client must carry the oldest of them; a version-0, unparseable, unexpected or
mismatching SENDME closes the circuit (DESTROY, PROTOCOL) with the reason logged. The edge's
own circuit SENDMEs carry the tag of the client's DATA cell that triggered them. The client
that never reads cannot answer with a valid SENDME, so the package window (1000 cells) is all
the exit ever reads from the target for it. Stream SENDMEs stay empty and unchecked, as tor's.

Back-pressure toward the client's link: :meth:`pause_reading` / :meth:`resume_reading` stop and
restart reading from every target of this circuit while the previous hop's write buffer is full.

Threads: loop thread only, like the circuit that owns it; the module-level functions marked
"Any thread" are pure.
"""

from __future__ import annotations

import ipaddress
import logging
import struct
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from reactor import CloseReason, Reactor, Stream, connect
from reactor.resolve import resolve
from relay.cells import RelayCommand
from relay.circuits import (
    CIRCWINDOW_INCREMENT,
    CIRCWINDOW_START,
    END_REASON_CONNECTREFUSED,
    END_REASON_CONNRESET,
    END_REASON_DONE,
    END_REASON_EXITPOLICY,
    END_REASON_MISC,
    END_REASON_NOTDIRECTORY,
    END_REASON_RESOLVEFAILED,
    END_REASON_RESOURCELIMIT,
    RELAY_HEADER,
    STREAMWINDOW_INCREMENT,
    STREAMWINDOW_START,
    ReadGate,
    pack_data_cells,
    pack_relay,
)
from relay.dirstream import DirServerFactory, DirTarget
from relay.dos import StreamCreationLimiter
from relay.exitpolicy import ExitVerdict
from relay.netinfo import ADDR_IPV4, ADDR_IPV6
from relay.sendme import SendmeTags, encode_sendme_v1, mark_cell, sendme_due
from tor1 import RELAY_DATA_MAX, RELAY_HEADER_LEN

__all__ = ["EARLY_CHUNK_OVERHEAD", "STREAM_COST", "ExitCheck", "ExitEdge", "Lookups", "Sockets",
           "TagLookup", "parse_begin", "refuse_every_exit"]

TagLookup = Callable[[int], bytes]
"""``tag_of(offset)``: the SENDME tag of the recognized cell at ``offset`` of a handed batch."""

log = logging.getLogger("relay.exit")

_BEGIN = RelayCommand.BEGIN
_DATA = RelayCommand.DATA
_END = RelayCommand.END
_SENDME = RelayCommand.SENDME
_CONNECTED = RelayCommand.CONNECTED
_DROP = RelayCommand.DROP
_RESOLVE = RelayCommand.RESOLVE
_RESOLVED = RelayCommand.RESOLVED
_BEGIN_DIR = RelayCommand.BEGIN_DIR
_DNS_TTL = 300  # tor rounds what it sends to a few fixed TTLs; 300 s is its smallest
_RESOLVED_TRANSIENT = 0xF0
_RESOLVED_NONTRANSIENT = 0xF1
_MAX_ANSWERS = 8
_WINDOW = "window"
_LINK = "link"

EARLY_CHUNK_OVERHEAD = 72
"""Bytes an early DATA chunk costs beyond its payload: the bytes object's header and malloc's
rounding (it is past pymalloc's 512-byte limit), its list slot, and the heap the relay's other
allocations leave between chunks. Alone a chunk costs 52-53 B beyond its payload
(``python -m benchmarks.exit_costs``); in a running exit, the RSS added per extra chunk between
``streams_fds``'s two limits is 569-574 B, payload included (``python -m benchmarks.attacks``,
``docs/attacks.md``)."""

STREAM_COST = 3072
"""Bytes a stream costs with nothing buffered: the ``_ExitStream`` and its closures, the
reactor's ``Stream``, the libuv TCP handle; measured 2.1-2.7 KB of RSS per half-open stream
(``python -m benchmarks.exit_costs``, more per stream with more streams; 2.1 KB of it Python)
and about 3.3 KB inside a relay under the ``streams_fds`` attack: 3 KiB. The socket's kernel
memory is not RSS and not counted."""

_EMPTY_BYTEARRAY = sys.getsizeof(bytearray())


ExitCheck = Callable[[str, int], ExitVerdict]
"""``check(address, port)``: the exit policy's verdict on a resolved target."""

_NOT_AN_EXIT = ExitVerdict(False, END_REASON_EXITPOLICY, "not an exit")


def refuse_every_exit(address: str, port: int) -> ExitVerdict:
    """The exit policy of a relay that is not an exit. Any thread (pure)."""
    return _NOT_AN_EXIT


class Sockets:
    """The relay's count of open exit-stream sockets and the rule that may refuse one more
    (``relay.connlimit.FdBudget.may_open_exit_stream``: links keep a reserve of descriptors).
    Loop thread only."""

    def __init__(self, may_open: Callable[[int], str | None] | None = None) -> None:
        """``may_open(open_exit_streams)``: None, or why not. Loop thread only."""
        self.open = 0
        self.refused = 0
        self._may_open = may_open

    def take(self) -> str | None:
        """Claim a socket for a new exit stream: None, or why it is refused (counted).
        Loop thread only."""
        why = self._may_open(self.open) if self._may_open is not None else None
        if why is not None:
            self.refused += 1
            return why
        self.open += 1
        return None

    def give_back(self) -> None:
        """An exit stream's socket closed. Loop thread only."""
        self.open -= 1


class Lookups:
    """The name lookups a relay has under way, bounded: libuv resolves on a small thread pool,
    and a client must not be able to queue lookups without limit. Loop thread only."""

    def __init__(self, limit: int = 64) -> None:
        """At most ``limit`` at once. Loop thread only."""
        self.limit = limit
        self.pending = 0
        self.refused = 0

    def take(self) -> bool:
        """Claim a lookup slot; False (counted) when all are taken. Loop thread only."""
        if self.pending >= self.limit:
            self.refused += 1
            return False
        self.pending += 1
        return True

    def give_back(self) -> None:
        """A lookup ended. Loop thread only."""
        self.pending -= 1


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def parse_begin(body: bytes) -> tuple[str, int]:
    """``(host, port)`` of a BEGIN body ``ADDRESS:PORT NUL [FLAGS]``; ``ValueError`` if
    malformed. IPv6 addresses come in brackets. Any thread."""
    target, nul, _ = body.partition(b"\x00")
    if not nul:
        raise ValueError("BEGIN body lacks its NUL terminator")
    text = target.decode("ascii")
    host, colon, port_text = text.rpartition(":")
    if not colon or not port_text.isdigit():
        raise ValueError(f"BEGIN target {text!r} is not ADDRESS:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port_text)


class _ExitStream:
    """One stream's target connection, buffers and windows. Loop thread only."""

    __slots__ = (
        "counted",
        "deliver_window",
        "early",
        "early_cost",
        "eof",
        "gate",
        "package_window",
        "pending",
        "pending_cost",
        "stream_id",
        "target",
        "withheld",
    )

    def __init__(self, stream_id: int, target: Stream | DirTarget | None) -> None:
        """A stream whose target is being resolved (None) or connected. Loop thread only."""
        self.stream_id = stream_id
        self.target = target
        self.gate = ReadGate(target) if target is not None else None
        self.package_window = STREAMWINDOW_START
        self.deliver_window = STREAMWINDOW_START
        self.pending = bytearray()  # read from the target, not yet packaged (window closed)
        self.pending_cost = 0  # what `pending` allocates beyond an empty bytearray
        self.early: list[bytes] | None = []  # DATA before CONNECTED; None once connected
        self.early_cost = 0  # its chunks' payloads plus EARLY_CHUNK_OVERHEAD each
        self.eof: int | None = None  # END reason to send once `pending` is empty
        self.withheld = False  # stream SENDMEs held back while the target's writes back up
        self.counted = False  # holds one of the relay's exit sockets (Sockets)


class ExitEdge:
    """The streams of one circuit at its exit, and the circuit's SENDME windows."""

    def __init__(
        self,
        reactor: Reactor,
        originate: Callable[[list[bytes]], None],
        close_circuit: Callable[[str], None],
        *,
        check: ExitCheck = refuse_every_exit,
        is_exit: bool = False,
        lookups: Lookups | None = None,
        sockets: Sockets | None = None,
        streams: StreamCreationLimiter | None = None,
        dir_server: DirServerFactory | None = None,
        name: str = "exit",
    ) -> None:
        """``originate(payloads)`` sends relay payloads toward the client (in order);
        ``close_circuit(reason)`` tears the circuit down (protocol violation); ``check`` is the
        exit policy (``is_exit``: whether it accepts anything; a non-exit resolves no names);
        ``lookups`` bounds the relay's name lookups, ``sockets`` its exit sockets, ``streams``
        this circuit's stream creation rate (``DoSStreamCreation*``); ``dir_server`` answers
        BEGIN_DIR. Loop thread only."""
        self._reactor = reactor
        self._originate = originate
        self._close_circuit = close_circuit
        self._check = check
        self._is_exit = is_exit
        self._lookups = lookups if lookups is not None else Lookups()
        self._sockets = sockets if sockets is not None else Sockets()
        self._streams_dos = streams
        self._dir_server = dir_server
        self._name = name
        self._streams: dict[int, _ExitStream] = {}
        self._held = 0  # STREAM_COST per stream plus what their buffers cost (buffered_bytes)
        self._buffers = 0  # the buffers' part of it
        self._buffers_since: float | None = None  # when `_buffers` last rose from zero
        self._blocked: dict[_ExitStream, None] = {}  # waiting for the circuit window
        self._out: list[bytes] = []
        self._closed = False
        self._targets_paused = False
        self.package_window = CIRCWINDOW_START
        self.deliver_window = CIRCWINDOW_START
        self._sendme = SendmeTags()  # tags of our DATA cells that SENDMEs must acknowledge
        self.sendmes_sent = 0
        self.data_cells_in = 0
        self.data_cells_out = 0
        self.bytes_to_targets = 0
        self.bytes_from_targets = 0
        self.streams_opened = 0
        self.dir_streams = 0

    # ------------------------------------------------------------------ cells from the client

    def handle(self, plain: bytes, offsets: Sequence[int], tag_of: TagLookup) -> None:
        """Handle the relay cells at ``offsets`` of the joined plaintext ``plain`` (recognized
        here, in circuit order; ``tag_of(offset)`` is a cell's SENDME tag, asked for one DATA
        cell in 100), then originate the answers in one call. Loop thread only."""
        writes: dict[_ExitStream, list[bytes]] = {}
        try:
            for offset in offsets:
                if self._closed:
                    return
                command, _, stream_id, _, length = RELAY_HEADER.unpack_from(plain, offset)
                if length > RELAY_DATA_MAX:
                    self._violation(f"relay length field {length} exceeds {RELAY_DATA_MAX}")
                    return
                start = offset + RELAY_HEADER_LEN
                if command == _DATA:
                    self._on_data(stream_id, plain[start : start + length], writes)
                    if self.deliver_window <= CIRCWINDOW_START - CIRCWINDOW_INCREMENT:
                        self._send_circuit_sendme(tag_of(offset))
                elif command == _SENDME:
                    self._on_sendme(stream_id, plain[start : start + length])
                elif command == _BEGIN:
                    self._on_begin(stream_id, plain[start : start + length])
                elif command == _BEGIN_DIR:
                    self._on_begin_dir(stream_id)
                elif command == _RESOLVE:
                    self._on_resolve(stream_id, plain[start : start + length])
                elif command == _END:
                    self._flush_writes(writes)
                    self._on_end(stream_id)
                elif command != _DROP:
                    log.info("%s: ignoring relay command %d", self._name, command)
        finally:
            self._flush_writes(writes)
            self._flush()

    def _on_data(self, stream_id: int, data: bytes, writes: dict[_ExitStream, list[bytes]]) -> None:
        self.data_cells_in += 1
        self.deliver_window -= 1
        if self.deliver_window < 0:
            self._violation("DATA beyond the circuit deliver window")
            return
        stream = self._streams.get(stream_id)
        if stream is None:
            return  # a stream we ended: its late DATA counts for the circuit only
        stream.deliver_window -= 1
        if stream.deliver_window < 0:
            self._violation(f"DATA beyond stream {stream_id}'s deliver window")
            return
        if stream.early is not None:
            stream.early.append(data)
            cost = len(data) + EARLY_CHUNK_OVERHEAD
            stream.early_cost += cost
            self._charge(cost)
        else:
            batch = writes.get(stream)
            if batch is None:
                writes[stream] = [data]
            else:
                batch.append(data)
        self.bytes_to_targets += len(data)

    def _send_circuit_sendme(self, tag: bytes) -> None:
        """The DATA cell whose tag this is took the deliver window to 900: acknowledge it."""
        if self._closed:
            return
        self.deliver_window += CIRCWINDOW_INCREMENT
        self._out.append(pack_relay(_SENDME, 0, encode_sendme_v1(tag)))
        self.sendmes_sent += 1

    def record_tags(self, tags: bytes) -> None:
        """The tags of our marked DATA cells, crypted and about to be written (in order).
        Loop thread only (the circuit calls it with the originate results)."""
        if not self._closed:
            self._sendme.record(tags)

    def _flush_writes(self, writes: dict[_ExitStream, list[bytes]]) -> None:
        """Write the DATA gathered per stream, one ``writelines`` each, then consider SENDMEs."""
        for stream, chunks in writes.items():
            target = stream.target
            if target is not None and not target.closed:
                target.writelines(chunks)
            self._consider_stream_sendme(stream)
        writes.clear()

    def _consider_stream_sendme(self, stream: _ExitStream) -> None:
        target = stream.target
        while stream.deliver_window <= STREAMWINDOW_START - STREAMWINDOW_INCREMENT:
            if (target is not None and not target.closed
                    and target.write_buffer_size > target.write_watermarks[0]):
                stream.withheld = True  # sent from on_write_low
                return
            stream.deliver_window += STREAMWINDOW_INCREMENT
            self._out.append(pack_relay(_SENDME, stream.stream_id))
        stream.withheld = False

    def _on_sendme(self, stream_id: int, body: bytes) -> None:
        if stream_id == 0:
            why = self._sendme.check(body)
            if why is not None:
                self._violation(f"circuit {why}")
                return
            self.package_window += CIRCWINDOW_INCREMENT
            if self.package_window > CIRCWINDOW_START:
                self._violation("circuit SENDME beyond the package window")
                return
            blocked, self._blocked = self._blocked, {}
            for stream in blocked:
                self._package(stream)
            return
        stream = self._streams.get(stream_id)
        if stream is None:
            return
        stream.package_window += STREAMWINDOW_INCREMENT
        if stream.package_window > STREAMWINDOW_START:
            self._violation(f"stream {stream_id} SENDME beyond the package window")
            return
        self._package(stream)

    def _on_begin(self, stream_id: int, body: bytes) -> None:
        if not self._new_stream_id(stream_id, "BEGIN"):
            return
        try:
            host, port = parse_begin(body)
        except (ValueError, UnicodeDecodeError) as exc:
            log.info("%s: bad BEGIN on stream %d: %s", self._name, stream_id, exc)
            self._end_stream(stream_id, END_REASON_MISC)
            return
        if not self._is_exit:
            self._refuse(stream_id, host, port, _NOT_AN_EXIT)
            return
        if not self._stream_allowed(stream_id):
            return
        stream = _ExitStream(stream_id, None)
        self._add_stream(stream)
        self.streams_opened += 1
        if _is_address(host):
            self._connect(stream, host, port)
        elif not self._lookups.take():
            self._drop_stream(stream_id)
            log.info("%s: stream %d: too many name lookups under way", self._name, stream_id)
            self._end_stream(stream_id, END_REASON_RESOLVEFAILED)
        else:
            resolve(self._reactor, host,
                    lambda found, error: self._on_resolved(stream, host, port, found, error))

    def _on_resolved(self, stream: _ExitStream, host: str, port: int, found: list[str],
                     error: str | None) -> None:
        self._lookups.give_back()
        if self._streams.get(stream.stream_id) is not stream or self._closed:
            return  # ended meanwhile
        if not found:
            self._drop_stream(stream.stream_id)
            log.info("%s: stream %d: %s does not resolve: %s", self._name, stream.stream_id,
                     host, error)
            self._end_stream(stream.stream_id, END_REASON_RESOLVEFAILED)
            self._flush()
            return
        self._connect(stream, found[0], port)
        self._flush()

    def _connect(self, stream: _ExitStream, address: str, port: int) -> None:
        """Check ``address:port`` against the exit policy, then dial it. Loop thread only."""
        stream_id = stream.stream_id
        verdict = self._check(address, port)
        if not verdict.allowed:
            self._drop_stream(stream_id)
            self._refuse(stream_id, address, port, verdict)
            return
        why = self._sockets.take()
        if why is not None:
            self._drop_stream(stream_id)
            log.warning("%s: stream %d refused: %s", self._name, stream_id, why)
            self._end_stream(stream_id, END_REASON_RESOURCELIMIT)
            return
        stream.counted = True
        stream.target = connect(
            self._reactor,
            address,
            port,
            lambda target: self._socket_connected(stream, target, address),
            lambda reason, detail: self._socket_failed(stream, reason, detail),
        )
        stream.gate = ReadGate(stream.target)

    def _release(self, stream: _ExitStream) -> None:
        """The stream's socket closed: give its descriptor back. Idempotent."""
        if stream.counted:
            stream.counted = False
            self._sockets.give_back()

    def _socket_connected(self, stream: _ExitStream, target: Stream, address: str) -> None:
        if self._streams.get(stream.stream_id) is not stream or stream.target is not target:
            self._release(stream)  # ended while connecting: close() below fires no on_close
        else:
            closed = target.on_close

            def on_close(reason: CloseReason, detail: str) -> None:
                self._release(stream)
                if closed is not None:
                    closed(reason, detail)

            target.on_close = on_close
        self._on_connected(stream.stream_id, target, address)

    def _socket_failed(self, stream: _ExitStream, reason: CloseReason, detail: str) -> None:
        self._release(stream)
        if self._streams.get(stream.stream_id) is stream:
            self._on_connect_failed(stream.stream_id, reason, detail)

    def _refuse(self, stream_id: int, host: str, port: int, verdict: ExitVerdict) -> None:
        log.info("%s: exit policy refuses %s:%d on stream %d: %s", self._name, host, port,
                 stream_id, verdict.why)
        self._end_stream(stream_id, verdict.end_reason or END_REASON_EXITPOLICY)

    def _stream_allowed(self, stream_id: int) -> bool:
        """``DoSStreamCreation*``: may this circuit open another stream now? A refusal ends the
        stream (END MISC) or closes the circuit, as configured. Loop thread only."""
        if self._streams_dos is None:
            return True
        verdict = self._streams_dos.on_begin(time.monotonic())
        if verdict.allowed:
            return True
        if verdict.close_circuit:
            self._violation(f"stream creation: {verdict.why}")
        else:
            log.info("%s: stream %d refused: %s", self._name, stream_id, verdict.why)
            self._end_stream(stream_id, verdict.reason)
        return False

    def _new_stream_id(self, stream_id: int, what: str) -> bool:
        if stream_id == 0 or stream_id in self._streams:
            self._violation(f"{what} with stream id {stream_id} (zero or in use)")
            return False
        return True

    def _end_stream(self, stream_id: int, reason: int) -> None:
        self._out.append(pack_relay(_END, stream_id, bytes((reason,))))

    def _on_begin_dir(self, stream_id: int) -> None:
        if not self._new_stream_id(stream_id, "BEGIN_DIR"):
            return
        if self._dir_server is None:
            self._end_stream(stream_id, END_REASON_NOTDIRECTORY)
            return
        target = DirTarget(self._reactor, self._dir_server)
        stream = _ExitStream(stream_id, target)
        self._add_stream(stream)
        self.streams_opened += 1
        self.dir_streams += 1
        self._on_connected(stream_id, target, None)

    def _on_resolve(self, stream_id: int, body: bytes) -> None:
        name = body.partition(b"\x00")[0].decode("ascii", "replace")
        if not self._is_exit:
            self._answer_resolve(stream_id, [], nontransient=True)
            return
        if not self._stream_allowed(stream_id):
            return
        if not self._lookups.take():
            self._answer_resolve(stream_id, [], nontransient=False)
            return

        def done(found: list[str], error: str | None) -> None:
            self._lookups.give_back()
            if self._closed:
                return
            if error is not None:
                log.info("%s: RESOLVE %r failed: %s", self._name, name, error)
            self._answer_resolve(stream_id, found, nontransient=True)
            self._flush()

        resolve(self._reactor, name, done)

    def _answer_resolve(self, stream_id: int, found: list[str], *, nontransient: bool) -> None:
        """RESOLVED with the addresses found, or one error answer. Loop thread only."""
        ttl = struct.pack(">I", _DNS_TTL)
        answers = []
        for text in found[:_MAX_ANSWERS]:
            packed = ipaddress.ip_address(text).packed
            answers.append(bytes((ADDR_IPV4 if len(packed) == 4 else ADDR_IPV6, len(packed)))
                           + packed + ttl)
        if not answers:
            kind = _RESOLVED_NONTRANSIENT if nontransient else _RESOLVED_TRANSIENT
            answers.append(bytes((kind, 0)) + ttl)
        self._out.append(pack_relay(_RESOLVED, stream_id, b"".join(answers)))

    def _on_end(self, stream_id: int) -> None:
        stream = self._drop_stream(stream_id)
        if stream is None:
            return
        self._blocked.pop(stream, None)
        if stream.gate is not None:
            stream.gate.clear()
        if stream.early:
            log.info("%s: stream %d ended before it connected", self._name, stream_id)
        if stream.target is not None:
            stream.target.close("END from the client")

    # ------------------------------------------------------------------ targets

    def _on_connected(self, stream_id: int, target: Stream | DirTarget, host: str | None) -> None:
        stream = self._streams.get(stream_id)
        if stream is None or stream.target is not target:
            target.close("stream ended while connecting")
            return
        assert stream.gate is not None
        early, stream.early = stream.early or [], None
        self._charge(-stream.early_cost)  # handed to the target's write queue below
        stream.early_cost = 0
        released = target.on_close  # the socket count's release, if any (_socket_connected)

        def on_close(reason: CloseReason, detail: str) -> None:
            if released is not None:
                released(reason, detail)
            self._on_target_closed(stream, reason, detail)

        target.on_close = on_close
        target.on_write_low = lambda: self._on_target_drained(stream)
        target.on_data = lambda data: self._on_target_data(stream, data)
        if self._targets_paused:
            stream.gate.hold(_LINK)
        if host is None:  # BEGIN_DIR: an empty CONNECTED
            self._out.append(pack_relay(_CONNECTED, stream_id))
        else:
            try:
                address = ipaddress.IPv4Address(host).packed
            except ValueError:
                address = bytes(4)
            self._out.append(pack_relay(_CONNECTED, stream_id,
                                        address + struct.pack(">I", _DNS_TTL)))
        if early:
            target.writelines(early)
            self._consider_stream_sendme(stream)
        self._flush()

    def _on_connect_failed(self, stream_id: int, reason: CloseReason, detail: str) -> None:
        stream = self._drop_stream(stream_id)
        if stream is None or self._closed:
            return
        log.info("%s: stream %d: connect failed: %s", self._name, stream_id, detail)
        code = END_REASON_CONNECTREFUSED if reason is CloseReason.REFUSED else END_REASON_MISC
        self._out.append(pack_relay(_END, stream_id, bytes((code,))))
        self._flush()

    def _on_target_data(self, stream: _ExitStream, data: bytes) -> None:
        self.bytes_from_targets += len(data)
        stream.pending += data
        self._cost_pending(stream)
        self._package(stream)
        self._flush()

    def _on_target_drained(self, stream: _ExitStream) -> None:
        if stream.withheld and self._streams.get(stream.stream_id) is stream:
            self._consider_stream_sendme(stream)
            self._flush()

    def _on_target_closed(self, stream: _ExitStream, reason: CloseReason, detail: str) -> None:
        if self._streams.get(stream.stream_id) is not stream:
            return  # ended by the client: nothing to tell it
        stream.eof = END_REASON_DONE if reason is CloseReason.EOF else END_REASON_CONNRESET
        self._package(stream)
        self._flush()

    def _package(self, stream: _ExitStream) -> None:
        """Turn buffered target bytes into DATA payloads while both windows allow."""
        if stream.gate is None:
            return  # still resolving: nothing read yet
        pending = stream.pending
        size = len(pending)
        offset = 0
        stream_id = stream.stream_id
        cells = min(
            -(-size // RELAY_DATA_MAX), self.package_window, stream.package_window
        )
        if cells > 0:
            end = min(size, cells * RELAY_DATA_MAX)
            out = self._out
            first = len(out)
            out.extend(pack_data_cells(stream_id, pending[:end]))
            for index in sendme_due(self.data_cells_out, cells):  # one cell in 100
                out[first + index] = mark_cell(out[first + index])
            offset = end
            self.package_window -= cells
            stream.package_window -= cells
            self.data_cells_out += cells
        if offset:
            del pending[:offset]
            self._cost_pending(stream)
        if pending:
            stream.gate.hold(_WINDOW)
            if self.package_window <= 0:
                self._blocked[stream] = None
            return
        stream.gate.release(_WINDOW)
        if stream.eof is not None:
            self._drop_stream(stream_id)
            self._out.append(pack_relay(_END, stream_id, bytes((stream.eof,))))

    # ------------------------------------------------------------------ memory

    def _add_stream(self, stream: _ExitStream) -> None:
        """A new stream: it costs STREAM_COST from now on. Loop thread only."""
        self._streams[stream.stream_id] = stream
        self._held += STREAM_COST

    def _drop_stream(self, stream_id: int) -> _ExitStream | None:
        """Forget stream ``stream_id`` (None if unknown): its cost and its buffers' leave the
        count, and it is charged nothing more. Loop thread only."""
        stream = self._streams.pop(stream_id, None)
        if stream is not None:
            self._held -= STREAM_COST
            self._charge(-(stream.early_cost + stream.pending_cost))
            stream.early_cost = stream.pending_cost = 0
        return stream

    def _charge(self, delta: int) -> None:
        """The streams' buffers grew by ``delta`` bytes (or shrank). Loop thread only."""
        if not delta:
            return
        before = self._buffers
        self._buffers = before + delta
        self._held += delta
        if not self._buffers:
            self._buffers_since = None
        elif not before:
            self._buffers_since = time.monotonic()

    def _cost_pending(self, stream: _ExitStream) -> None:
        """``stream.pending`` changed: count what it allocates now (its capacity, which
        ``sys.getsizeof`` reads in O(1)), if the stream is still ours. Loop thread only."""
        cost = sys.getsizeof(stream.pending) - _EMPTY_BYTEARRAY
        if self._streams.get(stream.stream_id) is stream:
            self._charge(cost - stream.pending_cost)
            stream.pending_cost = cost

    def _flush(self) -> None:
        if self._out and not self._closed:
            out, self._out = self._out, []
            self._originate(out)

    # ------------------------------------------------------------------ circuit level

    def pause_reading(self) -> None:
        """Stop reading every target of this circuit (the client's link is backed up).
        Loop thread only."""
        self._targets_paused = True
        for stream in self._streams.values():
            if stream.early is None and stream.gate is not None:
                stream.gate.hold(_LINK)

    def resume_reading(self) -> None:
        """Undo :meth:`pause_reading`. Loop thread only."""
        self._targets_paused = False
        for stream in self._streams.values():
            if stream.gate is not None:
                stream.gate.release(_LINK)

    def close(self) -> None:
        """The circuit is gone: abort every target connection. Loop thread only. Idempotent."""
        if self._closed:
            return
        self._closed = True
        streams, self._streams = self._streams, {}
        self._held = self._buffers = 0
        self._buffers_since = None
        self._blocked.clear()
        self._out.clear()
        for stream in streams.values():
            if stream.gate is not None:
                stream.gate.clear()
            if stream.target is not None:
                stream.target.close("circuit closed", flush=False)

    @property
    def open_streams(self) -> int:
        """Streams not yet ended. Loop thread only."""
        return len(self._streams)

    @property
    def buffered_bytes(self) -> int:
        """The memory this edge's streams hold, as allocated, counted toward MaxMemInQueues:
        STREAM_COST per open stream, what each ``pending`` buffer (read from the target, not
        yet packaged: the package windows are closed) allocates, and each early DATA chunk
        (before CONNECTED: optimistic data) with EARLY_CHUNK_OVERHEAD. A running count, kept
        where streams open and close and buffers change: O(1). Bytes already handed to a
        target's write queue are not in it. Loop thread only."""
        return self._held

    @property
    def buffered_since(self) -> float | None:
        """When the streams' buffers (not their fixed cost) last went from empty to holding
        something (monotonic seconds), or None while they hold nothing: the age the OOM
        handler orders this edge by. An upper bound on the age of the oldest byte (that one
        may have left since). Loop thread only."""
        return self._buffers_since

    def recount(self) -> int:
        """:attr:`buffered_bytes` computed from scratch, O(streams + chunks): a check on the
        running count. Loop thread only."""
        return sum(STREAM_COST + sys.getsizeof(s.pending) - _EMPTY_BYTEARRAY
                   + sum(len(c) + EARLY_CHUNK_OVERHEAD for c in s.early or ())
                   for s in self._streams.values())

    def stats(self) -> dict[str, Any]:
        """Counters of this edge. Loop thread only."""
        return {
            "streams_opened": self.streams_opened,
            "dir_streams": self.dir_streams,
            "data_cells_in": self.data_cells_in,
            "data_cells_out": self.data_cells_out,
            "bytes_to_targets": self.bytes_to_targets,
            "bytes_from_targets": self.bytes_from_targets,
            "sendmes_sent": self.sendmes_sent,
            "sendmes_accepted": self._sendme.accepted,
            "sendme_tags_recorded": self._sendme.recorded,
        }

    def _violation(self, what: str) -> None:
        log.warning("%s: protocol violation: %s; closing the circuit", self._name, what)
        self.close()
        self._close_circuit(what)
