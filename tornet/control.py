"""A tor control-port client over a plain socket (control-spec: replies, events, cookie auth).

The control protocol is line based: a command is one CRLF line; a reply is one or more lines
``CODE-text`` / ``CODE+text`` (followed by a data block ended by a lone ``.``) ending with a line
``CODE text``. Replies come in command order; asynchronous events (code 650) may come in between.
:class:`ControlConnection` runs a reader thread that splits the two: replies go to the caller
of :meth:`ControlConnection.command` (one command at a time, under a lock), events to a queue
read with :meth:`ControlConnection.next_event`. It authenticates with the cookie that
``CookieAuthentication 1`` writes to ``DataDirectory/control_auth_cookie`` (the COOKIE method:
the cookie in hex). No third-party library: the protocol needs a few dozen lines.

Threads: every public method from any thread (commands are serialised; events have one
consumer at a time by convention: whoever set the events up).
"""

from __future__ import annotations

import contextlib
import queue
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ControlConnection", "ControlError", "Reply", "bootstrap_progress"]

_CLOSED = None  # sentinel put on both queues when the connection ends


class ControlError(RuntimeError):
    """tor answered a command with an error code (or the connection ended)."""

    def __init__(self, command: str, reply: Reply | None, detail: str = "") -> None:
        """Any thread."""
        text = detail or (f"{reply.status} {' / '.join(reply.lines)}" if reply else "no reply")
        super().__init__(f"tor refused {command.split(' ', 1)[0]!r}: {text}")
        self.reply = reply


@dataclass(frozen=True)
class Reply:
    """One reply or event: its code and its lines (a data block joined into its line with
    newlines, after the ``key=`` it belongs to)."""

    status: int
    lines: list[str]

    @property
    def ok(self) -> bool:
        """True for a 2xx reply. Any thread (pure)."""
        return 200 <= self.status < 300

    @property
    def text(self) -> str:
        """The first line (for events: the whole event line). Any thread (pure)."""
        return self.lines[0] if self.lines else ""


def bootstrap_progress(phase: str) -> int:
    """The PROGRESS number of a ``status/bootstrap-phase`` value, 0 if absent. Any thread
    (pure)."""
    for word in phase.split():
        if word.startswith("PROGRESS="):
            with contextlib.suppress(ValueError):
                return int(word.split("=", 1)[1])
    return 0


class ControlConnection:
    """An authenticated control connection to one tor."""

    def __init__(self, sock: socket.socket, name: str = "tor") -> None:
        """Take over a connected socket and start the reader thread. Any thread."""
        sock.settimeout(None)
        self.name = name
        self._sock = sock
        self._file = sock.makefile("rb")
        self._replies: queue.Queue[Reply | None] = queue.Queue()
        self._events: queue.Queue[Reply | None] = queue.Queue()
        self._lock = threading.Lock()
        self._closed = False
        self._reader = threading.Thread(target=self._read, name=f"tornet-ctl-{name}",
                                        daemon=True)
        self._reader.start()

    @classmethod
    def open(
        cls, connect: Callable[[int], socket.socket], port: int, cookie_file: Path,
        name: str = "tor",
    ) -> ControlConnection:
        """Connect with ``connect(port)`` and authenticate with the cookie. Any thread."""
        connection = cls(connect(port), name)
        try:
            connection.command("AUTHENTICATE " + cookie_file.read_bytes().hex())
        except BaseException:
            connection.close()
            raise
        return connection

    def _read(self) -> None:
        """Reader thread: parse replies and events until EOF."""
        lines: list[str] = []
        try:
            while True:
                raw = self._file.readline()
                if not raw:
                    break
                line = raw.decode(errors="replace").rstrip("\r\n")
                if len(line) < 4:
                    continue
                code, separator, text = line[:3], line[3], line[4:]
                if separator == "+":
                    data = []
                    while True:
                        raw = self._file.readline()
                        if not raw:
                            break
                        chunk = raw.decode(errors="replace").rstrip("\r\n")
                        if chunk == ".":
                            break
                        data.append(chunk[1:] if chunk.startswith("..") else chunk)
                    text = text + "\n".join(data)
                lines.append(text)
                if separator == " ":
                    reply = Reply(int(code), lines)
                    lines = []
                    (self._events if code.startswith("6") else self._replies).put(reply)
        except OSError:
            pass
        finally:
            self._closed = True
            self._replies.put(_CLOSED)
            self._events.put(_CLOSED)

    def command(self, line: str, timeout: float = 30.0) -> Reply:
        """Send one command line and return tor's 2xx reply; raise :class:`ControlError` for any
        other code, a closed connection, or no reply in ``timeout`` s. Any thread."""
        with self._lock:
            if self._closed:
                raise ControlError(line, None, f"the control connection to {self.name} is closed")
            self._sock.sendall(line.encode() + b"\r\n")
            try:
                reply = self._replies.get(timeout=timeout)
            except queue.Empty:
                # A late reply would answer the next command: this connection is done.
                self._closed = True
                raise ControlError(line, None,
                                   f"no reply from {self.name} in {timeout} s") from None
        if reply is None:
            raise ControlError(line, None, f"{self.name} closed the control connection")
        if not reply.ok:
            raise ControlError(line, reply)
        return reply

    def getinfo(self, key: str) -> str:
        """The value of one GETINFO key. Any thread."""
        reply = self.command(f"GETINFO {key}")
        for line in reply.lines:
            if line.startswith(key + "="):
                return line[len(key) + 1:]
        raise ControlError(f"GETINFO {key}", reply, "the reply does not carry the key")

    def setconf(self, **options: str) -> None:
        """SETCONF key=value ... (values quoted). Any thread."""
        pairs = " ".join(f'{key}="{value}"' for key, value in options.items())
        self.command(f"SETCONF {pairs}")

    def setevents(self, *events: str) -> None:
        """Ask for these asynchronous events (none: stop them) and drop any still queued.
        Any thread."""
        self.command("SETEVENTS " + " ".join(events))
        while True:
            try:
                if self._events.get_nowait() is None:
                    self._events.put(None)
                    return
            except queue.Empty:
                return

    def next_event(self, timeout: float) -> Reply | None:
        """The next asynchronous event, or None after ``timeout`` s. Raises ControlError if the
        connection closed. Any thread."""
        try:
            event = self._events.get(timeout=max(0.0, timeout))
        except queue.Empty:
            return None
        if event is None:
            self._events.put(None)
            raise ControlError("(event)", None, f"{self.name} closed the control connection")
        return event

    def wait_bootstrap(self, timeout: float, check: Callable[[], None] | None = None,
                       progress: int = 100) -> float:
        """Poll ``status/bootstrap-phase`` until its PROGRESS reaches ``progress`` (100: done;
        75: enough directory information to build circuits); return the seconds waited.
        ``check()`` runs every poll (it raises to give up early, e.g. when a process died).
        Raises TimeoutError with the last phase. Any thread."""
        start = time.monotonic()
        phase = ""
        while time.monotonic() - start < timeout:
            if check is not None:
                check()
            phase = self.getinfo("status/bootstrap-phase")
            if bootstrap_progress(phase) >= progress:
                return time.monotonic() - start
            time.sleep(0.2)
        raise TimeoutError(f"{self.name} did not reach {progress} % in {timeout:.0f} s: {phase}")

    def close(self) -> None:
        """Close the connection (the reader thread ends). Any thread; idempotent."""
        self._closed = True
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self._file.close()
        with contextlib.suppress(OSError):
            self._sock.close()
        if threading.current_thread() is not self._reader:
            self._reader.join(5)
