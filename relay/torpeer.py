"""Start and stop a private, loopback-only tor relay to test against.

A real tor is the independent peer that proves the link, handshake and relay-crypto code byte
for byte. :func:`start_tor` writes a torrc (the template below, from the project's shared
``torpeer`` notes) into a fresh private directory (mode 700) on a free loopback port, starts
``tor -f DIR/torrc`` as a child process, and waits until ``notice.log`` says the OR listener is
open. The relay listens on 127.0.0.1 only, publishes nothing and dials nothing (no directory
authority is reachable, no exit, no SOCKS). Run it inside ``unshare -n`` (a network namespace
with only loopback) to make that a guarantee rather than a configuration.

The returned :class:`TorPeer` knows the pid, the port and the directory, reads the log (for error
reports: tests attach it when they fail), and :meth:`TorPeer.stop` ends that one process by its
pid and removes the directory unless asked to keep it.

Threads: these are blocking helpers for test and program set-up: call them from any thread, but
not from inside a callback of a running event loop (they sleep while tor starts).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["TORRC_TEMPLATE", "TorPeer", "TorStartError", "find_tor", "start_tor"]

TORRC_TEMPLATE = """\
# A tor relay that listens on loopback only and dials nothing.
DataDirectory @DIR@/data
Log notice file @DIR@/notice.log
Nickname relaycryptpeer
TestingTorNetwork 1
# TestingTorNetwork insists on a non-default authority; this one is never contacted.
DirAuthority fakeauth orport=9113 no-v2 127.0.0.1:9112 0000000000000000000000000000000000000000
UseDefaultFallbackDirs 0
Address 127.0.0.1
AddressDisableIPv6 1
ORPort 127.0.0.1:@ORPORT@ IPv4Only
AssumeReachable 1
PublishServerDescriptor 0
ExitRelay 0
ExitPolicy reject *:*
SocksPort 0
ClientUseIPv6 0
UseBridges 0
ServerDNSResolvConfFile @DIR@/resolv.conf
ServerDNSDetectHijacking 0
# Added to the shared template: log protocol violations by peers (our client) as warnings.
ProtocolWarnings 1
"""
"""The torrc of a loopback-only test relay: ``@DIR@`` and ``@ORPORT@`` are filled in."""

_READY_MARK = "Opened OR listener"
_STARTUP_WARNINGS = (
    "ContactInfo config option is not set",
    "DirAuthority or AlternateDirAuthority",
    "TestingTorNetwork is set",
    "running Tor as root",
    "GeoIP",
)
"""Warnings every run of the test relay logs at start-up (our torrc asks for them)."""
_LOG_NAME = "notice.log"
_STDERR_NAME = "stderr.log"


class TorStartError(RuntimeError):
    """tor is missing, exited, or did not open its OR listener in time. ``log`` holds its log."""

    def __init__(self, message: str, log: str = "") -> None:
        """``log`` is appended to the message. Any thread."""
        super().__init__(message + (f"\n--- tor's log ---\n{log}" if log else ""))
        self.log = log


def find_tor() -> str | None:
    """The path of the ``tor`` binary, or None when it is not installed. Any thread."""
    found = shutil.which("tor")
    if found:
        return found
    for candidate in ("/usr/bin/tor", "/usr/sbin/tor", "/usr/local/bin/tor"):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@dataclass
class TorPeer:
    """A running private tor relay: its process, OR port and private directory."""

    process: subprocess.Popen[bytes]
    orport: int
    directory: Path
    host: str = "127.0.0.1"
    keep_directory: bool = False
    _stopped: bool = field(default=False, repr=False)

    @property
    def pid(self) -> int:
        """tor's process id. Any thread."""
        return self.process.pid

    @property
    def log_path(self) -> Path:
        """The notice-level log file. Any thread."""
        return self.directory / _LOG_NAME

    def log_text(self) -> str:
        """tor's whole notice log so far, then anything it wrote to stderr ('' if nothing yet).
        Any thread."""
        parts = []
        for path, title in ((self.log_path, ""), (self.directory / _STDERR_NAME, "stderr")):
            try:
                text = path.read_text(errors="replace")
            except OSError:
                continue
            if text:
                parts.append(f"--- {title} ---\n{text}" if title else text)
        return "\n".join(parts)

    def log_errors(self) -> list[str]:
        """The ``[warn]`` and ``[err]`` lines of the log: what tor complained about. Any thread."""
        return [
            line for line in self.log_text().splitlines() if "[warn]" in line or "[err]" in line
        ]

    def unexpected_warnings(self) -> list[str]:
        """``log_errors`` minus the warnings every start-up of this test relay logs: what a
        client did wrong shows up here (with ``ProtocolWarnings 1``). Any thread."""
        return [line for line in self.log_errors()
                if not any(known in line for known in _STARTUP_WARNINGS)]

    def running(self) -> bool:
        """True while the tor process has not exited. Any thread."""
        return self.process.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        """Stop tor by its pid (SIGTERM, then SIGKILL after ``timeout``) and remove the directory
        unless ``keep_directory``. Idempotent. Any thread."""
        if self._stopped:
            return
        self._stopped = True
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    self.process.kill()
                self.process.wait()
        if not self.keep_directory:
            shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> TorPeer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_tor(
    *,
    tor_binary: str | None = None,
    host: str = "127.0.0.1",
    port: int | None = None,
    timeout: float = 30.0,
    directory: str | os.PathLike[str] | None = None,
    keep_directory: bool = False,
    attempts: int = 3,
) -> TorPeer:
    """Start a private loopback tor relay and wait until its OR listener is open.

    ``port=None`` picks a free port (and retries with another, up to ``attempts`` times, if tor
    could not bind it). ``directory`` (created, mode 700) defaults to a fresh temporary one.
    Raises :class:`TorStartError` with tor's log when tor is missing, exits, or is not ready
    within ``timeout`` seconds. Any thread (blocks; not from a loop callback).
    """
    binary = tor_binary or find_tor()
    if binary is None:
        raise TorStartError("tor is not installed (run tools/install_tor.sh as root)")
    last_error: TorStartError | None = None
    for _ in range(max(1, attempts)):
        base = Path(directory) if directory is not None else Path(
            tempfile.mkdtemp(prefix="relaycrypt-tor-")
        )
        try:
            return _start_once(binary, host, port or _free_port(host), timeout, base,
                               keep_directory)
        except TorStartError as exc:
            last_error = exc
            if not keep_directory:
                shutil.rmtree(base, ignore_errors=True)
            if port is not None or "Could not bind" not in exc.log:
                break
    assert last_error is not None
    raise last_error


