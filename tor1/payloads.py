"""Cell payloads as the tor1 implementations take them: size checks, joining and splitting.

Both backends (:mod:`tor1.reference` and :mod:`tor1.fast`) accept a relay payload as exactly
:data:`tor1.CELL_PAYLOAD_LEN` bytes, and a batch either as a list of such payloads or as a
:data:`CellBuffer`: one bytes-like object holding them joined, or a list/tuple of bytes-like
pieces read as their concatenation (only the total must be whole payloads; the C kernel reads
the pieces without joining them). Checking each payload before joining a list matters: a 508-
and a 510-byte payload must not pass as two good ones.

Threads: pure functions; any thread.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeAlias

from tor1 import CELL_PAYLOAD_LEN

__all__ = ["Bytes", "CellBuffer", "buffer_len", "check_payload", "join_checked", "split_buffer",
           "split_joined"]

Bytes: TypeAlias = bytes | bytearray | memoryview
CellBuffer: TypeAlias = Bytes | list[Bytes] | tuple[Bytes, ...]
"""Joined payloads: one bytes-like object, or pieces read as their concatenation."""


def check_payload(payload: Bytes) -> Bytes:
    """Return ``payload`` if it is one whole payload; ``ValueError`` otherwise. Any thread."""
    if len(payload) != CELL_PAYLOAD_LEN:
        raise ValueError(f"relay payload must be {CELL_PAYLOAD_LEN} bytes, got {len(payload)}")
    return payload


def join_checked(payloads: Sequence[Bytes]) -> bytes:
    """Join payloads after checking each one's size. Any thread."""
    for payload in payloads:
        check_payload(payload)
    return b"".join(payloads)


def split_joined(joined: bytes, count: int) -> list[bytes]:
    """The first ``count`` payloads of ``joined``, as separate ``bytes``. Any thread."""
    return [joined[i * CELL_PAYLOAD_LEN : (i + 1) * CELL_PAYLOAD_LEN] for i in range(count)]


def buffer_len(buf: CellBuffer) -> int:
    """Total bytes of a :data:`CellBuffer`. Any thread."""
    if isinstance(buf, list | tuple):
        return sum(buffer_len(piece) for piece in buf)
    return buf.nbytes if isinstance(buf, memoryview) else len(buf)


def split_buffer(buf: CellBuffer) -> list[bytes]:
    """Every payload of a :data:`CellBuffer` as ``bytes``; ``ValueError`` if the length is not
    whole payloads. Any thread."""
    if isinstance(buf, list | tuple):
        buf = b"".join(buf)
    view = memoryview(buf).cast("B")
    if len(view) % CELL_PAYLOAD_LEN:
        raise ValueError(
            f"buffer length must be a multiple of {CELL_PAYLOAD_LEN} (joined relay payloads), "
            f"got {len(view)}"
        )
    return [bytes(view[i : i + CELL_PAYLOAD_LEN]) for i in range(0, len(view), CELL_PAYLOAD_LEN)]
