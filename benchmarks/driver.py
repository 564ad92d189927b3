"""The loop-thread side shared by every pipeline design: arrivals in, results out, a 1 ms timer.

One :class:`PipelineRun` pushes one workload through one design on a fresh
:class:`reactor.Reactor` and measures it (designs on asyncio run the same logic on a fresh
asyncio loop: :mod:`benchmarks.driver_asyncio`). The loop thread is producer and consumer, as
in a relay:

* **Arrivals.** A ``pyuv.Idle`` callback hands the design ``burst`` arrivals per loop
  iteration (each arrival: one circuit's ``chunk_cells`` cells joined in one ``bytes``, as one
  read of a TLS record gives them), in the workload's fixed order. Because it runs once per
  iteration, the loop keeps running its timers between bursts, exactly as a relay reading
  sockets does.
* **Back-pressure.** At most ``window`` cells may be submitted and not yet returned. When the
  next burst would exceed it, the Idle handle stops (the relay stops reading) and the loop
  blocks in its poll phase; results bring the count down and at ``window // 2`` the Idle
  handle restarts. A design that crypts on the loop thread returns every cell inside
  ``submit`` and never fills the window.
* **Results.** Every design calls :meth:`PipelineRun.result` on the loop thread, per batch or
  per cell, in per-circuit order. The result is compared right there with the reference's
  bytes for that place in the circuit's stream (:class:`benchmarks.workload.OutputChecker`: one
  memcmp, about 1 us per 16 KB; the stand-in for the relay writing the cells to the next hop,
  and the same work in every design) and then dropped. A wrong byte stops the run at once and
  fails it; after the run every circuit must be complete.
* **Clock.** cells/s is the workload's cell count divided by the time from the first submit to
  the last result received, both taken on the loop thread with ``time.perf_counter_ns``.
* **Lateness.** A repeating 1 ms ``pyuv.Timer`` records the time of every callback while the
  clock runs. libuv re-arms a repeating timer 1 ms after the loop time of the iteration that
  ran it, so each interval between two callbacks beyond 1 ms is time the loop spent unable to
  serve timers: that excess (never below 0) is one lateness sample; p50/p99 are reported in ms.
  libuv's loop clock has 1 ms granularity, so an idle loop already shows some lateness:
  :func:`idle_lateness` measures that baseline.
* **CPU.** The loop thread's CPU time and the whole process's CPU time over the same interval
  (``time.thread_time_ns`` / ``time.process_time_ns``) give ``loop_busy`` (1.0: the loop
  thread never waited) and ``cpus_busy`` (2.0: both cores busy), and both per cell: where a
  design spends its time, and whether the loop thread is what limits it.
* **Watchdog.** A 1 s timer fails the run if no result arrived for ``stall_seconds`` (a design
  that lost a cell would otherwise hang the benchmark).
"""

from __future__ import annotations

import gc
import itertools
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import pyuv

from benchmarks.workload import OutputChecker, OutputMismatch, Workload
from reactor import Reactor

TIMER_PERIOD_S = 0.001
_TIMER_PERIOD_NS = 1_000_000
WATCHDOG_PERIOD_S = 1.0
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

Arrival = tuple[int, bytes, int]


class ResultSink(Protocol):
    """What a design hands results to. Loop thread only."""

    def result(self, circuit: int, out: bytes, flags: bytes, cells: int) -> None:
        """One batch (or cell) of one circuit's output, in that circuit's order."""


class Design(Protocol):
    """One way to get cells crypted. ``open``/``close`` run outside the timed region.

    ``loop_kind``: ``"pyuv"`` (``open`` gets a :class:`reactor.Reactor`) or ``"asyncio"``
    (``open`` gets the running asyncio loop); :func:`run_design` picks the driver from it.
    """

    name: str
    loop_kind: str

    def open(self, reactor: Any, workload: Workload, sink: ResultSink) -> None:
        """Build circuits, start threads. Loop thread."""

    def submit(self, arrivals: Sequence[Arrival]) -> None:
        """Hand over arrivals; results come back through ``sink.result``. Loop thread."""

    def close(self) -> None:
        """Stop threads and release handles; every result has been received. Loop thread."""

    def stats(self, cells: int) -> dict[str, float]:
        """Design-specific figures for the finished run (e.g. wake-ups per cell)."""

    def diagnose(self) -> str:
        """What the design holds right now (for a stalled run's error message). Loop thread."""


