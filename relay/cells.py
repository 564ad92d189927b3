"""Tor cell codec: command constants, link-protocol framing, and the relay payload layout.

Layers, outside in
------------------
* **Framing** (link protocol). A fixed-size cell is ``CircID | Command(1) | Payload(509)``; a
  variable-length cell is ``CircID | Command(1) | Length(2) | Payload(Length)``. CircID is 4 bytes
  on link protocol v4 and later, 2 bytes before, and 2 bytes while the version is not yet agreed
  (``link_version=0``, the VERSIONS exchange). Which commands are variable-length follows Tor:
  none on v1, only VERSIONS on v2, VERSIONS and every command >= 128 on v3+ and before
  negotiation. :class:`Cell` and :class:`VarCell` hold one cell each and ``encode`` it;
  :func:`parse_cell` frames one cell out of a byte-stream buffer and :func:`parse_cells` all
  complete ones. Unknown commands frame like any other (Tor drops them later, not the framer).
* **Relay payload** (inside the 509 bytes of a RELAY / RELAY_EARLY cell, after relay crypto):
  ``command(1) recognized(2) stream_id(2) digest(4) length(2) data(length)`` then padding of
  four zero bytes followed by random bytes. :class:`RelayPayload` packs and unpacks it.
* CREATE2 / CREATED2 / EXTEND2 bodies belong to the handshake code, not here.

Errors
------
Malformed content raises a subclass of :class:`CellFormatError` (a ``ValueError``) with a message
saying what is wrong; the codec never lets ``IndexError`` or ``struct.error`` escape. A stream
buffer that simply does not hold a whole cell yet is *not* an error: :func:`parse_cell` returns
``None`` and the caller waits for more bytes. With framing alone no byte sequence is malformed,
so the stream decoder only raises for bad arguments (an unknown link version, a bad offset).

Threads
-------
Pure functions and small value objects, no shared state: any thread may use them.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import IntEnum

from tor1 import (
    CELL_PAYLOAD_LEN,
    RELAY_DATA_MAX,
    RELAY_DIGEST_LEN,
    RELAY_DIGEST_OFFSET,
    RELAY_HEADER_LEN,
)

__all__ = [
    "CELL_HEADER_V3",
    "CELL_HEADER_V4",
    "MAX_VAR_PAYLOAD_LEN",
    "RELAY_HEADER",
    "RELAY_PADDING_GAP",
    "VAR_LENGTH",
    "VAR_LENGTH_COMMAND_MIN",
    "Cell",
    "CellCommand",
    "CellFormatError",
    "CircIdRangeError",
    "DestroyReason",
    "FieldRangeError",
    "LinkVersionError",
    "PayloadSizeError",
    "RelayCommand",
    "RelayLengthError",
    "RelayPayload",
    "TrailingBytesError",
    "TruncatedCellError",
    "VarCell",
    "VersionsFormatError",
    "circ_id_len",
    "decode_cell",
    "encode_versions",
    "highest_common_version",
    "is_var_length",
    "parse_cell",
    "parse_cells",
    "parse_versions",
]

MAX_VAR_PAYLOAD_LEN = 0xFFFF
RELAY_PADDING_GAP = 4
"""Zero bytes after a relay payload's data, before the random padding (tor-spec 6.1)."""
VAR_LENGTH_COMMAND_MIN = 128
"""Commands from this one up are variable-length cells (link protocol 3 and later)."""

CELL_HEADER_V3 = struct.Struct(">HB")
"""``circ_id, command`` of a cell on link protocols 1-3 (2-byte circuit ids)."""
CELL_HEADER_V4 = struct.Struct(">IB")
"""``circ_id, command`` of a cell on link protocol 4 and later (4-byte circuit ids)."""
VAR_LENGTH = struct.Struct(">H")
"""The payload length after a variable-length cell's header."""
RELAY_HEADER = struct.Struct(f">BHH{RELAY_DIGEST_LEN}sH")
"""``command, recognized, stream_id, digest, length`` at the start of a relay payload."""
assert RELAY_HEADER.size == RELAY_HEADER_LEN
assert struct.calcsize(">BHH") == RELAY_DIGEST_OFFSET


