"""Single-cell round trips through 3 relays, idle and under a bulk transfer on other circuits.

:func:`measure_rtt` starts ``examples.network``'s :class:`~examples.network.LocalNetwork` (an
echo service and three ``python -m examples.relay`` processes, TLS links unless ``tls=False``)
and, in this process, a :class:`Prober`: one circuit ``relay0 > relay1 > relay2`` built by
``relay.client.Client`` (CREATE_FAST, then ntor through EXTEND2) with one stream to the echo
service. A *sample* is one RELAY_DATA cell's worth (498 bytes) written on the stream and the
time until all 498 bytes came back: client -> 3 relays -> echo -> 3 relays -> client, the
client's own loop and crypto included. The next probe leaves ``gap`` seconds after the
previous one came back, so each cell crosses a network with nothing else in flight.

* **idle**: ``samples`` probes with nothing else running;
* **under load**: ``python -m examples.client`` in a process of its own echoes bulk data on
  ``load_circuits`` other circuits through the same three relays (each relay is guard, middle
  and exit of some of them) while the prober keeps probing for ``load_seconds``; only samples
  taken while the bulk client was alive and moving data count. The middle relay's cells/s
  during that time (its ``cells_crypted`` through SIGUSR1 before and after) says how much load
  there was.

Threads: main thread only (it runs the prober's Reactor).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from examples.client import percentile
from examples.network import ChildProcess, LocalNetwork
from reactor import Reactor
from relay.client import Client, ClientStream, OriginCircuit
from relay.directory import RelayDescriptor
from tor1 import RELAY_DATA_MAX

__all__ = ["Prober", "measure_rtt", "request_stats"]

_ROOT = Path(__file__).resolve().parent.parent


class Prober:
    """One 3-hop circuit and stream to the echo service; probes one cell at a time. Loop
    thread only."""

    def __init__(self, reactor: Reactor, path: list[RelayDescriptor], echo: tuple[str, int], *,
                 tls: bool, gap: float, on_ready: Callable[[], None],
                 on_failure: Callable[[str], None]) -> None:
        """Build the circuit and open the stream; ``on_ready`` once it is connected. Loop
        thread only."""
        self.reactor = reactor
        self.gap = gap
        self.on_ready = on_ready
        self.on_failure = on_failure
        self.samples: list[float] = []
        self.marks: list[tuple[float, float]] = []
        """``(sent, back)`` perf_counter times of every kept sample."""
        self.client = Client(reactor, tls=tls, name="prober")
        self.stream: ClientStream | None = None
        self._echo = echo
        self._payload = os.urandom(RELAY_DATA_MAX)
        self._sent_at = 0.0
        self._received = 0
        self._want = 0
        self._until = 0.0
        self._keep: Callable[[], bool] = lambda: True
        self._on_done: Callable[[], None] | None = None
        self.circuit: OriginCircuit = self.client.build_circuit(
            path, on_open=self._opened, on_close=lambda c, why: self._fail(f"circuit: {why}"))

    def _opened(self, circuit: OriginCircuit) -> None:
        host, port = self._echo
        self.stream = circuit.open_stream(
            host, port, on_connected=lambda s: self.on_ready(), on_data=self._data,
            on_end=lambda s, why: self._fail(f"stream ended: {why}"))

    def _fail(self, why: str) -> None:
        if self._on_done is not None or self.stream is None or not self.samples:
            self.on_failure(why)

    def run(self, samples: int, seconds: float, on_done: Callable[[], None],
            keep: Callable[[], bool] = lambda: True) -> None:
        """Probe until ``samples`` more samples or ``seconds`` passed, then ``on_done()``;
        a sample counts only if ``keep()`` is true when it comes back. Loop thread only."""
        self._want = len(self.samples) + samples
        self._until = time.perf_counter() + seconds
        self._keep = keep
        self._on_done = on_done
        self._send()

    def _send(self) -> None:
        assert self.stream is not None
        self._received = 0
        self._sent_at = time.perf_counter()
        self.stream.write(self._payload)

    def _data(self, stream: ClientStream, data: bytes) -> None:
        self._received += len(data)
        if self._received < RELAY_DATA_MAX:
            return
        now = time.perf_counter()
        if self._keep():
            self.samples.append(now - self._sent_at)
            self.marks.append((self._sent_at, now))
        if len(self.samples) >= self._want or now >= self._until:
            done, self._on_done = self._on_done, None
            if done is not None:
                done()
        elif self.gap > 0:
            self.reactor.call_later(self.gap, self._send)
        else:
            self._send()

    def close(self) -> None:
        """Close the circuit and link. Loop thread only."""
        self._on_done = None
        self.client.close()


def request_stats(child: ChildProcess, timeout: float = 5.0) -> dict[str, Any] | None:
    """SIGUSR1 to a relay of a LocalNetwork and its next STATS line (None if none came).
    Owner thread (blocks)."""
    old = child.stats
    child.kill(signal.SIGUSR1)
    deadline = time.monotonic() + timeout
    while child.stats is old and time.monotonic() < deadline:
        time.sleep(0.002)
    return child.stats if child.stats is not old else None


def _bulk_argv(network: LocalNetwork, tls: bool, circuits: int, size: int) -> list[str]:
    """The bulk client's command line for ``network``. Any thread (pure)."""
    host, port = network.echo_address
    return [sys.executable, "-m", "examples.client", "--directory",
            str(network.directory_path), "--target", f"{host}:{port}", "--circuits",
            str(circuits), "--bytes", str(size), "--seed", "7",
            *(["--plain-links"] if not tls else [])]


