"""The designs the pipeline benchmark compares, all crypting with the same C kernel.

The four on a pyuv loop are here; ``pool_asyncio`` and ``executor_batch`` (the baseline an
asyncio user would write: one executor job per circuit batch) are in
:mod:`benchmarks.designs_asyncio`.

Every design receives the same arrivals on the loop thread (one circuit's chunk of joined cells
each, see :mod:`benchmarks.driver`), crypts them with the same call
(``Workload.crypt_fn()``: ``FastRelayCrypto.forward_buf`` or ``FastOriginCrypto.encrypt_buf``)
and hands results back on the loop thread, in per-circuit order. What differs is where the
crypto runs and how work and results travel:

``inline``
    The loop thread crypts the arrivals as they come: the arrivals of one loop iteration in one
    kernel call (``crypt_group``, the same group function the pool uses; about 5% faster than
    one ``crypt_fn()`` call per chunk). The best single-thread code the project has (the same
    kernel the pool uses), no threads.
``pool``
    :class:`workers.pool.WorkerPool` with 2 worker threads. Arrivals of one loop iteration go in
    with one ``submit_many`` (one lock round); a worker takes several circuits per lock round
    (the pool's grouped path) and crypts their pending chunks (up to the pool's batch cap per
    circuit) in ONE kernel call with the GIL released (``tor1._kernel.crypt_group`` through
    :func:`tor1.fast.relay_group` / ``origin_group``: the same kernel op as
    ``crypt_fn()``, checked byte for byte like every result); results come back through a
    :class:`reactor.ReplyQueue` (one ``uv.Async`` send per empty -> non-empty transition) to
    ``WorkerPool.deliver``.
``futures_per_cell``
    What a Python user reaches for first: ``concurrent.futures.ThreadPoolExecutor`` (2 threads),
    one ``submit`` per cell. A circuit's crypto state is a stream, so each task takes the
    circuit's lock, pops the circuit's next cell and crypts it (one cell per kernel call, as
    the design implies); the future's done-callback sends the result back with
    ``Reactor.call_soon_threadsafe``, and the loop thread puts results back in order per
    circuit (two workers finish in either order).
``cpuworker_socketpair``
    Tor's old cpuworkers: one socketpair per worker thread (2), every cell written as one
    fixed-size request message (4-byte circuit id + payload) and answered with one fixed-size
    reply (circuit id, recognized flag, payload). A circuit always goes to the same worker, so
    the socket keeps its order. The loop writes each iteration's requests with one write per
    worker (a ``pyuv.Pipe`` over its end) and parses replies as they are read; a worker reads
    what is there, crypts each request on its own and writes its replies back in one call.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from typing import Any

import pyuv

from benchmarks.driver import Arrival, ResultSink
from benchmarks.workload import TARGET_HOP, CryptFn, Workload
from reactor import Reactor, ReplyQueue
from tor1 import CELL_PAYLOAD_LEN
from tor1.fast import OP_FORWARD, origin_group, relay_group
from workers.circuit import Circuit, GroupFn
from workers.pool import WorkerPool

DESIGNS = (
    "inline",
    "pool",
    "pool_asyncio",
    "executor_batch",
    "futures_per_cell",
    "cpuworker_socketpair",
)
WORKER_THREADS = 2

_CIRCUIT_ID_LEN = 4
_REQUEST_LEN = _CIRCUIT_ID_LEN + CELL_PAYLOAD_LEN
_REPLY_LEN = _CIRCUIT_ID_LEN + 1 + CELL_PAYLOAD_LEN
_RECV_SIZE = 1 << 16
_NO_FLAG = b"\x00"
_POOL_THREAD_NAME = "bench-pool"


def _threads_cpu_seconds(prefix: str) -> float:
    """CPU time of the live threads whose names start with ``prefix`` (their own clocks)."""
    total = 0.0
    for thread in threading.enumerate():
        if thread.name.startswith(prefix) and thread.ident is not None:
            try:
                total += time.clock_gettime(time.pthread_getcpuclockid(thread.ident))
            except OSError:
                pass  # exited between enumerate() and the clock read
    return total


WORKER_SCHED_CHOICES = ("default", "idle")


def sched_idle_worker(index: int) -> None:
    """Worker-state factory that moves the calling worker thread to SCHED_IDLE. Worker thread.

    Linux applies ``sched_setscheduler(0, ...)`` to the calling thread only. A SCHED_IDLE
    thread is preempted at once when a normal thread (the loop) wakes up on its core, so the
    loop gets a core, and then the GIL, without waiting for the scheduler's next decision. The
    price: on a machine busy with other normal-priority work, such workers get almost no CPU.
    """
    os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))


def pool_group_fn(workload: Workload) -> GroupFn:
    """The pool's ``group`` function: ``workload.crypt_fn()`` for several circuits in one call."""
    if workload.name == "relay_forward":
        return relay_group((OP_FORWARD,))
    encrypt = origin_group(TARGET_HOP)

    def group(jobs: list[tuple[Any, int, Any]]) -> list[Any]:
        # crypt_origin's result shape: (out, b"") -- no recognized flags at the origin.
        return [(out, b"") if out.__class__ is bytes else out for out in encrypt(jobs)]

    return group