class CellCommand(IntEnum):
    """Cell commands (tor-spec section 3)."""

    PADDING = 0
    CREATE = 1
    CREATED = 2
    RELAY = 3
    DESTROY = 4
    CREATE_FAST = 5
    CREATED_FAST = 6
    VERSIONS = 7
    NETINFO = 8
    RELAY_EARLY = 9
    CREATE2 = 10
    CREATED2 = 11
    PADDING_NEGOTIATE = 12
    VPADDING = 128
    CERTS = 129
    AUTH_CHALLENGE = 130
    AUTHENTICATE = 131
    AUTHORIZE = 132


class RelayCommand(IntEnum):
    """Relay commands (first byte of a relay payload)."""

    BEGIN = 1
    DATA = 2
    END = 3
    CONNECTED = 4
    SENDME = 5
    EXTEND = 6
    EXTENDED = 7
    TRUNCATE = 8
    TRUNCATED = 9
    DROP = 10
    RESOLVE = 11
    RESOLVED = 12
    BEGIN_DIR = 13
    EXTEND2 = 14
    EXTENDED2 = 15


class DestroyReason(IntEnum):
    """The one-byte reason in a DESTROY cell (and a TRUNCATED relay cell)."""

    NONE = 0
    PROTOCOL = 1
    INTERNAL = 2
    REQUESTED = 3
    HIBERNATING = 4
    RESOURCELIMIT = 5
    CONNECTFAILED = 6
    OR_IDENTITY = 7
    CHANNEL_CLOSED = 8
    FINISHED = 9
    TIMEOUT = 10
    DESTROYED = 11
    NOSUCHSERVICE = 12


# --------------------------------------------------------------------------- errors


class CellFormatError(ValueError):
    """Base of every codec error: the bytes or fields do not form a valid cell."""


class PayloadSizeError(CellFormatError):
    """A payload has the wrong size (a relay payload must be exactly 509 bytes)."""


class RelayLengthError(CellFormatError):
    """A relay payload's length field (or data) exceeds 498 bytes."""


class FieldRangeError(CellFormatError):
    """A header field does not fit its width (command, stream id, digest, ...)."""


class CircIdRangeError(FieldRangeError):
    """A circuit id does not fit the link protocol's 2- or 4-byte CircID."""


class TruncatedCellError(CellFormatError):
    """A complete buffer ends before its cell does."""


class TrailingBytesError(CellFormatError):
    """A buffer meant to hold exactly one cell has bytes after it."""


class VersionsFormatError(CellFormatError):
    """A VERSIONS payload is not a list of 2-byte versions."""


class LinkVersionError(ValueError):
    """The link protocol version argument is not one the codec understands (bad argument)."""


# --------------------------------------------------------------------------- framing


def _bad_link_version(link_version: int) -> str:
    return f"link version must be >= 0 (0 = not negotiated), got {link_version}"


def circ_id_len(link_version: int) -> int:
    """CircID width in bytes: 4 on v4+, 2 on v1-v3 and before negotiation (0)."""
    if link_version < 0:
        raise LinkVersionError(_bad_link_version(link_version))
    return 4 if link_version >= 4 else 2


def _cell_header(link_version: int) -> struct.Struct:
    return CELL_HEADER_V4 if link_version >= 4 else CELL_HEADER_V3


def is_var_length(command: int, link_version: int) -> bool:
    """Whether ``command`` is framed as a variable-length cell on ``link_version``."""
    if link_version == 1:
        return False
    if link_version == 2:
        return command == CellCommand.VERSIONS
    return command == CellCommand.VERSIONS or command >= VAR_LENGTH_COMMAND_MIN


def _check_circ_id(circ_id: int, link_version: int) -> None:
    limit = 1 << (8 * circ_id_len(link_version))
    if not 0 <= circ_id < limit:
        raise CircIdRangeError(
            f"circuit id {circ_id} does not fit link protocol v{link_version} "
            f"({circ_id_len(link_version)}-byte CircID)"
        )


def _check_header(circ_id: int, command: int) -> None:
    """The header fields of any cell, before the link version is known."""
    if not 0 <= command <= 0xFF:
        raise FieldRangeError(f"cell command must be 0..255, got {command}")
    if not 0 <= circ_id <= 0xFFFFFFFF:
        raise CircIdRangeError(f"circuit id must be 0..2**32-1, got {circ_id}")


