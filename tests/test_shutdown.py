"""Shutdown under load: SIGTERM to a relay process with 1,000 circuits in flight.

What is checked, and why
------------------------
A relay must stop promptly and cleanly when asked, however busy it is (docs/design.md, invariant 7):
stop intake, cancel queued crypto, wake and join every worker thread, close every link and the
reply queue's Async, and exit. Here three relay processes carry 1,000 three-hop circuits (every
circuit crosses every relay), each echoing data; once every circuit is open and data is moving,
one relay gets SIGTERM. Checked:

* the process exits with status 0 in under 2 seconds (the issue's bound; measured from the
  signal to the exit status, so it includes closing 1,000 circuits and joining the pool);
* its final ``STATS`` line (printed after ``RelayNode.close()``) shows every worker thread
  joined (``worker_threads_alive == 0``) and no circuit left open;
* its log holds no traceback;
* the client sees every circuit closed with a reason (nothing hangs), and every byte it did
  get back is the start of what it sent.
"""

from __future__ import annotations

import random
import signal
import threading
import time
from collections.abc import Iterator

import pytest
from reliability_support import (
    EchoJobs,
    relay_stats,
    stop_cleanly,
    tracebacks_in_log,
)
from support_loop import run_until

from examples.network import LocalNetwork
from reactor import Reactor

pytestmark = pytest.mark.timeout(240)

CIRCUITS = 1000
BASE = memoryview(random.Random(3).randbytes(1 << 20))


@pytest.fixture
def reactor() -> Iterator[Reactor]:
    r = Reactor()
    yield r
    r.close()


def test_sigterm_with_1000_circuits_in_flight_exits_cleanly_and_fast(reactor: Reactor) -> None:
    # 1,000 circuits from one client on 127.0.0.1: past tor's per-IP circuit-creation limit
    net = LocalNetwork(3, threads=2, relay_args=["--log-level", "INFO",
                                                 "--dos-circuit-creation-enabled", "0"])
    net.start()
    try:
        descriptors = net.descriptors
        jobs = EchoJobs(reactor, net.echo_address, window=16 * 1024, chunk=8 * 1024,
                        build_timeout=120.0)
        size = 256 * 1024
        for i in range(CIRCUITS):
            offset = (i * 7919) % (len(BASE) - size)
            jobs.add(f"c{i}", [descriptors[(i + k) % 3] for k in range(3)],
                     BASE[offset : offset + size])
        # In flight: every circuit open with its stream connected, data moving on most.
        assert run_until(reactor, lambda: all(j.connected or j.finished for j in jobs.jobs)
                         and sum(1 for j in jobs.jobs if j.received) >= CIRCUITS // 2, 180.0)
        assert not [j.failure for j in jobs.jobs if j.failure], "circuits failed before SIGTERM"
        victim = net.relays[0]
        before = relay_stats(victim)
        assert before["circuits_open"] >= CIRCUITS
        # SIGTERM from a thread while this loop keeps the client sending and reading.
        outcome: dict[str, float] = {}

        def terminate() -> None:
            started = time.monotonic()
            victim.kill(signal.SIGTERM)
            outcome["status"] = victim.popen.wait(10)
            outcome["exit_s"] = time.monotonic() - started

        thread = threading.Thread(target=terminate, name="sigterm")
        thread.start()
        assert run_until(reactor, lambda: not thread.is_alive(), 30.0)
        thread.join()
        status, exit_s = int(outcome["status"]), outcome["exit_s"]
        victim_stats_deadline = time.monotonic() + 5
        while victim.alive and time.monotonic() < victim_stats_deadline:
            time.sleep(0.01)  # the reader thread records the final STATS line at EOF
        final = victim.stats
        assert status == 0, victim.log_tail()
        assert exit_s < 2.0, exit_s
        assert final is not None and final is not before
        assert final["worker_threads_alive"] == 0
        assert final["circuits_open"] == 0
        assert not tracebacks_in_log(victim), victim.log_tail(40)
        # The client: every circuit ends with a reason, nothing hangs.
        assert run_until(reactor, jobs.all_finished, 60.0)
        reasons = {j.failure for j in jobs.jobs if j.failure}
        assert all(j.prefix_intact for j in jobs.jobs)
        failed = sum(1 for j in jobs.jobs if j.failure)
        jobs.close()
        stop_cleanly(net, killed=frozenset({victim.name}))  # the others stop cleanly too
        print(f"FIGURES sigterm: circuits_open_at_signal={before['circuits_open']} "
              f"cells_crypted_before={before['cells_crypted']} exit_s={exit_s:.3f} "
              f"status={status} threads_alive_after={final['worker_threads_alive']} "
              f"pool_cancelled={final['pool_cancelled']} pool_discarded={final['pool_discarded']} "
              f"client_circuits_closed={failed} reasons={sorted(reasons)[:3]}")
    finally:
        net.stop()
        net.cleanup()
