"""Helpers shared by the reliability suites (fuzzing, fault injection, shutdown, soak); no tests.

* :func:`fuzz_settings`: hypothesis settings whose example count is the suite's bounded default
  unless ``RELAYCRYPT_FUZZ_EXAMPLES`` asks for more (``make fuzz`` sets it), so the same tests
  run briefly in ``make test`` and long in ``make fuzz``.
* :func:`run_until`: drive a reactor until a condition holds (a generous deadline only stops a
  broken test from hanging; tests assert on the condition, never on the time taken).
* :class:`LogRecorder`: keeps the records of some loggers, to check that a closed link or
  circuit logged its reason and that nothing logged an unexpected traceback.
* :func:`process_sample`: RSS, thread count and open file descriptors of a process, read from
  ``/proc`` (the soak and the back-pressure tests sample relays with it).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from hypothesis import HealthCheck, settings

from reactor import Reactor

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


def run_until(reactor: Reactor, done: Callable[[], bool], deadline: float = 20.0) -> bool:
    """Run the loop until ``done()`` (polled every 2 ms) or ``deadline`` seconds; return
    ``done()``. Loop thread."""
    if done():
        return True
    stop_timer = reactor.call_later(deadline, reactor.stop)
    stopped = [False]

    def poll() -> None:
        if stopped[0]:
            return
        if done():
            stopped[0] = True
            reactor.stop()
        else:
            reactor.call_later(0.002, poll)

    reactor.call_soon(poll)
    reactor.run()
    stopped[0] = True
    stop_timer.cancel()
    return done()


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


@dataclass(frozen=True)
class ProcessSample:
    """One look at a process: resident memory, threads, open file descriptors."""

    rss_bytes: int
    threads: int
    fds: int


def process_sample(pid: int) -> ProcessSample:
    """Read RSS, thread count and open fds of ``pid`` from ``/proc`` (Linux)."""
    rss = threads = 0
    with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
            elif line.startswith("Threads:"):
                threads = int(line.split()[1])
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    return ProcessSample(rss, threads, fds)
