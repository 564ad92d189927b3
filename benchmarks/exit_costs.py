"""What an exit's streams and early DATA cost in memory: the figures behind
``relay.exit.EARLY_CHUNK_OVERHEAD`` and ``relay.exit.STREAM_COST``.

Run: ``python -m benchmarks.exit_costs [--json] [--streams N] [--cells N] [--reps N]``.

One process, one real :class:`relay.exit.ExitEdge` on a real reactor, fed relay cells as its
circuit would feed them (``ExitEdge.handle``):

* **per stream**: ``--streams`` BEGINs to a loopback port that listens with a backlog of 0
  and never accepts, so every stream stays half-open (a socket in SYN_SENT, a libuv TCP
  handle, the reactor's ``Stream``, the edge's ``_ExitStream`` with its closures). The loop
  runs until every connect is under way; the growth of the process's RSS divided by the
  streams is the cost per stream, the growth seen by ``tracemalloc`` the Python part of it.
* **per early DATA chunk**: ``--cells`` DATA cells of 498 bytes spread over those streams
  before any CONNECTED (optimistic data, kept in each stream's list). RSS growth per chunk,
  minus the 498 payload bytes, is the overhead of a chunk (the bytes object's header and
  malloc's rounding, the list slot).

The cost per stream rises with the number of streams (2,000: 2.1 KB; 4,000: 2.5 KB; 16,000:
2.7 KB, of which 2.1 KB Python at every size), the cost per chunk does not (45-53 B beyond the
payload; a bytes object of 531 bytes is a 544-byte malloc chunk, plus an 8-byte list slot).
In a running exit a chunk costs more (71-76 B beyond the payload, from ``streams_fds`` in
``python -m benchmarks.attacks``): the relay's own allocations land between the chunks;
``EARLY_CHUNK_OVERHEAD`` is that figure.

Each figure is the median of ``--reps`` runs, each in a fresh process (memory CPython frees
is reused, not returned: a second run in the same process would measure nothing). Kernel
memory of the sockets is not RSS and is not counted here.

Threads: main thread only (it is the reactor's loop thread).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import statistics
import subprocess
import sys
import tracemalloc
from dataclasses import dataclass

from reactor import Reactor
from relay.cells import RelayCommand
from relay.circuits import pack_relay
from relay.exit import ExitEdge, Sockets
from relay.exitpolicy import ExitVerdict
from tor1 import RELAY_DATA_MAX

_PAGE = os.sysconf("SC_PAGE_SIZE")
_ALLOW = ExitVerdict(True)


def _rss() -> int:
    """This process's resident set in bytes (``/proc/self/statm``). Any thread."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * _PAGE


@dataclass
class Costs:
    """One run: bytes per stream and per early chunk (RSS), and the Python part."""

    stream_rss: float
    stream_py: float
    chunk_rss: float
    chunk_py: float


def _run_for(reactor: Reactor, seconds: float) -> None:
    """Run the loop for ``seconds``. Loop thread only."""
    reactor.call_later(seconds, reactor.stop)
    reactor.run()


def _feed(edge: ExitEdge, payloads: list[bytes]) -> None:
    """Hand ``payloads`` to ``edge`` as one recognized batch. Loop thread only."""
    plain = b"".join(payloads)
    edge.handle(plain, range(0, len(plain), len(payloads[0])), lambda offset: bytes(20))


def measure(reactor: Reactor, port: int, streams: int, cells: int) -> Costs:
    """One run against the never-accepting ``port``. Loop thread only."""
    edge = ExitEdge(reactor, lambda payloads: None, lambda why: None,
                    check=lambda address, port: _ALLOW, is_exit=True, sockets=Sockets())
    target = f"127.0.0.1:{port}".encode() + b"\0"
    gc.collect()
    rss0, py0 = _rss(), tracemalloc.get_traced_memory()[0]
    _feed(edge, [pack_relay(RelayCommand.BEGIN, sid, target) for sid in range(1, streams + 1)])
    _run_for(reactor, 0.2)  # the connects get under way
    gc.collect()
    rss1, py1 = _rss(), tracemalloc.get_traced_memory()[0]
    per_stream = cells // streams
    payload = bytes(RELAY_DATA_MAX)
    for sid in range(1, streams + 1):
        for start in range(0, per_stream, 100):
            count = min(100, per_stream - start)
            _feed(edge, [pack_relay(RelayCommand.DATA, sid, payload)] * count)
    gc.collect()
    rss2, py2 = _rss(), tracemalloc.get_traced_memory()[0]
    chunks = per_stream * streams
    edge.close()
    _run_for(reactor, 0.2)  # the handles close
    return Costs((rss1 - rss0) / streams, (py1 - py0) / streams,
                 (rss2 - rss1) / chunks - RELAY_DATA_MAX, (py2 - py1) / chunks - RELAY_DATA_MAX)


def _one_run(streams: int, cells: int) -> Costs:
    """One measurement in this process. Main thread."""
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(0)
    try:
        with Reactor() as reactor:
            return measure(reactor, hole.getsockname()[1], streams, cells)
    finally:
        hole.close()


def main() -> None:
    """Measure (each run in a fresh process) and print. Main thread."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--streams", type=int, default=4000)
    parser.add_argument("--cells", type=int, default=200_000)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--tracemalloc", action="store_true",
                        help="also the Python part (tracemalloc's own cost then adds to RSS)")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        if args.tracemalloc:
            tracemalloc.start()
        print(json.dumps(vars(_one_run(args.streams, args.cells))))
        return
    argv = [sys.executable, "-m", "benchmarks.exit_costs", "--one", "--streams",
            str(args.streams), "--cells", str(args.cells)]
    if args.tracemalloc:
        argv.append("--tracemalloc")
    runs = [Costs(**json.loads(subprocess.run(argv, check=True, capture_output=True,
                                              text=True).stdout))
            for _ in range(args.reps)]
    result: dict[str, object] = {
        name: round(statistics.median(getattr(r, name) for r in runs), 1)
        for name in ("stream_rss", "stream_py", "chunk_rss", "chunk_py")}
    result["runs"] = [vars(r) for r in runs]
    if args.json:
        print(json.dumps(result))
        return
    python = args.tracemalloc
    print(f"per half-open stream: {result['stream_rss']:.0f} B RSS"
          + (f" ({result['stream_py']:.0f} B Python)" if python else ""))
    print(f"per early DATA chunk beyond its 498 bytes: {result['chunk_rss']:.1f} B RSS"
          + (f" ({result['chunk_py']:.1f} B Python)" if python else ""))
    print("runs (stream, chunk):", [(round(r.stream_rss), round(r.chunk_rss, 1)) for r in runs])


if __name__ == "__main__":
    main()
