"""Fault injection in a relay network of real processes on loopback (``examples.network``):
a relay SIGKILLed mid-transfer, random circuit closes, a peer that stops reading, a peer that
opens circuits without limit, and a worker exception inside one circuit of a relay.

What is checked, and why
------------------------
A relay network must contain faults: what breaks is the circuits that cross the fault, and only
those. For each fault the test records *what the client sees* (the close reason its circuits
get), checks that **every other circuit echoes every byte intact** (zero cells lost), that
**nothing hangs** (every affected circuit is closed with a reason within a generous bound, and
the whole run ends), that the surviving relays still serve new circuits, and that they logged
no traceback. The client runs in this process on a Reactor; the echo service and the relays are
child processes; circuits are built on explicit paths so the test knows which ones cross the
fault. The figures printed (``FIGURES`` lines, ``pytest -s``) feed docs/reliability.md.
"""

from __future__ import annotations

import random
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from reliability_support import (
    EchoJob,
    EchoJobs,
    EndlessSource,
    relay_stats,
    stop_cleanly,
    tracebacks_in_log,
)
from support_loop import run_until

from benchmarks.rawpeer import RawPeer, fixed_cell
from examples.network import ChildProcess, LocalNetwork
from examples.soak import process_sample
from reactor import Reactor
from relay.cells import (
    CellCommand,
    DestroyReason,
    RelayCommand,
)
from relay.circuits import pack_relay
from relay.directory import RelayDescriptor
from relay.handshakes import CreateFastClient
from tor1.reference import HopKeys, OriginCrypto

pytestmark = pytest.mark.timeout(180)

BASE = memoryview(random.Random(8).randbytes(4 << 20))


def data_for(index: int, size: int) -> memoryview:
    """Distinct bytes per job (a slice of one shared random buffer: no copy per job)."""
    offset = (index * 104729) % (len(BASE) - size)
    return BASE[offset : offset + size]


@pytest.fixture
def reactor() -> Iterator[Reactor]:
    r = Reactor()
    yield r
    r.close()


def start_network(relays: int, *relay_args: str) -> LocalNetwork:
    net = LocalNetwork(relays, threads=2, relay_args=["--log-level", "INFO", *relay_args])
    net.start()
    return net


def check_survivors(net: LocalNetwork, skip: set[str] = frozenset()) -> None:  # type: ignore[assignment]
    """Every relay still running logged no traceback, kept its worker threads, and holds no
    circuit once the client has closed everything."""
    for child in net.relays:
        if child.name in skip:
            continue
        assert not tracebacks_in_log(child), child.log_tail(40)
        deadline = time.monotonic() + 10
        while True:
            stats = relay_stats(child)
            if stats["circuits_open"] == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert stats["circuits_open"] == 0, (child.name, stats)
        assert stats["worker_threads_alive"] == stats["threads"], (child.name, stats)


def fresh_circuit_works(reactor: Reactor, echo: tuple[str, int],
                        path: list[RelayDescriptor]) -> None:
    """A circuit built now on ``path`` echoes 64 KiB intact."""
    jobs = EchoJobs(reactor, echo)
    job = jobs.add("fresh", path, data_for(999, 64 * 1024))
    assert run_until(reactor, jobs.all_finished, 30.0)
    assert job.intact, job.failure
    jobs.close()


# --------------------------------------------------------------------------- SIGKILL


