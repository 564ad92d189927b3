"""A plain-TCP DirPort: each accepted connection is one :class:`relay.dirserver.DirServer`.

The same request handling a BEGIN_DIR stream gets, over a TCP listener of the reactor: the
stream's bytes go to ``DirServer.feed``, its answer to ``Stream.write``, and its end closes
the connection after the answer is flushed (HTTP/1.0: the close ends the body). The client's
address is passed on for ``X-Your-Address-Is`` (reported only when it is not private).

tor clients never use a DirPort (they must tunnel over BEGIN_DIR), but tor relays do when a
directory they fetch from has no ORPort: a real tor relay pointed at this port reads the
consensus, certificates and microdescriptors from it with tor's own parser (the interop test
does that). A connection that sends nothing is closed after ``idle_timeout`` seconds.

Threads: loop thread only.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from reactor.loop import Reactor
from reactor.net import CloseReason, Listener, Stream, listen
from relay.dirhttp import Request
from relay.dirserver import DirServer
from relay.dirstore import DirStore

__all__ = ["serve_dirport"]

logger = logging.getLogger("relay.dirport")


def serve_dirport(reactor: Reactor, host: str, port: int, store: DirStore, *,
                  bridge: bool = False, idle_timeout: float = 60.0,
                  clock: Callable[[], float] = time.time,
                  on_request: Callable[[Request, int | None], object] | None = None
                  ) -> Listener:
    """Listen on ``host:port`` (0: any free port, see ``Listener.address``) and answer each
    connection's one request from ``store``. ``on_request(request, status)`` sees every
    request. Returns the listener (``close()`` stops accepting). Loop thread only."""

    def accepted(stream: Stream) -> None:
        peer = stream.peer_address
        def idle() -> None:
            if not stream.closed:
                stream.close("no request in time", flush=False)

        timer = reactor.call_later(idle_timeout, idle)

        def end(reason: str) -> None:
            if not timer.done:
                timer.cancel()
            if not stream.closed:
                stream.close(reason)

        def closed(reason: CloseReason, detail: str) -> None:
            if not timer.done:
                timer.cancel()

        server = DirServer(store, stream.write, end, bridge=bridge,
                           client_address=str(peer[0]) if peer else None, clock=clock,
                           on_request=on_request)
        stream.on_close = closed
        stream.on_data = server.feed

    return listen(reactor, host, port, accepted)
