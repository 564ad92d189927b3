"""The processes of the network: start them with their logs, notice deaths, stop every one.

:class:`ManagedProcess` is one child started in its own session (a terminal's Ctrl-C reaches
only the orchestrator, which then stops the children in order), with its stderr (and, unless
its stdout is read line by line, its stdout) in a log file of its directory. With
``read_stdout`` a reader thread keeps every stdout line (and copies it to ``stdout.log``), and
:meth:`ManagedProcess.wait_line` waits for one that matches a pattern (a READY line). With
``stdin_pipe`` the child's stdin is a pipe held open by this process: a child that stops on
stdin EOF (``examples.echo --exit-on-stdin-eof``, the external relays) outlives no orchestrator,
even one killed by SIGKILL. tor itself gets ``__OwningControllerProcess`` instead (see
:mod:`tornet.torrc`).

:class:`ProcessGroup` is every child of one network. A watchdog thread checks them every
``poll_interval`` with ``waitid(..., WNOWAIT)`` (which sees an exit without reaping it, so a
pid is never reused while this module may still signal it). When a child exits that was not
asked to, the group records why (:attr:`ProcessGroup.failure`, with the tail of its log) and
stops every other child. :meth:`ProcessGroup.stop_all` sends SIGTERM to each child, waits up
to a grace period, then SIGKILLs the child's whole process group (the child and whatever it
started in its session, e.g. the tor under a stand-in relay), and only then reaps it.

:func:`signals_interrupt` turns SIGINT and SIGTERM into :class:`Interrupted` in the main thread
(once: later signals are ignored so that the clean-up they started runs to the end).

Threads: :class:`ProcessGroup` and :class:`ManagedProcess` methods from any thread (a lock
guards the group's list and the stop); :func:`signals_interrupt` in the main thread only.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO

from tornet.netns import NetPlace

__all__ = [
    "Interrupted",
    "ManagedProcess",
    "NetworkFailed",
    "ProcessGroup",
    "alive_of",
    "process_identity",
    "signals_interrupt",
]


class NetworkFailed(RuntimeError):
    """A process of the network died, did not come up, or the network was stopped."""


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived (``signum`` says which)."""

    def __init__(self, signum: int) -> None:
        """Any thread."""
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _exit_status(pid: int) -> int | None:
    """None while ``pid`` (our child) runs; then its status (negative: killed by that signal).
    The zombie is left for Popen to reap."""
    try:
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return 0  # already reaped (finish() keeps the real status)
    if info is None:
        return None
    return info.si_status if info.si_code == os.CLD_EXITED else -info.si_status


def _exited(pid: int) -> bool:
    """True once ``pid`` (our child) has exited."""
    return _exit_status(pid) is not None


