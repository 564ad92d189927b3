"""Run one relay: ``python -m examples.relay --data-dir DIR [torrc-style options]``.

The relay (``relay.node.RelayNode``: a Reactor, a WorkerPool on the fast crypto backend --
several circuits' batches per GIL-free kernel call, the pool's grouped path -- links and
circuits) keeps tor's keys in ``DIR/keys`` (created on first run, tor's file names and
formats; ``DIR/fingerprint`` as tor writes it), listens on ``--orport`` and serves until
SIGTERM or SIGINT (or, with ``--exit-on-stdin-eof``, until its stdin ends). Links are TLS with
tor's link authentication; ``--plain-links`` (the in-process demos only) turns that off.

Options follow torrc's names: ``--dirauth "DirAuthority line"`` (repeatable), ``--exit-policy
"accept 127.0.0.1:7777, reject *:*"`` (not an exit without one), ``--bridge``,
``--testing-network``, ``--address``, ``--nickname``, ``--contact``; ``--publish-tap-key``
(the TAP onion key in the descriptor: ``docs/tornet.md``).

Line protocol on stdout (what ``examples.network`` and ``tornet`` read):

* ``READY orport=HOST:PORT fingerprint=HEX40 ed25519=BASE64 {json}`` once it listens; the JSON
  holds ``descriptor`` (the demo directory entry: nickname, address, port, identity,
  ntor_onion_key) and ``pid``;
* ``STATS {...}`` on SIGUSR1 (live counters), and once more when it exits: cells crypted,
  batches and mean batch size, group calls and batches per group, wake-ups per cell,
  circuits, link closes by kind, exit bytes; see ``RelayNode.stats``.

Logs go to stderr (``--log-level``).
"""

from __future__ import annotations

import argparse
import base64
import cProfile
import json
import logging
import os
import signal
import sys
import threading

from reactor import Reactor
from relay.config import RelayConfig, parse_dir_authority, split_policy
from relay.connlimit import CONN_LIMIT_DEFAULT, raise_nofile_limit
from relay.dos import DosConfig
from relay.identity.keys import RelayIdentity
from relay.node import DEFAULT_INLINE_CELLS, DEFAULT_MAX_CIRCUITS_PER_LINK, RelayNode
from relay.tlspipe import DEFAULT_INLINE_TLS_BYTES
from workers.pool import DEFAULT_BATCH_CELLS
from workers.tuning import env_without_thread_cache

__all__ = ["config_from_args", "main", "parse_args", "parse_hostport", "ready_line",
           "stop_on_stdin_eof"]


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


