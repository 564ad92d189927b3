"""TCP on the loop thread: ``listen`` (a ``Listener`` that accepts streams) and ``connect``.

The connection itself is :class:`reactor.stream.Stream` (callbacks, back-pressure, closing; see
that module); why a stream ended is :class:`reactor.uverrors.CloseReason`. This module makes
streams: :func:`listen` binds a :class:`Listener` that turns each accepted connection into a
connected Stream and hands it to ``on_connection(stream)``; :func:`connect` returns a Stream at
once, followed by exactly one of ``on_connect(stream)`` or ``on_error(reason, detail)``.
Everything a user imports from here before the split still is: ``from reactor.net import
Stream, CloseReason, StreamClosedError, DEFAULT_HIGH_WATER, DEFAULT_LOW_WATER, Listener,
listen, connect`` (and the same names from ``reactor``).

Hosts are IP address literals (IPv4 or IPv6); name resolution is the caller's business.

Threads: loop thread only, except the ``Listener.closed`` property (any thread).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import pyuv

from reactor.stream import DEFAULT_HIGH_WATER, DEFAULT_LOW_WATER, Stream
from reactor.uverrors import (
    CloseReason,
    StreamClosedError,
    check_ip,
    check_watermarks,
    describe,
    error_code,
)

if TYPE_CHECKING:
    from reactor.loop import Reactor

__all__ = [
    "DEFAULT_HIGH_WATER",
    "DEFAULT_LOW_WATER",
    "CloseReason",
    "Listener",
    "Stream",
    "StreamClosedError",
    "connect",
    "listen",
]

logger = logging.getLogger("reactor.net")


class Listener:
    """A listening TCP socket that turns each accepted connection into a ``Stream``."""

    def __init__(
        self,
        reactor: Reactor,
        host: str,
        port: int,
        on_connection: Callable[[Stream], object],
        *,
        backlog: int,
        high_water: int,
        low_water: int,
    ) -> None:
        """Bind and listen; raises ``OSError`` if that fails. Loop thread only."""
        reactor.check_loop_thread("listen()")
        check_ip(host)
        check_watermarks(high_water, low_water)
        self._reactor = reactor
        self._on_connection = on_connection
        self._high = high_water
        self._low = low_water
        self._tcp = pyuv.TCP(reactor.loop)
        try:
            self._tcp.bind((host, port))
            self._tcp.listen(self._on_incoming, backlog)
        except pyuv.error.UVError as exc:
            reactor._close_handle(self._tcp)
            code = error_code(exc)
            raise OSError(-code, f"listen on {host}:{port}: {describe(code)}") from None
        self.address: tuple[str, int] = tuple(self._tcp.getsockname())[:2]  # type: ignore[assignment]
        self.accepted = 0
        reactor._register_resource(self)

    @property
    def closed(self) -> bool:
        """True after ``close()``. Any thread."""
        return bool(self._tcp.closed)

    def close(self) -> None:
        """Stop accepting; streams already accepted stay open. Loop thread only. Idempotent."""
        self._reactor.check_loop_thread("Listener.close()")
        self._close_for_reactor()

    def _close_for_reactor(self) -> None:
        if not self._tcp.closed:
            self._reactor._close_handle(self._tcp)
        self._reactor._unregister_resource(self)

    def _on_incoming(self, server: pyuv.TCP, error: int | None) -> None:
        if error is not None:
            logger.error("listener %s: accept failed: %s", self.address, describe(error))
            return
        client = pyuv.TCP(self._reactor.loop)
        try:
            server.accept(client)
            client.nodelay(True)
        except pyuv.error.UVError as exc:
            logger.error("listener %s: accept failed: %s", self.address,
                         describe(error_code(exc)))
            self._reactor._close_handle(client)
            return
        self.accepted += 1
        stream = Stream(self._reactor, client, connected=True,
                        high_water=self._high, low_water=self._low)
        try:
            self._on_connection(stream)
        except Exception as exc:
            logger.exception("on_connection %r raised; closing the stream", self._on_connection)
            stream._fail_with(CloseReason.ERROR, f"on_connection raised {exc!r}", flush=False)

    def __repr__(self) -> str:
        return f"<Listener {self.address} {'closed' if self.closed else 'listening'}>"


def listen(
    reactor: Reactor,
    host: str,
    port: int,
    on_connection: Callable[[Stream], object],
    *,
    backlog: int = 511,
    high_water: int = DEFAULT_HIGH_WATER,
    low_water: int = DEFAULT_LOW_WATER,
) -> Listener:
    """Listen on ``host:port`` (port 0: any free port, see ``Listener.address``).

    Loop thread only. ``on_connection(stream)`` runs for each accepted connection; set the
    stream's callbacks there (reading starts when ``on_data`` is set). Raises ``OSError`` if the
    address cannot be bound, ``ValueError`` if ``host`` is not an IP literal.
    """
    return Listener(reactor, host, port, on_connection, backlog=backlog,
                    high_water=high_water, low_water=low_water)


def connect(
    reactor: Reactor,
    host: str,
    port: int,
    on_connect: Callable[[Stream], object],
    on_error: Callable[[CloseReason, str], object] | None = None,
    *,
    high_water: int = DEFAULT_HIGH_WATER,
    low_water: int = DEFAULT_LOW_WATER,
) -> Stream:
    """Start connecting to ``host:port``; returns the (not yet connected) Stream at once.

    Loop thread only. Exactly one of ``on_connect(stream)`` or ``on_error(reason, detail)``
    follows on a later loop iteration (``CloseReason.REFUSED`` for a closed port;
    ``CloseReason.LOCAL`` if ``stream.close()`` cancels). Raises only ``ValueError`` for a host
    that is not an IP literal.
    """
    reactor.check_loop_thread("connect()")
    check_ip(host)
    stream = Stream(reactor, pyuv.TCP(reactor.loop), connected=False,
                    high_water=high_water, low_water=low_water)
    stream._on_connect = on_connect
    stream._on_error = on_error
    try:
        stream._tcp.connect((host, port), stream._on_connected)
    except pyuv.error.UVError as exc:
        stream._fail_later(error_code(exc))
    return stream
