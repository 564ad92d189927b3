"""Incremental cell framing for an open link (link protocol 4+): bytes in, cells to circuits.

A link's plaintext arrives in arbitrary pieces (a TCP read, a TLS record). :class:`CellFramer`
keeps the partial tail of the previous piece (``pending``: short, at most one cell) and cuts
the complete cells of ``pending + data`` with :func:`route`, which does the per-cell work of a
read in one call:

* RELAY and RELAY_EARLY cells of circuits registered with a *batch handler* are grouped per
  circuit, in arrival order, as one joined buffer of 509-byte payloads:
  ``batch(payloads, count, early)``, ``early`` being None or the positions of the RELAY_EARLY
  cells in the group. A relayed cell never becomes a Python object on the loop thread: its
  payload goes from the read buffer to its circuit's batch with one ``memcpy``;
* every other cell (DESTROY, CREATE2, a padding or link cell, a cell of a circuit with only a
  per-cell handler or of an unknown id) ends the call and goes to its circuit's
  ``handler(command, payload)`` or to ``unrouted(circ_id, command, payload)`` after the groups
  before it: cells keep their order relative to control cells (a DESTROY, then a CREATE2
  reusing the id, then RELAY cells for the new circuit).

:func:`route` is C (:mod:`relay._cells`, built by ``make venv``); :func:`route_py` is the same
contract in Python, used when the extension is not built and as the reference the tests compare
the C one with.

Wire format (tor-spec 3, link protocol 4 and later: 4-byte circuit ids)::

    fixed cell     CIRCID (4) COMMAND (1) PAYLOAD (509, zero-padded)
    variable cell  CIRCID (4) COMMAND (1) LENGTH (2) PAYLOAD (LENGTH)   command 7 or >= 128

The handshake cells, whose format changes after VERSIONS, are framed by
``relay.cells.parse_cell`` in :mod:`relay.linkhandshake`, not here; both share the same
``pending`` bytes.

Stopping: the link clears ``running`` when reading is paused or the link closes, and sets
``closed`` when it closes. The framer checks ``running`` before each :func:`route` call and
before each control cell (which then stays in ``pending`` until the link resumes); the groups
of one call are all delivered unless the link closes meanwhile, so a pause takes effect within
at most one call's cells (``MAX_GROUPS`` circuits' worth of one read), and nothing is delivered
after a close.

Threads: loop thread only (one framer belongs to one link); :func:`route`, :func:`route_py`,
:func:`fixed_cell` and :func:`var_cell` are pure (any thread).
"""

from __future__ import annotations

from collections.abc import Callable

from relay.cells import (
    CELL_HEADER_V4,
    VAR_LENGTH,
    VAR_LENGTH_COMMAND_MIN,
    CellCommand,
    CellFormatError,
    is_var_length,
)
from tor1 import CELL_PAYLOAD_LEN

__all__ = [
    "FIXED_CELL_LEN",
    "BatchHandler",
    "CellFramer",
    "CellHandler",
    "UnroutedFn",
    "fixed_cell",
    "route",
    "route_py",
    "var_cell",
]

CellHandler = Callable[[int, bytes], object]
"""A circuit's handler on one link: ``handler(command, payload)``."""
BatchHandler = Callable[[bytes, int, "tuple[int, ...] | None"], object]
"""A circuit's RELAY/RELAY_EARLY cells of one read: ``batch(payloads, count, early)``."""
RouteFn = Callable[[bytes, int, dict], tuple[int, list, "tuple[int, int, bytes] | None"]]
"""``route(buf, offset, batches) -> (end, groups, other)``: see :func:`route_py`."""
UnroutedFn = Callable[[int, int, bytes], object]
"""``unrouted(circ_id, command, payload)``: a cell for no registered circuit."""

HEADER = CELL_HEADER_V4
"""``circ_id, command``: an open link speaks protocol 4 or later."""
FIXED_CELL_LEN = HEADER.size + CELL_PAYLOAD_LEN
"""Bytes of one fixed-size cell on the wire (4-byte circuit id)."""
_VAR_HEADER_LEN = HEADER.size + VAR_LENGTH.size
_VERSIONS = int(CellCommand.VERSIONS)


def fixed_cell(circ_id: int, command: int, payload: bytes = b"") -> bytes:
    """One fixed-size cell, payload zero-padded to 509 bytes (the caller checks the size).
    Any thread (pure)."""
    return HEADER.pack(circ_id, command) + payload + bytes(CELL_PAYLOAD_LEN - len(payload))


def var_cell(circ_id: int, command: int, payload: bytes) -> bytes:
    """One variable-length cell. Any thread (pure)."""
    return HEADER.pack(circ_id, command) + VAR_LENGTH.pack(len(payload)) + payload


_RELAY = CellCommand.RELAY
_RELAY_EARLY = CellCommand.RELAY_EARLY
MAX_GROUPS = 64
"""Circuits one :func:`route` call groups at most (the C lookup scans the groups so far)."""


