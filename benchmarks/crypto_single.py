"""Single-thread throughput of the pure-Python tor1 reference (tor1.reference).

Measures, in cells per second on the calling thread:

* ``forward_many``: a middle relay of a 3-hop circuit decrypting cells meant for the exit
  (the common case for a relay: decrypt, check ``recognized``, pass on). The cells are real:
  made by an OriginCrypto and peeled by the guard beforehand, outside the timed region.
* ``forward_many`` at the exit: the same cells one hop later, all recognized (SHA-1 per cell).
* ``encrypt_many``: the client encrypting cells for hop 3 of 3 (digest + three AES layers).
* the one-cell ``forward`` and ``encrypt`` calls on the same inputs, for comparison.

Each measurement runs the whole cell list in batches of ``--batch`` cells on a fresh circuit,
``--repeat`` times; the best and median rates are printed. Run::

    python -m benchmarks.crypto_single [--cells N] [--batch B] [--repeat R] [--json]

Single-threaded by design; nothing here is shared between threads.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable, Sequence

from relay.cells import RelayCommand, RelayPayload
from tor1 import RELAY_DATA_MAX
from tor1.reference import HOP_MATERIAL_LEN, HopKeys, OriginCrypto, RelayCrypto, kdf_tor

HOPS = 3


def _circuit_keys(seed: int) -> list[HopKeys]:
    return [HopKeys.from_material(kdf_tor(bytes([seed, i]), HOP_MATERIAL_LEN)) for i in range(HOPS)]


def _plain_payloads(count: int) -> list[bytes]:
    data = os.urandom(RELAY_DATA_MAX)
    return [RelayPayload(RelayCommand.DATA, stream_id=i & 0xFFFF, data=data).pack()
            for i in range(count)]


def _batches(items: Sequence[bytes], size: int) -> list[list[bytes]]:
    return [list(items[i : i + size]) for i in range(0, len(items), size)]


def _rate(
    run: Callable[[], None], cells: int, repeat: int, make: Callable[[], None]
) -> list[float]:
    rates = []
    for _ in range(repeat):
        make()
        start = time.perf_counter()
        run()
        rates.append(cells / (time.perf_counter() - start))
    return rates


def measure(cells: int, batch: int, repeat: int) -> dict[str, dict[str, float]]:
    """Return ``{name: {"best": cells/s, "median": cells/s}}`` for each measurement."""
    keys = _circuit_keys(1)
    plain = _plain_payloads(cells)

    # Cells as they reach the middle relay: encrypted for the exit, guard layer removed.
    origin = OriginCrypto(keys)
    guard = RelayCrypto(keys[0])
    at_middle = [w for _, w in guard.forward_many(origin.encrypt_many(plain, HOPS - 1))]
    middle_batches = _batches(at_middle, batch)
    at_exit = [w for _, w in RelayCrypto(keys[1]).forward_many(at_middle)]
    exit_batches = _batches(at_exit, batch)
    plain_batches = _batches(plain, batch)

    state: dict[str, object] = {}

    def fresh() -> None:
        state["relay"] = RelayCrypto(keys[1])
        state["exit"] = RelayCrypto(keys[2])
        state["origin"] = OriginCrypto(keys)

    def forward_many() -> None:
        relay = state["relay"]
        assert isinstance(relay, RelayCrypto)
        for b in middle_batches:
            relay.forward_many(b)

    def forward_many_exit() -> None:
        relay = state["exit"]
        assert isinstance(relay, RelayCrypto)
        for b in exit_batches:
            relay.forward_many(b)

    def forward_one() -> None:
        relay = state["relay"]
        assert isinstance(relay, RelayCrypto)
        for cell in at_middle:
            relay.forward(cell)

    def encrypt_many() -> None:
        client = state["origin"]
        assert isinstance(client, OriginCrypto)
        for b in plain_batches:
            client.encrypt_many(b, HOPS - 1)

    def encrypt_one() -> None:
        client = state["origin"]
        assert isinstance(client, OriginCrypto)
        for cell in plain:
            client.encrypt(cell, HOPS - 1)

    # Sanity: the middle relay must pass every cell on (none is for it).
    check = RelayCrypto(keys[1]).forward_many(at_middle[:batch])
    assert not any(ok for ok, _ in check)
    assert all(ok for ok, _ in RelayCrypto(keys[2]).forward_many(at_exit[:batch]))

    results: dict[str, dict[str, float]] = {}
    for name, run in (
        ("forward_many", forward_many),
        ("forward", forward_one),
        ("forward_many_exit", forward_many_exit),
        ("encrypt_many_3hops", encrypt_many),
        ("encrypt_3hops", encrypt_one),
    ):
        rates = _rate(run, cells, repeat, fresh)
        results[name] = {"best": max(rates), "median": statistics.median(rates)}
    return results


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=50_000, help="cells per run")
    parser.add_argument("--batch", type=int, default=32, help="cells per *_many call")
    parser.add_argument("--repeat", type=int, default=5, help="runs per measurement")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    results = measure(args.cells, args.batch, args.repeat)
    if args.json:
        print(json.dumps({"cells": args.cells, "batch": args.batch, "repeat": args.repeat,
                          "cells_per_second": results}, indent=2))
        return
    print(f"tor1 pure-Python reference, one thread, {args.cells} cells, batch {args.batch}, "
          f"best/median of {args.repeat}")
    for name, r in results.items():
        print(f"  {name:<20} {r['best']:>12,.0f} cells/s   (median {r['median']:,.0f})")


if __name__ == "__main__":
    main()