class RunFailed(RuntimeError):
    """A run stalled or a design raised; the run has no valid figures."""


@dataclass
class RunFigures:
    """What one run measured."""

    cells: int
    seconds: float
    cells_per_s: float
    lateness_p50_ms: float
    lateness_p99_ms: float
    lateness_max_ms: float
    lateness_samples: int
    extra: dict[str, float] = field(default_factory=dict)


def system_busy_ns() -> int:
    """CPU time all processes have spent busy since boot (user+nice+system+irq+softirq+steal
    from ``/proc/stat``), in ns; 10 ms granularity. 0 where /proc/stat is missing."""
    try:
        with open("/proc/stat") as stat:
            fields = stat.readline().split()
    except OSError:
        return 0
    # cpu user nice system idle iowait irq softirq steal ...
    busy = sum(int(fields[i]) for i in (1, 2, 3, 6, 7, 8))
    return busy * 1_000_000_000 // _CLOCK_TICKS


def load_average() -> str:
    """The 1/5/15-minute load averages, as text (for the benchmarks' headers)."""
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of an ascending sequence (0.0 when empty)."""
    if not sorted_values:
        return 0.0
    rank = max(1, round(fraction * len(sorted_values) + 0.5))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def lateness_ms(ticks_ns: Sequence[int]) -> list[float]:
    """Ascending lateness samples (ms) from consecutive 1 ms timer callback times."""
    return sorted(
        max(0, later - earlier - _TIMER_PERIOD_NS) / 1e6
        for earlier, later in itertools.pairwise(ticks_ns)
    )


class PipelineRunBase:
    """One workload through one design: everything but the loop library. Loop thread only.

    Subclasses provide the loop: :class:`PipelineRun` (pyuv, a :class:`reactor.Reactor`) and
    :class:`benchmarks.driver_asyncio.AsyncioPipelineRun`. They call :meth:`_arrive` once per
    loop iteration while arrivals flow (it returns False to stop them), :meth:`_tick` from the
    1 ms timer, :meth:`_watchdog_tick` every second, and implement :meth:`_resume_arrivals`,
    :meth:`_stop_handles` and :meth:`_stop_loop`; :meth:`_figures` turns the run into figures.
    """

    def __init__(
        self,
        workload: Workload,
        design: Design,
        *,
        window: int,
        burst: int,
        stall_seconds: float = 30.0,
    ) -> None:
        """Prepare a run; nothing is measured before :meth:`run`."""
        if window < workload.chunk_cells or burst < 1:
            raise ValueError("window must hold at least one chunk and burst must be >= 1")
        self.workload = workload
        self.design = design
        self.window = window
        self.resume_at = window // 2
        self.burst = burst
        self.stall_seconds = stall_seconds
        self.checker = OutputChecker(workload)
        self._total = workload.total_cells
        self._arrivals = workload.arrivals
        self._next_arrival = 0
        self._in_flight = 0
        self._received = 0
        self._paused = False
        self._start_ns = 0
        self._end_ns = 0
        self._start_cpu = (0, 0)
        self._end_cpu = (0, 0)
        self._start_system_ns = 0
        self._end_system_ns = 0
        self._ticks: list[int] = []
        self._progress_seen = -1
        self._stalled_for = 0.0
        self._error: BaseException | None = None

    # ------------------------------------------------------------------ loop side

    def result(self, circuit: int, out: bytes, flags: bytes, cells: int) -> None:
        """Check and count one result. Loop thread only (designs call it there)."""
        if not self.checker.check(circuit, out, flags):
            self._fail(self.checker.explain(circuit, out, flags, self.design.name))
            return
        self._in_flight -= cells
        self._received += cells
        if self._received >= self._total:
            self._finish()
        elif self._paused and self._in_flight <= self.resume_at:
            self._paused = False
            self._resume_arrivals()

    def _arrive(self) -> bool:
        """Hand the design the next burst; False when arrivals must stop (window full or all
        sent). Loop thread, once per loop iteration."""
        if self._start_ns == 0:
            self._start_ns = time.perf_counter_ns()
            self._start_cpu = (time.thread_time_ns(), time.process_time_ns())
            self._start_system_ns = system_busy_ns()
        chunk = self.workload.chunk_cells
        position = self._next_arrival
        count = min(
            self.burst, (self.window - self._in_flight) // chunk, len(self._arrivals) - position
        )
        if count <= 0:
            self._paused = position < len(self._arrivals)
            return False
        self._next_arrival = position + count
        self._in_flight += count * chunk
        try:
            self.design.submit(self._arrivals[position : position + count])
        except Exception as exc:  # a design bug: fail the run instead of hanging it
            self._fail(exc)
            return False
        return self._next_arrival < len(self._arrivals)

    def _tick(self) -> None:
        self._ticks.append(time.perf_counter_ns())

    def _watchdog_tick(self) -> None:
        if self._received != self._progress_seen:
            self._progress_seen = self._received
            self._stalled_for = 0.0
            return
        self._stalled_for += WATCHDOG_PERIOD_S
        if self._stalled_for >= self.stall_seconds:
            self._fail(
                RunFailed(
                    f"{self.design.name}/{self.workload.name}: no result for "
                    f"{self.stall_seconds:.0f} s ({self._received} of {self._total} cells); "
                    f"{self.design.diagnose()}"
                )
            )

    def _fail(self, exc: BaseException) -> None:
        if self._error is None:
            self._error = exc
        self._stop_handles()
        self._stop_loop()

    def _finish(self) -> None:
        self._end_ns = time.perf_counter_ns()
        self._end_cpu = (time.thread_time_ns(), time.process_time_ns())
        self._end_system_ns = system_busy_ns()
        self._stop_handles()
        self._stop_loop()

    def _resume_arrivals(self) -> None:
        """Restart the per-iteration arrivals after a pause. Loop thread."""
        raise NotImplementedError

    def _stop_handles(self) -> None:
        """Stop arrivals, the timer and the watchdog. Loop thread."""
        raise NotImplementedError

    def _stop_loop(self) -> None:
        """Make the loop's run return. Loop thread."""
        raise NotImplementedError

    def _figures(self) -> RunFigures:
        """Verify the finished run and compute its figures. Loop thread, after the run."""
        if isinstance(self._error, (OutputMismatch, RunFailed)):
            raise self._error
        if self._error is not None:
            raise RunFailed(f"{self.design.name}/{self.workload.name} failed") from self._error
        if self._received != self._total:
            raise RunFailed(
                f"{self.design.name}/{self.workload.name}: {self._received} of {self._total} "
                "cells came back"
            )
        self.checker.check_complete(self.design.name)
        seconds = (self._end_ns - self._start_ns) / 1e9
        ticks = [t for t in self._ticks if self._start_ns <= t <= self._end_ns]
        late = lateness_ms(ticks)
        loop_cpu_ns = self._end_cpu[0] - self._start_cpu[0]
        process_cpu_ns = self._end_cpu[1] - self._start_cpu[1]
        extra = {
            "loop_cpu_ns_per_cell": loop_cpu_ns / self._total,
            "process_cpu_ns_per_cell": process_cpu_ns / self._total,
            "loop_busy": loop_cpu_ns / (seconds * 1e9),
            "cpus_busy": process_cpu_ns / (seconds * 1e9),
            "others_cpus_busy": max(
                0.0,
                (self._end_system_ns - self._start_system_ns - process_cpu_ns) / (seconds * 1e9),
            ),
        }
        extra.update(self.design.stats(self._total))
        return RunFigures(
            cells=self._total,
            seconds=seconds,
            cells_per_s=self._total / seconds,
            lateness_p50_ms=percentile(late, 0.50),
            lateness_p99_ms=percentile(late, 0.99),
            lateness_max_ms=late[-1] if late else 0.0,
            lateness_samples=len(late),
            extra=extra,
        )


