"""The stand-in external relay: ``python -m tornet.standin`` runs a real tor from relay options.

It takes exactly the options an external relay gets (:mod:`tornet.external`):
``--testing-network --nickname NAME --data-dir DIR --orport 127.0.0.1:PORT --dirauth LINE...
--exit-policy POLICY [--bridge]``, writes a torrc from them (:func:`tornet.torrc.relay`, tor's
DataDirectory in ``DIR/data``, its log ``DIR/tor.log``), starts tor, and once tor's OR
listener is open and its identity files exist prints
``READY orport=127.0.0.1:PORT fingerprint=HEX40 ed25519=BASE64``. It then runs until SIGTERM or
SIGINT, until its stdin ends when stdin is a pipe (the network that started it is gone), or
until tor dies (exit status 1, tor's log tail on stderr). In every case it stops its tor before
exiting; its tor also exits by itself if the stand-in is killed (``__OwningControllerProcess``).

It exists so the network has external relays -- started through the same command line and READY
line as relaycrypt's relays will be -- before relaycrypt's relay speaks enough of Tor.

Threads: main thread (``main``).
"""

from __future__ import annotations

import argparse
import os
import stat
import sys
import threading
import time
from pathlib import Path

from tornet import torrc
from tornet.external import format_ready
from tornet.keys import read_identity
from tornet.netns import LOOPBACK, NetPlace
from tornet.procs import Interrupted, NetworkFailed, ProcessGroup, signals_interrupt
from tornet.tornode import OR_LISTENER_READY, TorNode, find_program, start_tor, wait_log

__all__ = ["main"]


def _orport(text: str) -> int:
    host, _, port = text.rpartition(":")
    if host != LOOPBACK or not port.isdigit():
        raise argparse.ArgumentTypeError(f"--orport must be {LOOPBACK}:PORT, got {text!r}")
    return int(port)


def _watch_stdin(done: threading.Event) -> None:
    """When stdin is a pipe, set ``done`` at its EOF (a daemon thread blocks on it)."""
    try:
        if not stat.S_ISFIFO(os.fstat(0).st_mode):
            return
    except OSError:
        return

    def watch() -> None:
        try:
            while os.read(0, 4096):
                pass
        except OSError:
            pass
        done.set()

    threading.Thread(target=watch, name="stdin-watch", daemon=True).start()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The external-relay options. Main thread."""
    parser = argparse.ArgumentParser(prog="python -m tornet.standin",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--dirauth", action="append", required=True,
                        help="a DirAuthority line of the network (repeatable)")
    parser.add_argument("--exit-policy", default="reject *:*")
    parser.add_argument("--bridge", action="store_true")
    parser.add_argument("--testing-network", action="store_true")
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--nickname", required=True)
    parser.add_argument("--orport", type=_orport, required=True,
                        help=f"{LOOPBACK}:PORT to listen on")
    parser.add_argument("--timeout", type=float, default=60.0,
                        help="seconds to wait for tor's OR listener")
    args = parser.parse_args(argv)
    if not args.testing_network:
        parser.error("the stand-in runs only in a test network: pass --testing-network")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the stand-in relay (see the module docstring). Main thread."""
    args = parse_args(argv)
    tor = find_program("tor")
    if tor is None:
        print("standin: tor is not installed", file=sys.stderr)
        return 2
    place = NetPlace(want_namespace=False)  # already inside the network's place
    group = ProcessGroup(place)
    node = TorNode(args.nickname, "relay", args.data_dir.resolve(), orport=args.orport)
    done = threading.Event()
    status = 0
    with signals_interrupt() as quiet:
        try:
            base = torrc.common(nickname=args.nickname, data_dir=node.data_dir,
                                log_file=node.log_file, dirauths=args.dirauth,
                                control_port=None, owner_pid=os.getpid())
            start_tor(group, tor, node, torrc.relay(
                base, orport=args.orport, resolv_conf=node.resolv_conf,
                exit_policy=args.exit_policy, bridge=args.bridge))
            wait_log(node, OR_LISTENER_READY, args.timeout, group.check)
            fingerprint, ed25519 = _identity(node, group)
            print(format_ready(args.orport, fingerprint, ed25519), flush=True)
            _watch_stdin(done)
            while not done.wait(0.2):
                group.check()
        except Interrupted:
            pass
        except NetworkFailed as exc:
            print(f"standin {args.nickname}: {exc}", file=sys.stderr)
            status = 1
        finally:
            quiet.set()
            group.stop_all()
            place.close()
    return status


def _identity(node: TorNode, group: ProcessGroup, timeout: float = 10.0) -> tuple[str, str]:
    deadline = time.monotonic() + timeout
    while True:
        group.check()
        try:
            fingerprint, ed25519 = read_identity(node.data_dir)
            if ed25519:
                return fingerprint, ed25519
        except FileNotFoundError:
            pass
        if time.monotonic() > deadline:
            raise NetworkFailed(f"{node.name}: tor wrote no identity files in {node.data_dir}")
        time.sleep(0.05)


if __name__ == "__main__":
    sys.exit(main())
