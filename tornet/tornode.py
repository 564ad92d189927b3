"""One tor process of the network: its directory layout, torrc, start, log and control port.

A node's directory (mode 700) holds ``torrc``, ``tor.log``, ``resolv.conf``
(``nameserver 127.0.0.1``), ``stderr.log`` and the tor ``data`` directory (keys, cached
consensus, ``control_auth_cookie``). :func:`start_tor` writes the torrc from a list of
:class:`tornet.torrc.Option` and starts ``tor -f torrc`` in a :class:`tornet.procs.ProcessGroup`
(``--defaults-torrc /dev/null``: the system's /etc/tor/torrc is never read).
:func:`wait_log` waits for a line in the log; :func:`open_control` connects to the
node's ControlPort once tor wrote its cookie.

Threads: any thread (blocking helpers; a node is owned by the network that made it).
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tornet import torrc
from tornet.control import ControlConnection, ControlError
from tornet.netns import NetPlace
from tornet.procs import ManagedProcess, NetworkFailed, ProcessGroup

__all__ = ["OR_LISTENER_READY", "TorNode", "find_program", "open_control", "start_tor",
           "wait_log"]

OR_LISTENER_READY = "Opened OR listener connection (ready)"
"""The notice-log line tor writes when its ORPort accepts connections."""


def find_program(name: str) -> str | None:
    """The path of ``tor`` / ``tor-gencert`` (PATH, then Debian's /usr/sbin and /usr/bin), or
    None. Any thread."""
    found = shutil.which(name)
    if found:
        return found
    for directory in ("/usr/bin", "/usr/sbin", "/usr/local/bin"):
        candidate = os.path.join(directory, name)
        if os.access(candidate, os.X_OK):
            return candidate
    return None


@dataclass
class TorNode:
    """A tor of the network: where it lives and which ports it has."""

    name: str
    role: str
    """"authority", "relay", "client" or "bridge-client"."""
    directory: Path
    control_port: int | None = None
    orport: int | None = None
    dirport: int | None = None
    socks_port: int | None = None
    fingerprint: str = ""
    process: ManagedProcess | None = field(default=None, repr=False)

    @property
    def data_dir(self) -> Path:
        """tor's DataDirectory. Any thread (pure)."""
        return self.directory / "data"

    @property
    def log_file(self) -> Path:
        """tor's log (notice level unless asked otherwise). Any thread (pure)."""
        return self.directory / "tor.log"

    @property
    def resolv_conf(self) -> Path:
        """The resolver file a relay's DNS reads (nameserver 127.0.0.1). Any thread (pure)."""
        return self.directory / "resolv.conf"

    @property
    def cookie_file(self) -> Path:
        """Where tor writes the control-port authentication cookie. Any thread (pure)."""
        return self.data_dir / "control_auth_cookie"

    def prepare(self) -> None:
        """Create the directory, data directory (mode 700) and resolv.conf. Any thread."""
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.data_dir.mkdir(mode=0o700, exist_ok=True)
        self.directory.chmod(0o700)
        self.data_dir.chmod(0o700)
        self.resolv_conf.write_text("nameserver 127.0.0.1\n")

    @property
    def pid(self) -> int:
        """tor's process id. Any thread."""
        if self.process is None:
            raise NetworkFailed(f"{self.name} is not started")
        return self.process.pid

    def log_text(self) -> str:
        """The notice log so far ('' before tor wrote it). Any thread."""
        try:
            return self.log_file.read_text(errors="replace")
        except OSError:
            return ""


def start_tor(
    group: ProcessGroup, tor_binary: str, node: TorNode, options: list[torrc.Option],
) -> ManagedProcess:
    """Write ``node``'s torrc and start tor in ``group``; sets ``node.process``. Any thread."""
    node.prepare()
    path = node.directory / "torrc"
    path.write_text(torrc.render(options))
    node.process = group.start(
        node.name, [tor_binary, "--defaults-torrc", os.devnull, "-f", str(path)],
        node.directory, log_files=[node.log_file],
    )
    return node.process


def wait_log(
    node: TorNode, marker: str, timeout: float, check: Callable[[], None] | None = None,
) -> None:
    """Wait until ``marker`` appears in the node's notice log; ``check()`` runs every poll
    (it raises to give up). Raises NetworkFailed with the log tail on timeout. Any thread."""
    deadline = time.monotonic() + timeout
    while marker not in node.log_text():
        if check is not None:
            check()
        if time.monotonic() > deadline:
            tail = node.process.log_tail() if node.process else node.log_text()[-3000:]
            raise NetworkFailed(f"{node.name}: no {marker!r} in {timeout:.0f} s\n{tail}")
        time.sleep(0.05)


def open_control(
    place: NetPlace, node: TorNode, timeout: float = 30.0,
    check: Callable[[], None] | None = None,
) -> ControlConnection:
    """An authenticated control connection to ``node`` (retrying until tor listens and wrote
    its cookie). Any thread."""
    if node.control_port is None:
        raise ValueError(f"{node.name} has no ControlPort")
    deadline = time.monotonic() + timeout
    while True:
        if check is not None:
            check()
        try:
            return ControlConnection.open(place.connect, node.control_port, node.cookie_file,
                                          node.name)
        except (OSError, ControlError) as exc:
            if time.monotonic() > deadline:
                raise NetworkFailed(f"{node.name}: no control connection in {timeout:.0f} s "
                                    f"({exc})") from exc
            time.sleep(0.1)
