"""Circuit-level protocol pieces shared by relays and clients: relay payloads, SENDME windows,
wire-cell building, read gates, and the per-iteration flush.

Relay payloads without per-cell objects
---------------------------------------
``relay.cells.RelayPayload`` is the readable, validating form of the 509-byte plaintext. On the
data path (thousands of cells per second per circuit) the relay and client use the functions
here instead: :func:`pack_relay` builds one payload with a single ``struct`` call (a full DATA
cell has no padding to draw), :func:`pack_data_cells` cuts a byte string into DATA payloads,
and :data:`RELAY_HEADER` unpacks the header fields straight from a joined plaintext buffer at
an offset, so no ``RelayPayload`` or slice is made for a cell that is only inspected.

Wire cells
----------
After crypto, a circuit's batch is ``n`` joined 509-byte payloads; on the link each needs the
5-byte ``CircID | Command`` header (link protocol v4). :func:`wire_cells` builds the whole batch
as one ``bytes`` in one C call (``relay._cells.frame``, with RELAY_EARLY at given positions),
which is what a relay hands to its link per reply: no per-cell Python call.

SENDME windows (tor-spec 7.3, 7.4)
----------------------------------
Only RELAY_DATA cells count. A sender starts a circuit with a *package window* of 1000 cells and
each stream with 500; each DATA cell sent takes one, and a sender whose window is zero stops. A
receiver starts with *deliver windows* of the same sizes; each DATA cell received takes one, and
when a circuit's deliver window has dropped by 100 (a stream's by 50) it sends a SENDME (stream
id 0 for the circuit) and adds the increment back; the sender adds it to its package window. A
stream-level SENDME is withheld while the receiving application is not keeping up (its TCP
write buffer is above the high watermark), which is what stops a fast sender from flooding a
slow reader. A DATA cell beyond a deliver window is a protocol violation. Circuit SENDMEs are
version 1, authenticated with the tag of the DATA cell they acknowledge (:mod:`relay.sendme`,
which states tor's rules); stream SENDMEs are version 0 (empty body), as tor's.

Read gates
----------
Several independent reasons may each want a stream's reading paused (the worker pool over its
high-water mark, one circuit over its own mark, the next hop's write buffer full, a SENDME
window exhausted). A :class:`ReadGate` holds a set of those reasons: reading is paused while the
set is non-empty, and each reason is added and removed idempotently, so the reasons cannot
cancel each other out.

Per iteration, not per cell
---------------------------
A relay's and a client's circuits only append what a link hands them and mark themselves dirty
(once per iteration: the circuit keeps its own flag); the work is done for every dirty circuit
in one call at the end of the loop iteration. :class:`IterationFlush` is that list: the first
mark of an iteration schedules the flush with ``Reactor.call_after_io``, which runs after every
read callback of the iteration, before the loop polls again.

Threads: pure functions and loop-thread objects; nothing here is shared between threads.
"""

from __future__ import annotations

import importlib
import os
import struct
from collections.abc import Callable, Hashable, Sequence
from typing import Any, Generic, Protocol, TypeVar

from relay.cells import (
    CELL_HEADER_V4,
    RELAY_HEADER,
    RELAY_PADDING_GAP,
    CellCommand,
    RelayCommand,
)
from tor1 import CELL_PAYLOAD_LEN, RELAY_DATA_MAX, RELAY_DIGEST_LEN, RELAY_HEADER_LEN

__all__ = [
    "CIRCWINDOW_INCREMENT",
    "CIRCWINDOW_START",
    "END_REASON_CONNECTREFUSED",
    "END_REASON_CONNRESET",
    "END_REASON_DESTROY",
    "END_REASON_DONE",
    "END_REASON_EXITPOLICY",
    "END_REASON_MISC",
    "END_REASON_NOTDIRECTORY",
    "END_REASON_RESOLVEFAILED",
    "END_REASON_RESOURCELIMIT",
    "END_REASON_TORPROTOCOL",
    "RELAY_HEADER",
    "STREAMWINDOW_INCREMENT",
    "STREAMWINDOW_START",
    "IterationFlush",
    "Pausable",
    "ReadGate",
    "crypt_frame",
    "crypt_frame_py",
    "data_runs",
    "data_runs_py",
    "pack_data_cells",
    "pack_relay",
    "relay_body",
    "wire_cells",
    "wire_cells_py",
]

CIRCWINDOW_START = 1000
CIRCWINDOW_INCREMENT = 100
STREAMWINDOW_START = 500
STREAMWINDOW_INCREMENT = 50

END_REASON_MISC = 1
END_REASON_RESOLVEFAILED = 2
END_REASON_CONNECTREFUSED = 3
END_REASON_EXITPOLICY = 4
END_REASON_DESTROY = 5
END_REASON_DONE = 6
END_REASON_RESOURCELIMIT = 11
END_REASON_CONNRESET = 12
END_REASON_TORPROTOCOL = 13
END_REASON_NOTDIRECTORY = 14

