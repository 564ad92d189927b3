"""Push bytes to the echo service through a circuit whose every hop was chosen, and check them.

:func:`open_pinned_stream` builds the circuit and puts one SOCKS stream on it, through the
client tor's control port (control-spec ``EXTENDCIRCUIT``, ``__LeaveStreamsUnattached``,
``ATTACHSTREAM``):

1. ``EXTENDCIRCUIT 0 $FP1,$FP2,$FP3`` and wait for the ``CIRC id BUILT`` event (a ``FAILED`` or
   ``CLOSED`` event ends it with tor's REASON);
2. ``SETCONF __LeaveStreamsUnattached=1``, open the SOCKS connection and send CONNECT;
3. the ``STREAM sid NEW`` event whose SOURCE_ADDR is our SOCKS socket is ours:
   ``ATTACHSTREAM sid id`` (any other new stream meanwhile -- tor's own -- is handed back with
   ``ATTACHSTREAM other 0``: let tor choose);
4. wait for ``STREAM sid SUCCEEDED`` (``FAILED``, ``CLOSED`` or ``DETACHED`` end it, with
   REASON and REMOTE_REASON), restore ``__LeaveStreamsUnattached=0``, read the SOCKS reply.

Every refusal raises :class:`PinError` naming the step, the path and tor's words
(:class:`StreamRefused` when the circuit was built but the stream did not open).

:func:`transfer` then sends the payload from a writer thread while the calling thread reads the
echo, compares every received byte with the byte sent at that offset, and times the transfer
from the first byte sent to the last byte received.

:class:`PushResult` is one push as the network reports it: the transfer, the path, and each
relay's CPU per *relayed cell* (:func:`relayed_cells`: the stream bytes that crossed a relay in
both directions, divided by 498, the data of a full RELAY_DATA cell).

Threads: any thread; one pinned stream at a time per client controller (the caller serialises).
"""

from __future__ import annotations

import contextlib
import math
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from tor1 import RELAY_DATA_MAX
from tornet import socks
from tornet.control import ControlConnection, ControlError, Reply

__all__ = ["Circuit", "PinError", "PushResult", "StreamRefused", "TransferResult",
           "build_circuit", "open_pinned_stream", "relayed_cells", "transfer"]

_CHUNK = 64 * 1024


class PinError(RuntimeError):
    """tor refused to build the chosen circuit or to carry the stream on it."""


class StreamRefused(PinError):
    """The circuit was built but the stream did not open on it (tor reported it FAILED,
    CLOSED or DETACHED): ``reason`` is tor's, ``remote_reason`` the END reason a relay sent."""

    def __init__(self, message: str, reason: str | None, remote_reason: str | None) -> None:
        """Any thread."""
        super().__init__(message)
        self.reason = reason
        self.remote_reason = remote_reason


@dataclass(frozen=True)
class TransferResult:
    """What one push moved and how much of it came back unchanged."""

    bytes_sent: int
    bytes_echoed: int
    bytes_echoed_intact: int
    first_mismatch: int | None
    """Offset of the first echoed byte that differs from the byte sent there (None: none)."""
    seconds: float

    @property
    def intact(self) -> bool:
        """Every byte sent came back unchanged, in order. Any thread (pure)."""
        return (self.bytes_echoed_intact == self.bytes_sent == self.bytes_echoed
                and self.first_mismatch is None)

    @property
    def mb_per_s(self) -> float:
        """Bytes sent per second, in MB (10^6 bytes), first byte out to last byte back. Any
        thread (pure)."""
        return self.bytes_sent / self.seconds / 1e6 if self.seconds > 0 else 0.0


def _event_fields(event: Reply) -> tuple[list[str], dict[str, str]]:
    """Positional words and KEY=VALUE pairs of an event line."""
    words, pairs = [], {}
    for word in event.text.split():
        key, eq, value = word.partition("=")
        if eq and key.isupper():
            pairs[key] = value
        else:
            words.append(word)
    return words, pairs


