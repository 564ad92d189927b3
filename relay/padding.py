"""Channel padding (padding-spec 2): a client's PADDING_NEGOTIATE, and the PADDING cells a
relay then sends on an idle link.

A tor client (link protocol 5) may send its guard ``PADDING_NEGOTIATE`` (cell command 12, on
circuit id 0)::

    version (1) = 0    command (1): 1 STOP, 2 START    ito_low_ms (2)    ito_high_ms (2)

START asks the relay to send a PADDING cell whenever the link has sent nothing for a timeout
drawn in ``[ito_low_ms, ito_high_ms]``; the relay clamps the low end to the consensus's
``nf_ito_low`` (default 1500 ms; zeros mean "the consensus values", ``nf_ito_high`` default
9500 ms). STOP turns it off. Recipients accept negotiation at any time; a malformed cell closes
the link (protocol violation). :class:`LinkPadding` is one link's padding: a timer that fires
at the drawn timeout and sends PADDING only when nothing else went out since the last firing,
so a busy link pays nothing but the timer.

Threads: :func:`decode_padding_negotiate` and :class:`PaddingNegotiate` values any thread
(pure); :class:`LinkPadding` loop thread only.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Callable

from reactor import Reactor, TimerHandle

__all__ = [
    "NF_ITO_HIGH_MS",
    "NF_ITO_LOW_MS",
    "PADDING_START",
    "PADDING_STOP",
    "LinkPadding",
    "PaddingNegotiate",
    "decode_padding_negotiate",
    "encode_padding_negotiate",
]

PADDING_STOP = 1
PADDING_START = 2
NF_ITO_LOW_MS = 1500
"""Consensus ``nf_ito_low`` default: the shortest idle timeout a relay pads at."""
NF_ITO_HIGH_MS = 9500
"""Consensus ``nf_ito_high`` default."""
_BODY = struct.Struct(">BBHH")


class PaddingNegotiate:
    """A decoded PADDING_NEGOTIATE: ``start`` (else STOP) and the timeout range in ms."""

    __slots__ = ("high_ms", "low_ms", "start")

    def __init__(self, start: bool, low_ms: int, high_ms: int) -> None:
        self.start = start
        self.low_ms = low_ms
        self.high_ms = high_ms


def decode_padding_negotiate(payload: bytes) -> PaddingNegotiate:
    """Parse a PADDING_NEGOTIATE body (trailing padding ignored); ``ValueError`` when the
    version or command is not one tor defines. Any thread (pure)."""
    if len(payload) < _BODY.size:
        raise ValueError("PADDING_NEGOTIATE is truncated")
    version, command, low, high = _BODY.unpack_from(payload)
    if version != 0 or command not in (PADDING_START, PADDING_STOP):
        raise ValueError(f"PADDING_NEGOTIATE version {version} command {command}")
    return PaddingNegotiate(command == PADDING_START, low, high)


def encode_padding_negotiate(start: bool, low_ms: int = 0, high_ms: int = 0) -> bytes:
    """A PADDING_NEGOTIATE body (unpadded). Any thread (pure)."""
    return _BODY.pack(0, PADDING_START if start else PADDING_STOP, low_ms, high_ms)


class LinkPadding:
    """The PADDING cells of one link: sent when the link has been idle for a drawn timeout.

    ``sent()`` is the link's count of cells sent so far and ``pad()`` sends one PADDING cell.
    Loop thread only."""

    def __init__(self, reactor: Reactor, sent: Callable[[], int], pad: Callable[[], None], *,
                 rng: random.Random | None = None) -> None:
        """Inactive until :meth:`negotiate` starts it. Loop thread only."""
        self._reactor = reactor
        self._sent = sent
        self._pad = pad
        self._rng = rng if rng is not None else random.Random()
        self._timer: TimerHandle | None = None
        self._range = (NF_ITO_LOW_MS, NF_ITO_HIGH_MS)
        self._seen = 0
        self.padding_sent = 0

    @property
    def active(self) -> bool:
        """True while padding is on. Loop thread only."""
        return self._timer is not None

    def negotiate(self, request: PaddingNegotiate) -> None:
        """Apply a client's START or STOP. Loop thread only."""
        if not request.start:
            self.stop()
            return
        low = max(request.low_ms or NF_ITO_LOW_MS, NF_ITO_LOW_MS)
        high = max(request.high_ms or NF_ITO_HIGH_MS, low)
        self._range = (low, high)
        self.stop()
        self._seen = self._sent()
        self._arm()

    def stop(self) -> None:
        """No more padding (STOP, or the link closed). Idempotent. Loop thread only."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _arm(self) -> None:
        low, high = self._range
        self._timer = self._reactor.call_later(self._rng.uniform(low, high) / 1000, self._tick)

    def _tick(self) -> None:
        sent = self._sent()
        if sent == self._seen:  # idle for the whole timeout
            self._pad()
            self.padding_sent += 1
            sent = self._sent()
        self._seen = sent
        self._arm()