_FULL_DATA = struct.Struct(f"{RELAY_HEADER.format}{RELAY_DATA_MAX}s")
_ZERO_DIGEST = bytes(RELAY_DIGEST_LEN)
_PAD_GAP = bytes(RELAY_PADDING_GAP)
_DATA = int(RelayCommand.DATA)
_CELL_HEADER = CELL_HEADER_V4
_RELAY = CellCommand.RELAY
_RELAY_EARLY = CellCommand.RELAY_EARLY
_MAX_RUNS = 64  # streams per data_runs call (the C kernel's MAX_RUNS)


def pack_relay(command: int, stream_id: int, data: bytes = b"") -> bytes:
    """One 509-byte relay payload (recognized and digest zero; crypto sets the digest).

    Padding follows tor-spec: four zero bytes, then random bytes. ``data`` is at most 498 bytes.
    Any thread.
    """
    size = len(data)
    if size == RELAY_DATA_MAX:
        return _FULL_DATA.pack(command, 0, stream_id, _ZERO_DIGEST, size, data)
    if size > RELAY_DATA_MAX:
        raise ValueError(f"relay data is at most {RELAY_DATA_MAX} bytes, got {size}")
    header = RELAY_HEADER.pack(command, 0, stream_id, _ZERO_DIGEST, size)
    rest = CELL_PAYLOAD_LEN - RELAY_HEADER_LEN - size
    gap = _PAD_GAP[:rest]
    return header + bytes(data) + gap + os.urandom(rest - len(gap))


def pack_data_cells(stream_id: int, data: bytes | bytearray | memoryview) -> list[bytes]:
    """Cut ``data`` into RELAY_DATA payloads of at most 498 bytes each, in order. Any thread."""
    if type(data) is not bytes:
        data = bytes(data)
    size = len(data)
    full_end = size - size % RELAY_DATA_MAX
    pack = _FULL_DATA.pack
    cells = [
        pack(_DATA, 0, stream_id, _ZERO_DIGEST, RELAY_DATA_MAX, data[i : i + RELAY_DATA_MAX])
        for i in range(0, full_end, RELAY_DATA_MAX)
    ]
    if full_end < size:
        cells.append(pack_relay(_DATA, stream_id, data[full_end:]))
    return cells


def relay_body(plain: bytes | memoryview, offset: int = 0) -> tuple[int, int, bytes]:
    """``(command, stream_id, data)`` of the plaintext payload at ``offset``. Raises
    ``ValueError`` if the length field exceeds 498. Any thread."""
    command, _, stream_id, _, length = RELAY_HEADER.unpack_from(plain, offset)
    if length > RELAY_DATA_MAX:
        raise ValueError(f"relay length field {length} exceeds {RELAY_DATA_MAX}")
    start = offset + RELAY_HEADER_LEN
    return command, stream_id, bytes(plain[start : start + length])


def wire_cells_py(circ_id: int, command: int, payloads: bytes,
                  early: Sequence[int] | None = None) -> bytes:
    """Link-protocol-v4 wire bytes of ``n`` joined 509-byte payloads behind ``(circ_id,
    command)`` headers; the cells at the positions in ``early`` get RELAY_EARLY instead.

    The reference for the C ``relay._cells.frame`` (same results): one comprehension and one
    ``join``, the header being the separator. Any thread (pure).
    """
    size = CELL_PAYLOAD_LEN
    if len(payloads) % size:
        raise ValueError(f"payloads of {len(payloads)} bytes are not whole 509-byte cells")
    header = _CELL_HEADER.pack(circ_id, command)
    pieces = [payloads[i : i + size] for i in range(0, len(payloads), size)]
    if not early:
        return header + header.join(pieces) if pieces else b""
    marked = set(early)
    if min(marked) < 0 or max(marked) >= len(pieces):
        raise ValueError(f"early positions outside {len(pieces)} cells")
    other = _CELL_HEADER.pack(circ_id, _RELAY_EARLY)
    return b"".join((other if i in marked else header) + piece
                    for i, piece in enumerate(pieces))


def _c_kernel(name: str) -> Callable[..., Any] | None:
    """``relay._cells``'s function ``name``, or None when the extension is not built."""
    try:
        return getattr(importlib.import_module("relay._cells"), name)
    except ImportError:
        return None


wire_cells: Callable[..., bytes] = _c_kernel("frame") or wire_cells_py
"""``wire_cells(circ_id, command, payloads, early=None)``: the C ``relay._cells.frame`` when
built, else :func:`wire_cells_py` (same contract). Any thread (pure)."""


def crypt_frame_py(crypt: Callable[[bytes], Any], payloads: bytes, circ_id: int) -> Any:
    """``crypt(payloads)``, then its output as RELAY wire cells behind ``circ_id`` headers:
    when it returns bytes, or an ``(out, recognized, tags)`` tuple with no recognized cell;
    such a tuple with a recognized cell is returned as it is.

    The reference for the C ``relay._cells.crypt_frame`` (same results). Whatever thread may
    call ``crypt``."""
    result = crypt(payloads)
    if isinstance(result, tuple):
        out, recognized, _ = result
        if any(recognized):
            return result
        return wire_cells(circ_id, _RELAY, out)
    return wire_cells(circ_id, _RELAY, result)