def test_middle_relay_sigkilled_mid_transfer(reactor: Reactor) -> None:
    net = start_network(4)
    try:
        guard, victim, exit_, spare = net.descriptors
        jobs = EchoJobs(reactor, net.echo_address)
        size = 1 << 20
        through = [jobs.add(f"via-victim-{i}", [guard, victim, exit_], data_for(i, size))
                   for i in range(6)]
        around = [jobs.add(f"around-{i}", [guard, spare, exit_], data_for(10 + i, size))
                  for i in range(6)]
        # Kill once every circuit through the victim is moving and none is done.
        assert run_until(reactor, lambda: all(len(j.received) >= 32 * 1024 for j in through)
                         or jobs.all_finished(), 60.0)
        assert not any(j.finished for j in through), [j.failure for j in through]
        net.relays[1].kill(signal.SIGKILL)
        killed_at = time.monotonic()
        assert run_until(reactor, lambda: all(j.finished for j in through), 30.0)
        detected_s = time.monotonic() - killed_at
        assert run_until(reactor, jobs.all_finished, 120.0)

        for job in around:
            assert job.intact, (job.name, job.failure, len(job.received))
        reasons = set()
        for job in through:
            assert not job.done and job.failure is not None
            assert 0 < len(job.received) < size and job.prefix_intact, job.name
            reasons.add(job.failure)
        # The guard's link to the dead middle closed: it destroys the circuits on it with
        # CHANNEL_CLOSED, and that is the reason the client gets.
        assert all(f"reason {int(DestroyReason.CHANNEL_CLOSED)}" in r for r in reasons), reasons
        assert detected_s < 10.0, detected_s  # generous: nothing hangs
        jobs.close()
        fresh_circuit_works(reactor, net.echo_address, [guard, spare, exit_])
        check_survivors(net, skip={"relay1"})
        print(f"FIGURES sigkill-middle: circuits_through={len(through)} "
              f"circuits_around={len(around)} around_intact={sum(j.intact for j in around)} "
              f"client_reason={sorted(reasons)[0]!r} detected_s={detected_s:.3f}")
        stop_cleanly(net, killed=frozenset({"relay1"}))
    finally:
        net.stop()
        net.cleanup()


# --------------------------------------------------------------------------- random closes