@dataclass(slots=True)
class Cell:
    """A fixed-size cell. ``payload`` is at most 509 bytes; ``encode`` pads it with zeros."""

    circ_id: int
    command: int
    payload: bytes = b""

    def __post_init__(self) -> None:
        _check_header(self.circ_id, self.command)
        if len(self.payload) > CELL_PAYLOAD_LEN:
            raise PayloadSizeError(
                f"fixed cell payload is at most {CELL_PAYLOAD_LEN} bytes, got {len(self.payload)}"
            )

    def encode(self, link_version: int) -> bytes:
        """Wire bytes: ``CircID | Command | Payload`` padded to 509 bytes (512 or 514 total)."""
        _check_circ_id(self.circ_id, link_version)
        if is_var_length(self.command, link_version):
            raise CellFormatError(
                f"command {self.command} is variable-length on link v{link_version}; use VarCell"
            )
        header = _cell_header(link_version).pack(self.circ_id, self.command)
        return header + self.payload + bytes(CELL_PAYLOAD_LEN - len(self.payload))


@dataclass(slots=True)
class VarCell:
    """A variable-length cell (VERSIONS, VPADDING, CERTS, ...); payload up to 65535 bytes."""

    circ_id: int
    command: int
    payload: bytes = b""

    def __post_init__(self) -> None:
        _check_header(self.circ_id, self.command)
        if len(self.payload) > MAX_VAR_PAYLOAD_LEN:
            raise PayloadSizeError(
                f"variable cell payload is at most {MAX_VAR_PAYLOAD_LEN} bytes, "
                f"got {len(self.payload)}"
            )

    def encode(self, link_version: int) -> bytes:
        """Wire bytes: ``CircID | Command | Length(2) | Payload``."""
        _check_circ_id(self.circ_id, link_version)
        if not is_var_length(self.command, link_version):
            raise CellFormatError(
                f"command {self.command} is fixed-size on link v{link_version}; use Cell"
            )
        header = _cell_header(link_version).pack(self.circ_id, self.command)
        return header + VAR_LENGTH.pack(len(self.payload)) + self.payload


AnyCell = Cell | VarCell


def parse_cell(
    buf: bytes | bytearray | memoryview, offset: int = 0, link_version: int = 4
) -> tuple[AnyCell, int] | None:
    """Frame one cell starting at ``buf[offset]``.

    Returns ``(cell, offset_after_it)``, or ``None`` when the buffer does not yet hold the whole
    cell (read more and call again with the same offset). Never raises for short input; framing
    has no malformed content, so only bad arguments raise (``LinkVersionError``, ``ValueError``
    for a negative offset).
    """
    if offset < 0:
        raise ValueError(f"offset must be >= 0, got {offset}")
    if link_version < 0:
        raise LinkVersionError(_bad_link_version(link_version))
    header = _cell_header(link_version)
    header_len = header.size
    available = len(buf) - offset
    if available < header_len:
        return None
    circ_id, command = header.unpack_from(buf, offset)
    start = offset + header_len
    if not is_var_length(command, link_version):
        end = start + CELL_PAYLOAD_LEN
        if available < header_len + CELL_PAYLOAD_LEN:
            return None
        return Cell(circ_id, command, bytes(buf[start:end])), end
    if available < header_len + VAR_LENGTH.size:
        return None
    (length,) = VAR_LENGTH.unpack_from(buf, start)
    start += VAR_LENGTH.size
    end = start + length
    if available < header_len + VAR_LENGTH.size + length:
        return None
    return VarCell(circ_id, command, bytes(buf[start:end])), end


def parse_cells(
    buf: bytes | bytearray | memoryview, offset: int = 0, link_version: int = 4
) -> tuple[list[AnyCell], int]:
    """Frame every complete cell from ``buf[offset:]``; return them and the offset after the
    last one (the caller keeps ``buf[offset_after:]`` for the next read)."""
    cells: list[AnyCell] = []
    while True:
        framed = parse_cell(buf, offset, link_version)
        if framed is None:
            return cells, offset
        cell, offset = framed
        cells.append(cell)


def decode_cell(data: bytes | bytearray | memoryview, link_version: int) -> AnyCell:
    """Decode a buffer that must hold exactly one cell.

    Raises :class:`TruncatedCellError` if it is short and :class:`TrailingBytesError` if it is
    long.
    """
    framed = parse_cell(data, 0, link_version)
    if framed is None:
        raise TruncatedCellError(
            f"{len(data)} bytes do not hold a whole cell on link protocol v{link_version}"
        )
    cell, end = framed
    if end != len(data):
        raise TrailingBytesError(f"{len(data) - end} bytes after the cell")
    return cell


# --------------------------------------------------------------------------- VERSIONS