def _percentiles(samples: list[float]) -> dict[str, float]:
    """p50/p90/p99/max in ms and the count of round-trip samples (s). Any thread (pure)."""
    return {"p50_ms": percentile(samples, 0.50) * 1e3, "p90_ms": percentile(samples, 0.90) * 1e3,
            "p99_ms": percentile(samples, 0.99) * 1e3,
            "max_ms": max(samples) * 1e3 if samples else 0.0, "samples": len(samples)}


def measure_rtt(tls: bool, workdir: Path, *, samples: int = 400, gap: float = 0.002,
                load_seconds: float = 5.0, load_circuits: int = 4,
                load_bytes: int = 64 << 20, threads: int = 2,
                network: LocalNetwork | None = None,
                relay_args: tuple[str, ...] = ()) -> dict[str, Any]:
    """One run (see the module docstring): ``{"idle": {...}, "load": {...}}`` with p50/p90/
    p99/max in ms and the sample counts; ``load`` also holds the middle relay's cells/s while
    probing. ``network``: a LocalNetwork (or subclass) not yet started, configured with
    ``tls`` (default: a new one, its relays run with ``relay_args``). Raises RuntimeError when
    the network or the prober fails. Main thread."""
    if network is None:
        network = LocalNetwork(3, threads=threads,
                               workdir=workdir / ("rtt-tls" if tls else "rtt-plain"),
                               plain_links=not tls, relay_args=relay_args)
    network.start()
    failures: list[str] = []
    result: dict[str, Any] = {}
    bulk: subprocess.Popen[bytes] | None = None
    bulk_log = open(network.workdir / "bulk.log", "wb")
    try:
        with Reactor() as reactor:
            middle = network.relay_by_nickname("relay1")
            marks: dict[str, Any] = {}

            def failed(why: str) -> None:
                failures.append(why)
                reactor.stop()

            def ready() -> None:
                prober.run(samples, 600.0, idle_done)

            def idle_done() -> None:
                nonlocal bulk
                result["idle"] = _percentiles(prober.samples)
                prober.samples.clear()
                env = dict(os.environ)
                env["PYTHONPATH"] = str(_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
                bulk = subprocess.Popen(
                    _bulk_argv(network, tls, load_circuits, load_bytes), cwd=_ROOT, env=env,
                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=bulk_log,
                    start_new_session=True)
                wait_for_load(time.monotonic() + 30.0, None)

            def wait_for_load(deadline: float, last: int | None) -> None:
                stats = request_stats(middle)
                cells = stats["cells_crypted"] if stats else 0
                if last is not None and cells - last > 1000:
                    marks["start"] = (time.perf_counter(), cells)
                    prober.run(10**9, load_seconds, load_done, keep=bulk_alive)
                elif time.monotonic() > deadline or not bulk_alive():
                    failed("the bulk transfer did not start moving data")
                else:
                    reactor.call_later(0.1, wait_for_load, deadline, cells)

            def bulk_alive() -> bool:
                return bulk is not None and bulk.poll() is None

            def load_done() -> None:
                stats = request_stats(middle)
                started, cells = marks["start"]
                load = _percentiles(prober.samples)
                load["middle_cells_per_s"] = ((stats["cells_crypted"] - cells)
                                              / (time.perf_counter() - started)
                                              if stats else 0.0)
                load["bulk_ran_throughout"] = bulk_alive()
                result["load"] = load
                reactor.stop()

            prober = Prober(reactor, network.descriptors, network.echo_address, tls=tls,
                            gap=gap, on_ready=ready, on_failure=failed)
            reactor.run()
            prober.close()
    finally:
        if bulk is not None and bulk.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(bulk.pid, signal.SIGINT)
            try:
                bulk.wait(10)
            except subprocess.TimeoutExpired:
                bulk.kill()
                bulk.wait()
        bulk_log.close()
        network.stop()
        network.cleanup()
    if failures or "load" not in result:
        raise RuntimeError("round trips failed: " + ("; ".join(failures) or "no result"))
    return result
