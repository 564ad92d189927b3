"""C tor as the relay under test: a private loopback tor relay driven by the same outside load.

:class:`TorRelayProcess` starts Debian's tor with ``relay.torpeer.start_tor`` (a relay on a
free 127.0.0.1 port that publishes nothing and dials nothing but the relays it is asked to
extend to, here the load's fake next hops on 127.0.0.1; ``TestingTorNetwork`` lets it extend
to a private address), and reads what a neighbour needs from its data directory: the RSA
identity fingerprint (``fingerprint``) and the ntor onion key (``keys/secret_onion_key_ntor``,
tor's file, whose public half is the key tor publishes). It offers what
:func:`benchmarks.relay_cpu.measure` uses of :class:`benchmarks.relay_proc.RelayProcess`:
``descriptor``, ``address``, ``pid``, ``times``, ``split``, ``counters`` (None: tor has no
counter of relayed cells to ask for; the benchmark counts the cells that reached the far ends
instead, which for our relay agree with its own counter within 1 %), ``stop``, ``log_tail``.

tor relays every cell on its main thread (its worker threads only answer onionskins), so the
split files the main thread as ``loop`` and the others as ``other``.

Threads: owner thread (start blocks until tor listens).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from benchmarks.relay_proc import CpuSplit, RelayStartError, ThreadTimes, thread_times
from relay.directory import RelayDescriptor
from relay.identity.keyfiles import read_curve25519
from relay.torpeer import TorPeer, TorStartError, start_tor

__all__ = ["TorRelayProcess"]


class TorRelayProcess:
    """One private tor relay under test. See the module docstring."""

    def __init__(self, directory: Path) -> None:
        """Configure; :meth:`start` starts tor in ``directory``. Owner thread."""
        self.directory = directory
        self.peer: TorPeer | None = None
        self.descriptor: RelayDescriptor | None = None
        self.address: tuple[str, int] = ("127.0.0.1", 0)
        self.pid = 0
        """tor's process id, once started (kept after it stopped)."""

    def start(self, timeout: float = 60.0) -> None:
        """Start tor, wait for its listener and its keys. Raises
        :class:`benchmarks.relay_proc.RelayStartError`. Owner thread (blocks)."""
        try:
            self.peer = start_tor(directory=self.directory, timeout=timeout)
        except TorStartError as exc:
            raise RelayStartError(str(exc)) from exc
        self.pid = self.peer.pid
        data = self.directory / "data"
        deadline = time.monotonic() + timeout
        while not ((data / "fingerprint").exists()
                   and (data / "keys" / "secret_onion_key_ntor").exists()):
            if time.monotonic() > deadline:
                self.stop()
                raise RelayStartError(f"tor wrote no keys in {timeout:.0f} s:\n"
                                      f"{self.log_tail()}")
            time.sleep(0.05)
        fingerprint = (data / "fingerprint").read_text().split()[1]
        secret = read_curve25519(data / "keys" / "secret_onion_key_ntor")
        onion_key = X25519PrivateKey.from_private_bytes(secret).public_key().public_bytes_raw()
        self.address = ("127.0.0.1", self.peer.orport)
        self.descriptor = RelayDescriptor("relaycryptpeer", "127.0.0.1", self.peer.orport,
                                          bytes.fromhex(fingerprint), onion_key)

    def times(self) -> dict[int, ThreadTimes]:
        """CPU of every thread of tor now. Any thread."""
        return thread_times(self.pid)

    def split(self, before: dict[int, ThreadTimes], after: dict[int, ThreadTimes]) -> CpuSplit:
        """CPU between two samples: the main thread as ``loop``, the rest as ``other``. Any
        thread (pure)."""
        return CpuSplit.between(self.pid, frozenset(), before, after)

    def counters(self) -> dict[str, Any] | None:
        """None: tor has no relayed-cell counter to ask for. Any thread."""
        return None

    def stop(self) -> dict[str, Any] | None:
        """Stop tor and remove its directory. Idempotent. Owner thread."""
        if self.peer is not None:
            self.peer.stop()
            self.peer = None
        return None

    def log_tail(self, lines: int = 20) -> str:
        """The end of tor's notice log. Any thread."""
        if self.peer is None:
            return "(tor stopped)"
        return "\n".join(self.peer.log_text().splitlines()[-lines:])
