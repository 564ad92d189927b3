"""Where the network lives: a fresh network namespace when permitted, else the host's loopback.

:class:`NetPlace` owns one thread, the *network thread*. In namespace mode that thread calls
``unshare(CLONE_NEWNET)`` on itself (a network namespace belongs to a thread, not to the whole
process, on Linux), brings ``lo`` up with ``ip link set lo up`` run from that thread, and from
then on every socket the network needs (free-port probes, control connections, SOCKS
connections) and every child process (``subprocess.Popen`` forks from the calling thread, so the
child inherits the thread's namespace) is made on that thread through :meth:`NetPlace.call`.
Sockets keep the namespace they were created in, so once made they can be used from any thread.
The namespace has only a loopback interface: nothing the network runs can reach another
machine, whatever a torrc says. It disappears when the thread and every child have exited.

Without ``CAP_SYS_ADMIN`` (``unshare`` fails with EPERM) or without ``ip``, the place falls back
to the host's loopback and says so in :attr:`NetPlace.description`; the torrcs of this package
dial only 127.0.0.1 either way.

Threads: :meth:`call` and :meth:`free_port` from any thread (they block until the network
thread ran the function); :meth:`close` from the owner thread.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import random
import shutil
import socket
import subprocess
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

__all__ = ["CLONE_NEWNET", "LOOPBACK", "NetPlace"]

CLONE_NEWNET = 0x40000000
"""The ``unshare(2)`` flag for a new network namespace (linux/sched.h)."""
LOOPBACK = "127.0.0.1"
"""The one address every process of the network binds and dials."""

T = TypeVar("T")
_PORT_RANGE = (20000, 32000)
"""Listening ports are drawn from here: below the default ephemeral range (32768-60999)."""


def _unshare_net_and_raise_lo() -> None:
    """Move the calling thread into a new network namespace and bring its ``lo`` up. Raises
    OSError when not permitted. Network thread only."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    if libc.unshare(CLONE_NEWNET) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"unshare(CLONE_NEWNET): {os.strerror(errno)}")
    ip = shutil.which("ip")
    if ip is None:
        raise OSError("the `ip` command is missing: cannot bring lo up in the namespace")
    subprocess.run([ip, "link", "set", "lo", "up"], check=True, capture_output=True, timeout=10)


class NetPlace:
    """A network namespace (or the host's loopback) and the thread that works inside it."""

    def __init__(self, want_namespace: bool = True) -> None:
        """Start the network thread; enter a fresh namespace when ``want_namespace`` and
        permitted. Owner thread."""
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tornet-net")
        self._given: set[int] = set()
        self._random = random.Random()
        self.namespace = False
        self.fallback_reason = "not requested"
        if want_namespace:
            try:
                self._executor.submit(_unshare_net_and_raise_lo).result(timeout=20)
                self.namespace = True
            except (OSError, subprocess.SubprocessError) as exc:
                self.fallback_reason = str(exc)
                # The failed thread may be half-way (unshared but lo down): start a clean one.
                self._executor.shutdown(wait=True)
                self._executor = ThreadPoolExecutor(max_workers=1,
                                                    thread_name_prefix="tornet-net")

    @property
    def description(self) -> str:
        """One line saying where the network runs (and why, on the host). Any thread."""
        if self.namespace:
            return "a fresh network namespace (loopback only)"
        return f"the host's loopback (no namespace: {self.fallback_reason})"

    def call(self, fn: Callable[..., T], *args: object, **kwargs: object) -> T:
        """Run ``fn(*args, **kwargs)`` on the network thread and return its result (or raise its
        exception). Any thread except the network thread itself."""
        return self._executor.submit(fn, *args, **kwargs).result()

    def free_port(self) -> int:
        """A TCP port on 127.0.0.1, free a moment ago inside this place and never handed out
        before by this place. It comes from below the kernel's ephemeral range (32768 and up
        by default), so no outgoing connection can be holding it when the program that gets
        it binds it. Any thread."""

        def probe() -> int:
            for _ in range(1000):
                port = self._random.randrange(*_PORT_RANGE)
                if port in self._given:
                    continue
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                    try:
                        sock.bind((LOOPBACK, port))
                    except OSError:
                        continue
                self._given.add(port)
                return port
            raise OSError("no free TCP port on 127.0.0.1 in the range tornet uses")

        return self.call(probe)

    def connect(self, port: int, timeout: float = 10.0) -> socket.socket:
        """A TCP connection to 127.0.0.1:``port`` inside this place (blocking socket with
        ``timeout``). Any thread."""
        return self.call(socket.create_connection, (LOOPBACK, port), timeout)

    def popen(self, argv: list[str], **kwargs: object) -> subprocess.Popen[bytes]:
        """``subprocess.Popen(argv, **kwargs)`` inside this place. Any thread."""
        return self.call(subprocess.Popen, argv, **kwargs)

    def close(self) -> None:
        """End the network thread (after every child is gone the namespace disappears).
        Owner thread; idempotent."""
        self._executor.shutdown(wait=True)
