"""Embedding the loop-plus-workers core in an application that already has a pyuv loop.

``python -m examples.embedding`` plays an event-driven application that owns its loop and
drives it itself (``loop.run()``), with a timer of its own that ticks every millisecond. Into
that loop it plugs relaycrypt's core:

* ``Reactor(loop)`` wraps the application's loop instead of creating one;
* ``WorkerPool.attach(reactor, ...)`` starts the worker threads and the ``ReplyQueue`` whose
  ``uv.Async`` wakes the loop when results are ready;
* ``pool.open_circuit(state, on_result=...)`` per circuit, with the circuit's tor1 relay crypto
  state (``tor1.backend.relay_crypto_for``: the C kernel unless RELAYCRYPT_PURE=1).

The application's own timer feeds cells (joined buffers of 32 cells, as a relay would after
reading a socket) to ``--circuits`` circuits, and ``on_result`` collects the decrypted cells on
the loop thread. At the end every circuit's output is compared byte for byte with the pure
Python reference crypting the same cells in order, and the program prints cells/s, wake-ups per
cell and how many times the application's timer ran meanwhile (the loop stayed responsive).
``--json`` prints the same as one object. Exit status 1 if any byte differs.

Threads: everything here runs on the application's (loop) thread except the pool's workers;
the only calls that cross threads are inside the pool and its reply queue.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

import pyuv

from reactor import Reactor, ReplyQueue
from tor1 import CELL_PAYLOAD_LEN
from tor1 import backend as crypto_backend
from tor1.reference import HOP_MATERIAL_LEN, HopKeys, RelayCrypto, kdf_tor
from workers.circuit import Circuit
from workers.pool import WorkerPool

FORWARD = 0
CHUNK_CELLS = 32


def crypt(state: Any, direction: int, batch: Any) -> Any:
    """The pool's process function: one batch of a circuit, in order. Worker thread."""
    if direction != FORWARD:
        raise ValueError(f"this example only crypts forward cells, not direction {direction}")
    return state.forward_buf(batch)


