"""A Tor link peer on a blocking socket, for programs that script a relay's peer: the tests'
strangers and the hostile peers of ``benchmarks.attacks``.

:class:`RawPeer` is a minimal link initiator (link protocol 4+: 4-byte circuit ids, fixed cells
of 514 bytes) over TLS (Python's ``ssl``, no certificate checks: it plays a client that does
not care who the relay is) or, with ``tls=False``, plain TCP for relays run with plain links:
the VERSIONS/NETINFO handshake (the relay's CERTS and AUTH_CHALLENGE are skipped), fixed cells
out and in, CREATE_FAST, and waiting for the relay to hang up. :meth:`RawPeer.serve` plays a
responding relay on an accepted socket, with a real identity's TLS certificate and CERTS (so a
relay extending to it accepts it), without checking the initiator. :meth:`RawPeer.next_cell`
reads any cell (variable-length ones too) and skips padding. :class:`CellPump` moves a peer to
non-blocking mode and sends and receives in one thread at once, for floods that must read the
relay's answers while they write (a Python ``ssl`` socket must not be read and written from two
threads at the same time).

Users: ``test_relay_bad_input`` and ``test_relay_backpressure`` use it as it is (the latter
also as a fake next relay), ``test_fuzz_relay.Stranger`` adds variable-length cells and
per-circuit bookkeeping, ``test_faults_network.NonReader`` stops reading once its streams are
connected; ``benchmarks.attacks`` builds its attacks on it.

It is written with plain sockets, the cell codec (``relay.cells``) and the cell layout of
``relay.framing``, not with ``relay.link``'s connection: the relay is checked against a second
implementation of the link handshake and of the cell reader.

Threads: a :class:`RawPeer` and its :class:`CellPump` belong to the thread that uses them (one
at a time); :func:`fixed_cell` and :func:`var_cell` are any thread (pure).
"""

from __future__ import annotations

import select
import socket
import ssl
import struct
import tempfile
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from relay import framing
from relay.cells import CELL_HEADER_V3, CellCommand, encode_versions, is_var_length
from relay.framing import FIXED_CELL_LEN, HEADER, VAR_LENGTH, fixed_cell
from relay.handshakes import CreateFastClient
from relay.identity.authenticate import build_auth_challenge
from relay.identity.keys import RelayIdentity
from relay.link import NetInfo, encode_netinfo
from tor1 import CELL_PAYLOAD_LEN
from tor1.reference import HopKeys, OriginCrypto


def var_cell(command: int, payload: bytes, circ_id: int = 0) -> bytes:
    """A variable-length cell (link protocol 4+)."""
    return framing.var_cell(circ_id, command, payload)


_LINK_VERSION = 4  # framing of every cell after VERSIONS (4-byte circuit ids)
_VERSIONS_HEADER = struct.Struct(CELL_HEADER_V3.format + VAR_LENGTH.format.lstrip(">"))
"""VERSIONS on any link: a 2-byte circuit id, the command, the length."""
_PADDINGS = frozenset({int(CellCommand.PADDING), int(CellCommand.VPADDING)})


def split_cells(data: bytes) -> tuple[list[tuple[int, int, bytes]], bytes]:
    """The complete cells at the start of ``data`` (fixed and variable-length, padding
    included) as ``(circ_id, command, payload)``, and the bytes left over. Any thread (pure)."""
    cells: list[tuple[int, int, bytes]] = []
    offset, size = 0, len(data)
    while size - offset >= HEADER.size:
        circ_id, command = HEADER.unpack_from(data, offset)
        if is_var_length(command, _LINK_VERSION):
            if size - offset < HEADER.size + VAR_LENGTH.size:
                break
            (length,) = VAR_LENGTH.unpack_from(data, offset + HEADER.size)
            start = offset + HEADER.size + VAR_LENGTH.size
            end = start + length
        else:
            end = offset + FIXED_CELL_LEN
            start = offset + HEADER.size
        if end > size:
            break
        cells.append((circ_id, command, data[start:end]))
        offset = end
    return cells, data[offset:]


