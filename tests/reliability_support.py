"""Helpers shared by the reliability suites (fuzzing, fault injection, shutdown, soak); no tests.

* :func:`fuzz_settings`: hypothesis settings whose example count is the suite's bounded default
  unless ``RELAYCRYPT_FUZZ_EXAMPLES`` asks for more (``make fuzz`` sets it), so the same tests
  run briefly in ``make test`` and long in ``make fuzz``.
* :func:`mutated_bytes`: the fuzzers' byte mutator (flip, set, insert, delete, truncate); each
  suite chooses how many edits and which byte values ``set`` writes.
* :class:`LogRecorder`: keeps the records of some loggers, to check that a closed link or
  circuit logged its reason and that nothing logged an unexpected traceback.
* :class:`EchoJob` / :class:`EchoJobs`: echo bytes through circuits on *explicit* paths of a
  relay network and check every byte that comes back (the fault tests choose which circuits
  cross the relay they kill, stall or break). Data is written a little at a time, so a thousand
  circuits do not each queue their whole payload on the client.
* :class:`EndlessSource`: a loopback service that writes to every connection as fast as it is
  read (a download that never ends), counting what the kernel accepted.
* :func:`relay_stats`: a live ``STATS`` snapshot of a relay process (SIGUSR1);
  ``process_sample`` (RSS, threads, fds from ``/proc``) comes from ``examples.soak``.

Driving a reactor until a condition holds is ``support_loop.run_until``, shared with the other
suites.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from examples.network import ChildProcess, LocalNetwork
from examples.soak import live_stats
from reactor import Reactor
from relay.client import Client
from relay.config import RelayConfig
from relay.directory import RelayDescriptor
from relay.dos import DosConfig
from relay.identity.keys import RelayIdentity
from relay.node import RelayNode
from relay.origin import ClientStream, OriginCircuit

FUZZ_EXAMPLES_ENV = "RELAYCRYPT_FUZZ_EXAMPLES"


def fuzz_examples(default: int) -> int:
    """``default`` in the suite; ``$RELAYCRYPT_FUZZ_EXAMPLES`` when that is set (make fuzz)."""
    text = os.environ.get(FUZZ_EXAMPLES_ENV, "").strip()
    return int(text) if text else default


def fuzz_settings(default: int) -> settings:
    """Hypothesis settings for a fuzz test: no per-example deadline (a shared 2-core machine is
    noisy; a hang is caught by pytest-timeout instead), no too-slow health checks."""
    return settings(
        max_examples=fuzz_examples(default),
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                               HealthCheck.function_scoped_fixture],
    )


@st.composite
def mutated_bytes(draw: st.DrawFn, base: bytes, edits: st.SearchStrategy[int],
                  set_values: Sequence[int]) -> bytes:
    """``base`` with ``draw(edits)`` random edits: flip a bit, set a byte to one of
    ``set_values``, insert 1-8 random bytes, delete 1-8 bytes, truncate."""
    data = bytearray(base)
    for _ in range(draw(edits)):
        kind = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]))
        position = draw(st.integers(0, max(len(data), 1) - 1)) if data else 0
        if kind == "flip" and data:
            data[position] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set" and data:
            data[position] = draw(st.sampled_from(set_values))
        elif kind == "insert":
            data[position:position] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete" and data:
            del data[position : position + draw(st.integers(1, 8))]
        elif kind == "truncate":
            del data[position:]
    return bytes(data)


class LogRecorder(logging.Handler):
    """Keeps every record of the loggers it is attached to (any thread may log)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def messages(self, min_level: int = logging.DEBUG) -> list[str]:
        """The formatted messages at ``min_level`` or above."""
        return [r.getMessage() for r in list(self.records) if r.levelno >= min_level]

    def tracebacks(self) -> list[str]:
        """Messages of records that carry an exception (``log.exception`` and friends)."""
        return [r.getMessage() for r in list(self.records) if r.exc_info]

    def clear(self) -> None:
        self.records.clear()


@contextmanager
def recording(*names: str, level: int = logging.INFO) -> Iterator[LogRecorder]:
    """Attach a :class:`LogRecorder` to the loggers ``names`` (at ``level``) for the block."""
    recorder = LogRecorder()
    loggers = [logging.getLogger(name) for name in names]
    saved = [(lg, lg.level) for lg in loggers]
    for lg in loggers:
        lg.addHandler(recorder)
        if lg.level == logging.NOTSET or lg.level > level:
            lg.setLevel(level)
    try:
        yield recorder
    finally:
        for lg, old in saved:
            lg.removeHandler(recorder)
            lg.setLevel(old)


# --------------------------------------------------------------------------- echo jobs


@dataclass(eq=False)
class EchoJob:
    """One circuit on an explicit path echoing ``data`` through the exit. Loop thread only."""

    name: str
    path: list[RelayDescriptor]
    data: memoryview
    received: bytearray = field(default_factory=bytearray)
    written: int = 0
    circuit: OriginCircuit | None = None
    stream: ClientStream | None = None
    connected: bool = False
    done: bool = False
    failure: str | None = None

    @property
    def finished(self) -> bool:
        return self.done or self.failure is not None

    @property
    def intact(self) -> bool:
        """Every byte came back, equal to what was sent."""
        return self.done and self.received == self.data

    @property
    def prefix_intact(self) -> bool:
        """What came back (maybe less than all) equals the start of what was sent."""
        return self.received == self.data[: len(self.received)]


