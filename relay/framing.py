"""Incremental cell framing for an open link (link protocol 4+): bytes in, cells to circuits.

A link's plaintext arrives in arbitrary pieces (a TCP read, a TLS record). :class:`CellFramer`
keeps the partial tail of the previous piece (``pending``: short, at most one cell), and
:meth:`CellFramer.dispatch` cuts every complete cell out of ``pending + data`` with one
``struct.unpack_from`` and one slice, and hands it to its circuit's handler through one dict
lookup -- a 64 KiB read yields ~127 cells in one pass with no per-cell object but the payload
``bytes``. Cells for unregistered ids go to ``unrouted(circ_id, command, payload)``.

Wire format (tor-spec 3, link protocol 4 and later: 4-byte circuit ids)::

    fixed cell     CIRCID (4) COMMAND (1) PAYLOAD (509, zero-padded)
    variable cell  CIRCID (4) COMMAND (1) LENGTH (2) PAYLOAD (LENGTH)   command 7 or >= 128

Which commands are variable-length comes from ``relay.cells.is_var_length``; a command
framed as variable-length that the link version does not allow raises
``relay.cells.CellFormatError`` (the link then closes). The handshake cells, whose format
changes after VERSIONS, are framed by ``relay.cells.parse_cell`` in
:mod:`relay.linkhandshake`, not here; both share the same ``pending`` bytes.

Stopping: after each cell the framer checks ``running``, which its link clears when reading
is paused or the link closes (possibly from inside a handler), so no cell is delivered after
that; the cells not yet cut stay in ``pending`` until the link resumes.

Threads: loop thread only (one framer belongs to one link).
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from relay.cells import CellFormatError, is_var_length
from tor1 import CELL_PAYLOAD_LEN

__all__ = [
    "FIXED_CELL_LEN",
    "CellFramer",
    "CellHandler",
    "UnroutedFn",
    "fixed_cell",
    "var_cell",
]

CellHandler = Callable[[int, bytes], object]
"""A circuit's handler on one link: ``handler(command, payload)``."""
UnroutedFn = Callable[[int, int, bytes], object]
"""``unrouted(circ_id, command, payload)``: a cell for no registered circuit."""

HEADER = struct.Struct(">IB")
VAR_LENGTH = struct.Struct(">H")
FIXED_CELL_LEN = 5 + CELL_PAYLOAD_LEN
"""Bytes of one fixed-size cell on the wire (4-byte circuit id)."""


def fixed_cell(circ_id: int, command: int, payload: bytes = b"") -> bytes:
    """One fixed-size cell, payload zero-padded to 509 bytes (the caller checks the size).
    Any thread (pure)."""
    return HEADER.pack(circ_id, command) + payload + bytes(CELL_PAYLOAD_LEN - len(payload))


def var_cell(circ_id: int, command: int, payload: bytes) -> bytes:
    """One variable-length cell. Any thread (pure)."""
    return HEADER.pack(circ_id, command) + VAR_LENGTH.pack(len(payload)) + payload


class CellFramer:
    """Cuts an open link's cells out of its byte stream and dispatches them. Loop thread only.

    ``circuits`` is the link's id -> handler map (shared, not copied: registering a circuit on
    the link makes it routable here at once). ``version`` is the negotiated link protocol, set
    by the link when the handshake ends. ``cells`` counts the cells dispatched.
    """

    __slots__ = ("cells", "circuits", "pending", "running", "unrouted", "version")

    def __init__(self, circuits: dict[int, CellHandler], unrouted: UnroutedFn) -> None:
        """Frame for ``circuits``; ``unrouted`` gets cells of other ids. Loop thread only."""
        self.circuits = circuits
        self.unrouted = unrouted
        self.version = 0
        self.running = False
        self.pending = b""
        self.cells = 0

    def take(self, data: bytes) -> bytes:
        """The bytes to frame now: the kept tail followed by ``data``. Loop thread only."""
        return self.pending + data if self.pending else data

    def keep(self, buf: bytes, offset: int) -> None:
        """Keep ``buf[offset:]`` (not yet framed) for the next piece. Loop thread only."""
        self.pending = buf[offset:] if offset < len(buf) else b""

    def dispatch(self, buf: bytes, offset: int) -> int:
        """Deliver every complete cell of ``buf`` from ``offset`` while ``running``; return the
        offset of the first byte not consumed. A handler's exception propagates (the cells
        before it, and it, are consumed and counted). Loop thread only."""
        end_of_data = len(buf)
        circuits = self.circuits
        unpack = HEADER.unpack_from
        version = self.version
        count = 0
        try:
            while offset + 5 <= end_of_data:
                circ_id, command = unpack(buf, offset)
                if command == 7 or command >= 128:
                    if offset + 7 > end_of_data:
                        break
                    (length,) = VAR_LENGTH.unpack_from(buf, offset + 5)
                    end = offset + 7 + length
                    if end > end_of_data:
                        break
                    payload = buf[offset + 7 : end]
                    if not is_var_length(command, version):
                        raise CellFormatError(f"command {command} framed as variable-length")
                else:
                    end = offset + FIXED_CELL_LEN
                    if end > end_of_data:
                        break
                    payload = buf[offset + 5 : end]
                offset = end
                count += 1
                handler = circuits.get(circ_id)
                if handler is not None:
                    handler(command, payload)
                else:
                    self.unrouted(circ_id, command, payload)
                if not self.running:
                    break
        finally:
            self.cells += count
        return offset
