"""A TCP echo service on the reactor: the target the relay network's exit streams connect to.

``python -m examples.echo --host 127.0.0.1 --port 0`` listens (port 0: any free port), prints one
line ``READY {"address": ..., "port": ..., "pid": ...}`` on stdout once it accepts connections,
and runs until SIGTERM or SIGINT (or, with ``--exit-on-stdin-eof``, until stdin ends); it then
prints ``STATS {...}`` (connections, bytes echoed) and exits 0.

Every byte read is written straight back on the same connection. Back-pressure: when a
connection's write buffer rises above its high watermark the service stops reading from that
connection, and resumes at the low watermark, so a client that does not read its echo cannot
make the service buffer without bound. A peer's EOF is answered by flushing and closing.

:class:`EchoServer` is the same service as a library object, for tests and programs that host it
inside their own reactor.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys

from examples.relay import stop_on_stdin_eof
from reactor import Reactor
from reactor.net import CloseReason, Listener, Stream, listen

__all__ = ["EchoServer", "main"]


class EchoServer:
    """Echo every connection's bytes back to it, pausing reads while its writes back up."""

    def __init__(self, reactor: Reactor, host: str = "127.0.0.1", port: int = 0) -> None:
        """Listen on ``host:port``. Loop thread only."""
        self._listener: Listener = listen(reactor, host, port, self._accept)
        self.connections = 0
        self.open_connections = 0
        self.bytes_echoed = 0

    @property
    def address(self) -> tuple[str, int]:
        """``(host, port)`` actually bound. Any thread."""
        return self._listener.address

    def close(self) -> None:
        """Stop accepting (open connections stay until their peers close). Loop thread only."""
        self._listener.close()

    def stats(self) -> dict[str, int]:
        """Counters as a plain dict. Loop thread only."""
        return {
            "connections": self.connections,
            "open_connections": self.open_connections,
            "bytes_echoed": self.bytes_echoed,
        }

    def _accept(self, stream: Stream) -> None:
        self.connections += 1
        self.open_connections += 1

        def on_data(data: bytes) -> None:
            self.bytes_echoed += len(data)
            stream.write(data)

        def on_close(reason: CloseReason, detail: str) -> None:
            self.open_connections -= 1

        stream.on_write_high = stream.pause_reading
        stream.on_write_low = stream.resume_reading
        stream.on_close = on_close
        stream.on_data = on_data


def main(argv: list[str] | None = None) -> int:
    """Run the echo service until SIGTERM/SIGINT. Main thread (it becomes the loop thread)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--exit-on-stdin-eof", action="store_true",
                        help="also exit when stdin ends (used by examples.network)")
    args = parser.parse_args(argv)
    with Reactor() as reactor:
        server = EchoServer(reactor, args.host, args.port)
        for signum in (signal.SIGTERM, signal.SIGINT):
            reactor.add_signal_handler(signum, reactor.stop)
        if args.exit_on_stdin_eof:
            stop_on_stdin_eof(reactor)
        host, port = server.address
        print("READY " + json.dumps({"address": host, "port": port, "pid": os.getpid()}),
              flush=True)
        reactor.run()
        print("STATS " + json.dumps(server.stats()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
