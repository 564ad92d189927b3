"""The two asyncio designs of the pipeline benchmark: the pool on asyncio, and the baseline an
asyncio user would really write.

``executor_batch``
    ``asyncio`` plus ``concurrent.futures.ThreadPoolExecutor`` (2 threads, like the pool), ONE
    job per circuit batch: the loop appends each arrival to its circuit's pending list; a
    circuit with no job in flight gets one job with all its pending chunks (joined), via
    ``loop.run_in_executor``; when the job's future is done (asyncio hands the result back with
    one ``call_soon_threadsafe`` per job), its output goes to the sink and, if more chunks
    arrived meanwhile, the next job starts with all of them. One job in flight per circuit
    keeps each circuit's stream in order. The job calls ``Workload.crypt_fn()``: the same C
    kernel call (``forward_buf`` / ``encrypt_buf``) as the pool's process function, on the
    same joined cells. What the pool adds beyond it is its scheduling: a worker takes several
    circuits per lock round and crypts them in one GIL-free ``crypt_group`` call, and replies
    wake the loop once per empty -> non-empty transition instead of once per job.
``pool_asyncio``
    :class:`benchmarks.designs.PoolDesign` unchanged, on the asyncio loop: its
    ``reactor.ReplyQueue`` is woken through an eventfd watched with ``add_reader``
    (:mod:`reactor.aio`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

from benchmarks.designs import WORKER_THREADS, PoolDesign
from benchmarks.driver import Arrival, ResultSink
from benchmarks.workload import CryptFn, Workload
from tor1 import CELL_PAYLOAD_LEN


class PoolAsyncioDesign(PoolDesign):
    """The worker pool attached to the run's asyncio loop."""

    name = "pool_asyncio"
    loop_kind = "asyncio"


class ExecutorBatchDesign:
    """``ThreadPoolExecutor``, one job per circuit batch, one job in flight per circuit."""

    name = "executor_batch"
    loop_kind = "asyncio"

    def __init__(self, threads: int = WORKER_THREADS) -> None:
        """No threads until :meth:`open`."""
        self.threads = threads
        self._executor: ThreadPoolExecutor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._states: list[Any] = []
        self._pending: list[list[bytes]] = []
        self._busy: list[bool] = []
        self._crypt: CryptFn | None = None
        self._sink: ResultSink | None = None
        self._jobs = 0

    def open(self, loop: asyncio.AbstractEventLoop, workload: Workload, sink: ResultSink) -> None:
        """Start the executor; fresh crypto state per circuit. Loop thread."""
        self._executor = ThreadPoolExecutor(self.threads, thread_name_prefix="bench-executor")
        self._loop = loop
        self._states = [workload.new_state(c) for c in range(workload.circuits)]
        self._pending = [[] for _ in range(workload.circuits)]
        self._busy = [False] * workload.circuits
        self._crypt = workload.crypt_fn()
        self._sink = sink
        self._jobs = 0

    def submit(self, arrivals: Sequence[Arrival]) -> None:
        """Queue each chunk on its circuit; start a job for every idle circuit. Loop thread."""
        pending, busy, start = self._pending, self._busy, self._start
        for circuit, cells, _count in arrivals:
            pending[circuit].append(cells)
            if not busy[circuit]:
                start(circuit)

    def _start(self, circuit: int) -> None:
        """One job with all of the circuit's pending chunks. Loop thread."""
        chunks = self._pending[circuit]
        self._pending[circuit] = []
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        self._busy[circuit] = True
        self._jobs += 1
        assert self._loop is not None and self._crypt is not None
        future = self._loop.run_in_executor(self._executor, self._crypt, self._states[circuit],
                                            data)
        future.add_done_callback(partial(self._done, circuit))

    def _done(self, circuit: int, future: asyncio.Future[tuple[bytes, bytes]]) -> None:
        """The job's result, on the loop thread: to the sink, then the next job. Loop thread."""
        out, flags = future.result()
        assert self._sink is not None
        self._sink.result(circuit, out, flags, len(out) // CELL_PAYLOAD_LEN)
        self._busy[circuit] = False
        if self._pending[circuit]:
            self._start(circuit)

    def close(self) -> None:
        """Shut the executor down (every job has finished). Loop thread."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        self._executor = None
        self._states = []

    def stats(self, cells: int) -> dict[str, float]:
        """Jobs per cell (each wakes the loop once) and cells per job."""
        return {
            "wakeups_per_cell": self._jobs / cells,
            "batch_mean": cells / self._jobs if self._jobs else 0.0,
        }

    def diagnose(self) -> str:
        """Circuits with a job in flight or chunks pending. Loop thread."""
        busy = sum(self._busy)
        waiting = sum(1 for p in self._pending if p)
        return f"executor_batch: {busy} circuits with a job in flight, {waiting} with chunks"
