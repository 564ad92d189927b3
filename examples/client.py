"""Echo through the relay network: ``python -m examples.client --directory FILE --target H:P``.

What it does
------------
Reads the relay directory, builds ``--circuits`` circuits of ``--hops`` relays (circuit ``i``
uses relays ``i, i+1, ...`` of the directory, modulo its size, so the load spreads over every
relay and every relay is a guard, a middle and an exit of some circuit), opens one stream per
circuit to the echo service at ``--target`` through the exit, sends ``--bytes`` bytes on each
(deterministic pseudo-random data, seeded per circuit), and compares every byte that comes back
with what was sent. It prints a summary (``--json``: a JSON object) and exits 0 only if every
circuit echoed every byte intact.

:class:`EchoTransfer` is the same job as a library object on a caller's reactor;
``examples.network`` runs it in-process next to the relays it started.

Measurements
------------
* throughput: intact echoed bytes over the transfer time (first stream connected to last byte
  back);
* round-trip time: each stream first sends ``probes`` single cells one at a time, each after
  the previous one's echo came back (``rtt_p50_ms``/``rtt_p99_ms``: client -> 3 relays -> echo
  service and back, with every circuit probing at once but no bulk data queued);
* round-trip time under load (``rtt_load_*``): during the bulk transfer, each time the client
  hands a batch of DATA cells to its link it notes the stream offset and the time; when the
  echo reaches that offset, the difference is a sample (so it includes the queueing a full
  SENDME window causes);
* failures: a circuit that closes or whose stream ends before its last byte came back is
  reported with the reason (a relay that died, a DESTROY, a timeout). A transfer with no
  progress for ``stall_timeout`` seconds fails its unfinished circuits instead of hanging.

Threads: :class:`EchoTransfer` is loop thread only; :func:`main` runs on the main thread.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import signal
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from reactor import Reactor, TimerHandle
from relay.client import Client, ClientStream, OriginCircuit
from relay.directory import RelayDescriptor, read_directory
from tor1 import RELAY_DATA_MAX

__all__ = ["EchoTransfer", "main", "parse_size", "percentile"]


def parse_size(text: str) -> int:
    """``"16MiB"``, ``"512k"``, ``"1000"`` -> bytes (k/M/G are powers of 1024). Any thread."""
    units = {"": 1, "k": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mib": 1 << 20,
             "g": 1 << 30, "gib": 1 << 30, "b": 1}
    stripped = text.strip().lower()
    number = stripped.rstrip("kmgib")
    unit = stripped[len(number):]
    if unit not in units or not number:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}")
    return int(float(number) * units[unit])


def percentile(samples: Sequence[float], fraction: float) -> float:
    """The ``fraction`` quantile (nearest rank) of ``samples``; 0.0 if empty. Any thread."""
    if not samples:
        return 0.0
    ordered = sorted(samples)
    rank = min(len(ordered) - 1, max(0, math.ceil(fraction * len(ordered)) - 1))
    return ordered[rank]


class _Job:
    """One circuit's echo job. Loop thread only."""

    __slots__ = ("circuit", "done", "error", "expected", "index", "intact", "mismatches",
                 "path", "probe_at", "probe_end", "probes_left", "received", "sent_marks",
                 "stream")

    def __init__(
        self, index: int, path: list[RelayDescriptor], expected: bytes, probes: int
    ) -> None:
        """Circuit ``index`` through ``path``, to echo ``expected`` after ``probes`` single
        cells. Loop thread only."""
        self.index = index
        self.probes_left = probes
        self.probe_end = 0
        self.probe_at = 0.0
        self.path = path
        self.expected = expected
        self.circuit: OriginCircuit | None = None
        self.stream: ClientStream | None = None
        self.received = 0
        self.intact = 0
        self.mismatches = 0
        self.done = False
        self.error: str | None = None
        self.sent_marks: deque[tuple[int, float]] = deque()

    @property
    def finished(self) -> bool:
        """True once it succeeded or failed. Loop thread only."""
        return self.done or self.error is not None