class EchoJobs:
    """Runs :class:`EchoJob` s on one client. ``window``: bytes written ahead of the echo."""

    def __init__(self, reactor: Reactor, echo: tuple[str, int], *, window: int = 64 * 1024,
                 chunk: int = 16 * 1024, build_timeout: float = 60.0) -> None:
        self.reactor = reactor
        self.echo = echo
        self.window = window
        self.chunk = chunk
        self.client = Client(reactor, build_timeout=build_timeout)
        self.jobs: list[EchoJob] = []

    def add(self, name: str, path: Sequence[RelayDescriptor], data: memoryview) -> EchoJob:
        job = EchoJob(name, list(path), data)
        self.jobs.append(job)
        job.circuit = self.client.build_circuit(
            job.path, on_open=lambda c: self._open(job),
            on_close=lambda c, why: self._fail(job, f"circuit closed: {why}"))
        return job

    def _open(self, job: EchoJob) -> None:
        assert job.circuit is not None
        job.stream = job.circuit.open_stream(
            *self.echo, on_connected=lambda s: self._connected(job),
            on_data=lambda s, data: self._data(job, data),
            on_end=lambda s, why: self._fail(job, f"stream ended: {why}"))

    def _connected(self, job: EchoJob) -> None:
        job.connected = True
        self._write_more(job)

    def _write_more(self, job: EchoJob) -> None:
        stream = job.stream
        assert stream is not None
        while (job.written < len(job.data) and job.written - len(job.received) < self.window
               and not stream.ended):
            end = min(job.written + self.chunk, len(job.data))
            stream.write(job.data[job.written : end])
            job.written = end

    def _data(self, job: EchoJob, data: bytes) -> None:
        job.received += data
        if len(job.received) >= len(job.data):
            job.done = True
            assert job.circuit is not None
            job.circuit.close("echo complete")
        elif not job.finished:
            self._write_more(job)

    def _fail(self, job: EchoJob, why: str) -> None:
        if not job.finished:
            job.failure = why

    def close_job(self, job: EchoJob, why: str) -> None:
        """Close the job's circuit from the client side (it then counts as failed)."""
        self._fail(job, why)
        if job.circuit is not None:
            job.circuit.close(why)

    def all_finished(self) -> bool:
        return all(job.finished for job in self.jobs)

    def close(self) -> None:
        self.client.close()


def relay_stats(child: ChildProcess, timeout: float = 10.0) -> dict[str, Any]:
    """A relay's live STATS (SIGUSR1; ``examples.soak.live_stats``). Owner thread."""
    return live_stats(child, timeout)


def tracebacks_in_log(child: ChildProcess) -> list[str]:
    """Lines of a child's stderr log that start a Python traceback."""
    text = child.log_path.read_text(errors="replace")
    return [line for line in text.splitlines() if "Traceback (most recent call last)" in line]


def stop_cleanly(net: LocalNetwork, killed: frozenset[str] = frozenset()) -> None:
    """Stop the network (SIGTERM) and check every child not in ``killed`` exited with status 0
    and logged no traceback: a clean shutdown, not just a dead process. Owner thread."""
    net.stop()
    for child in net.children():
        if child.name in killed:
            continue
        assert child.popen.returncode == 0, (child.name, child.popen.returncode,
                                             child.log_tail(20))
        assert not tracebacks_in_log(child), child.log_tail(40)


def memory_limited_exit(reactor: Reactor, data_dir: Path, nickname: str,
                        limit: int) -> RelayNode:
    """A started in-process exit to loopback with MaxMemInQueues ``limit`` (below tor's floor,
    as tests may) and the DoS limits off (one client address opens everything)."""
    identity = RelayIdentity.load_or_create(data_dir, nickname)
    config = RelayConfig(nickname=nickname, testing_network=True,
                         exit_policy=("accept 127.0.0.1:*", "reject *:*"),
                         dos=DosConfig(connection_enabled=False, circuit_creation_enabled=False))
    node = RelayNode(reactor, identity, config, queue_memory_limit=limit)
    node.start()
    return node


class EndlessSource:
    """A loopback service that writes to every connection as fast as it is read."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.address = self.server.getsockname()[:2]
        self.sent = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        threading.Thread(target=self._accept, name="source-accept", daemon=True).start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            thread = threading.Thread(target=self._pump, args=(conn,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _pump(self, conn: socket.socket) -> None:
        chunk = bytes(16384)
        conn.settimeout(0.2)
        with conn:
            while not self._stop.is_set():
                try:
                    n = conn.send(chunk)
                except TimeoutError:
                    continue
                except OSError:
                    return
                with self._lock:
                    self.sent += n

    def close(self) -> None:
        self._stop.set()
        self.server.close()
        for thread in self._threads:
            thread.join(5)
