"""CREATE floods over several links of one address, each link driven by a :class:`CellPump`.

* :func:`replay_creates`: each link keeps ``window`` CREATEs outstanding, all with the same
  body (one CREATE2 onionskin replayed: it costs the flooder nothing, the relay a handshake);
  each answer is followed by a DESTROY of that circuit and a new CREATE, until the time is up.
  ``python -m benchmarks.attacks.flood`` runs it in a process of its own and prints the counts
  as JSON, so that the flooder's Python does not share a GIL with the bystander that measures
  the relay's latency meanwhile.
* :func:`open_circuits`: each link sends ``per_link`` CREATE_FASTs at once and reads every
  answer: how many circuits one address gets.

Each link runs on its own thread; the counts are summed when all are done.

Threads: the functions are called from one thread and run their own (joined before they
return).
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

from benchmarks.attacks.circuit import FIRST_CIRC_ID
from benchmarks.rawpeer import CellPump, RawPeer, fixed_cell
from relay.cells import CellCommand
from relay.handshakes import CreateFastClient

__all__ = ["FloodCounts", "main", "open_circuits", "replay_creates"]

_ANSWERS = frozenset({int(CellCommand.CREATED2), int(CellCommand.CREATED_FAST)})


@dataclass
class FloodCounts:
    """What the links of a flood got back."""

    links: int = 0
    links_failed: int = 0  # could not open (refused at accept, handshake failed)
    links_closed: int = 0  # closed by the relay during the flood
    sent: int = 0
    created: int = 0
    refused: int = 0
    reasons: Counter[int] = field(default_factory=Counter)
    seconds: float = 0.0

    def add(self, other: FloodCounts) -> None:
        """Sum ``other`` into this. Owner thread."""
        for name in ("links", "links_failed", "links_closed", "sent", "created", "refused"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.reasons.update(other.reasons)

    def to_json(self) -> dict[str, object]:
        """JSON-ready (reasons keyed by their number). Any thread."""
        out = asdict(self)
        out["reasons"] = {str(k): v for k, v in self.reasons.items()}
        return out


def _link(port: int, counts: FloodCounts) -> RawPeer | None:
    try:
        peer = RawPeer(port, timeout=10)
        peer.handshake()
    except (OSError, EOFError, AssertionError):
        counts.links_failed += 1
        return None
    counts.links += 1
    return peer


def _replay_one(port: int, command: int, body: bytes, window: int, deadline: float,
                counts: FloodCounts) -> None:
    peer = _link(port, counts)
    if peer is None:
        return
    next_id = FIRST_CIRC_ID

    def create() -> bytes:
        nonlocal next_id
        circ_id, next_id = next_id, 0x80000000 | ((next_id + 1) & 0x7FFFFFFF)
        counts.sent += 1
        return fixed_cell(circ_id, command, body)

    def on_cell(circ_id: int, got: int, payload: bytes) -> None:
        if got in _ANSWERS:
            counts.created += 1
            pump.queue(fixed_cell(circ_id, CellCommand.DESTROY, b"\x00") + create())
        elif got == CellCommand.DESTROY:
            counts.refused += 1
            counts.reasons[payload[0]] += 1
            pump.queue(create())

    pump = CellPump(peer, on_cell)
    pump.queue(b"".join(create() for _ in range(window)))
    try:
        pump.run(lambda: False, deadline)
        counts.links_closed += pump.closed
    finally:
        peer.close()


def replay_creates(port: int, links: int, seconds: float, *, body: bytes,
                   command: int = CellCommand.CREATE2, window: int = 32) -> FloodCounts:
    """Flood ``127.0.0.1:port`` from ``links`` links for ``seconds`` (see the module
    docstring). Owner thread (blocks)."""
    per_link = [FloodCounts() for _ in range(links)]
    started = time.monotonic()
    threads = [threading.Thread(target=_replay_one, daemon=True, name=f"flood-{i}",
                                args=(port, command, body, window, started + seconds, counts))
               for i, counts in enumerate(per_link)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(seconds + 30)
    total = FloodCounts(seconds=time.monotonic() - started)
    for counts in per_link:
        total.add(counts)
    return total


def _open_on_one(port: int, per_link: int, deadline: float, counts: FloodCounts,
                 ready: threading.Barrier) -> None:
    peer = _link(port, counts)
    try:
        ready.wait(30)  # every link is open before any sends: one address, N connections
    except threading.BrokenBarrierError:
        pass
    if peer is None:
        return
    answered = 0

    def on_cell(circ_id: int, got: int, payload: bytes) -> None:
        nonlocal answered
        if got == CellCommand.CREATED_FAST:
            counts.created += 1
            answered += 1
        elif got == CellCommand.DESTROY:
            counts.refused += 1
            counts.reasons[payload[0]] += 1
            answered += 1

    pump = CellPump(peer, on_cell)
    skin = CreateFastClient().onionskin  # the same X for all: only the count matters here
    pump.queue(b"".join(fixed_cell(FIRST_CIRC_ID + i, CellCommand.CREATE_FAST, skin)
                        for i in range(per_link)))
    counts.sent += per_link
    try:
        pump.run(lambda: answered >= per_link, deadline)
        counts.links_closed += pump.closed
    finally:
        peer.close()


def open_circuits(port: int, links: int, per_link: int, timeout: float) -> FloodCounts:
    """``links`` links, all opened first, then each sending ``per_link`` CREATE_FASTs at once;
    every answer counted. Owner thread (blocks)."""
    per = [FloodCounts() for _ in range(links)]
    ready = threading.Barrier(links)
    started = time.monotonic()
    threads = [threading.Thread(target=_open_on_one, daemon=True, name=f"circuits-{i}",
                                args=(port, per_link, started + timeout, counts, ready))
               for i, counts in enumerate(per)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout + 30)
    total = FloodCounts(seconds=time.monotonic() - started)
    for counts in per:
        total.add(counts)
    return total


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks.attacks.flood --port P --links N --seconds S --body HEX``: run
    :func:`replay_creates` and print its counts as one JSON line. Main thread."""
    parser = argparse.ArgumentParser(description="CREATE2 replay flood (one JSON line out)")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--links", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--window", type=int, default=32)
    parser.add_argument("--body", required=True, help="the CREATE2 payload, hex")
    args = parser.parse_args(argv)
    counts = replay_creates(args.port, args.links, args.seconds, body=bytes.fromhex(args.body),
                            window=args.window)
    print(json.dumps(counts.to_json()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