class EchoTransfer:
    """Echo ``bytes_per_circuit`` bytes through each of ``circuits`` circuits and verify them.

    Loop thread only. ``on_finished(transfer)`` runs once every circuit succeeded or failed.
    """

    def __init__(
        self,
        reactor: Reactor,
        descriptors: Sequence[RelayDescriptor],
        target: tuple[str, int],
        *,
        circuits: int = 16,
        bytes_per_circuit: int = 1 << 20,
        hops: int = 3,
        seed: int = 1,
        probes: int = 5,
        stall_timeout: float = 30.0,
        build_timeout: float = 30.0,
        tls: bool = True,
        on_finished: Callable[[EchoTransfer], None] | None = None,
    ) -> None:
        """Prepare the jobs (the data is generated here). ``tls=False`` only for relays run
        with ``--plain-links``. Loop thread only."""
        if len(descriptors) < hops:
            raise ValueError(f"{hops}-hop circuits need at least {hops} relays, "
                             f"the directory has {len(descriptors)}")
        self.reactor = reactor
        self.target = target
        self.descriptors = list(descriptors)
        self.bytes_per_circuit = bytes_per_circuit
        self.stall_timeout = stall_timeout
        self.on_finished = on_finished
        self.client = Client(reactor, build_timeout=build_timeout, tls=tls)
        n = len(self.descriptors)
        self.jobs = [
            _Job(i, [self.descriptors[(i + k) % n] for k in range(hops)],
                 random.Random(seed * 1_000_003 + i).randbytes(bytes_per_circuit), probes)
            for i in range(circuits)
        ]
        self.probe_rtts: list[float] = []
        self.rtts: list[float] = []
        self.started_at = 0.0
        self.transfer_started_at: float | None = None
        self.finished_at: float | None = None
        self._progress_at = 0.0
        self._progress_bytes = -1
        self._watchdog: TimerHandle | None = None
        self._finished = False

    # ------------------------------------------------------------------ running

    def start(self) -> None:
        """Build every circuit; the rest follows from callbacks. Loop thread only."""
        self.started_at = self._progress_at = time.perf_counter()
        for job in self.jobs:
            job.circuit = self.client.build_circuit(
                job.path,
                on_open=lambda circuit, job=job: self._on_open(job),
                on_close=lambda circuit, reason, job=job: self._on_circuit_closed(job, reason),
            )
        self._watchdog = self.reactor.call_later(1.0, self._check_stall)

    def abort(self, reason: str) -> None:
        """Fail every unfinished circuit with ``reason`` and finish. Loop thread only."""
        for job in self.jobs:
            if not job.finished:
                self._fail(job, reason)
        self._maybe_finished()

    def _on_open(self, job: _Job) -> None:
        assert job.circuit is not None
        host, port = self.target
        job.stream = job.circuit.open_stream(
            host, port,
            on_connected=lambda stream: self._on_connected(job, stream),
            on_data=lambda stream, data: self._on_data(job, data),
            on_end=lambda stream, why: self._on_stream_end(job, why),
        )

    def _on_connected(self, job: _Job, stream: ClientStream) -> None:
        if self.transfer_started_at is None:
            self.transfer_started_at = time.perf_counter()
        if job.probes_left > 0:
            self._probe(job, stream)
        else:
            self._bulk(job, stream)

    def _probe(self, job: _Job, stream: ClientStream) -> None:
        """Send one cell's worth and wait for its echo: an unloaded round trip."""
        job.probe_end = min(job.received + RELAY_DATA_MAX, self.bytes_per_circuit)
        job.probe_at = time.perf_counter()
        stream.write(job.expected[job.received : job.probe_end])

    def _bulk(self, job: _Job, stream: ClientStream) -> None:
        """Send the rest at once; the windows pace it. Round trips measured under load."""
        stream.on_sent = lambda s, total: job.sent_marks.append((total, time.perf_counter()))
        if job.received < self.bytes_per_circuit:
            stream.write(job.expected[job.received :])

    def _on_data(self, job: _Job, data: bytes) -> None:
        start = job.received
        end = start + len(data)
        if data == job.expected[start:end]:
            job.intact += len(data)
        else:
            job.mismatches += 1
            expected = job.expected[start:end]
            job.intact += sum(1 for a, b in zip(data, expected, strict=False) if a == b)
        job.received = end
        if job.probes_left > 0 and end >= job.probe_end:
            self.probe_rtts.append(time.perf_counter() - job.probe_at)
            job.probes_left -= 1
            assert job.stream is not None
            if end < self.bytes_per_circuit:
                if job.probes_left > 0:
                    self._probe(job, job.stream)
                else:
                    self._bulk(job, job.stream)
        marks = job.sent_marks
        if marks and marks[0][0] <= end:
            now = time.perf_counter()
            while marks and marks[0][0] <= end:
                self.rtts.append(now - marks.popleft()[1])
        if end >= self.bytes_per_circuit and not job.finished:
            job.done = True
            assert job.stream is not None and job.circuit is not None
            job.stream.end()
            job.circuit.close("transfer complete")
            self._maybe_finished()

    def _on_stream_end(self, job: _Job, why: str) -> None:
        if not job.finished:
            self._fail(job, f"stream ended after {job.received} of {self.bytes_per_circuit} "
                            f"bytes: {why}")
            if job.circuit is not None:
                job.circuit.close(why)
            self._maybe_finished()

    def _on_circuit_closed(self, job: _Job, reason: str) -> None:
        if not job.finished:
            self._fail(job, f"circuit closed after {job.received} of {self.bytes_per_circuit} "
                            f"bytes: {reason}")
            self._maybe_finished()

    def _fail(self, job: _Job, reason: str) -> None:
        if job.finished:
            return
        job.error = reason
        if job.circuit is not None:
            job.circuit.close(reason)

    def _check_stall(self) -> None:
        self._watchdog = None
        if self._finished:
            return
        now = time.perf_counter()
        moved = sum(j.received for j in self.jobs) + sum(
            j.stream.bytes_sent for j in self.jobs if j.stream is not None
        )
        if moved != self._progress_bytes:
            self._progress_bytes = moved
            self._progress_at = now
        elif now - self._progress_at > self.stall_timeout:
            self.abort(f"no progress for {self.stall_timeout:.0f} s")
            return
        self._watchdog = self.reactor.call_later(1.0, self._check_stall)

    def _maybe_finished(self) -> None:
        if self._finished or not all(job.finished for job in self.jobs):
            return
        self._finished = True
        self.finished_at = time.perf_counter()
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        self.client.close()
        if self.on_finished is not None:
            self.on_finished(self)

    # ------------------------------------------------------------------ reporting

    @property
    def finished(self) -> bool:
        """True once every circuit succeeded or failed. Loop thread only."""
        return self._finished

    @property
    def ok(self) -> bool:
        """True when every circuit echoed every byte intact. Loop thread only."""
        total = self.bytes_per_circuit * len(self.jobs)
        return self._finished and self.bytes_echoed_intact == total and not self.failures()

    @property
    def bytes_echoed_intact(self) -> int:
        """Echoed bytes equal to what was sent. Loop thread only."""
        return sum(job.intact for job in self.jobs)

    def transfer_seconds(self) -> float:
        """From the first stream connected to the end (or now). Loop thread only."""
        start = self.transfer_started_at or self.started_at
        end = self.finished_at or time.perf_counter()
        return max(end - start, 1e-9)

    def failures(self) -> list[dict[str, Any]]:
        """One entry per circuit that failed or returned a wrong byte. Loop thread only."""
        out = []
        for job in self.jobs:
            if job.error is not None or job.mismatches or (job.done and job.intact
                                                             < self.bytes_per_circuit):
                out.append({"circuit": job.index,
                            "path": [d.nickname for d in job.path],
                            "bytes_echoed": job.received, "bytes_intact": job.intact,
                            "mismatched_chunks": job.mismatches,
                            "reason": job.error or "echoed bytes differ from those sent"})
        return out

    def progress(self) -> dict[str, Any]:
        """A snapshot for the live progress line. Loop thread only."""
        sent = sum(j.stream.bytes_sent for j in self.jobs if j.stream is not None)
        echoed = sum(j.received for j in self.jobs)
        return {
            "bytes_sent": sent,
            "bytes_echoed": echoed,
            "bytes_total": self.bytes_per_circuit * len(self.jobs),
            "circuits_done": sum(1 for j in self.jobs if j.done),
            "circuits_failed": sum(1 for j in self.jobs if j.error is not None),
            "circuits_open": sum(1 for j in self.jobs if j.circuit is not None
                                 and j.circuit.is_open),
            "seconds": self.transfer_seconds(),
        }

    def results(self) -> dict[str, Any]:
        """The transfer's figures as a JSON-ready dict. Loop thread only."""
        seconds = self.transfer_seconds()
        intact = self.bytes_echoed_intact
        return {
            "circuits": len(self.jobs),
            "hops": len(self.jobs[0].path) if self.jobs else 0,
            "bytes_per_circuit": self.bytes_per_circuit,
            "bytes_sent": sum(j.stream.bytes_sent for j in self.jobs if j.stream is not None),
            "bytes_echoed": sum(j.received for j in self.jobs),
            "bytes_echoed_intact": intact,
            "circuits_ok": sum(1 for j in self.jobs if j.done and j.intact ==
                               self.bytes_per_circuit and not j.mismatches),
            "circuits_failed": len(self.failures()),
            "failures": self.failures(),
            "transfer_seconds": seconds,
            "build_seconds": (self.transfer_started_at or self.started_at) - self.started_at,
            "mbytes_per_s": intact / seconds / 1e6,
            "rtt_samples": len(self.probe_rtts),
            "rtt_p50_ms": percentile(self.probe_rtts, 0.50) * 1e3,
            "rtt_p99_ms": percentile(self.probe_rtts, 0.99) * 1e3,
            "rtt_load_samples": len(self.rtts),
            "rtt_load_p50_ms": percentile(self.rtts, 0.50) * 1e3,
            "rtt_load_p99_ms": percentile(self.rtts, 0.99) * 1e3,
            "ok": self.ok,
        }