class RawPeer:
    """A minimal Tor link initiator on a blocking socket. The thread that made it."""

    def __init__(self, port: int, *, timeout: float = 10.0, tls: bool = True,
                 host: str = "127.0.0.1", rcvbuf: int | None = None) -> None:
        """Connect to ``host:port`` (the TLS handshake runs in :meth:`handshake`).
        ``rcvbuf``: SO_RCVBUF set before connecting (a small one makes a peer that stops
        reading stall its sender sooner)."""
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        try:
            if rcvbuf is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            sock.settimeout(timeout)
            sock.connect((host, port))
        except BaseException:
            sock.close()
            raise
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
        circ, command, length = _VERSIONS_HEADER.unpack(peer.read_exact(_VERSIONS_HEADER.size))
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
        circ, command, length = _VERSIONS_HEADER.unpack(self.read_exact(_VERSIONS_HEADER.size))
        assert (circ, command) == (0, CellCommand.VERSIONS)
        self.read_exact(length)
        self.skip_to_netinfo()
        self.send_cell(0, CellCommand.NETINFO, encode_netinfo(NetInfo(0, "127.0.0.1")))

    def skip_to_netinfo(self) -> None:
        """Read handshake cells (variable-length ones skipped) up to and including NETINFO."""
        while True:
            circ_id, command = HEADER.unpack(self.read_exact(HEADER.size))
            # CERTS, AUTH_CHALLENGE, AUTHENTICATE, VPADDING
            if is_var_length(command, _LINK_VERSION):
                (length,) = VAR_LENGTH.unpack(self.read_exact(VAR_LENGTH.size))
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
        circ_id, command = HEADER.unpack(self.read_exact(HEADER.size))
        return circ_id, command, self.read_exact(CELL_PAYLOAD_LEN)

    def next_cell(self) -> tuple[int, int, bytes]:
        """The next cell that is not padding, fixed or variable-length: ``(circ_id, command,
        payload)``; ``EOFError`` if the connection closes first. A socket timeout leaves the
        cell being read unconsumed, so the call can be repeated."""
        while True:
            self._fill(HEADER.size + VAR_LENGTH.size)
            circ_id, command = HEADER.unpack_from(self.buf)
            if is_var_length(command, _LINK_VERSION):
                (length,) = VAR_LENGTH.unpack_from(self.buf, HEADER.size)
                start = HEADER.size + VAR_LENGTH.size
            else:
                length, start = CELL_PAYLOAD_LEN, HEADER.size
            self._fill(start + length)
            payload = self.buf[start : start + length]
            self.buf = self.buf[start + length :]
            if command not in _PADDINGS:
                return circ_id, command, payload

    def _fill(self, n: int) -> None:
        """Read until at least ``n`` bytes are buffered (nothing consumed)."""
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError(f"connection closed with {len(self.buf)} of {n} bytes")
            self.buf += chunk

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


CellHandler = Callable[[int, int, bytes], None]
"""``on_cell(circ_id, command, payload)``: a cell the pump read (padding skipped)."""
_WRITE_PIECE = 65536
_READ_SIZE = 262144
_READS_PER_ROUND = 64  # then the writes get a turn, even if the peer never stops sending


class CellPump:
    """Write queued bytes to a :class:`RawPeer` while reading its cells, in one thread.

    The peer's socket is put in non-blocking mode (its handshake must be done); :meth:`run`
    selects on it, hands every cell read to ``on_cell`` (which may :meth:`queue` more) and
    writes what is queued, until a condition holds or a deadline passes. The thread that
    made it only."""

    def __init__(self, peer: RawPeer, on_cell: CellHandler) -> None:
        """Take over ``peer`` (whose bytes already read but not yet parsed are kept)."""
        self.peer = peer
        self.on_cell = on_cell
        self.closed = False  # the other side closed (or reset) the connection
        self.sent_bytes = 0
        self.cells_read = 0
        self._out: deque[bytes] = deque()
        self._chunk: bytes | None = None
        self._queued = 0
        peer.sock.setblocking(False)

    @property
    def unsent(self) -> int:
        """Bytes queued and not yet written."""
        return self._queued

    def queue(self, data: bytes) -> None:
        """Write ``data`` after what is already queued."""
        for start in range(0, len(data), _WRITE_PIECE):
            piece = data[start : start + _WRITE_PIECE]
            self._out.append(piece)
            self._queued += len(piece)

    def run(self, until: Callable[[], bool], deadline: float) -> bool:
        """Pump until ``until()`` holds (True) or ``time.monotonic()`` reaches ``deadline`` or
        the connection closes (``until()`` then)."""
        sock = self.peer.sock
        self._parse()
        while not until():
            left = deadline - time.monotonic()
            if left <= 0 or self.closed:
                return until()
            writing = self._chunk is not None or bool(self._out)
            readable, writable, _ = select.select([sock], [sock] if writing else [], [],
                                                  min(left, 0.05))
            if readable:
                self._read()
            if writable and not self.closed:
                self._write()
        return True

    def _read(self) -> None:
        sock = self.peer.sock
        chunks = [self.peer.buf]
        for _ in range(_READS_PER_ROUND):
            try:
                data = sock.recv(_READ_SIZE)
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
                break
            except OSError:
                self.closed = True
                break
            if not data:
                self.closed = True
                break
            chunks.append(data)
        self.peer.buf = b"".join(chunks)
        self._parse()

    def _parse(self) -> None:
        cells, self.peer.buf = split_cells(self.peer.buf)
        for circ_id, command, payload in cells:
            self.cells_read += 1
            if command not in _PADDINGS:
                self.on_cell(circ_id, command, payload)

    def _write(self) -> None:
        sock = self.peer.sock
        while True:
            if self._chunk is None:
                if not self._out:
                    return
                self._chunk = self._out.popleft()
            try:
                sent = sock.send(self._chunk)
            except (ssl.SSLWantWriteError, ssl.SSLWantReadError, BlockingIOError):
                return  # retried with the same bytes, as OpenSSL wants
            except OSError:
                self.closed = True
                return
            self.sent_bytes += sent
            self._queued -= sent
            self._chunk = self._chunk[sent:] or None