@dataclass(frozen=True)
class Circuit:
    """A circuit tor reported BUILT: its id and its hops as tor lists them (HEX40)."""

    id: str
    path: list[str]


def _hops(field: str) -> list[str]:
    """HEX40 fingerprints of a CIRC event's path field (``$FP~nick,$FP=nick,...``)."""
    return [hop.lstrip("$").split("~")[0].split("=")[0].upper() for hop in field.split(",")]


def build_circuit(control: ControlConnection, path: Sequence[str], timeout: float,
                  check: Callable[[], None] = lambda: None) -> Circuit:
    """Build a circuit through exactly ``path`` (HEX40 fingerprints) and return it once tor
    reports it BUILT (with the path tor's event names). The caller must have asked for CIRC
    events (``control.setevents("CIRC", ...)``). Raises :class:`PinError`. Any thread."""
    spec = ",".join(f"${fingerprint}" for fingerprint in path)
    try:
        reply = control.command(f"EXTENDCIRCUIT 0 {spec}")
    except ControlError as exc:
        raise PinError(f"tor refused to build the circuit {spec}: {exc}") from exc
    words = reply.text.split()
    if len(words) < 2 or words[0] != "EXTENDED":
        raise PinError(f"EXTENDCIRCUIT {spec}: unexpected reply {reply.text!r}")
    circuit = words[1]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        check()
        event = control.next_event(min(0.5, deadline - time.monotonic()))
        if event is None:
            continue
        fields, pairs = _event_fields(event)
        if fields[:2] != ["CIRC", circuit]:
            continue
        if fields[2] == "BUILT":
            return Circuit(circuit, _hops(fields[3]) if len(fields) > 3 else [])
        if fields[2] in ("FAILED", "CLOSED"):
            raise PinError(f"circuit {circuit} through {spec} {fields[2]}: "
                           f"reason {pairs.get('REASON')}, remote {pairs.get('REMOTE_REASON')}")
    raise PinError(f"circuit {circuit} through {spec} not built in {timeout:.0f} s")


def open_pinned_stream(
    control: ControlConnection, connect: Callable[[int], socket.socket], socks_port: int,
    path: Sequence[str], target: tuple[str, int], *, timeout: float = 60.0,
    check: Callable[[], None] = lambda: None,
) -> tuple[socket.socket, Circuit]:
    """A SOCKS stream to ``target`` on a new circuit through exactly ``path`` (HEX40
    fingerprints, first hop first), and the circuit id. ``connect(port)`` opens a TCP
    connection to 127.0.0.1:port where the client tor lives; ``check()`` runs while waiting
    (it raises to give up). Raises :class:`PinError`. Any thread (one at a time per
    ``control``)."""
    control.setevents("CIRC", "STREAM")
    sock: socket.socket | None = None
    circuit: Circuit | None = None
    try:
        circuit = build_circuit(control, path, timeout, check)
        control.setconf(__LeaveStreamsUnattached="1")
        sock = connect(socks_port)
        sock.settimeout(timeout)
        socks.send_connect(sock, *target)
        _attach(control, sock, circuit.id, path, timeout, check)
        control.setconf(__LeaveStreamsUnattached="0")
        socks.read_reply(sock)
        return sock, circuit
    except BaseException:
        if sock is not None:
            sock.close()
        if circuit is not None:
            with contextlib.suppress(ControlError):
                control.command(f"CLOSECIRCUIT {circuit.id}")
        raise
    finally:
        with contextlib.suppress(ControlError):
            control.setconf(__LeaveStreamsUnattached="0")
        with contextlib.suppress(ControlError):
            control.setevents()