class InlineDesign:
    """Crypt every arrival on the loop thread, one kernel call per loop iteration."""

    name = "inline"
    loop_kind = "pyuv"

    def __init__(self) -> None:
        """No state until :meth:`open`."""
        self._states: list[Any] = []
        self._group: GroupFn | None = None
        self._sink: ResultSink | None = None

    def open(self, reactor: Reactor, workload: Workload, sink: ResultSink) -> None:
        """Fresh crypto state per circuit. Loop thread."""
        self._states = [workload.new_state(c) for c in range(workload.circuits)]
        self._group = pool_group_fn(workload)
        self._sink = sink

    def submit(self, arrivals: Sequence[Arrival]) -> None:
        """Crypt the arrivals in one kernel call and return each one at once. Loop thread."""
        states, group, sink = self._states, self._group, self._sink
        assert group is not None and sink is not None
        result = sink.result
        outputs = group([(states[circuit], 0, cells) for circuit, cells, _ in arrivals])
        for (circuit, _, count), output in zip(arrivals, outputs, strict=True):
            if isinstance(output, BaseException):
                raise output
            result(circuit, output[0], output[1], count)

    def close(self) -> None:
        """Nothing to stop."""
        self._states = []

    def stats(self, cells: int) -> dict[str, float]:
        """No extra figures."""
        return {}

    def diagnose(self) -> str:
        """Nothing to add."""
        return ""