crypt_frame: Callable[..., Any] = _c_kernel("crypt_frame") or crypt_frame_py
"""``crypt_frame(crypt, payloads, circ_id)``: the C ``relay._cells.crypt_frame`` when built,
else :func:`crypt_frame_py` (same contract)."""

DataRuns = tuple[int, int, list[tuple[int, bytes, int]]]


def data_runs_py(plain: bytes, offset: int) -> DataRuns:
    """In decrypted relay payloads (joined, 509 bytes each), the DATA cells (length at most
    ``RELAY_DATA_MAX``) from ``offset`` up to the first cell that is not one: ``(end, cells,
    runs)``, ``runs`` their bodies joined per stream as ``(stream_id, data, cells)`` in order
    of each stream's first cell, ``end`` the offset of the first cell not taken (or
    ``len(plain)``; also at a stream that would be the call's 65th, as in C: call again).

    The reference for the C ``relay._cells.data_runs`` (same results). Any thread (pure)."""
    if len(plain) % CELL_PAYLOAD_LEN or not 0 <= offset <= len(plain) \
            or offset % CELL_PAYLOAD_LEN:
        raise ValueError("data_runs needs whole 509-byte payloads and an offset at a "
                         "payload's start")
    gathered: dict[int, list[bytes]] = {}
    end = offset
    while end < len(plain):
        command, _, stream_id, _, length = RELAY_HEADER.unpack_from(plain, end)
        if command != _DATA or length > RELAY_DATA_MAX:
            break
        chunks = gathered.get(stream_id)
        if chunks is None:
            if len(gathered) == _MAX_RUNS:
                break
            chunks = gathered[stream_id] = []
        start = end + RELAY_HEADER_LEN
        chunks.append(plain[start : start + length])
        end += CELL_PAYLOAD_LEN
    runs = [(stream_id, b"".join(chunks), len(chunks)) for stream_id, chunks in gathered.items()]
    return end, (end - offset) // CELL_PAYLOAD_LEN, runs


data_runs: Callable[[bytes, int], DataRuns] = _c_kernel("data_runs") or data_runs_py
"""``data_runs(plain, offset)``: the C ``relay._cells.data_runs`` when built, else
:func:`data_runs_py` (same contract)."""


class Pausable(Protocol):
    """Anything whose reading can be paused: ``reactor.net.Stream``, a link."""

    def pause_reading(self) -> None:
        """Stop delivering data until ``resume_reading``. Loop thread only."""
        ...

    def resume_reading(self) -> None:
        """Deliver data again. Loop thread only."""
        ...


class ReadGate:
    """Pause a stream's reading while at least one reason holds it. Loop thread only."""

    __slots__ = ("_reasons", "target")

    def __init__(self, target: Pausable) -> None:
        """Gate ``target``; initially open. Loop thread only."""
        self.target = target
        self._reasons: set[Hashable] = set()

    @property
    def paused(self) -> bool:
        """True while some reason holds the gate. Loop thread only."""
        return bool(self._reasons)

    def hold(self, reason: Hashable) -> None:
        """Add ``reason`` (idempotent); pauses reading on the first one. Loop thread only."""
        if reason in self._reasons:
            return
        self._reasons.add(reason)
        if len(self._reasons) == 1:
            self.target.pause_reading()

    def release(self, reason: Hashable) -> None:
        """Remove ``reason`` (idempotent); resumes reading with the last one. Loop thread only."""
        if reason not in self._reasons:
            return
        self._reasons.discard(reason)
        if not self._reasons:
            self.target.resume_reading()

    def clear(self) -> None:
        """Forget every reason without touching the target (it is closing). Loop thread only."""
        self._reasons.clear()


T = TypeVar("T")


class IterationFlush(Generic[T]):
    """What was marked during this loop iteration, handed to ``flush`` once at its end.

    ``call_at_end`` is the reactor's ``Reactor.call_after_io``: the flush runs in the same
    iteration, after its I/O callbacks. Loop thread only.
    """

    __slots__ = ("_call_at_end", "_flush", "_marked", "_scheduled")

    def __init__(self, call_at_end: Callable[[Callable[[], None]], object],
                 flush: Callable[[list[T]], None]) -> None:
        """Nothing marked yet. Loop thread only."""
        self._call_at_end = call_at_end
        self._flush = flush
        self._marked: list[T] = []
        self._scheduled = False

    def mark(self, item: T) -> None:
        """Add ``item`` (the caller marks each item once per iteration); the first mark of an
        iteration schedules the flush. Loop thread only."""
        self._marked.append(item)
        if not self._scheduled:
            self._scheduled = True
            self._call_at_end(self._run)

    def _run(self) -> None:
        marked, self._marked = self._marked, []
        self._scheduled = False
        self._flush(marked)