class EmbeddingDemo:
    """The application: its own loop, its own timer, and relaycrypt's core plugged in."""

    def __init__(self, circuits: int, cells: int, threads: int) -> None:
        """Build the loop, the reactor over it, the pool and the circuits. Loop thread only."""
        self.loop = pyuv.Loop()
        self.reactor = Reactor(self.loop)
        group = None
        if crypto_backend.backend_name() == "kernel":
            from tor1.fast import relay_group

            group = relay_group()
        # WorkerPool.attach(reactor, ...) does these three steps in one call; spelled out here
        # to show the wiring: results travel worker -> ReplyQueue -> pool.deliver (loop thread)
        # -> on_result.
        self.pool = WorkerPool(None, threads=threads, process=crypt, group=group, joined=True,
                               cell_size=CELL_PAYLOAD_LEN, lanes=1)
        self.replies = ReplyQueue(self.reactor, self.pool.deliver)
        self.pool.set_replies(self.replies, owned=True)  # pool.close() closes it
        self.pool.start()
        self.cells_per_circuit = cells
        self.keys = [HopKeys.from_material(kdf_tor(b"embedding-%d" % i, HOP_MATERIAL_LEN))
                     for i in range(circuits)]
        self.inputs = [_cells_for(i, cells) for i in range(circuits)]
        self.outputs: list[list[bytes]] = [[] for _ in range(circuits)]
        self.circuits: list[Circuit] = [
            self.pool.open_circuit(crypto_backend.relay_crypto_for(k), on_result=self.on_result,
                                   context=i)
            for i, k in enumerate(self.keys)
        ]
        self.sent = 0
        self.received = 0
        self.ticks = 0
        self.offset = 0
        self.app_timer = pyuv.Timer(self.loop)
        self.started = 0.0
        self.elapsed = 0.0

    def on_result(self, circuit: Circuit, direction: int, result: Any) -> None:
        """A batch of one circuit came back: keep its cells. Loop thread only."""
        out, _recognized = result
        self.outputs[circuit.context].append(out)
        self.received += len(out) // CELL_PAYLOAD_LEN
        if self.received == self.sent and self.offset >= self.cells_per_circuit * CELL_PAYLOAD_LEN:
            self.finish()

    def tick(self, timer: pyuv.Timer) -> None:
        """The application's own 1 ms timer: it also feeds the next chunk of every circuit."""
        self.ticks += 1
        if self.offset >= self.cells_per_circuit * CELL_PAYLOAD_LEN:
            return
        end = min(self.offset + CHUNK_CELLS * CELL_PAYLOAD_LEN * 8,
                  self.cells_per_circuit * CELL_PAYLOAD_LEN)
        work = [(c, FORWARD, self.inputs[i][self.offset:end])
                for i, c in enumerate(self.circuits)]
        self.sent += (end - self.offset) // CELL_PAYLOAD_LEN * len(self.circuits)
        self.offset = end
        self.pool.submit_many(work)

    def finish(self) -> None:
        """Everything came back: stop the application's timer so ``loop.run()`` returns."""
        self.elapsed = time.perf_counter() - self.started
        self.app_timer.stop()
        self.app_timer.close()

    def run(self) -> dict[str, Any]:
        """Drive the loop the way the application always has, then check. Loop thread."""
        self.started = time.perf_counter()
        self.app_timer.start(self.tick, 0.001, 0.001)
        self.loop.run()  # the application's own call: the Reactor needs no run() of its own
        pool_stats = self.pool.stats()
        wakeups = self.replies.stats()["wakeups_sent"]
        self.pool.close()
        self.reactor.close()
        intact = sum(self.check(i) for i in range(len(self.circuits)))
        return {
            "backend": crypto_backend.backend_name(),
            "circuits": len(self.circuits),
            "cells": self.received,
            "circuits_intact": intact,
            "ok": intact == len(self.circuits) and self.received == self.sent,
            "cells_per_s": round(self.received / self.elapsed) if self.elapsed else 0,
            "app_timer_ticks": self.ticks,
            "elapsed_s": round(self.elapsed, 3),
            "batch_mean": pool_stats["batch_mean"],
            "wakeups_per_cell": round(wakeups / self.received, 5) if self.received else 0.0,
        }

    def check(self, index: int) -> bool:
        """Compare circuit ``index``'s output with the reference, cell by cell, in order."""
        reference = RelayCrypto(self.keys[index])
        data = self.inputs[index]
        expected = b"".join(reference.forward(data[o:o + CELL_PAYLOAD_LEN])[1]
                            for o in range(0, len(data), CELL_PAYLOAD_LEN))
        return b"".join(self.outputs[index]) == expected


def _cells_for(index: int, count: int) -> bytes:
    """Deterministic ciphertext-looking cells for circuit ``index`` (not for this relay)."""
    seed = kdf_tor(b"cells-%d" % index, 5120)
    repeats = count * CELL_PAYLOAD_LEN // len(seed) + 1
    return (seed * repeats)[: count * CELL_PAYLOAD_LEN]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--circuits", type=int, default=64, help="circuits (default %(default)s)")
    parser.add_argument("--cells", type=int, default=2048,
                        help="cells per circuit (default %(default)s)")
    parser.add_argument("--threads", type=int, default=2, help="worker threads")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    result = EmbeddingDemo(args.circuits, args.cells, args.threads).run()
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{'OK' if result['ok'] else 'FAILED'}: {result['circuits_intact']} of "
              f"{result['circuits']} circuits byte-identical to the reference "
              f"({result['backend']} backend)")
        print(f"  {result['cells']:,} cells in {result['elapsed_s']} s: "
              f"{result['cells_per_s']:,} cells/s; the application's own 1 ms timer ran "
              f"{result['app_timer_ticks']} times meanwhile")
        print(f"  {result['wakeups_per_cell']} loop wake-ups per cell, mean worker batch "
              f"{result['batch_mean']:.0f} cells")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
