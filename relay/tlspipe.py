"""A link's TLS record crypto after its handshake: on the worker pool, small pieces on the loop.

Once a link is open, every byte it reads is TLS-decrypted and every byte it writes
TLS-encrypted: for a relay that forwards cells, as much AES as the relay crypto itself, and on
the loop thread it would cap the relay at one core. A :class:`TlsPipe` moves that work to the
pool: the link's session becomes the state of ONE pool circuit with two lanes
(``relay.tlslanes``: decrypt and encrypt), so one worker at a time owns the session, each
lane's results come back in the order it was fed, and the link only moves bytes between the
socket and the pool.

Small pieces on the loop thread
-------------------------------
A hand-off costs two thread wake-ups, far more than decrypting one cell's record. So a piece
of at most ``inline_bytes`` is done on the loop thread, at once, when nothing of the link is on
the pool (``in_flight`` is 0): no worker is inside the session then (a worker's call on the
session returns before it puts the reply, and ``in_flight`` counts every piece until its reply
is delivered; a worker that still owns the circuit only takes pieces submitted later), and
nothing queued ahead of the piece could be overtaken, in either lane. Once the pipe is dead
(its circuit closed, ``in_flight`` forced to 0) it is never idle: a worker may still be inside
the session. Under load, reads and writes are large or the pool is busy
with the link: the pool does the work.

Bounds
------
Ciphertext read and not yet decrypted counts against ``read_limit``: past it,
``on_read_full(True)`` asks the link to stop reading until the backlog is decrypted
(``on_read_full(False)``). Plaintext handed to :meth:`encrypt` and not yet back as records is
:attr:`encrypting` bytes: the link counts it as written, so its write watermarks (and the circuit
scheduler behind them) see it.

Errors and closing: a TLS error on either lane (a corrupt record from the peer, say) kills the
session: ``on_error(exc)`` once, and the pipe takes nothing more. :meth:`close` returns the
close_notify to send when the session is idle; with work in flight it abandons that work (the
pool discards it) and returns None: the link then closes without close_notify.

Threads: loop thread only (the callbacks run on the loop thread); the pool's workers run
``relay.tlslanes.process``/``group`` on the session while they own the circuit.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from relay import tlslanes
from relay.tlscontext import TlsError
from workers.circuit import Circuit
from workers.pool import PoolClosedError, WorkerPool

__all__ = ["DEFAULT_INLINE_TLS_BYTES", "DEFAULT_TLS_READ_LIMIT", "TlsOffload", "TlsPipe"]

DEFAULT_INLINE_TLS_BYTES = 16384
"""A read or write of at most this many bytes, with nothing of its link on the pool, is
TLS-crypted on the loop thread (docs/tuning.md)."""
DEFAULT_TLS_READ_LIMIT = 1 << 20
"""Ciphertext a link may have waiting for decryption before it stops reading."""

Piece = bytes | bytearray | memoryview


@dataclass(frozen=True)
class TlsOffload:
    """Where and how a link's TLS record crypto runs once the link is open: on ``pool``,
    pieces of at most ``inline_bytes`` on the loop thread, at most ``read_limit`` bytes of
    ciphertext waiting for decryption. Any thread (immutable)."""

    pool: WorkerPool
    inline_bytes: int = DEFAULT_INLINE_TLS_BYTES
    read_limit: int = DEFAULT_TLS_READ_LIMIT


class TlsPipe:
    """One open link's TLS session, crypted on ``pool`` (see the module docstring). Loop thread
    only."""

    __slots__ = (
        "_backlog",
        "_circuit",
        "_dead",
        "_inline_bytes",
        "_pending",
        "_pool",
        "_read_full",
        "_read_limit",
        "_session",
        "decrypting",
        "encrypting",
        "inline_jobs",
        "on_error",
        "on_plain",
        "on_read_full",
        "on_records",
        "pool_jobs",
    )

    def __init__(
        self,
        pool: WorkerPool,
        session: Any,
        *,
        on_plain: Callable[[bytes], object],
        on_records: Callable[[bytes], object],
        on_error: Callable[[TlsError], object],
        on_read_full: Callable[[bool], object],
        inline_bytes: int = DEFAULT_INLINE_TLS_BYTES,
        read_limit: int = DEFAULT_TLS_READ_LIMIT,
    ) -> None:
        """Take over ``session`` (handshake done, idle). ``on_plain(data)`` gets decrypted bytes
        in read order, ``on_records(data)`` the records to write in write order. Loop thread
        only."""
        if not session.handshake_done:
            raise ValueError("TlsPipe needs a session whose handshake is done")
        self._pool = pool
        self._session = session
        self.on_plain = on_plain
        self.on_records = on_records
        self.on_error = on_error
        self.on_read_full = on_read_full
        self._inline_bytes = inline_bytes
        self._read_limit = read_limit
        self._read_full = False
        self._dead = False
        self.decrypting = 0  # ciphertext bytes on the pool
        self.encrypting = 0  # plaintext bytes on the pool
        self.inline_jobs = 0
        self.pool_jobs = 0
        # Per lane, the submitted pieces not yet delivered: (cells counted, bytes). A delivery
        # covers whole pieces (the pool joins a lane's pieces into one batch), and how many
        # cells it covered is what the circuit's in_flight lost.
        self._pending: tuple[deque[tuple[int, int]], deque[tuple[int, int]]] = (deque(), deque())
        self._backlog = 0  # cells submitted, not delivered, both lanes
        self._circuit: Circuit = pool.open_circuit(
            session, process=tlslanes.process, group=tlslanes.group, joined=True,
            on_result=self._on_result, on_error=self._on_job_error, context="tls")

    @property
    def idle(self) -> bool:
        """Open and nothing of this link on the pool: the loop thread may use the session.
        Loop thread only."""
        return not self._dead and self._circuit.in_flight == 0

    @property
    def busy(self) -> bool:
        """Open with work on the pool: results are still to come. Loop thread only."""
        return not self._dead and self._circuit.in_flight != 0

    @property
    def read_full(self) -> bool:
        """The decrypt backlog passed ``read_limit`` and has not yet drained to half of it:
        the link should not read. Loop thread only."""
        return self._read_full

    @property
    def session(self) -> Any:
        """The TLS session (its flags may be read at any time). Loop thread only."""
        return self._session

    # ------------------------------------------------------------------ the two lanes

    def decrypt(self, data: bytes) -> None:
        """TLS bytes read from the socket, in read order. Loop thread only."""
        if self._dead or not data:
            return
        if self.idle and len(data) <= self._inline_bytes:
            self._here(self._session.decrypt, data, self.on_plain)
            return
        if not self._submit(tlslanes.LANE_DECRYPT, data, len(data)):
            return
        self.decrypting += len(data)
        if not self._read_full and self.decrypting > self._read_limit:
            self._read_full = True
            self.on_read_full(True)

    def encrypt(self, pieces: Sequence[Piece], size: int) -> None:
        """Plaintext to send (``size`` bytes in ``pieces``), in write order. Loop thread only."""
        if self._dead:
            return
        if self.idle and size <= self._inline_bytes:
            self._here(self._session.encrypt, pieces, self.on_records)
            return
        if self._submit(tlslanes.LANE_ENCRYPT, list(pieces), size):
            self.encrypting += size

    def _here(self, crypt: Callable[[Any], bytes], item: Any,
              deliver: Callable[[bytes], object]) -> None:
        """Crypt ``item`` on this (the loop) thread and deliver the result at once; the pipe is
        idle, so no worker is in the session."""
        self.inline_jobs += 1
        try:
            result = crypt(item)
        except TlsError as exc:
            self._die(exc)
            return
        deliver(result)

    def _submit(self, lane: int, item: Any, size: int) -> bool:
        """Hand ``item`` to the pool; False (and the pipe dead) if the pool takes no more."""
        cells = tlslanes.count(item)
        try:
            self._pool.submit(self._circuit, lane, item, count=cells)
        except PoolClosedError:
            self._die(TlsError("the worker pool is closed"))
            return False
        self._pending[lane].append((cells, size))
        self._backlog += cells
        self.pool_jobs += 1
        return True

    def _delivered(self, lane: int) -> int:
        """Pop the pieces a delivery on ``lane`` covered; their bytes. The cells it covered
        are what ``in_flight`` lost since the last delivery; when the pool also cancelled
        pieces (a pool closing without draining), those are popped with it: the counts stay
        consistent, and nothing more is asked of a pipe whose pool is closing."""
        in_flight = self._circuit.in_flight
        cells, self._backlog = self._backlog - in_flight, in_flight
        pending = self._pending[lane]
        size = 0
        while cells > 0 and pending:
            piece_cells, piece_size = pending.popleft()
            cells -= piece_cells
            size += piece_size
        return size

    def _on_result(self, circuit: Circuit, lane: int, result: bytes) -> None:
        size = self._delivered(lane)
        if lane == tlslanes.LANE_DECRYPT:
            self.decrypting = max(0, self.decrypting - size)
            if self._read_full and self.decrypting <= self._read_limit // 2:
                self._read_full = False
                self.on_read_full(False)
            self.on_plain(result)
        else:
            self.encrypting = max(0, self.encrypting - size)
            self.on_records(result)

    def _on_job_error(self, circuit: Circuit, lane: int, exc: BaseException) -> None:
        if isinstance(exc, TlsError):
            self._die(exc)
        else:  # not TLS's refusal: a bug or a broken kernel; still this link only
            self._die(TlsError(f"TLS {('decrypt', 'encrypt')[lane]} failed: {exc!r}"))

    def _die(self, exc: TlsError) -> None:
        if self._dead:
            return
        self._dead = True
        self._pool.close_circuit(self._circuit)
        self.on_error(exc)

    # ------------------------------------------------------------------ closing

    def close(self) -> bytes | None:
        """Stop: the close_notify to send, or None when work was in flight (abandoned, see the
        module docstring) or the session is dead. Idempotent. Loop thread only."""
        idle = self.idle  # False once dead
        self._dead = True
        self._pool.close_circuit(self._circuit)
        if not idle:
            return None
        try:
            return self._session.close()
        except TlsError:
            return None