def route_py(buf: bytes, offset: int,
             batches: dict) -> tuple[int, list, tuple[int, int, bytes] | None]:
    """Group the RELAY/RELAY_EARLY cells of ``buf[offset:]`` per circuit of ``batches``.

    Returns ``(end, groups, other)``: ``groups`` is a list of ``(handler, payloads, count,
    early)`` in order of each circuit's first cell; ``other`` the first cell that is not
    grouped, as ``(circ_id, command, payload)``, with ``end`` just after it; without one,
    ``end`` is the offset of the first incomplete cell, the end of ``buf``, or the first cell
    of a circuit that would be the call's ``MAX_GROUPS + 1``-th. The C :func:`route` gives the
    same results. Any thread (pure).
    """
    size = len(buf)
    unpack = HEADER.unpack_from
    order: list[int] = []
    found: dict[int, tuple[object, list[bytes], list[int]]] = {}
    other = None
    head = HEADER.size
    while offset + head <= size:
        circ_id, command = unpack(buf, offset)
        if command == _VERSIONS or command >= VAR_LENGTH_COMMAND_MIN:
            if offset + _VAR_HEADER_LEN > size:
                break
            (length,) = VAR_LENGTH.unpack_from(buf, offset + head)
            start = offset + _VAR_HEADER_LEN
            if start + length > size:
                break
            other = (circ_id, command, bytes(buf[start : start + length]))
            offset = start + length
            break
        if offset + FIXED_CELL_LEN > size:
            break
        group = found.get(circ_id)
        if group is None and (command == _RELAY or command == _RELAY_EARLY):
            handler = batches.get(circ_id)
            if handler is not None:
                if len(order) == MAX_GROUPS:
                    break
                group = found[circ_id] = (handler, [], [])
                order.append(circ_id)
        if group is None or not (command == _RELAY or command == _RELAY_EARLY):
            other = (circ_id, command, bytes(buf[offset + head : offset + FIXED_CELL_LEN]))
            offset += FIXED_CELL_LEN
            break
        if command == _RELAY_EARLY:
            group[2].append(len(group[1]))
        group[1].append(buf[offset + head : offset + FIXED_CELL_LEN])
        offset += FIXED_CELL_LEN
    groups = []
    for circ_id in order:
        handler, payloads, early = found[circ_id]
        groups.append((handler, b"".join(payloads), len(payloads),
                       tuple(early) if early else None))
    return offset, groups, other


def _c_route() -> RouteFn | None:
    try:
        from relay._cells import route as c_route
    except ImportError:
        return None
    return c_route


route: RouteFn = _c_route() or route_py
"""The C ``relay._cells.route`` when built, else :func:`route_py` (same contract)."""


class CellFramer:
    """Cuts an open link's cells out of its byte stream and dispatches them. Loop thread only.

    ``circuits`` is the link's id -> per-cell handler map and ``batches`` its id -> batch
    handler map (shared, not copied: registering a circuit on the link makes it routable here
    at once). ``version`` is the negotiated link protocol, set by the link when the handshake
    ends. ``cells`` counts the cells dispatched.
    """

    __slots__ = ("batches", "cells", "circuits", "closed", "pending", "running", "unrouted",
                 "version")

    def __init__(self, circuits: dict[int, CellHandler], unrouted: UnroutedFn,
                 batches: dict[int, BatchHandler] | None = None) -> None:
        """Frame for ``circuits`` (and ``batches``); ``unrouted`` gets cells of other ids.
        Loop thread only."""
        self.circuits = circuits
        self.batches: dict[int, BatchHandler] = {} if batches is None else batches
        self.unrouted = unrouted
        self.version = 0
        self.running = False
        self.closed = False  # set by the link when it closes: nothing is delivered after
        self.pending = b""
        self.cells = 0

    def take(self, data: bytes) -> bytes:
        """The bytes to frame now: the kept tail followed by ``data``. Loop thread only."""
        return self.pending + data if self.pending else data

    def keep(self, buf: bytes, offset: int) -> None:
        """Keep ``buf[offset:]`` (not yet framed) for the next piece. Loop thread only."""
        self.pending = buf[offset:] if offset < len(buf) else b""

    def dispatch(self, buf: bytes, offset: int) -> int:
        """Deliver the complete cells of ``buf`` from ``offset`` while ``running``; return the
        offset of the first byte not consumed. A handler's exception propagates (the link
        closes). Loop thread only."""
        batches = self.batches
        circuits = self.circuits
        size = len(buf)
        while self.running and offset < size:
            offset, groups, other = route(buf, offset, batches)
            for handler, payloads, count, early in groups:
                if self.closed:
                    return offset
                self.cells += count
                handler(payloads, count, early)
            if other is None:
                if not groups:
                    break  # an incomplete cell: wait for more bytes
                continue
            circ_id, command, payload = other
            variable = command == _VERSIONS or command >= VAR_LENGTH_COMMAND_MIN
            if not self.running:  # a batch handler paused the link: `other` stays pending
                return offset - (_VAR_HEADER_LEN + len(payload) if variable else FIXED_CELL_LEN)
            if variable and not is_var_length(command, self.version):
                raise CellFormatError(f"command {command} framed as variable-length")
            self.cells += 1
            handler = circuits.get(circ_id)
            if handler is not None:
                handler(command, payload)
            else:
                self.unrouted(circ_id, command, payload)
        return offset
