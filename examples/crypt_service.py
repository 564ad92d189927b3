"""What the asyncio and trio embedding examples share: the protocol, the crypto, the check.

The service (``examples.embedding_asyncio``, ``examples.embedding_trio``) is a TCP server on
loopback that acts as a middle relay for each connection: the client sends a 16-byte circuit
seed, then relay cells (509 bytes each), then closes its sending side; the service crypts every
cell with that circuit's forward relay crypto (tor1, keys derived from the seed with KDF-TOR) on
the worker pool and writes the crypted cells back in order, then closes. The client compares
every byte it gets with the pure-Python reference (``tor1.reference.RelayCrypto``) crypting the
same cells in order.

Per connection the service keeps at most :data:`WINDOW_CELLS` cells submitted and not yet
written back: it stops reading above that (the pool's own marks bound only what is in flight
inside the pool, not results waiting for a slow client).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from typing import Any

from tor1 import CELL_PAYLOAD_LEN
from tor1 import backend as crypto_backend
from tor1.reference import HOP_MATERIAL_LEN, HopKeys, RelayCrypto, kdf_tor

CELL = CELL_PAYLOAD_LEN
SEED_LEN = 16
#: Cells submitted and not yet written back, per connection, before the service stops reading.
WINDOW_CELLS = 2048
#: Bytes the client writes at a time (32 cells, a TLS record's worth).
CLIENT_CHUNK = 32 * CELL
READ_SIZE = 1 << 16


def circuit_keys(seed: bytes) -> HopKeys:
    """The circuit's relay keys, from its seed. Any thread (pure)."""
    return HopKeys.from_material(kdf_tor(b"crypt-service:" + seed, HOP_MATERIAL_LEN))


def seed_for(index: int) -> bytes:
    """Client ``index``'s circuit seed. Any thread (pure)."""
    return kdf_tor(b"seed-%d" % index, SEED_LEN)


def cells_for(index: int, count: int) -> bytes:
    """``count`` deterministic cells for client ``index``. Any thread (pure)."""
    pattern = kdf_tor(b"cells-%d" % index, 5120)
    return (pattern * (count * CELL // len(pattern) + 1))[: count * CELL]


def reference_output(seed: bytes, data: bytes) -> bytes:
    """What the service must send back: the reference crypting the cells in order. Any
    thread (pure)."""
    reference = RelayCrypto(circuit_keys(seed))
    return b"".join(reference.forward(data[o:o + CELL])[1] for o in range(0, len(data), CELL))


def forward(state: Any, lane: int, batch: bytes) -> tuple[bytes, bytes]:
    """The pool's process function: one batch of a circuit's cells, in order. Worker thread."""
    return state.forward_buf(batch)


def new_circuit_state(seed: bytes) -> Any:
    """The circuit's crypto state for the pool (the C kernel unless RELAYCRYPT_PURE=1)."""
    return crypto_backend.relay_crypto_for(circuit_keys(seed))


def pool_options(threads: int) -> dict[str, Any]:
    """The WorkerPool options both services use. Loop thread."""
    options: dict[str, Any] = {"threads": threads, "process": forward, "joined": True,
                               "cell_size": CELL, "lanes": 1}
    if crypto_backend.backend_name() == "kernel":
        from tor1.fast import relay_group

        options["group"] = relay_group()
    return options


def parser(description: str) -> argparse.ArgumentParser:
    """The command line both examples take."""
    result = argparse.ArgumentParser(description=description)
    result.add_argument("--circuits", type=int, default=16, help="client connections")
    result.add_argument("--cells", type=int, default=1024, help="cells per connection")
    result.add_argument("--threads", type=int, default=2, help="worker threads")
    result.add_argument("--json", action="store_true", help="print one JSON object")
    return result


def report(result: dict[str, Any], as_json: bool) -> int:
    """Print the result; the exit status (1 if any byte differed)."""
    if as_json:
        print(json.dumps(result))
    else:
        print(f"{'OK' if result['ok'] else 'FAILED'}: {result['circuits_intact']} of "
              f"{result['circuits']} connections got back exactly the reference's bytes "
              f"({result['loop']}, {result['backend']} backend)")
        print(f"  {result['cells']:,} cells through the service in {result['elapsed_s']} s: "
              f"{result['cells_per_s']:,} cells/s; {result['wakeups_per_cell']} loop wake-ups "
              f"per cell, mean worker batch {result['batch_mean']:.0f} cells")
    return 0 if result["ok"] else 1


def summary(loop: str, intact: Sequence[bool], cells: int, elapsed: float,
            stats: dict[str, Any]) -> dict[str, Any]:
    """The result document of one run. Any thread (pure)."""
    delivered = stats["delivered"]
    return {
        "loop": loop,
        "backend": crypto_backend.backend_name(),
        "circuits": len(intact),
        "circuits_intact": sum(intact),
        "cells": cells,
        "ok": all(intact) and delivered == cells,
        "elapsed_s": round(elapsed, 3),
        "cells_per_s": round(cells / elapsed) if elapsed else 0,
        "batch_mean": stats["batch_mean"],
        "wakeups_per_cell": round(stats["replies"]["wakeups_sent"] / cells, 5) if cells else 0,
        "pool_delivered": delivered,
    }
