"""Run ``examples.relay`` with one injected fault: the K-th circuit this relay creates gets
crypto that raises on its N-th batch (``--fail-circuit K --fail-batch N -- RELAY ARGS``).

Used by ``test_faults_network.py`` to put a crypto exception inside one circuit of a real relay
process: the exception is raised by the circuit's own crypto (on a worker, or on the loop thread
for a small batch), exactly where a broken kernel or a corrupted state would raise, and
everything around it (pool, circuit, links, the other circuits) is the unmodified relay. Not a
test module (no ``test_`` prefix).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # before the project imports

import examples.relay
import relay.node
from tor1.reference import HopKeys


class InjectedFault(RuntimeError):
    """The fault this launcher injects."""


class FaultyCrypto:
    """A circuit's real relay crypto that raises on its ``fail_batch``-th batch. Called by the
    worker owning the circuit, or by the loop thread for a small batch of an idle circuit:
    never by two threads at once."""

    def __init__(self, inner: Any, fail_batch: int) -> None:
        self._inner = inner
        self._fail_batch = fail_batch
        self._batches = 0

    def _count(self) -> None:
        self._batches += 1
        if self._batches == self._fail_batch:
            raise InjectedFault(f"injected on batch {self._batches}")

    def forward_tagged_buf(self, batch: Any) -> Any:
        self._count()
        return self._inner.forward_tagged_buf(batch)

    def backward_buf(self, batch: Any) -> Any:
        self._count()
        return self._inner.backward_buf(batch)

    def originate_tagged_buf(self, batch: Any) -> Any:
        self._count()
        return self._inner.originate_tagged_buf(batch)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fail-circuit", type=int, required=True)
    parser.add_argument("--fail-batch", type=int, required=True)
    parser.add_argument("relay_args", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    relay_args = [a for a in args.relay_args if a != "--"]
    real_factory = relay.node.relay_crypto_for
    created = [0]

    def factory(keys: HopKeys) -> Any:
        created[0] += 1
        crypto = real_factory(keys)
        return FaultyCrypto(crypto, args.fail_batch) if created[0] == args.fail_circuit else crypto

    relay.node.relay_crypto_for = factory  # type: ignore[assignment]
    return examples.relay.main(relay_args)


if __name__ == "__main__":
    sys.exit(main())