def encode_versions(versions: Iterable[int]) -> bytes:
    """A complete VERSIONS cell: always a 2-byte CircID (0), whatever will be negotiated."""
    listed = list(versions)
    for v in listed:
        if not 0 <= v <= 0xFFFF:
            raise FieldRangeError(f"link version must be 0..65535, got {v}")
    payload = b"".join(VAR_LENGTH.pack(v) for v in listed)
    return VarCell(0, CellCommand.VERSIONS, payload).encode(0)


def parse_versions(payload: bytes) -> list[int]:
    """The versions listed in a VERSIONS payload; an odd length raises VersionsFormatError."""
    if len(payload) % 2:
        raise VersionsFormatError(
            f"VERSIONS payload must hold 2-byte versions, got {len(payload)} bytes"
        )
    return [v for (v,) in VAR_LENGTH.iter_unpack(payload)]


def highest_common_version(ours: Iterable[int], theirs: Iterable[int]) -> int | None:
    """The link protocol both sides list, highest first; None if they share none."""
    common = set(ours) & set(theirs)
    return max(common) if common else None


# --------------------------------------------------------------------------- relay payload


def _default_padding(n: int) -> bytes:
    return os.urandom(n)


@dataclass(slots=True)
class RelayPayload:
    """The 509-byte plaintext inside a RELAY cell, as fields.

    ``length`` defaults to ``len(data)`` and must equal it. ``digest`` is what the header holds
    (relay crypto sets it; leave it zero when building a cell to send).
    """

    command: int
    recognized: int = 0
    stream_id: int = 0
    digest: bytes = bytes(RELAY_DIGEST_LEN)
    length: int | None = None
    data: bytes = field(default=b"")

    def __post_init__(self) -> None:
        if not 0 <= self.command <= 0xFF:
            raise FieldRangeError(f"relay command must be 0..255, got {self.command}")
        if not 0 <= self.recognized <= 0xFFFF:
            raise FieldRangeError(f"recognized must be 0..65535, got {self.recognized}")
        if not 0 <= self.stream_id <= 0xFFFF:
            raise FieldRangeError(f"stream id must be 0..65535, got {self.stream_id}")
        if len(self.digest) != 4:
            raise FieldRangeError(f"digest must be 4 bytes, got {len(self.digest)}")
        if len(self.data) > RELAY_DATA_MAX:
            raise RelayLengthError(
                f"relay data is at most {RELAY_DATA_MAX} bytes, got {len(self.data)}"
            )
        if self.length is None:
            self.length = len(self.data)
        elif self.length != len(self.data):
            raise RelayLengthError(
                f"length field {self.length} does not match {len(self.data)} bytes of data"
            )

    def pack(self, padding: Callable[[int], bytes] | None = None) -> bytes:
        """The 509-byte payload: header, data, then 4 zero bytes and random padding.

        ``padding(n)`` supplies the ``n`` random bytes (default ``os.urandom``); pass e.g.
        ``random.Random(seed).randbytes`` for deterministic output.
        """
        header = RELAY_HEADER.pack(
            self.command, self.recognized, self.stream_id, bytes(self.digest), len(self.data)
        )
        used = RELAY_HEADER_LEN + len(self.data)
        gap = min(RELAY_PADDING_GAP, CELL_PAYLOAD_LEN - used)
        random_len = CELL_PAYLOAD_LEN - used - gap
        rand = (padding or _default_padding)(random_len) if random_len else b""
        if len(rand) != random_len:
            raise ValueError(f"padding source returned {len(rand)} bytes, wanted {random_len}")
        return header + bytes(self.data) + bytes(gap) + rand

    @classmethod
    def unpack(cls, payload: bytes | bytearray | memoryview) -> RelayPayload:
        """Parse a 509-byte plaintext relay payload (padding ignored)."""
        if len(payload) != CELL_PAYLOAD_LEN:
            raise PayloadSizeError(
                f"relay payload must be {CELL_PAYLOAD_LEN} bytes, got {len(payload)}"
            )
        command, recognized, stream_id, digest, length = RELAY_HEADER.unpack_from(payload, 0)
        if length > RELAY_DATA_MAX:
            raise RelayLengthError(
                f"relay length field {length} exceeds the maximum of {RELAY_DATA_MAX}"
            )
        data = bytes(payload[RELAY_HEADER_LEN : RELAY_HEADER_LEN + length])
        return cls(command, recognized, stream_id, digest, length, data)