def _dir_authority(text: str) -> object:
    try:
        return parse_dir_authority(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


_UNITS = {"b": 1, "byte": 1, "bytes": 1, "kb": 1 << 10, "kbytes": 1 << 10, "mb": 1 << 20,
          "mbytes": 1 << 20, "gb": 1 << 30, "gbytes": 1 << 30}


def _memory_size(text: str) -> int:
    """torrc's memory units: ``"64 MB"``, ``"1 GB"``, plain bytes. Any thread."""
    words = text.lower().split()
    try:
        number = int(words[0]) if words else -1
        unit = _UNITS[words[1]] if len(words) > 1 else 1
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(f"expected a size like '64 MB', got {text!r}") from None
    if number < 0 or len(words) > 2:
        raise argparse.ArgumentTypeError(f"expected a size like '64 MB', got {text!r}")
    return number * unit


def _flag(text: str) -> bool:
    if text not in ("0", "1"):
        raise argparse.ArgumentTypeError(f"expected 0 or 1, got {text!r}")
    return text == "1"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line. Any thread."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True, help="tor's DataDirectory: keys, fingerprint")
    parser.add_argument("--orport", "--listen", dest="orport", type=parse_hostport,
                        default=("127.0.0.1", 0),
                        help="OR port address (default 127.0.0.1:0, any free port)")
    parser.add_argument("--address", help="address to publish (default: the OR port's)")
    parser.add_argument("--nickname", default="Unnamed")
    parser.add_argument("--contact", help="ContactInfo for the descriptor")
    parser.add_argument("--publish-tap-key", choices=("auto", "0", "1"), default="auto",
                        help="the TAP onion key in the descriptor: 1 always, 0 never, auto "
                             "(default) with it until an authority refuses the descriptor "
                             "(authorities after tor 0.4.9.11 refuse TAP keys)")
    parser.add_argument("--dirauth", action="append", type=_dir_authority, default=[],
                        metavar="LINE", help="a DirAuthority line (repeatable)")
    parser.add_argument("--exit-policy", default="",
                        help='ExitPolicy, e.g. "accept 127.0.0.1:7777, reject *:*" '
                             "(default: not an exit)")
    parser.add_argument("--exit-policy-reject-private", type=_flag, default=None,
                        metavar="0|1",
                        help="ExitPolicyRejectPrivate (default 1; 0 with --testing-network)")
    parser.add_argument("--extend-allow-private-addresses", type=_flag, default=None,
                        metavar="0|1", help="ExtendAllowPrivateAddresses (default 0; 1 with "
                                            "--testing-network)")
    parser.add_argument("--bridge", action="store_true", help="BridgeRelay 1")
    parser.add_argument("--max-mem-in-queues", type=_memory_size, default=0, metavar="SIZE",
                        help='MaxMemInQueues, e.g. "64 MB" (default: tor\'s, from the RAM)')
    parser.add_argument("--conn-limit", type=int, default=CONN_LIMIT_DEFAULT,
                        help=f"ConnLimit: descriptors the relay needs "
                             f"(default {CONN_LIMIT_DEFAULT})")
    for option, default in (("connection", 1), ("circuit-creation", 1), ("stream-creation", 0)):
        parser.add_argument(f"--dos-{option}-enabled", type=_flag, default=bool(default),
                            metavar="0|1", help=f"DoS{option.title().replace('-', '')}Enabled "
                                                f"(default {default}, as tor's consensus)")
    parser.add_argument("--testing-network", action="store_true", help="TestingTorNetwork 1")
    parser.add_argument("--plain-links", action="store_true",
                        help="plain TCP links, no TLS, no certificates (local demos only)")
    parser.add_argument("--threads", type=int, default=2, help="worker threads (default 2)")
    parser.add_argument("--batch-cells", type=int, default=DEFAULT_BATCH_CELLS,
                        help=f"worker batch cap in cells (default {DEFAULT_BATCH_CELLS})")
    parser.add_argument("--inline-cells", type=int, default=DEFAULT_INLINE_CELLS,
                        help="a circuit's batch of at most this many cells, with nothing on "
                             "the pool, is crypted on the loop thread; 0: always on the pool "
                             f"(default {DEFAULT_INLINE_CELLS})")
    parser.add_argument("--tls-on-pool", action="store_true",
                        help="TLS record crypto of open links on the worker pool (less loop "
                             "CPU per cell; the relay re-executes itself with glibc's "
                             "per-thread malloc cache off: see docs/tuning.md)")
    parser.add_argument("--tls-inline-bytes", type=int, default=DEFAULT_INLINE_TLS_BYTES,
                        help="with --tls-on-pool: a link's read or write of at most this many "
                             "bytes, with nothing of the link on the pool, is TLS-crypted on "
                             f"the loop thread (default {DEFAULT_INLINE_TLS_BYTES})")
    parser.add_argument("--max-circuits-per-link", type=int,
                        default=DEFAULT_MAX_CIRCUITS_PER_LINK,
                        help="CREATEs beyond this many circuits on one link get DESTROY "
                             f"(RESOURCELIMIT) (default {DEFAULT_MAX_CIRCUITS_PER_LINK})")
    parser.add_argument("--log-level", default="WARNING")
    parser.add_argument("--profile", action="store_true",
                        help="profile the loop thread (cProfile) into DATA_DIR/loop.prof")
    parser.add_argument("--exit-on-stdin-eof", action="store_true",
                        help="also exit when stdin ends (used by examples.network)")
    return parser.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> RelayConfig:
    """The node's configuration from the command line. Any thread."""
    host, port = args.orport
    return RelayConfig(
        nickname=args.nickname, or_host=host, or_port=port, address=args.address,
        dir_authorities=tuple(args.dirauth), exit_policy=split_policy(args.exit_policy),
        reject_private_exits=args.exit_policy_reject_private,
        allow_private_extends=args.extend_allow_private_addresses, bridge=args.bridge,
        testing_network=args.testing_network, contact=args.contact,
        publish_tap_key=None if args.publish_tap_key == "auto" else args.publish_tap_key == "1",
        plain_links=args.plain_links, threads=args.threads,
        max_mem_in_queues=args.max_mem_in_queues, conn_limit=args.conn_limit,
        dos=DosConfig(connection_enabled=args.dos_connection_enabled,
                      circuit_creation_enabled=args.dos_circuit_creation_enabled,
                      stream_creation_enabled=args.dos_stream_creation_enabled),
    )


def ready_line(node: RelayNode) -> str:
    """The READY line for ``node`` (see the module docstring). Loop thread only."""
    host, port = node.address
    identity = node.identity
    ed25519 = base64.b64encode(identity.ed25519_identity).decode().rstrip("=")
    extra = {"descriptor": node.descriptor().to_json(), "pid": os.getpid()}
    return (f"READY orport={host}:{port} fingerprint={identity.fingerprint} "
            f"ed25519={ed25519} {json.dumps(extra)}")


def main(argv: list[str] | None = None) -> int:
    """Run the relay until SIGTERM/SIGINT. Main thread (it becomes the loop thread)."""
    args = parse_args(argv)
    config = config_from_args(args)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format=f"%(asctime)s {config.nickname} %(name)s %(levelname)s "
                               "%(message)s")
    raise_nofile_limit()  # as tor: the soft descriptor limit up to the hard one
    identity = RelayIdentity.load_or_create(args.data_dir, config.nickname)
    with Reactor() as reactor:
        node = RelayNode(reactor, identity, config, batch_cells=args.batch_cells,
                         max_circuits_per_link=args.max_circuits_per_link,
                         inline_cells=args.inline_cells, tls_on_pool=args.tls_on_pool,
                         tls_inline_bytes=args.tls_inline_bytes)
        node.start()
        for signum in (signal.SIGTERM, signal.SIGINT):
            reactor.add_signal_handler(signum, reactor.stop)
        reactor.add_signal_handler(
            signal.SIGUSR1, lambda: print("STATS " + json.dumps(node.stats()), flush=True)
        )
        if args.exit_on_stdin_eof:
            stop_on_stdin_eof(reactor)
        print(ready_line(node), flush=True)
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


def reexec_without_thread_cache(argv: list[str]) -> None:
    """With ``--tls-on-pool``: run this same command again (``execve``: the same process id,
    stdio and environment) with glibc's per-thread cache of freed blocks off, which records
    made on the workers and freed on the loop thread otherwise turn into a creeping RSS
    (``workers.tuning.env_without_thread_cache``; docs/tuning.md). Returns when there is nothing
    to do (no ``--tls-on-pool``, not glibc, or already so). Main thread, before anything runs."""
    if not parse_args(argv).tls_on_pool:
        return
    env = env_without_thread_cache(os.environ)
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, env)


if __name__ == "__main__":
    reexec_without_thread_cache(sys.argv[1:])
    sys.exit(main())
