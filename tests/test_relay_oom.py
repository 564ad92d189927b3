"""MaxMemInQueues: a client that never reads makes its circuits queue cells at the relay; past
the limit, tor's OOM handler closes the circuits with the oldest queued cells until the total
is back under 90% of it.

Before, a guard whose client never read grew without bound (36 -> 95 MiB in 16 s and still
growing: the sniper attack). The limit here is 2 MiB (tor itself will not go below 64 MiB; the
node takes a smaller one for tests and benchmarks): each circuit's exit may queue a package
window of cells (1,000, about 500 KB, filled by 3 streams of 500 each) for the client, so 20
circuits hold about 10 MB for it: past the limit even when the kernel has taken the 4 MiB its
send buffer may grow to on loopback (with one stream per circuit, 5 MB, the kernel's share
decided whether the limit was reached at all).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
from reliability_support import EndlessSource, memory_limited_exit
from support_loop import run_until_met

from benchmarks.rawpeer import RawPeer
from reactor import Reactor
from relay.cells import CellCommand, DestroyReason, RelayCommand
from relay.circuits import pack_relay

pytestmark = pytest.mark.timeout(120)

LIMIT = 2 << 20
CIRCUITS = 20
STREAMS = 3  # per circuit: together past the stream window, so the circuit window binds


@pytest.fixture
def reactor() -> Iterator[Reactor]:
    with Reactor() as loop:
        yield loop


def test_the_oom_handler_closes_the_oldest_circuits_and_holds_the_limit(
    reactor: Reactor, tmp_path_factory: pytest.TempPathFactory
) -> None:
    node = memory_limited_exit(reactor, tmp_path_factory.mktemp("oom") / "r", "oom", LIMIT)
    source = EndlessSource()
    destroys: list[int] = []
    done = threading.Event()
    started = threading.Event()

    def client() -> None:
        peer = RawPeer(node.address[1], rcvbuf=4096)
        try:
            peer.handshake()
            target = f"{source.address[0]}:{source.address[1]}".encode() + b"\0"
            cryptos = [peer.create_fast(0x80000001 + i) for i in range(CIRCUITS)]
            for i, crypto in enumerate(cryptos):
                for stream_id in range(1, STREAMS + 1):
                    begin = pack_relay(RelayCommand.BEGIN, stream_id, target)
                    peer.send_cell(0x80000001 + i, CellCommand.RELAY, crypto.encrypt(begin, 0))
            started.set()
            done.wait(60)  # reads nothing while the relay fills its queues
            peer.sock.settimeout(5)
            try:  # then drain what came, counting the DESTROYs the OOM handler sent
                while True:
                    _, command, payload = peer.recv_cell()
                    if command == CellCommand.DESTROY:
                        destroys.append(payload[0])
            except (TimeoutError, EOFError, OSError):
                pass
        finally:
            peer.close()

    thread = threading.Thread(target=client, daemon=True)
    thread.start()
    try:
        run_until_met(reactor, lambda: node.oom_closes > 0, 60)
        stats = node.stats()
        assert stats["queued_bytes"] < LIMIT
        assert 0 < stats["oom_closes"] < CIRCUITS and stats["circuits_open"] >= 1
        done.set()
        run_until_met(reactor, lambda: not thread.is_alive(), 60)
        assert destroys and set(destroys) == {DestroyReason.RESOURCELIMIT}
    finally:
        done.set()
        node.close()
        source.close()
