"""A Tor link peer on a plain blocking socket, for tests that script a relay's peer; no tests.

:class:`RawPeer` is a minimal link initiator (link protocol 4+: 4-byte circuit ids, fixed cells
of 514 bytes): the VERSIONS/NETINFO handshake, fixed cells out and in, CREATE_FAST, and waiting
for the relay to hang up. The tests' strangers build on it: ``test_relay_bad_input`` and
``test_relay_backpressure`` use it as it is (the latter also as a fake next relay, on an accepted
socket), ``test_fuzz_relay.Stranger`` adds variable-length cells and per-circuit bookkeeping,
``test_faults_network.NonReader`` stops reading once its streams are connected.

It is written with plain sockets, ``struct`` and the cell codec (``relay.cells``), not with
``relay.link`` or ``relay.framing``: the relay is checked against a second implementation of the
link handshake and of the cell framing.
"""

from __future__ import annotations

import socket
import struct
import time

from relay.cells import CellCommand, encode_versions
from relay.handshakes import CreateFastClient
from relay.link import NetInfo, encode_netinfo
from tor1 import CELL_PAYLOAD_LEN
from tor1.reference import HopKeys, OriginCrypto


def fixed_cell(circ_id: int, command: int, payload: bytes = b"") -> bytes:
    """A fixed cell: ``payload`` zero-padded to 509 bytes (a longer one is sent as it is)."""
    return struct.pack(">IB", circ_id, command) + payload + bytes(CELL_PAYLOAD_LEN - len(payload))


class RawPeer:
    """A minimal Tor link initiator on a blocking socket. The thread that made it."""

    def __init__(self, port: int, *, timeout: float = 10.0) -> None:
        self._attach(socket.create_connection(("127.0.0.1", port), timeout=timeout))

    @classmethod
    def on_socket(cls, sock: socket.socket) -> RawPeer:
        """A peer over an already connected socket (one a test accepted, to play a relay)."""
        peer = cls.__new__(cls)
        peer._attach(sock)
        return peer

    def _attach(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def close(self) -> None:
        self.sock.close()

    def read_exact(self, n: int) -> bytes:
        """The next ``n`` bytes; ``EOFError`` if the connection closes first."""
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError(f"connection closed with {len(self.buf)} of {n} bytes")
            self.buf += chunk
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def handshake(self) -> None:
        """VERSIONS (4 and 5) both ways, the relay's NETINFO, ours."""
        self.sock.sendall(encode_versions([4, 5]))
        circ, command, length = struct.unpack(">HBH", self.read_exact(5))
        assert (circ, command) == (0, CellCommand.VERSIONS)
        self.read_exact(length)
        _, command, _ = self.recv_cell()
        assert command == CellCommand.NETINFO
        self.send_cell(0, CellCommand.NETINFO, encode_netinfo(NetInfo(0, "127.0.0.1")))

    def send_cell(self, circ_id: int, command: int, payload: bytes = b"") -> None:
        """One fixed cell, ``payload`` zero-padded to 509 bytes."""
        self.sock.sendall(fixed_cell(circ_id, command, payload))

    def recv_cell(self) -> tuple[int, int, bytes]:
        """The next fixed cell: ``(circ_id, command, payload)``."""
        circ_id, command = struct.unpack(">IB", self.read_exact(5))
        return circ_id, command, self.read_exact(CELL_PAYLOAD_LEN)

    def closed_by_peer(self, timeout: float = 10.0) -> bool:
        """True once the relay closes the connection (cells before that are skipped)."""
        deadline = time.monotonic() + timeout
        self.sock.settimeout(0.5)
        while time.monotonic() < deadline:
            try:
                if not self.sock.recv(65536):
                    return True
            except TimeoutError:
                continue
            except ConnectionResetError:
                return True
        return False

    def create_fast(self, circ_id: int) -> OriginCrypto:
        """CREATE_FAST on ``circ_id``; the next cell must be its CREATED_FAST."""
        client = CreateFastClient()
        self.send_cell(circ_id, CellCommand.CREATE_FAST, client.onionskin)
        got_id, command, payload = self.recv_cell()
        assert (got_id, command) == (circ_id, CellCommand.CREATED_FAST)
        return OriginCrypto([HopKeys.from_material(client.complete(payload))])
