"""Loopback services the attacks aim at, and a next relay played by this process.

* :class:`Listener`: a TCP listener on a loopback address that counts the connections it
  accepts and hands each to a behaviour: :func:`secret_service` (writes a secret: a relay that
  lets a client read it has leaked a loopback-only service), :func:`silent_port` (accepts and
  never speaks: the open port of a port scan), :func:`endless_source` (writes without end:
  what a sniper downloads).
* :class:`NeverAccepting`: a listening socket whose backlog is full and that never accepts:
  connections to it hang in SYN_SENT, each holding a descriptor of whoever dials it.
* :func:`closed_port`: a loopback port nothing listens on.
* :class:`FakeNextRelay`: the next hop of an EXTEND2, with a real identity's certificates
  (``benchmarks.rawpeer.RawPeer.serve``), so the relay under attack accepts the link: it
  answers each CREATE2 with the CREATED2 payload its script gives, counts the relay cells
  that arrive per circuit, can stop reading (a next hop that stalls), and can send cells back.

Threads: each object runs its own threads (daemon, stopped by ``close``); the counters are
read from the owner thread (ints, set by one thread each).
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections import Counter, deque
from collections.abc import Callable

from benchmarks.rawpeer import RawPeer, fixed_cell, split_cells
from relay.cells import CellCommand
from relay.handshakes import NTOR_REPLY_LEN, encode_created2
from relay.identity.keys import RelayIdentity

__all__ = [
    "FakeNextRelay",
    "Listener",
    "NeverAccepting",
    "closed_port",
    "endless_source",
    "good_created2",
    "secret_service",
    "silent_port",
]

_SECRET = b"the loopback-only secret: only this machine may read it\n"
_SOURCE_BLOCK = bytes(range(256)) * 256  # 64 KiB


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


class Listener:
    """A loopback listener on a thread: counts accepted connections, gives each to
    ``serve(conn)`` on its own thread. Owner thread (``close``)."""

    def __init__(self, host: str, serve: Callable[[socket.socket, threading.Event], None],
                 *, name: str) -> None:
        """Listen on ``host`` (a loopback address), any free port."""
        self.host = host
        self.name = name
        self.sock = socket.socket(_family(host))
        self.sock.bind((host, 0))
        self.sock.listen(64)
        self.sock.settimeout(0.1)
        self.port: int = self.sock.getsockname()[1]
        self.accepted = 0
        self.bytes_sent = 0
        self._serve = serve
        self._stop = threading.Event()
        self._conns: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, name=f"svc-{name}", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted += 1
            self._conns.append(conn)
            threading.Thread(target=self._serve_one, args=(conn,), daemon=True).start()

    def _serve_one(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError):
            self._serve(conn, self._stop)

    def count_sent(self, n: int) -> None:
        """A behaviour wrote ``n`` bytes (one writer thread at a time per service)."""
        self.bytes_sent += n

    def close(self) -> None:
        """Stop accepting and close every connection."""
        self._stop.set()
        self.sock.close()
        self._thread.join(2)
        for conn in self._conns:
            with contextlib.suppress(OSError):
                conn.close()


def secret_service(host: str) -> Listener:
    """A loopback-only service that writes a secret to whoever connects."""

    def serve(conn: socket.socket, stop: threading.Event) -> None:
        conn.sendall(_SECRET)
        stop.wait(30)

    return Listener(host, serve, name=f"secret-{host}")


def silent_port(host: str) -> Listener:
    """An open port that accepts and never reads or writes."""
    return Listener(host, lambda conn, stop: stop.wait(300), name=f"silent-{host}")


def endless_source(host: str) -> Listener:
    """A service that writes 64 KiB blocks to each connection until it fails or is closed;
    ``bytes_sent`` counts what the kernel took."""
    holder: list[Listener] = []

    def serve(conn: socket.socket, stop: threading.Event) -> None:
        conn.settimeout(0.2)
        while not stop.is_set():
            try:
                sent = conn.send(_SOURCE_BLOCK)
            except TimeoutError:
                continue
            holder[0].count_sent(sent)

    listener = Listener(host, serve, name=f"source-{host}")
    holder.append(listener)
    return listener


class NeverAccepting:
    """A listening socket with a backlog of 0 that never accepts: the kernel completes at most
    one connection into its queue and drops the SYNs of the rest, which stay SYN_SENT."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        """Bind and listen on ``host``, any free port. Owner thread."""
        self.sock = socket.socket(_family(host))
        self.sock.bind((host, 0))
        self.sock.listen(0)
        self.port: int = self.sock.getsockname()[1]

    def close(self) -> None:
        """Close it (the pending connections are reset)."""
        self.sock.close()


def closed_port(host: str = "127.0.0.1") -> int:
    """A port on ``host`` that nothing listens on (bound once, then closed). Any thread."""
    with socket.socket(_family(host)) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
    return port


def good_created2(index: int) -> bytes:
    """A well-formed CREATED2 payload (64 bytes of HDATA: the relay does not check them, the
    client would). Any thread (pure)."""
    return encode_created2(bytes(NTOR_REPLY_LEN))


def _send(peer: RawPeer, data: bytes) -> None:
    """Write on a link whose reads poll with a short timeout: a write gets a long one."""
    peer.sock.settimeout(10)
    try:
        peer.sock.sendall(data)
    finally:
        peer.sock.settimeout(0.05)


class FakeNextRelay:
    """A next relay played by this process (see the module docstring). Owner thread."""

    def __init__(self, identity: RelayIdentity, *,
                 created2: Callable[[int], bytes] = good_created2,
                 rcvbuf: int | None = None) -> None:
        """Listen on 127.0.0.1 with ``identity``'s certificates; the n-th CREATE2 (0-based,
        over all links) is answered with CREATED2 carrying ``created2(n)``. ``rcvbuf``: the
        accepted links' SO_RCVBUF (small: a stalled hop backs up at once)."""
        self.identity = identity
        self.rsa_id = identity.identity_digest
        self._created2 = created2
        self.sock = socket.socket()
        if rcvbuf is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.1)
        self.port: int = self.sock.getsockname()[1]
        self.creates = 0
        self.create_ids: list[int] = []
        self.relay_cells: Counter[int] = Counter()  # RELAY and RELAY_EARLY per circuit id
        self.early_cells = 0
        self.destroys: dict[int, int] = {}  # circuit id -> reason
        self.links = 0
        self.links_ended = 0
        self.errors: list[str] = []
        self._stall = threading.Event()
        self._stop = threading.Event()
        self._outgoing: deque[bytes] = deque()
        self._socks: list[socket.socket] = []
        self._threads = [threading.Thread(target=self._accept, name="fake-relay", daemon=True)]
        self._threads[0].start()

    @property
    def total_relay_cells(self) -> int:
        """RELAY and RELAY_EARLY cells received on every circuit."""
        return sum(self.relay_cells.values())

    def stall(self) -> None:
        """Stop reading every link (after the cell being read now)."""
        self._stall.set()

    def send(self, circ_id: int, command: int, payload: bytes = b"") -> None:
        """Send one fixed cell on the (first) link, from its thread, soon. Any thread."""
        self._outgoing.append(fixed_cell(circ_id, command, payload))

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self._socks.append(conn)
            thread = threading.Thread(target=self._link, args=(conn,), daemon=True,
                                      name="fake-relay-link")
            self._threads.append(thread)
            thread.start()

    def _link(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(10)
            peer = RawPeer.serve(conn, self.identity)
            self.links += 1
            peer.sock.settimeout(0.05)
            # cells that came with the handshake's last read (a relay may send its first
            # CREATE2 in the same write as its NETINFO)
            cells, peer.buf = split_cells(peer.buf)
            for circ_id, command, payload in cells:
                self._on_cell(peer, circ_id, command, payload)
            while not self._stop.is_set():
                if self._stall.is_set():
                    self._stop.wait(0.05)
                    continue
                while self._outgoing:
                    _send(peer, self._outgoing.popleft())
                try:
                    data = peer.sock.recv(65536)
                except TimeoutError:
                    continue
                if not data:
                    break
                cells, peer.buf = split_cells(peer.buf + data)
                for circ_id, command, payload in cells:
                    self._on_cell(peer, circ_id, command, payload)
        except (OSError, EOFError, AssertionError) as exc:
            if not self._stop.is_set():
                self.errors.append(f"{type(exc).__name__}: {exc}")
        finally:
            self.links_ended += 1

    def _on_cell(self, peer: RawPeer, circ_id: int, command: int, payload: bytes) -> None:
        if command == CellCommand.CREATE2:
            index = self.creates
            self.creates += 1
            self.create_ids.append(circ_id)
            _send(peer, fixed_cell(circ_id, CellCommand.CREATED2, self._created2(index)))
        elif command in (CellCommand.RELAY, CellCommand.RELAY_EARLY):
            self.relay_cells[circ_id] += 1
            if command == CellCommand.RELAY_EARLY:
                self.early_cells += 1
        elif command == CellCommand.DESTROY:
            self.destroys[circ_id] = payload[0]

    def close(self) -> None:
        """Close the listener and every link; join the threads."""
        self._stop.set()
        self.sock.close()
        for conn in self._socks:
            with contextlib.suppress(OSError):
                conn.close()
        for thread in self._threads:
            thread.join(2)