class PipelineRun(PipelineRunBase):
    """One workload through one design on its own Reactor (pyuv). Loop thread only."""

    def __init__(
        self,
        workload: Workload,
        design: Design,
        *,
        window: int,
        burst: int,
        stall_seconds: float = 30.0,
    ) -> None:
        """Prepare a run; nothing is measured before :meth:`run`."""
        super().__init__(workload, design, window=window, burst=burst,
                         stall_seconds=stall_seconds)
        self._reactor: Reactor | None = None
        self._idle: pyuv.Idle | None = None
        self._timer: pyuv.Timer | None = None
        self._watchdog: pyuv.Timer | None = None

    def _on_idle(self, idle: pyuv.Idle) -> None:
        if not self._arrive() and not idle.closed:
            idle.stop()

    def _resume_arrivals(self) -> None:
        assert self._idle is not None
        self._idle.start(self._on_idle)

    def _stop_handles(self) -> None:
        for handle in (self._idle, self._timer, self._watchdog):
            if handle is not None and not handle.closed:
                handle.stop()

    def _stop_loop(self) -> None:
        assert self._reactor is not None
        self._reactor.stop()

    def run(self) -> RunFigures:
        """Open the design, run the workload, close, verify. Raises RunFailed/OutputMismatch."""
        reactor = Reactor()
        self._reactor = reactor
        loop = reactor.loop
        self._idle = pyuv.Idle(loop)
        self._timer = pyuv.Timer(loop)
        self._watchdog = pyuv.Timer(loop)
        try:
            self.design.open(reactor, self.workload, self)
            # Start from a settled heap: what open() allocated is promoted now, not by full
            # collections inside the timed region (a relay in steady state).
            gc.collect()
            try:
                self._timer.start(lambda t: self._tick(), TIMER_PERIOD_S, TIMER_PERIOD_S)
                self._watchdog.start(lambda t: self._watchdog_tick(), WATCHDOG_PERIOD_S,
                                     WATCHDOG_PERIOD_S)
                self._idle.start(self._on_idle)
                reactor.run()
            finally:
                self.design.close()
        finally:
            for handle in (self._idle, self._timer, self._watchdog):
                if not handle.closed:
                    handle.close()
            reactor.close()
            loop.run(pyuv.UV_RUN_NOWAIT)
        return self._figures()


