"""A Tor link peer on a blocking socket, for tests that script a relay's peer; no tests.

:class:`RawPeer` is a minimal link initiator (link protocol 4+: 4-byte circuit ids, fixed cells
of 514 bytes) over TLS (Python's ``ssl``, no certificate checks: it plays a client that does
not care who the relay is) or, with ``tls=False``, plain TCP for relays run with plain links:
the VERSIONS/NETINFO handshake (the relay's CERTS and AUTH_CHALLENGE are skipped), fixed cells
out and in, CREATE_FAST, and waiting for the relay to hang up. :meth:`RawPeer.serve` plays a
responding relay on an accepted socket, with a real identity's TLS certificate and CERTS (so a
relay extending to it accepts it), without checking the initiator. The tests' strangers
build on it: ``test_relay_bad_input`` and ``test_relay_backpressure`` use it as it is (the
latter also as a fake next relay), ``test_fuzz_relay.Stranger`` adds variable-length cells
and per-circuit bookkeeping, ``test_faults_network.NonReader`` stops reading once its
streams are connected.

It is written with plain sockets, ``struct`` and the cell codec (``relay.cells``), not with
``relay.link`` or ``relay.framing``: the relay is checked against a second implementation of the
link handshake and of the cell framing.
"""

from __future__ import annotations

import socket
import ssl
import struct
import tempfile
import time
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from relay.cells import CellCommand, encode_versions
from relay.handshakes import CreateFastClient
from relay.identity.authenticate import build_auth_challenge
from relay.identity.keys import RelayIdentity
from relay.link import NetInfo, encode_netinfo
from tor1 import CELL_PAYLOAD_LEN
from tor1.reference import HopKeys, OriginCrypto


def fixed_cell(circ_id: int, command: int, payload: bytes = b"") -> bytes:
    """A fixed cell: ``payload`` zero-padded to 509 bytes (a longer one is sent as it is)."""
    return struct.pack(">IB", circ_id, command) + payload + bytes(CELL_PAYLOAD_LEN - len(payload))


def var_cell(command: int, payload: bytes, circ_id: int = 0) -> bytes:
    """A variable-length cell (link protocol 4+)."""
    return struct.pack(">IBH", circ_id, command, len(payload)) + payload


class RawPeer:
    """A minimal Tor link initiator on a blocking socket. The thread that made it."""

    def __init__(self, port: int, *, timeout: float = 10.0, tls: bool = True,
                 rcvbuf: int | None = None) -> None:
        sock = socket.socket()
        sock.settimeout(timeout)
        if rcvbuf is not None:  # before connecting: the window the peer offers
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.connect(("127.0.0.1", port))
        if tls:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            # The TLS handshake runs on the first read or write, i.e. in handshake(), which
            # tests call on their peer thread while the relay's loop runs.
            sock = context.wrap_socket(sock, do_handshake_on_connect=False)
        self._attach(sock)

    @classmethod
    def serve(cls, sock: socket.socket, identity: RelayIdentity) -> RawPeer:
        """Play the responding relay ``identity`` on an accepted socket: TLS with its link
        certificate, VERSIONS, CERTS, AUTH_CHALLENGE and NETINFO out, and the initiator's
        handshake cells read up to its NETINFO (not checked)."""
        with tempfile.TemporaryDirectory() as tmp:
            cert, key = Path(tmp, "cert.pem"), Path(tmp, "key.pem")
            cert.write_bytes(identity.tls.link_cert.public_bytes(serialization.Encoding.PEM))
            key.write_bytes(identity.tls.link_key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption()))
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(cert, key)
        peer = cls.__new__(cls)
        peer._attach(context.wrap_socket(sock, server_side=True))
        circ, command, length = struct.unpack(">HBH", peer.read_exact(5))
        assert (circ, command) == (0, CellCommand.VERSIONS)
        peer.read_exact(length)
        peer.sock.sendall(encode_versions([4, 5])
                          + var_cell(CellCommand.CERTS, identity.responder_certs_body())
                          + var_cell(CellCommand.AUTH_CHALLENGE, build_auth_challenge())
                          + fixed_cell(0, CellCommand.NETINFO,
                                       encode_netinfo(NetInfo(int(time.time()), "127.0.0.1",
                                                              ("127.0.0.1",)))))
        peer.skip_to_netinfo()
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
        """VERSIONS (4 and 5) both ways, the relay's CERTS/AUTH_CHALLENGE (skipped) and
        NETINFO, ours."""
        self.sock.sendall(encode_versions([4, 5]))
        circ, command, length = struct.unpack(">HBH", self.read_exact(5))
        assert (circ, command) == (0, CellCommand.VERSIONS)
        self.read_exact(length)
        self.skip_to_netinfo()
        self.send_cell(0, CellCommand.NETINFO, encode_netinfo(NetInfo(0, "127.0.0.1")))

    def skip_to_netinfo(self) -> None:
        """Read handshake cells (variable-length ones skipped) up to and including NETINFO."""
        while True:
            circ_id, command = struct.unpack(">IB", self.read_exact(5))
            if command >= 128:  # CERTS, AUTH_CHALLENGE, AUTHENTICATE, VPADDING
                (length,) = struct.unpack(">H", self.read_exact(2))
                self.read_exact(length)
                continue
            self.read_exact(CELL_PAYLOAD_LEN)
            assert (circ_id, command) == (0, CellCommand.NETINFO), command
            return

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
