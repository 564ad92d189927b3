"""Authenticated circuit SENDMEs (flow control v1, proposal 289): body codec, tag bookkeeping.

Why
---
A version-0 SENDME has an empty body: anyone can send one, and a client that never reads but
sends SENDMEs blindly keeps an exit packaging cells without limit (the "sniper attack"). A
version-1 SENDME carries the *tag* of the DATA cell that triggered it -- the whole 20-byte
running digest after that cell (:data:`tor1.SENDME_TAG_LEN`), which only a receiver that
decrypted the cell knows -- and the sender of the DATA checks it against the tag it kept.

tor's rules (tor 0.4.9, ``src/core/or/sendme.c`` unless said otherwise)
-----------------------------------------------------------------------
* Only RELAY_DATA counts, and only circuit-level SENDMEs are authenticated: stream-level ones
  are sent with an empty body and their body is never read (``sendme_connection_edge_consider_
  sending``, ``sendme_process_stream_level``).
* The sender records the tag of every CIRCWINDOW_INCREMENT-th DATA cell it sends, right after
  the cell is crypted (``relay_send_command_from_edge_`` in ``relay.c`` ->
  ``sendme_record_cell_digest_on_circ``; ``circuit_sent_cell_for_sendme`` in
  ``congestion_control_common.c``: the package window before the cell is not 1000 and
  ``(window - 1) % 100 == 0``, i.e. the cell is the 100th, 200th, ... DATA cell sent). The tag
  is the crypto's ``sendme_digest`` (``relay_crypto_get_sendme_tag``; for tor1
  ``tor1_set_digest_v0`` stores the full digest): the forward digest at a client, the
  backward one at a relay.
* The receiver, when a DATA cell takes its deliver window to 900 or below
  (``sendme_circuit_consider_sending``, called for every DATA cell), adds 100 back and sends a
  SENDME whose tag is ``sendme_digest`` at that moment: the digest of that very DATA cell
  (``cpath_get_sendme_tag`` at a client, ``relay_crypto_get_sendme_tag`` at an exit). One
  SENDME per such cell.
* The body is trunnel's ``sendme_cell``: ``u8 version IN [0, 1]``, ``u16 data_len IN [16, 20]``,
  then ``data_len`` bytes (version 1: the tag; 16 is CGO's tag, 20 tor1's); bytes after that
  are ignored. An empty body is version 0. tor emits version ``sendme_emit_min_version``
  (default 1: ``SENDME_EMIT_MIN_VERSION_DEFAULT`` in ``sendme.h``) and accepts versions from
  ``sendme_accept_min_version`` (default 0, but the live consensus sets 1).
* Checking (``sendme_is_valid``): an unparseable body, or a version below the accepted minimum,
  is invalid; then the oldest recorded tag is popped (whatever the version, so none pile up);
  none recorded is invalid ("no cell digests to match"); version 1 needs ``data_len`` equal to
  the circuit's tag length (20 for tor1) and the tag equal in constant time (``tor_memneq``).
  Then the package window may not exceed CIRCWINDOW_START_MAX (1000): "Unexpected sendme"
  (``sendme_process_circuit_level_impl``). Every failure closes the circuit with
  ``END_CIRC_REASON_TORPROTOCOL`` (DESTROY reason 1, PROTOCOL).

This project emits version 1 and, like the live network, accepts version 1 only
(:data:`SENDME_ACCEPT_MIN_VERSION`).

How the tags are obtained here
------------------------------
The crypto's ``*_tagged_buf`` forms (:mod:`tor1.reference`, "SENDME tags") return tags for
chosen cells: at a receiver, the tag of every recognized cell of a batch; at a sender, the tag
of every *marked* cell, a payload whose digest field is non-zero before crypto
(:func:`mark_cell`). The sender marks its 100th, 200th, ... DATA cell when it packages it
(:func:`sendme_due`: per batch, not per cell), and the mark travels with the payload through
any batching on the worker pool; the tags come back with the crypted cells, in order, and go
into :class:`SendmeTags`, which checks each SENDME against the oldest one.

Threads: pure functions (any thread); a :class:`SendmeTags` belongs to its circuit's loop
thread.
"""

from __future__ import annotations

import hmac
import struct
from collections import deque

from relay.circuits import CIRCWINDOW_INCREMENT
from tor1 import SENDME_TAG_LEN

__all__ = [
    "SENDME_ACCEPT_MIN_VERSION",
    "SENDME_EMIT_VERSION",
    "SendmeError",
    "SendmeTags",
    "decode_sendme",
    "encode_sendme_v1",
    "mark_cell",
    "sendme_due",
]

SENDME_EMIT_VERSION = 1
"""The version of the circuit SENDMEs sent here (tor 0.4.9's default)."""
SENDME_ACCEPT_MIN_VERSION = 1
"""The lowest version accepted here (the live network's ``sendme_accept_min_version``)."""