def _start_once(
    binary: str, host: str, port: int, timeout: float, base: Path, keep_directory: bool
) -> TorPeer:
    base.mkdir(mode=0o700, parents=True, exist_ok=True)
    base.chmod(0o700)
    (base / "data").mkdir(mode=0o700, exist_ok=True)
    (base / "resolv.conf").write_text("nameserver 127.0.0.1\n")
    torrc = TORRC_TEMPLATE.replace("@DIR@", str(base)).replace("@ORPORT@", str(port))
    if host != "127.0.0.1":
        torrc = torrc.replace("127.0.0.1:" + str(port), f"{host}:{port}")
    (base / "torrc").write_text(torrc)
    with open(base / _STDERR_NAME, "wb") as stderr_file:
        process = subprocess.Popen(
            [binary, "-f", str(base / "torrc"), "--defaults-torrc", os.devnull],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr_file,
            cwd=base,
        )
    peer = TorPeer(process, port, base, host, keep_directory)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _READY_MARK in peer.log_text():
            return peer
        if process.poll() is not None:
            raise TorStartError(f"tor exited with status {process.returncode} while starting",
                                peer.log_text())
        time.sleep(0.02)
    log = peer.log_text()
    peer.keep_directory = True
    peer.stop()
    raise TorStartError(f"tor did not open its OR listener within {timeout} s", log)