def test_random_circuit_closes_mid_transfer(reactor: Reactor) -> None:
    net = start_network(3)
    try:
        rng = random.Random(5)
        descriptors = net.descriptors
        jobs = EchoJobs(reactor, net.echo_address)
        size = 256 * 1024
        all_jobs = [jobs.add(f"c{i}", [descriptors[(i + k) % 3] for k in range(3)],
                             data_for(i, size)) for i in range(30)]
        # Each victim is closed when its echo passes a random point: its cells are then in
        # flight at every hop (client, three relays' pools and links, the exit's stream).
        thresholds = {i: rng.randint(1, size * 3 // 4) for i in rng.sample(range(30), 10)}
        closed: list[EchoJob] = []

        def close_some() -> None:
            for i, threshold in list(thresholds.items()):
                job = all_jobs[i]
                if job.finished:
                    del thresholds[i]
                elif len(job.received) >= threshold:
                    jobs.close_job(job, "closed at random by the test")
                    closed.append(job)
                    del thresholds[i]
            if thresholds:
                reactor.call_later(0.001, close_some)

        reactor.call_soon(close_some)
        assert run_until(reactor, jobs.all_finished, 120.0)
        assert len(closed) >= 5, "too few circuits were closed mid-transfer"
        for job in all_jobs:
            if job in closed:
                assert job.prefix_intact
            else:
                assert job.intact, (job.name, job.failure)
        jobs.close()
        check_survivors(net)
        mid = sum(1 for j in closed if 0 < len(j.received) < size)
        print(f"FIGURES random-closes: circuits={len(all_jobs)} closed={len(closed)} "
              f"closed_mid_transfer={mid} others_intact={len(all_jobs) - len(closed)}")
        stop_cleanly(net)
    finally:
        net.stop()
        net.cleanup()


# --------------------------------------------------------------------------- circuit cap


def test_peer_opening_circuits_without_limit_gets_destroy(reactor: Reactor) -> None:
    cap = 100
    # Every client here is 127.0.0.1: tor's per-IP circuit-creation limit would refuse first
    # (tests/test_relay_dos.py covers it); this test is about the per-link cap.
    net = start_network(1, "--max-circuits-per-link", str(cap),
                        "--dos-circuit-creation-enabled", "0")
    try:
        relay = net.descriptors[0]
        flood = EchoJobs(reactor, net.echo_address)
        jobs = [flood.add(f"f{i}", [relay], data_for(i, 4096)) for i in range(cap + 30)]
        assert run_until(reactor, lambda: all(j.finished or j.connected for j in jobs), 60.0)
        refused = [j for j in jobs if j.failure is not None]
        # What the client sees: DESTROY from the guard with reason RESOURCELIMIT (5).
        assert len(refused) == 30
        assert all(f"reason {int(DestroyReason.RESOURCELIMIT)}" in (j.failure or "")
                   for j in refused), {j.failure for j in refused}
        # Another link is not limited by this one: a second client gets circuits.
        fresh_circuit_works(reactor, net.echo_address, [relay])
        # The circuits under the cap all work, every byte.
        assert run_until(reactor, flood.all_finished, 60.0)
        assert sum(j.intact for j in jobs) == cap
        stats = relay_stats(net.relays[0])
        assert stats["circuits_refused_limit"] == 30
        log = net.relays[0].log_path.read_text(errors="replace")
        assert "max_circuits_per_link" in log and "WARNING" in log
        # The cap counts live circuits: once closed, the link can create again.
        again = [flood.add(f"g{i}", [relay], data_for(i, 4096)) for i in range(20)]
        assert run_until(reactor, lambda: all(j.finished for j in again), 60.0)
        assert all(j.intact for j in again)
        flood.close()
        check_survivors(net)
        print(f"FIGURES circuit-cap: cap={cap} asked={cap + 30} refused={len(refused)} "
              f"client_reason={refused[0].failure!r}")
        stop_cleanly(net)
    finally:
        net.stop()
        net.cleanup()


# --------------------------------------------------------------------------- stops reading


class NonReader(RawPeer):
    """A Tor link initiator that opens circuits, BEGINs a download on each, then never reads."""

    def __init__(self, port: int, circuits: int, target: tuple[str, int]) -> None:
        super().__init__(port, timeout=20)
        self.circuits = circuits
        self.target = target
        self.connected = 0
        self.error: str | None = None

    def run(self) -> None:
        """Handshake, circuits, BEGINs, then wait for CONNECTED on each and stop reading."""
        try:
            self.handshake()
            crypto: dict[int, OriginCrypto] = {}
            handshakes = {0x80000001 + i: CreateFastClient() for i in range(self.circuits)}
            self.sock.sendall(b"".join(fixed_cell(circ_id, CellCommand.CREATE_FAST, h.onionskin)
                                       for circ_id, h in handshakes.items()))
            for _ in handshakes:
                circ_id, command, reply = self.recv_cell()
                assert command == CellCommand.CREATED_FAST, command
                keys = HopKeys.from_material(handshakes[circ_id].complete(reply))
                crypto[circ_id] = OriginCrypto([keys])
            begin = pack_relay(RelayCommand.BEGIN, 1,
                               f"{self.target[0]}:{self.target[1]}".encode() + b"\0")
            self.sock.sendall(b"".join(fixed_cell(circ_id, CellCommand.RELAY,
                                                  state.encrypt(begin, 0))
                                       for circ_id, state in crypto.items()))
            waiting = set(crypto)
            while waiting:  # CONNECTED for every stream, then the data starts: stop reading
                circ_id, _, payload = self.recv_cell()
                if circ_id in waiting:
                    _, plain = crypto[circ_id].decrypt(payload)
                    if plain[0] == RelayCommand.CONNECTED:
                        waiting.discard(circ_id)
                        self.connected += 1
        except Exception as exc:  # reported to the test
            self.error = repr(exc)


def test_peer_that_stops_reading_is_bounded_by_back_pressure(reactor: Reactor) -> None:
    net = start_network(1, "--dos-circuit-creation-enabled", "0")  # 100 circuits from one IP
    source = EndlessSource()
    stranger: NonReader | None = None
    try:
        relay = net.descriptors[0]
        pid = net.relays[0].pid
        rss_idle = process_sample(pid).rss_bytes
        circuits = 100
        stranger = NonReader(relay.port, circuits, source.address)
        thread = threading.Thread(target=stranger.run, name="non-reader")
        thread.start()
        thread.join(60)
        assert stranger.error is None and stranger.connected == circuits
        # The stranger reads nothing more. Meanwhile another client streams through the relay.
        jobs = EchoJobs(reactor, net.echo_address)
        healthy = jobs.add("healthy", [relay], data_for(1, 2 << 20))
        samples: list[tuple[float, int, int]] = []
        started = time.monotonic()

        def sample() -> None:
            samples.append((time.monotonic() - started, process_sample(pid).rss_bytes,
                            source.sent))
            if time.monotonic() - started < 4.0 or not jobs.all_finished():
                reactor.call_later(0.2, sample)

        reactor.call_soon(sample)
        assert run_until(reactor, lambda: jobs.all_finished()
                         and time.monotonic() - started > 4.5, 60.0)
        assert healthy.intact, healthy.failure  # the stalled peer does not stall others
        jobs.close()
        # Flat: over the last 1.5 s neither the relay's memory nor what it read grew.
        late = [s for s in samples if s[0] >= samples[-1][0] - 1.5]
        rss_growth = max(s[1] for s in samples) - rss_idle
        read_late = late[-1][2] - late[0][2]
        window_bytes = circuits * 500 * 498  # the stream windows' worst case
        assert read_late <= 0.02 * late[-1][2] + 65536, samples
        assert late[-1][1] - late[0][1] < 4 << 20, samples
        assert rss_growth < window_bytes + (32 << 20), (rss_growth, samples)
        stats = relay_stats(net.relays[0])
        assert stats["write_congestions"] >= 1  # the stranger's link did back up
        print(f"FIGURES non-reader: write_congestions={stats['write_congestions']} "
              f"queued_writes={stats['queued_writes']}")
        print(f"FIGURES non-reader: circuits={circuits} "
              f"source_bytes_sent_mostly_in_kernel_buffers={late[-1][2]} "
              f"window_bound={window_bytes} relay_rss_idle_mb={rss_idle / 2**20:.1f} "
              f"relay_rss_growth_mb={rss_growth / 2**20:.1f} "
              f"healthy_intact={healthy.intact}")
        stranger.sock.close()
        stop_cleanly(net)
    finally:
        if stranger is not None:
            stranger.sock.close()
        source.close()
        net.stop()
        net.cleanup()


# --------------------------------------------------------------------------- worker exception


FAULTY_RELAY = Path(__file__).with_name("faulty_relay.py")


@pytest.mark.parametrize("inline_cells", [0, 8], ids=["pool-only", "inline-small"])
def test_worker_exception_in_one_circuit_of_a_relay(reactor: Reactor, tmp_path: Path,
                                                    inline_cells: int) -> None:
    """The crypto of one circuit raises: with ``--inline-cells 0`` on a worker, by default on
    whichever thread crypts that batch (a small batch of an idle circuit is crypted on the loop
    thread). Either way exactly that circuit closes and everything else goes on."""
    net = start_network(2)
    faulty: ChildProcess | None = None
    try:
        env = net._env()
        faulty = ChildProcess(
            "faulty", [sys.executable, str(FAULTY_RELAY), "--fail-circuit", "3",
                       "--fail-batch", "4", "--", "--listen", "127.0.0.1:0",
                       "--nickname", "faulty", "--data-dir", str(tmp_path / "faulty"),
                       "--testing-network", "--exit-policy", "accept 127.0.0.1:*",
                       "--inline-cells", str(inline_cells), "--log-level", "INFO"],
            tmp_path / "faulty.log", env=env)
        middle = RelayDescriptor.from_json(faulty.wait_ready(30)["descriptor"])
        guard, exit_ = net.descriptors
        jobs = EchoJobs(reactor, net.echo_address)
        all_jobs: list[EchoJob] = []
        for i in range(10):  # one at a time through the middle, so circuit 3 is job 2
            all_jobs.append(jobs.add(f"c{i}", [guard, middle, exit_], data_for(i, 512 * 1024)))
            assert run_until(reactor, lambda: all_jobs[-1].connected or all_jobs[-1].finished,
                             30.0)
        assert run_until(reactor, jobs.all_finished, 120.0)
        failed = [j for j in all_jobs if not j.intact]
        assert len(failed) == 1, [(j.name, j.failure) for j in failed]
        assert failed[0].prefix_intact
        # What the client sees: the middle destroys the circuit with INTERNAL (2).
        assert f"reason {int(DestroyReason.INTERNAL)}" in (failed[0].failure or "")
        jobs.close()
        log = (tmp_path / "faulty.log").read_text(errors="replace")
        on_worker = log.count("crypto failed on a worker")
        on_loop = log.count("crypto failed on the loop thread")
        assert on_worker + on_loop == 1 and "InjectedFault" in log
        stats = relay_stats(faulty)
        assert (stats["pool_errors"], stats["inline_crypto_errors"]) == (on_worker, on_loop)
        if inline_cells == 0:
            assert on_worker == 1 and stats["cells_crypted_inline"] == 0
        assert stats["worker_threads_alive"] == stats["threads"]  # the worker lived on
        fresh_circuit_works(reactor, net.echo_address, [guard, middle, exit_])
        check_survivors(net)
        print(f"FIGURES worker-exception: circuits={len(all_jobs)} failed=1 "
              f"others_intact={len(all_jobs) - 1} client_reason={failed[0].failure!r}")
        stop_cleanly(net)
    finally:
        if faulty is not None:
            faulty.stop(10)
        net.stop()
        net.cleanup()

