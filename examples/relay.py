"""Run one relay: ``python -m examples.relay --listen 127.0.0.1:0 --data-dir DIR``.

The relay (``relay.node.RelayNode``: a Reactor, a WorkerPool on the fast crypto backend --
several circuits' batches per GIL-free kernel call, the pool's grouped path -- links and
circuits) keeps its identity and ntor onion key in ``--data-dir`` (created on first run),
listens on ``--listen`` (port 0: any free port) and serves until SIGTERM or SIGINT (or, with
``--exit-on-stdin-eof``, until its stdin ends). It is an exit to loopback addresses only.

Line protocol on stdout (what ``examples.network`` reads):

* ``READY {"descriptor": {...}, "pid": N}`` once it listens: the descriptor is the directory
  entry (nickname, address, port, identity, ntor_onion_key);
* ``STATS {...}`` on SIGUSR1 (live counters), and once more when it exits: cells crypted,
  batches and mean batch size, group calls and batches per group, wake-ups per cell,
  circuits, link closes by kind, exit bytes; see ``RelayNode.stats``.

Logs go to stderr (``--log-level``).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import logging
import os
import signal
import sys
import threading

from reactor import Reactor
from relay.directory import RelayKeys
from relay.node import DEFAULT_MAX_CIRCUITS_PER_LINK, RelayNode
from workers.pool import DEFAULT_BATCH_CELLS

__all__ = ["main", "parse_hostport", "stop_on_stdin_eof"]


def parse_hostport(text: str) -> tuple[str, int]:
    """``"HOST:PORT"`` -> ``(host, port)``; IPv6 hosts in brackets. Any thread."""
    host, colon, port = text.rpartition(":")
    if not colon or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def stop_on_stdin_eof(reactor: Reactor) -> None:
    """Stop ``reactor`` when stdin reaches EOF (the parent that holds the pipe died or closed
    it). A daemon thread blocks on stdin and hands the news to the loop thread. Loop thread
    only (to set up)."""

    def watch() -> None:
        # os.read on the descriptor, not sys.stdin.buffer: a daemon thread blocked inside the
        # BufferedReader holds its lock, and interpreter shutdown then aborts the process
        # ("could not acquire lock for <stdin> at interpreter shutdown", SIGABRT).
        try:
            fd = sys.stdin.fileno()
            while os.read(fd, 4096):
                pass
        except (OSError, ValueError):
            pass
        try:
            reactor.call_soon_threadsafe(reactor.stop)
        except RuntimeError:
            pass  # the reactor already closed

    threading.Thread(target=watch, name="stdin-watch", daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    """Run the relay until SIGTERM/SIGINT. Main thread (it becomes the loop thread)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", type=parse_hostport, default=("127.0.0.1", 0),
                        help="OR port address (default 127.0.0.1:0, any free port)")
    parser.add_argument("--data-dir", required=True, help="keeps the relay's keys")
    parser.add_argument("--nickname", default="relay")
    parser.add_argument("--threads", type=int, default=2, help="worker threads (default 2)")
    parser.add_argument("--batch-cells", type=int, default=DEFAULT_BATCH_CELLS,
                        help=f"worker batch cap in cells (default {DEFAULT_BATCH_CELLS})")
    parser.add_argument("--max-circuits-per-link", type=int,
                        default=DEFAULT_MAX_CIRCUITS_PER_LINK,
                        help="CREATEs beyond this many circuits on one link get DESTROY "
                             f"(RESOURCELIMIT) (default {DEFAULT_MAX_CIRCUITS_PER_LINK})")
    parser.add_argument("--log-level", default="WARNING")
    parser.add_argument("--profile", action="store_true",
                        help="profile the loop thread (cProfile) into DATA_DIR/loop.prof")
    parser.add_argument("--exit-on-stdin-eof", action="store_true",
                        help="also exit when stdin ends (used by examples.network)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format=f"%(asctime)s {args.nickname} %(name)s %(levelname)s %(message)s")
    keys = RelayKeys.load_or_create(args.data_dir)
    host, port = args.listen
    with Reactor() as reactor:
        node = RelayNode(reactor, keys, nickname=args.nickname, host=host, port=port,
                         threads=args.threads, batch_cells=args.batch_cells,
                         max_circuits_per_link=args.max_circuits_per_link)
        node.start()
        for signum in (signal.SIGTERM, signal.SIGINT):
            reactor.add_signal_handler(signum, reactor.stop)
        reactor.add_signal_handler(
            signal.SIGUSR1, lambda: print("STATS " + json.dumps(node.stats()), flush=True)
        )
        if args.exit_on_stdin_eof:
            stop_on_stdin_eof(reactor)
        ready = {"descriptor": node.descriptor().to_json(), "pid": os.getpid()}
        print("READY " + json.dumps(ready), flush=True)
        profiler = cProfile.Profile() if args.profile else None
        try:
            if profiler is not None:
                profiler.runcall(reactor.run)
                profiler.dump_stats(os.path.join(args.data_dir, "loop.prof"))
            else:
                reactor.run()
        finally:
            node.close()
            print("STATS " + json.dumps(node.stats()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