class PoolDesign:
    """:class:`workers.pool.WorkerPool`, ``threads`` workers, a ReplyQueue back to the loop
    (a pyuv Reactor here; the asyncio loop in ``pool_asyncio``)."""

    name = "pool"
    loop_kind = "pyuv"

    def __init__(
        self,
        threads: int = WORKER_THREADS,
        batch_cells: int | None = None,
        reply_max_batch: int | None = None,
        worker_sched: str = "default",
    ) -> None:
        """``batch_cells`` None: the pool's default cap; ``reply_max_batch``: see ReplyQueue;
        ``worker_sched``: ``"default"`` (the pool's own policy: the workers beyond CPUs - 1 in
        SCHED_IDLE, 1 of 2 on 2 CPUs) or ``"idle"`` (every worker thread puts itself in Linux's
        SCHED_IDLE class when it starts, see :func:`sched_idle_worker`).
        """
        if worker_sched not in WORKER_SCHED_CHOICES:
            raise ValueError(f"worker_sched must be one of {WORKER_SCHED_CHOICES}")
        self.threads = threads
        self.batch_cells = batch_cells
        self.reply_max_batch = reply_max_batch
        self.worker_sched = worker_sched
        self._pool: WorkerPool | None = None
        self._replies: ReplyQueue[Any] | None = None
        self._circuits: list[Circuit] = []
        self._sink: ResultSink | None = None
        self._final: dict[str, float] = {}

    def open(self, reactor: Any, workload: Workload, sink: ResultSink) -> None:
        """Start the pool and open one pool circuit per workload circuit. Loop thread.

        ``reactor``: the run's loop (a Reactor, or an asyncio loop for ``pool_asyncio``)."""
        crypt = workload.crypt_fn()

        def process(state: Any, direction: int, batch: bytes) -> tuple[bytes, bytes]:
            return crypt(state, batch)

        options: dict[str, Any] = {}
        if self.batch_cells is not None:
            options["batch_cells"] = self.batch_cells
        if self.worker_sched == "idle":
            options["worker_state_factory"] = sched_idle_worker
        # The driver's window does the back-pressure; the pool's marks must not interfere.
        pool = WorkerPool(
            None,
            threads=self.threads,
            process=process,
            joined=True,
            cell_size=CELL_PAYLOAD_LEN,
            group=pool_group_fn(workload),
            circuit_high_water=1 << 40,
            pool_high_water=1 << 41,
            name=_POOL_THREAD_NAME,
            **options,
        )
        replies: ReplyQueue[Any] = ReplyQueue(
            reactor, pool.deliver, max_batch=self.reply_max_batch
        )
        pool.set_replies(replies)
        self._pool = pool
        self._replies = replies
        self._sink = sink
        on_result = self._on_result
        self._circuits = [
            pool.open_circuit(workload.new_state(c), on_result=on_result, context=c)
            for c in range(workload.circuits)
        ]
        pool.start()

    def _on_result(self, circuit: Circuit, direction: int, result: tuple[bytes, bytes]) -> None:
        out, flags = result
        assert self._sink is not None
        self._sink.result(circuit.context, out, flags, len(out) // CELL_PAYLOAD_LEN)

    def submit(self, arrivals: Sequence[Arrival]) -> None:
        """One ``submit_many`` (one lock round) for the iteration's arrivals. Loop thread."""
        assert self._pool is not None
        circuits = self._circuits
        self._pool.submit_many([(circuits[c], 0, cells) for c, cells, _ in arrivals])

    def close(self) -> None:
        """Close the pool (joins the workers), then the reply queue. Loop thread."""
        if self._pool is not None:
            # Every result is in, so the workers are idle and their CPU clocks final.
            worker_cpu = _threads_cpu_seconds(_POOL_THREAD_NAME)
            self._pool.close()
            stats = self._pool.stats()
            self._final = {
                "worker_cpu_s": worker_cpu,
                "worker_busy_s": float(sum(stats["worker_busy_s"])),
                "batch_mean": float(stats["batch_mean"]),
                "low_priority_workers": float(stats.get("low_priority_workers", 0)),
                "batches": float(stats["batches"]),
                "worker_notifies": float(stats["notifies"]),
            }
        if self._replies is not None:
            queue = self._replies.stats()
            self._final["async_sends"] = float(queue["wakeups_sent"])
            self._final["reply_callbacks"] = float(queue["callbacks"])
            self._replies.close()
        self._pool = None
        self._replies = None
        self._circuits = []

    def stats(self, cells: int) -> dict[str, float]:
        """Wake-ups of the loop per cell (Async sends), worker notifies per cell, batch mean."""
        final = self._final
        return {
            "wakeups_per_cell": final.get("async_sends", 0.0) / cells,
            "notifies_per_cell": final.get("worker_notifies", 0.0) / cells,
            "batch_mean": final.get("batch_mean", 0.0),
            "batches": final.get("batches", 0.0),
            "reply_callbacks": final.get("reply_callbacks", 0.0),
            "low_priority_workers": final.get("low_priority_workers", 0.0),
            "worker_cpu_ns_per_cell": final.get("worker_cpu_s", 0.0) * 1e9 / cells,
            "worker_in_process_ns_per_cell": final.get("worker_busy_s", 0.0) * 1e9 / cells,
        }

    def diagnose(self) -> str:
        """Pool and reply-queue counters and the circuits still holding work. Loop thread."""
        if self._pool is None or self._replies is None:
            return "pool closed"
        stuck = [
            f"{c!r} pending={[len(q) for q in c.pending]}"
            for c in self._circuits
            if c.in_flight or c.has_pending()
        ]
        return f"pool {self._pool.stats()}; replies {self._replies.stats()}; circuits {stuck[:8]}"


class _CellQueue:
    """One circuit for the futures design: crypto state, its lock, cells awaiting a task."""

    __slots__ = ("crypted", "early", "inbox", "index", "lock", "next_seq", "state")

    def __init__(self, index: int, state: Any) -> None:
        self.index = index
        self.state = state
        self.lock = threading.Lock()
        self.inbox: deque[bytes] = deque()  # loop appends; tasks pop under `lock`
        self.crypted = 0  # under `lock`: sequence number of the next cell crypted
        self.next_seq = 0  # loop thread: next sequence number to hand to the sink
        self.early: dict[int, tuple[bytes, bytes]] = {}  # loop thread: out-of-order results


class FuturesPerCellDesign:
    """``ThreadPoolExecutor``, one submit per cell, results by ``call_soon_threadsafe``."""

    name = "futures_per_cell"
    loop_kind = "pyuv"

    def __init__(self, threads: int = WORKER_THREADS) -> None:
        """No threads until :meth:`open`."""
        self.threads = threads
        self._executor: ThreadPoolExecutor | None = None
        self._queues: list[_CellQueue] = []
        self._crypt: CryptFn | None = None
        self._reactor: Reactor | None = None
        self._sink: ResultSink | None = None

    def open(self, reactor: Reactor, workload: Workload, sink: ResultSink) -> None:
        """Start the executor. Loop thread."""
        self._executor = ThreadPoolExecutor(self.threads, thread_name_prefix="bench-futures")
        self._queues = [_CellQueue(c, workload.new_state(c)) for c in range(workload.circuits)]
        self._crypt = workload.crypt_fn()
        self._reactor = reactor
        self._sink = sink

    def submit(self, arrivals: Sequence[Arrival]) -> None:
        """Split each chunk into cells; one executor submit per cell. Loop thread."""
        executor = self._executor
        assert executor is not None
        task, done = self._crypt_next, self._done
        for circuit, cells, count in arrivals:
            queue = self._queues[circuit]
            for offset in range(0, count * CELL_PAYLOAD_LEN, CELL_PAYLOAD_LEN):
                queue.inbox.append(cells[offset : offset + CELL_PAYLOAD_LEN])
                executor.submit(task, queue).add_done_callback(done)

    def _crypt_next(self, queue: _CellQueue) -> tuple[_CellQueue, int, bytes, bytes]:
        """Worker thread: crypt the circuit's next cell under its lock (stream order)."""
        crypt = self._crypt
        assert crypt is not None
        with queue.lock:
            cell = queue.inbox.popleft()
            seq = queue.crypted
            queue.crypted = seq + 1
            out, flags = crypt(queue.state, cell)
        return queue, seq, out, flags

    def _done(self, future: Future[tuple[_CellQueue, int, bytes, bytes]]) -> None:
        """Worker thread (the future's done-callback): send the result to the loop."""
        assert self._reactor is not None
        self._reactor.call_soon_threadsafe(self._arrived, future)

    def _arrived(self, future: Future[tuple[_CellQueue, int, bytes, bytes]]) -> None:
        """Loop thread: deliver in per-circuit order, holding back early results."""
        queue, seq, out, flags = future.result()
        sink = self._sink
        assert sink is not None
        if seq != queue.next_seq:
            queue.early[seq] = (out, flags)
            return
        sink.result(queue.index, out, flags, 1)
        seq += 1
        early = queue.early
        while seq in early:
            out, flags = early.pop(seq)
            sink.result(queue.index, out, flags, 1)
            seq += 1
        queue.next_seq = seq

    def close(self) -> None:
        """Shut the executor down (every task has finished). Loop thread."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        self._executor = None
        self._queues = []

    def stats(self, cells: int) -> dict[str, float]:
        """No extra figures."""
        return {}

    def diagnose(self) -> str:
        """Nothing to add."""
        return ""


def _cpuworker_main(
    sock: socket.socket, states: dict[int, Any], crypt: CryptFn, has_flags: bool
) -> None:
    """A cpuworker thread: read requests, crypt each on its own, write the replies back."""
    pending = bytearray()
    try:
        while True:
            data = sock.recv(_RECV_SIZE)
            if not data:
                return
            pending += data
            usable = len(pending) - len(pending) % _REQUEST_LEN
            replies: list[bytes] = []
            view = memoryview(pending)
            for offset in range(0, usable, _REQUEST_LEN):
                header = bytes(view[offset : offset + _CIRCUIT_ID_LEN])
                circuit = int.from_bytes(header, "big")
                out, flags = crypt(states[circuit], view[offset + _CIRCUIT_ID_LEN : offset +
                                                          _REQUEST_LEN])
                replies.append(header + (flags if has_flags else _NO_FLAG) + out)
            view.release()
            del pending[:usable]
            if replies:
                sock.sendall(b"".join(replies))
    except OSError:
        return  # the loop closed its end while replies were being written
    finally:
        sock.close()


class CpuworkerSocketpairDesign:
    """Tor's old cpuworker shape: per-cell request/reply messages over socketpairs."""

    name = "cpuworker_socketpair"
    loop_kind = "pyuv"

    def __init__(self, threads: int = WORKER_THREADS) -> None:
        """No threads until :meth:`open`."""
        self.threads = threads
        self._loop_socks: list[socket.socket] = []
        self._pipes: list[pyuv.Pipe] = []
        self._threads: list[threading.Thread] = []
        self._received: list[bytearray] = []
        self._sink: ResultSink | None = None

    def open(self, reactor: Reactor, workload: Workload, sink: ResultSink) -> None:
        """One socketpair and one thread per worker; circuit ``c`` goes to worker ``c % n``."""
        self._sink = sink
        crypt = workload.crypt_fn()
        for index in range(self.threads):
            loop_sock, worker_sock = socket.socketpair()
            loop_sock.setblocking(False)
            pipe = pyuv.Pipe(reactor.loop)
            pipe.open(loop_sock.fileno())
            pipe.start_read(partial(self._on_read, index))
            states = {
                c: workload.new_state(c) for c in range(index, workload.circuits, self.threads)
            }
            thread = threading.Thread(
                target=_cpuworker_main,
                args=(worker_sock, states, crypt, workload.has_flags),
                name=f"bench-cpuworker-{index}",
                daemon=True,
            )
            self._loop_socks.append(loop_sock)
            self._pipes.append(pipe)
            self._received.append(bytearray())
            self._threads.append(thread)
        for thread in self._threads:
            thread.start()

    def submit(self, arrivals: Sequence[Arrival]) -> None:
        """Frame every cell as one request; one write per worker. Loop thread."""
        workers = self.threads
        parts: list[list[bytes]] = [[] for _ in range(workers)]
        for circuit, cells, count in arrivals:
            header = circuit.to_bytes(_CIRCUIT_ID_LEN, "big")
            out = parts[circuit % workers]
            for offset in range(0, count * CELL_PAYLOAD_LEN, CELL_PAYLOAD_LEN):
                out.append(header)
                out.append(cells[offset : offset + CELL_PAYLOAD_LEN])
        for pipe, chunks in zip(self._pipes, parts, strict=True):
            if chunks:
                pipe.write(b"".join(chunks))

    def _on_read(self, index: int, pipe: pyuv.Pipe, data: bytes | None, error: int | None) -> None:
        """Loop thread: parse whole replies, one result per cell."""
        if data is None:
            return  # EOF or error: close() handles the end
        buffer = self._received[index]
        buffer += data
        usable = len(buffer) - len(buffer) % _REPLY_LEN
        sink = self._sink
        assert sink is not None
        result = sink.result
        for offset in range(0, usable, _REPLY_LEN):
            circuit = int.from_bytes(buffer[offset : offset + _CIRCUIT_ID_LEN], "big")
            flag_at = offset + _CIRCUIT_ID_LEN
            result(circuit, bytes(buffer[flag_at + 1 : offset + _REPLY_LEN]),
                   bytes(buffer[flag_at : flag_at + 1]), 1)
        del buffer[:usable]

    def close(self) -> None:
        """Shut the loop ends (workers see EOF), join, then close the pipes. Loop thread."""
        for sock in self._loop_socks:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for thread in self._threads:
            thread.join()
        for pipe in self._pipes:
            if not pipe.closed:
                pipe.close()
        for sock in self._loop_socks:
            sock.detach()  # the pipe owns (and closed) the descriptor
        self._loop_socks = []
        self._pipes = []
        self._threads = []
        self._received = []

    def stats(self, cells: int) -> dict[str, float]:
        """No extra figures."""
        return {}

    def diagnose(self) -> str:
        """Nothing to add."""
        return ""


DesignFactory = Callable[[], Any]


def make_design(name: str, **pool_options: Any) -> Any:
    """A new design object by name; ``pool_options`` go to :class:`PoolDesign`."""
    if name == "inline":
        return InlineDesign()
    if name == "pool":
        return PoolDesign(**pool_options)
    if name == "pool_asyncio":
        from benchmarks.designs_asyncio import PoolAsyncioDesign

        return PoolAsyncioDesign(**pool_options)
    if name == "executor_batch":
        from benchmarks.designs_asyncio import ExecutorBatchDesign

        return ExecutorBatchDesign()
    if name == "futures_per_cell":
        return FuturesPerCellDesign()
    if name == "cpuworker_socketpair":
        return CpuworkerSocketpairDesign()
    raise ValueError(f"unknown design {name!r}; choose from {DESIGNS}")