def _attach(control: ControlConnection, sock: socket.socket, circuit: str,
            path: Sequence[str], timeout: float, check: Callable[[], None]) -> None:
    source = f"127.0.0.1:{sock.getsockname()[1]}"
    stream = ""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        check()
        event = control.next_event(min(0.5, deadline - time.monotonic()))
        if event is None:
            continue
        fields, pairs = _event_fields(event)
        if len(fields) < 3 or fields[0] != "STREAM":
            continue
        if not stream and fields[2] == "NEW":
            if pairs.get("SOURCE_ADDR") != source:
                with contextlib.suppress(ControlError):  # tor's own stream: tor chooses
                    control.command(f"ATTACHSTREAM {fields[1]} 0")
                continue
            stream = fields[1]
            try:
                control.command(f"ATTACHSTREAM {stream} {circuit}")
            except ControlError as exc:
                raise PinError(f"tor refused to attach the stream to circuit {circuit} "
                               f"({','.join(path)}): {exc}") from exc
        elif fields[1] == stream and stream:
            if fields[2] == "SUCCEEDED":
                return
            if fields[2] in ("FAILED", "CLOSED", "DETACHED"):
                raise StreamRefused(
                    f"stream {stream} on circuit {circuit} ({','.join(path)}) {fields[2]}: "
                    f"reason {pairs.get('REASON')}, remote {pairs.get('REMOTE_REASON')}",
                    pairs.get("REASON"), pairs.get("REMOTE_REASON"))
    raise PinError(f"stream on circuit {circuit} not open in {timeout:.0f} s "
                   f"({'never announced' if not stream else 'stream ' + stream})")


def transfer(sock: socket.socket, payload: bytes, timeout: float = 120.0) -> TransferResult:
    """Send ``payload`` on ``sock`` (from a writer thread) and read its echo here; compare every
    byte. Stops reading at the payload's length, at EOF, or after ``timeout`` s without data.
    Closes ``sock``. Any thread."""
    sock.settimeout(timeout)

    def write() -> None:
        view = memoryview(payload)
        with contextlib.suppress(OSError):  # a short echo then tells what arrived
            for offset in range(0, len(view), _CHUNK):
                sock.sendall(view[offset:offset + _CHUNK])

    received = intact = 0
    first_mismatch: int | None = None
    writer = threading.Thread(target=write, name="tornet-push-writer", daemon=True)
    start = time.monotonic()
    writer.start()
    try:
        while received < len(payload):
            try:
                chunk = sock.recv(min(_CHUNK * 4, len(payload) - received))
            except OSError:
                break
            if not chunk:
                break
            expected = payload[received:received + len(chunk)]
            if chunk == expected:
                intact += len(chunk)
            else:
                same = [a == b for a, b in zip(chunk, expected, strict=False)]
                intact += sum(same)
                if first_mismatch is None:
                    first_mismatch = received + same.index(False)
            received += len(chunk)
        seconds = time.monotonic() - start
    finally:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()
        writer.join(10)
    return TransferResult(len(payload), received, intact, first_mismatch, seconds)


def relayed_cells(bytes_sent: int, bytes_echoed: int) -> int:
    """Relay cells a relay on the path carried for a push, counted as the stream bytes that
    crossed it in both directions divided by 498 (a full RELAY_DATA cell's data), rounded up.
    Ignores SENDMEs and the few cells that build the circuit and open the stream. Any thread
    (pure)."""
    return math.ceil((bytes_sent + bytes_echoed) / RELAY_DATA_MAX)


@dataclass
class PushResult:
    """One push: where it went, what came back, and what it cost each relay on the path."""

    position: str
    path: list[str]
    """Relay names, first hop first."""
    tor_path: list[str]
    """The circuit's hops (HEX40) as the client tor reported them when it was built."""
    result: TransferResult
    cells: int
    """Relayed cells per relay on the path (:func:`relayed_cells`)."""
    cpu_s: dict[str, float]
    """CPU seconds each relay on the path spent during the transfer."""
    cpu_threads: dict[str, dict[str, float]]
    """Per relay, CPU seconds per thread name."""
    refusals: list[str] = field(default_factory=list)
    """Streams that did not open before this one did (see ``TorNet.push``)."""

    def cpu_us_per_cell(self, relay: str) -> float:
        """Microseconds of ``relay``'s CPU per relayed cell. Any thread (pure)."""
        return self.cpu_s[relay] * 1e6 / self.cells if self.cells else 0.0
