"""Flow control and failure through real relay processes, driven by an in-process client.

* A slow reader behind the exit: SENDME windows stop the sender (it does not flood the exit);
  once the reader reads, every byte arrives intact.
* A relay killed mid-transfer: the client reports exactly the circuits through it as failed,
  the others finish intact, and nothing hangs.
"""

from __future__ import annotations

import hashlib
import random
import socket
import threading
from collections.abc import Iterator

import pytest
from support_loop import run_until_met

from examples.client import EchoTransfer
from examples.network import LocalNetwork
from reactor import Reactor
from relay.client import Client, ClientStream, OriginCircuit


@pytest.fixture
def network3() -> Iterator[LocalNetwork]:
    with LocalNetwork(3, threads=2) as net:
        yield net


class SlowReader:
    """A TCP server that accepts one connection and reads nothing until ``release()``."""

    def __init__(self, expected: int) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(1)
        self.port = self.sock.getsockname()[1]
        self.expected = expected
        self.received = hashlib.sha256()
        self.count = 0
        self._release = threading.Event()
        self.finished = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def release(self) -> None:
        self._release.set()

    def _run(self) -> None:
        conn, _ = self.sock.accept()
        with conn:
            self._release.wait(60)
            while self.count < self.expected:
                chunk = conn.recv(1 << 16)
                if not chunk:
                    break
                self.received.update(chunk)
                self.count += len(chunk)
        self.finished.set()
        self.sock.close()


def test_sendme_windows_stop_a_fast_sender_at_a_slow_reader(network3: LocalNetwork) -> None:
    total = 16 << 20
    data = random.Random(7).randbytes(total)
    reader = SlowReader(total)
    with Reactor() as reactor:
        client = Client(reactor)
        holder: dict[str, object] = {}

        def opened(circuit: OriginCircuit) -> None:
            holder["stream"] = circuit.open_stream(
                "127.0.0.1", reader.port, on_connected=lambda s: s.write(data))

        circuit = client.build_circuit(network3.descriptors, on_open=opened)
        sent_history: list[int] = []

        def stalled() -> bool:
            stream = holder.get("stream")
            if not isinstance(stream, ClientStream) or not stream.connected:
                return False
            sent_history.append(stream.bytes_sent)
            # unchanged for one second (100 polls of 10 ms), with something sent
            return len(sent_history) > 100 and len(set(sent_history[-100:])) == 1 > 0

        run_until_met(reactor, stalled, 60)
        stream = holder["stream"]
        assert isinstance(stream, ClientStream)
        stalled_at = stream.bytes_sent
        assert 0 < stalled_at < total // 2, stalled_at
        # The sender stopped because a window is closed, not for another reason.
        assert stream.package_window == 0 or circuit.package_window == 0
        assert stream.queued == total - stalled_at

        reader.release()
        run_until_met(reactor, reader.finished.is_set, 60)
        assert stream.bytes_sent == total
        client.close()
    assert reader.count == total
    assert reader.received.digest() == hashlib.sha256(data).digest()


def test_relay_killed_mid_transfer_fails_only_its_circuits() -> None:
    circuits = 8
    with LocalNetwork(4, threads=2) as net, Reactor() as reactor:
        transfer = EchoTransfer(reactor, net.descriptors, net.echo_address,
                                circuits=circuits, bytes_per_circuit=3 << 20,
                                stall_timeout=20)
        victim = net.relays[3]
        unfinished_at_kill: set[int] = set()

        def kill_when_moving() -> bool:
            progress = transfer.progress()
            if not unfinished_at_kill and progress["bytes_echoed"] >= progress[
                "bytes_total"
            ] // 20:
                unfinished_at_kill.update(j.index for j in transfer.jobs if not j.finished)
                victim.kill()
            return transfer.finished

        transfer.start()
        run_until_met(reactor, kill_when_moving, 90)
        results = transfer.results()
    through_victim = {job.index for job in transfer.jobs
                      if victim.name in [d.nickname for d in job.path]}
    assert through_victim == {1, 2, 3, 5, 6, 7}  # circuit i uses relays i, i+1, i+2 mod 4
    failed = {failure["circuit"] for failure in results["failures"]}
    assert failed == through_victim & unfinished_at_kill
    assert failed, "the kill came too late to hit any circuit"
    for failure in results["failures"]:
        assert "DESTROY" in failure["reason"] or "link" in failure["reason"], failure
        assert failure["bytes_echoed"] < 3 << 20
    survivors = [job for job in transfer.jobs if job.index not in failed]
    assert survivors and all(job.done and job.intact == 3 << 20 for job in survivors)
    assert results["bytes_echoed_intact"] == sum(job.intact for job in transfer.jobs)