def idle_lateness(seconds: float) -> tuple[float, float]:
    """(p50, p99) lateness in ms of the 1 ms timer on an otherwise idle loop: the floor."""
    reactor = Reactor()
    loop = reactor.loop
    ticks: list[int] = []
    timer = pyuv.Timer(loop)
    stopper = pyuv.Timer(loop)

    def tick(handle: pyuv.Timer) -> None:
        ticks.append(time.perf_counter_ns())

    def stop(handle: pyuv.Timer) -> None:
        timer.stop()
        reactor.stop()

    timer.start(tick, TIMER_PERIOD_S, TIMER_PERIOD_S)
    stopper.start(stop, seconds, 0.0)
    reactor.run()
    timer.close()
    stopper.close()
    reactor.close()
    loop.run(pyuv.UV_RUN_NOWAIT)
    late = lateness_ms(ticks)
    return percentile(late, 0.50), percentile(late, 0.99)


def run_design(
    workload: Workload, design: Design, *, window: int, burst: int, stall_seconds: float = 30.0
) -> RunFigures:
    """One run on the design's loop kind: :class:`PipelineRun` (pyuv) or
    :class:`benchmarks.driver_asyncio.AsyncioPipelineRun`."""
    if getattr(design, "loop_kind", "pyuv") == "asyncio":
        from benchmarks.driver_asyncio import AsyncioPipelineRun

        return AsyncioPipelineRun(
            workload, design, window=window, burst=burst, stall_seconds=stall_seconds
        ).run()
    return PipelineRun(
        workload, design, window=window, burst=burst, stall_seconds=stall_seconds
    ).run()


def as_dict(figures: RunFigures) -> dict[str, Any]:
    """A run's figures as a flat dict (design extras merged in)."""
    out: dict[str, Any] = {
        "cells": figures.cells,
        "seconds": figures.seconds,
        "cells_per_s": figures.cells_per_s,
        "lateness_p50_ms": figures.lateness_p50_ms,
        "lateness_p99_ms": figures.lateness_p99_ms,
        "lateness_max_ms": figures.lateness_max_ms,
        "lateness_samples": figures.lateness_samples,
    }
    out.update(figures.extra)
    return out
