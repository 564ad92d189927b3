"""The pipeline driver on an asyncio loop, for the designs a Python asyncio user would write.

The same run as :class:`benchmarks.driver.PipelineRun` (arrivals, window, checks, figures: all
in :class:`~benchmarks.driver.PipelineRunBase`), on a fresh ``asyncio`` event loop instead of a
Reactor:

* **Arrivals** once per loop iteration: a callback that re-schedules itself with
  ``loop.call_soon`` while arrivals flow. asyncio runs the callbacks queued during an
  iteration in the next one, after polling I/O without blocking, as libuv runs an Idle handle.
* **The 1 ms timer** re-arms itself with ``loop.call_later(0.001)`` from its callback, as libuv
  re-arms a repeating timer from the loop time of the iteration that ran it; lateness is the
  same excess over 1 ms. asyncio's clock has no 1 ms granularity, so its idle floor is lower
  than libuv's: compare lateness between designs of the same loop kind.
* **Watchdog** every second through ``call_later``, as in the pyuv driver.
"""

from __future__ import annotations

import asyncio
import gc

from benchmarks.driver import (
    TIMER_PERIOD_S,
    WATCHDOG_PERIOD_S,
    Design,
    PipelineRunBase,
    RunFigures,
)
from benchmarks.workload import Workload


class AsyncioPipelineRun(PipelineRunBase):
    """One workload through one design on its own asyncio loop. Loop thread only."""

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
        self._loop: asyncio.AbstractEventLoop | None = None
        self._arriving = False
        self._running = False
        self._timer: asyncio.TimerHandle | None = None
        self._watchdog: asyncio.TimerHandle | None = None

    def _on_iteration(self) -> None:
        if not self._arriving:
            return
        if self._arrive() and self._arriving:
            assert self._loop is not None
            self._loop.call_soon(self._on_iteration)
        else:
            self._arriving = False

    def _resume_arrivals(self) -> None:
        assert self._loop is not None
        if not self._arriving:
            self._arriving = True
            self._loop.call_soon(self._on_iteration)

    def _on_timer(self) -> None:
        if not self._running:
            return
        self._tick()
        assert self._loop is not None
        self._timer = self._loop.call_later(TIMER_PERIOD_S, self._on_timer)

    def _on_watchdog(self) -> None:
        if not self._running:
            return
        self._watchdog_tick()
        if self._running:
            assert self._loop is not None
            self._watchdog = self._loop.call_later(WATCHDOG_PERIOD_S, self._on_watchdog)

    def _stop_handles(self) -> None:
        self._running = False
        self._arriving = False
        for handle in (self._timer, self._watchdog):
            if handle is not None:
                handle.cancel()

    def _stop_loop(self) -> None:
        assert self._loop is not None
        self._loop.stop()

    def run(self) -> RunFigures:
        """Open the design, run the workload, close, verify. Raises RunFailed/OutputMismatch."""
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            self.design.open(loop, self.workload, self)
            gc.collect()  # as in the pyuv driver: a settled heap before the timed region
            try:
                self._running = True
                self._timer = loop.call_later(TIMER_PERIOD_S, self._on_timer)
                self._watchdog = loop.call_later(WATCHDOG_PERIOD_S, self._on_watchdog)
                self._resume_arrivals()
                loop.run_forever()
            finally:
                self._stop_handles()
                self.design.close()
        finally:
            loop.close()
        return self._figures()
