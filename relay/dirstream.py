"""A BEGIN_DIR stream's "target": the relay's own directory server, in process.

The exit edge (:mod:`relay.exit`) drives every stream's target through the same few calls it
makes on a TCP ``reactor.Stream`` (``writelines``, ``close``, reading pauses, the ``on_data`` /
``on_close`` / ``on_write_low`` callbacks). :class:`DirTarget` offers those over a
:class:`relay.dirserver.DirServer`: the client's DATA goes to ``DirServer.feed``; the answer
comes back through ``on_data`` and the end through ``on_close`` (``EOF``), both one loop
iteration later (``call_soon``), so the edge is never re-entered while it handles a cell. The
edge's stream windows then package the answer exactly as they package a TCP target's bytes, so
a large document is sent no faster than the client's SENDMEs allow.

Threads: loop thread only.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from reactor import CloseReason, Reactor

__all__ = ["DirServerFactory", "DirTarget"]

log = logging.getLogger("relay.exit")

_WATERMARKS = (1 << 16, 1 << 14)


class _DirServerLike(Protocol):
    def feed(self, data: bytes) -> None: ...


DirServerFactory = Callable[[Callable[[bytes], object], Callable[[str], object]], _DirServerLike]
"""``factory(send, end)``: a new directory server for one BEGIN_DIR stream."""


class DirTarget:
    """The in-process target of one BEGIN_DIR stream. Loop thread only."""

    def __init__(self, reactor: Reactor, factory: DirServerFactory) -> None:
        """A fresh directory server for this stream. Loop thread only."""
        self._reactor = reactor
        self.on_data: Callable[[bytes], Any] | None = None
        self.on_close: Callable[[CloseReason, str], Any] | None = None
        self.on_write_low: Callable[[], Any] | None = None
        self.closed = False
        self.write_buffer_size = 0
        self.write_watermarks = _WATERMARKS
        self._server = factory(self._send, self._end)

    def writelines(self, chunks: Sequence[bytes | bytearray | memoryview]) -> None:
        """The client's request bytes, in order. Loop thread only."""
        if not self.closed:
            self._server.feed(b"".join(bytes(c) for c in chunks))

    def pause_reading(self) -> None:
        """Nothing to pause: the answer is produced whole. Loop thread only."""

    def resume_reading(self) -> None:
        """See :meth:`pause_reading`. Loop thread only."""

    def close(self, reason: str = "", flush: bool = True) -> None:
        """The stream ended on the client's side (or the circuit closed). Loop thread only."""
        self.closed = True

    def _send(self, answer: bytes) -> None:
        self._reactor.call_soon(self._deliver, answer)

    def _deliver(self, answer: bytes) -> None:
        if not self.closed and self.on_data is not None:
            self.on_data(answer)

    def _end(self, why: str) -> None:
        self._reactor.call_soon(self._finish, why)

    def _finish(self, why: str) -> None:
        if self.closed:
            return
        self.closed = True
        log.debug("directory stream ended: %s", why)
        if self.on_close is not None:
            self.on_close(CloseReason.EOF, f"directory answer sent ({why})")