class ManagedProcess:
    """One child of the network, its logs, and (optionally) its stdout lines."""

    def __init__(
        self, name: str, popen: subprocess.Popen[bytes], directory: Path,
        log_files: Sequence[Path], stderr_file: IO[bytes], stdout_log: IO[bytes] | None,
    ) -> None:
        """Wrap a started child; start its stdout reader when its stdout is a pipe. Called by
        :meth:`ProcessGroup.start` (any thread)."""
        self.name = name
        self.popen = popen
        self.directory = directory
        self.log_files = [*log_files, directory / "stderr.log"]
        self.stopping = False
        self.returncode: int | None = None
        self._stderr_file = stderr_file
        self._stdout_log = stdout_log
        self._lines: list[str] = []
        self._lines_changed = threading.Condition()
        self._stdout_done = False
        self._reader: threading.Thread | None = None
        if popen.stdout is not None:
            self.log_files.append(directory / "stdout.log")
            self._reader = threading.Thread(target=self._read_stdout,
                                            name=f"tornet-out-{name}", daemon=True)
            self._reader.start()

    @property
    def pid(self) -> int:
        """The child's process id (also its process group id). Any thread."""
        return self.popen.pid

    def alive(self) -> bool:
        """True until the child exits. Any thread."""
        return self.returncode is None and not _exited(self.pid)

    def _read_stdout(self) -> None:
        """Reader thread: keep and log each stdout line until EOF."""
        assert self.popen.stdout is not None
        for raw in self.popen.stdout:
            if self._stdout_log is not None:
                self._stdout_log.write(raw)
                self._stdout_log.flush()
            with self._lines_changed:
                self._lines.append(raw.decode(errors="replace").rstrip("\r\n"))
                self._lines_changed.notify_all()
        with self._lines_changed:
            self._stdout_done = True
            self._lines_changed.notify_all()

    def wait_line(self, pattern: re.Pattern[str], timeout: float) -> re.Match[str]:
        """The first stdout line matching ``pattern`` (waiting up to ``timeout`` s for it).
        Raises :class:`NetworkFailed` with the log tail if the child's stdout ends or time runs
        out first. Any thread."""
        if self._reader is None:
            raise ValueError(f"{self.name}: stdout is not read (start it with read_stdout)")
        deadline = time.monotonic() + timeout
        seen = 0
        with self._lines_changed:
            while True:
                for line in self._lines[seen:]:
                    match = pattern.search(line)
                    if match:
                        return match
                seen = len(self._lines)
                left = deadline - time.monotonic()
                if self._stdout_done or left <= 0:
                    why = "exited" if self._stdout_done else f"said nothing in {timeout:.0f} s"
                    raise NetworkFailed(f"{self.name} {why} before a line matching "
                                        f"{pattern.pattern!r}\n{self.log_tail()}")
                self._lines_changed.wait(min(left, 0.5))

    def stdout_lines(self) -> list[str]:
        """Every stdout line so far (when read). Any thread."""
        with self._lines_changed:
            return list(self._lines)

    def log_tail(self, lines: int = 25) -> str:
        """The last ``lines`` lines of each of its logs, labelled. Any thread."""
        parts = []
        for path in self.log_files:
            try:
                text = path.read_text(errors="replace")
            except OSError:
                continue
            tail = text.splitlines()[-lines:]
            if tail:
                parts.append(f"--- {self.name}: {path} ---\n" + "\n".join(tail))
        return "\n".join(parts) or f"({self.name} left no log)"

    def signal(self, signum: int) -> None:
        """Send ``signum`` to the child itself (not its group) unless it exited. Any thread."""
        if not _exited(self.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signum)

    def finish(self, grace: float) -> int:
        """Wait up to ``grace`` s for the child to exit, then SIGKILL its process group (the
        child and anything left in its session), then reap it. Returns the exit status. Any
        thread (called by the group's stop)."""
        deadline = time.monotonic() + grace
        while not _exited(self.pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        # Not yet reaped, so the pid (= process group id) cannot have been reused.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        self.returncode = self.popen.wait()
        if self._reader is not None:
            self._reader.join(5)
        for stream in (self.popen.stdin, self.popen.stdout, self._stderr_file, self._stdout_log):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        return self.returncode


class ProcessGroup:
    """Every child of one network; a watchdog that stops them all when one dies."""

    def __init__(
        self, place: NetPlace, *, poll_interval: float = 0.2,
        on_failure: Callable[[str], None] | None = None,
    ) -> None:
        """Start the watchdog thread. Any thread."""
        self.place = place
        self.failure: str | None = None
        self.on_failure = on_failure
        self._processes: list[ManagedProcess] = []
        self._lock = threading.RLock()
        self._stopped = threading.Event()
        self._poll_interval = poll_interval
        self._watchdog = threading.Thread(target=self._watch, name="tornet-watchdog",
                                          daemon=True)
        self._watchdog.start()

    @property
    def processes(self) -> list[ManagedProcess]:
        """The children started so far, in start order. Any thread."""
        with self._lock:
            return list(self._processes)

    def start(
        self, name: str, argv: Sequence[str], directory: Path, *,
        log_files: Sequence[Path] = (), read_stdout: bool = False, stdin_pipe: bool = False,
        env: dict[str, str] | None = None, cwd: Path | None = None,
    ) -> ManagedProcess:
        """Start ``argv`` as child ``name`` inside the group's place, logging into
        ``directory`` (created, mode 700). ``log_files``: files the program writes itself
        (shown on failure). Raises :class:`NetworkFailed` once the group is stopped. Any
        thread."""
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        with self._lock:
            if self._stopped.is_set():
                raise NetworkFailed(f"not starting {name}: the network is stopped"
                                    + (f" ({self.failure.splitlines()[0]})"
                                       if self.failure else ""))
            stderr_file = open(directory / "stderr.log", "ab")  # closed in finish()
            stdout_log = open(directory / "stdout.log", "ab") if read_stdout else None
            popen = self.place.popen(
                list(argv),
                stdin=subprocess.PIPE if stdin_pipe else subprocess.DEVNULL,
                stdout=subprocess.PIPE if read_stdout else stderr_file,
                stderr=stderr_file,
                start_new_session=True,
                env=env,
                cwd=str(cwd or directory),
            )
            process = ManagedProcess(name, popen, directory, log_files, stderr_file, stdout_log)
            self._processes.append(process)
            return process

    def pids(self) -> list[int]:
        """The pids of every child started (alive or not). Any thread."""
        return [process.pid for process in self.processes]

    def check(self) -> None:
        """Raise :class:`NetworkFailed` if a child died or the group was stopped. Any thread."""
        if self.failure is not None:
            raise NetworkFailed(self.failure)
        if self._stopped.is_set():
            raise NetworkFailed("the network was stopped")

    def _watch(self) -> None:
        """Watchdog thread: the first unexpected exit stops the whole group."""
        while not self._stopped.wait(self._poll_interval):
            for process in self.processes:
                status = None if process.stopping else _exit_status(process.pid)
                if status is None:
                    continue
                with self._lock:  # a stop_one() may have begun since: then it is no death
                    if process.stopping:
                        continue
                self.failure = (f"{process.name} (pid {process.pid}) exited unexpectedly "
                                f"with status {status}\n{process.log_tail()}")
                if self.on_failure is not None:
                    self.on_failure(self.failure)
                self.stop_all()
                return

    def stop_one(self, process: ManagedProcess, grace: float = 10.0) -> int:
        """Stop one child on purpose (SIGTERM, SIGKILL to its group after ``grace``). Any
        thread."""
        with self._lock:
            process.stopping = True
            if process.returncode is not None:
                return process.returncode
            process.signal(signal.SIGTERM)
            return process.finish(grace)

    def stop_all(self, grace: float = 10.0) -> None:
        """Stop every child: SIGTERM to all (newest first), then for each wait up to
        ``grace`` s in total before SIGKILL to its process group, then reap. Idempotent and
        safe from several threads at once. Any thread."""
        with self._lock:
            self._stopped.set()
            processes = list(reversed(self._processes))
            for process in processes:
                process.stopping = True
                if process.returncode is None:
                    process.signal(signal.SIGTERM)
            deadline = time.monotonic() + grace
            for process in processes:
                if process.returncode is None:
                    process.finish(max(0.0, deadline - time.monotonic()))
        if threading.current_thread() is not self._watchdog:
            self._watchdog.join(5)


@contextlib.contextmanager
def signals_interrupt() -> Iterator[threading.Event]:
    """Inside the block, the first SIGINT or SIGTERM raises :class:`Interrupted` in the main
    thread; any later one is ignored, so the clean-up it set off is not cut short. The block
    gets an Event: set it before a clean-up that no signal may interrupt (from then on every
    signal is ignored). The previous handlers come back at the end. Main thread only."""
    quiet = threading.Event()

    def handler(signum: int, _frame: object) -> None:
        if quiet.is_set():
            return
        quiet.set()
        raise Interrupted(signum)

    previous = {signum: signal.signal(signum, handler)
                for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield quiet
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def process_identity(pid: int) -> tuple[int, int] | None:
    """``(pid, start time in clock ticks since boot)`` from /proc/PID/stat: names one process
    even after its pid is reused; None when it is gone. Any thread."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()
    return pid, int(fields[19])  # field 22 (starttime); fields[0] is field 3


def alive_of(identities: Iterable[tuple[int, int]]) -> list[int]:
    """The pids among ``identities`` whose process still exists and is not a zombie. Any
    thread."""
    alive = []
    for pid, started in identities:
        now = process_identity(pid)
        if now is None or now[1] != started:
            continue
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state != "Z":
            alive.append(pid)
    return alive
