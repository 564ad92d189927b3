"""Run ``examples.relay`` as an exit whose circuit SENDMEs are wrong: ``--sendme v0`` sends them
with an empty body (version 0), ``--sendme forged`` as version 1 with one bit of the tag flipped
(``forging_relay.py --sendme MODE -- RELAY ARGS``).

Used by ``test_sendme_network.py`` to check that our client refuses an exit's SENDMEs that
tor 0.4.9 would refuse. Only the body encoder of ``relay.exit`` is replaced; everything else is
the unmodified relay. Not a test module (no ``test_`` prefix).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # before the project imports

import examples.relay
import relay.exit
from relay.sendme import encode_sendme_v1


def forged_v1(tag: bytes) -> bytes:
    """A version-1 body whose tag has its first bit flipped. Any thread (pure)."""
    return encode_sendme_v1(bytes([tag[0] ^ 0x80]) + tag[1:])


def version_0(tag: bytes) -> bytes:
    """An empty body: a version-0 SENDME. Any thread (pure)."""
    return b""


ENCODERS: dict[str, Callable[[bytes], bytes]] = {"v0": version_0, "forged": forged_v1}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sendme", choices=sorted(ENCODERS), required=True)
    parser.add_argument("relay_args", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    relay.exit.encode_sendme_v1 = ENCODERS[args.sendme]  # type: ignore[assignment]
    return examples.relay.main([a for a in args.relay_args if a != "--"])


if __name__ == "__main__":
    sys.exit(main())