def main(argv: list[str] | None = None) -> int:
    """Run one echo transfer through an existing network. Main thread."""
    from examples.relay import parse_hostport

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--directory", required=True, help="the network's directory.json")
    parser.add_argument("--target", type=parse_hostport, required=True,
                        help="echo service HOST:PORT (loopback)")
    parser.add_argument("--circuits", type=int, default=4)
    parser.add_argument("--bytes", type=parse_size, default=1 << 20, help="per circuit")
    parser.add_argument("--hops", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--plain-links", action="store_true",
                        help="the relays run with --plain-links (no TLS)")
    parser.add_argument("--log-level", default="WARNING")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr)
    descriptors = read_directory(args.directory)
    with Reactor() as reactor:
        transfer = EchoTransfer(reactor, descriptors, args.target, circuits=args.circuits,
                                bytes_per_circuit=args.bytes, hops=args.hops, seed=args.seed,
                                tls=not args.plain_links, on_finished=lambda t: reactor.stop())
        reactor.add_signal_handler(signal.SIGINT, transfer.abort, "interrupted")
        transfer.start()
        reactor.run()
        results = transfer.results()
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(f"{results['circuits_ok']}/{results['circuits']} circuits intact, "
              f"{results['bytes_echoed_intact']} bytes echoed intact in "
              f"{results['transfer_seconds']:.2f} s ({results['mbytes_per_s']:.2f} MB/s), "
              f"RTT p50 {results['rtt_p50_ms']:.2f} ms p99 {results['rtt_p99_ms']:.2f} ms, "
              f"under load p50 {results['rtt_load_p50_ms']:.1f} ms "
              f"p99 {results['rtt_load_p99_ms']:.1f} ms")
        for failure in results["failures"]:
            print(f"  FAILED circuit {failure['circuit']} {failure['path']}: {failure['reason']}")
    return 0 if results["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