_MAX_VERSION = 1
_DATA_LENS = (16, 20)  # trunnel: data_len IN [16, 20] (CGO's and tor1's tag lengths)
_HEADER = struct.Struct(">BH")
_MARK = b"\xff\xff\xff\xff"
_DIGEST_FIELD = slice(5, 9)


class SendmeError(ValueError):
    """A SENDME body that trunnel's ``sendme_cell_parse`` would refuse."""


def encode_sendme_v1(tag: bytes) -> bytes:
    """The body of a version-1 SENDME: ``01 | 00 14 | tag`` (23 bytes for a tor1 tag). Any
    thread (pure)."""
    if len(tag) != SENDME_TAG_LEN:
        raise ValueError(f"a tor1 SENDME tag is {SENDME_TAG_LEN} bytes, got {len(tag)}")
    return _HEADER.pack(1, SENDME_TAG_LEN) + tag


def decode_sendme(body: bytes) -> tuple[int, bytes]:
    """``(version, tag)`` of a SENDME body: ``(0, b"")`` for an empty body, ``(1, tag)`` with
    the ``data_len`` bytes of a version-1 body (extra bytes ignored, as tor does). Raises
    :class:`SendmeError` for what trunnel refuses: a version above 1, a ``data_len`` other than
    16 or 20, or a body shorter than its ``data_len``. Any thread (pure)."""
    if not body:
        return 0, b""
    if len(body) < _HEADER.size:
        raise SendmeError(f"SENDME body of {len(body)} bytes is shorter than its header")
    version, data_len = _HEADER.unpack_from(body)
    if version > _MAX_VERSION:
        raise SendmeError(f"SENDME version {version} is unknown")
    if data_len not in _DATA_LENS:
        raise SendmeError(f"SENDME data_len {data_len} is not 16 or 20")
    end = _HEADER.size + data_len
    if len(body) < end:
        raise SendmeError(f"SENDME body of {len(body)} bytes is shorter than data_len "
                          f"{data_len} says")
    return version, (body[_HEADER.size : end] if version == 1 else b"")


def sendme_due(sent_before: int, count: int) -> range:
    """Which of ``count`` DATA cells about to be sent, after ``sent_before`` DATA cells on the
    circuit, must have their tag recorded: the positions (0-based, within the new cells) of the
    100th, 200th, ... DATA cell of the circuit. Any thread (pure)."""
    first = CIRCWINDOW_INCREMENT - 1 - sent_before % CIRCWINDOW_INCREMENT
    return range(first, count, CIRCWINDOW_INCREMENT)


def mark_cell(payload: bytes) -> bytes:
    """``payload`` (a plaintext relay payload, digest field zero) marked for its tag: the
    digest field is set non-zero; crypto overwrites it, so no byte on the wire changes. Any
    thread (pure)."""
    return payload[: _DIGEST_FIELD.start] + _MARK + payload[_DIGEST_FIELD.stop :]


class SendmeTags:
    """The tags a sender of DATA expects back, oldest first, and the check of a SENDME.

    Loop thread only (the circuit's).
    """

    __slots__ = ("_tags", "accepted", "recorded")

    def __init__(self) -> None:
        """No tag expected yet. Loop thread only."""
        self._tags: deque[bytes] = deque()
        self.recorded = 0
        self.accepted = 0

    @property
    def pending(self) -> int:
        """Tags recorded and not yet matched by a SENDME. Loop thread only."""
        return len(self._tags)

    def record(self, tags: bytes) -> None:
        """Append joined tags (what a ``*_tagged_buf`` call returned for marked cells), in the
        order their cells were sent. Loop thread only."""
        size = SENDME_TAG_LEN
        for start in range(0, len(tags), size):
            self._tags.append(tags[start : start + size])
        self.recorded += len(tags) // size

    def check(self, body: bytes) -> str | None:
        """Check a circuit SENDME's body against the oldest expected tag, which it consumes
        (as tor does, whatever the version). None when it is valid; otherwise why not, and the
        caller closes the circuit (DESTROY, PROTOCOL). Loop thread only."""
        try:
            version, tag = decode_sendme(body)
        except SendmeError as exc:
            return f"unparseable SENDME: {exc}"
        if version < SENDME_ACCEPT_MIN_VERSION:
            return (f"SENDME version {version} refused (version "
                    f"{SENDME_ACCEPT_MIN_VERSION} required)")
        if not self._tags:
            return "unexpected SENDME: no DATA cell tag is waiting for one"
        expected = self._tags.popleft()
        if len(tag) != len(expected):
            return f"SENDME tag of {len(tag)} bytes where a tor1 tag has {len(expected)}"
        if not hmac.compare_digest(tag, expected):
            return "SENDME tag does not match the DATA cell it acknowledges"
        self.accepted += 1
        return None
