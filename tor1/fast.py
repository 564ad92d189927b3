"""tor1 relay-cell crypto over the C batch kernel, with the reference's exact API and bytes.

What this is
------------
:class:`FastRelayCrypto` and :class:`FastOriginCrypto` are drop-in replacements for
:class:`tor1.reference.RelayCrypto` and :class:`~tor1.reference.OriginCrypto`: the
same method names, arguments, results and exceptions (``ValueError`` for a bad payload size or
hop index, :class:`~tor1.reference.UnrecognizedCell` at the origin), byte for byte. The
state lives in a ``tor1._kernel`` object (``RelayState`` / ``OriginState``), which crypts a
whole batch -- every AES layer and every SHA-1 digest -- in one C call that releases the GIL.

The fast path: joined buffers
-----------------------------
The one-cell and list (``*_many``) forms exist for compatibility; they pay for joining and
splitting Python objects. The ``*_buf`` forms take and return *joined* buffers (``n * 509``
bytes) and are what the worker pool and the relay programs use. Their input is one bytes-like
object, or a list/tuple of bytes-like pieces read as their concatenation (only the total must
be whole cells): the kernel gathers the pieces itself with the GIL released, so a caller
holding several chunks of one circuit need not ``b"".join`` them first.

* ``FastRelayCrypto.forward_buf(buf) -> (out, recognized)``: ``recognized[i]`` is 1 when cell
  ``i`` is for this relay (recognized field zero and digest matches), else 0;
* ``backward_buf(buf) -> out``, ``originate_buf(buf) -> out``;
* ``FastOriginCrypto.encrypt_buf(buf, hop) -> out``;
* ``FastOriginCrypto.decrypt_buf(buf) -> (out, hops)``: ``hops[i]`` is the hop that
  recognized cell ``i``. A cell no hop recognizes raises ``UnrecognizedCell`` (with ``index``
  and the earlier ``results``, as the reference's ``decrypt_many``); the state is then exactly
  as after the cells before it.

Each but ``backward_buf`` has a ``*_tagged_buf`` form that returns one more item, ``tags``:
the SENDME tags (20 bytes each, joined) of the recognized cells (``forward_tagged_buf``,
``decrypt_tagged_buf``) or of the marked cells (``originate_tagged_buf``,
``encrypt_tagged_buf``), exactly as the reference's ``*_tagged_many`` (see
:mod:`tor1.reference`, "SENDME tags"). The untagged forms do no tag work at all.

Several circuits in one call: group functions
---------------------------------------------
:func:`relay_group` and :func:`origin_group` build ``group`` functions for
:class:`workers.pool.WorkerPool` (see :data:`workers.circuit.GroupFn`): given the jobs
``(crypto, direction, pieces)`` of several circuits a worker owns, they make ONE
``tor1._kernel.crypt_group`` call, which releases the GIL once for all of them, and return
per job exactly what the matching ``*_buf`` method returns (or raises, as an exception
instance). Under the GIL, what a worker pays per kernel call -- taking the GIL back, the Python
around the call -- is what limits a pool when the crypto itself is cheap (relay forward runs at
the AES ceiling); grouping pays it once per group instead of once per circuit.

Threads
-------
No global mutable state. One object is one circuit's crypto state: any thread may use it, one
thread at a time (the worker pool gives a circuit to one worker at a time). Two threads calling
one object concurrently get ``RuntimeError`` from the kernel instead of corrupt keystreams.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from tor1._kernel import (
    OP_BACKWARD,
    OP_DECRYPT,
    OP_ENCRYPT,
    OP_FORWARD,
    OP_ORIGINATE,
    OP_TAGS,
    OriginState,
    RelayState,
    crypt_group,
)
from tor1.payloads import CellBuffer, buffer_len, check_payload, join_checked, split_joined
from tor1.reference import UnrecognizedCell

if TYPE_CHECKING:
    from workers.circuit import GroupFn

__all__ = [
    "RELAY_OPS",
    "RELAY_TAGGED_OPS",
    "FastOriginCrypto",
    "FastRelayCrypto",
    "HopKeysLike",
    "origin_group",
    "relay_group",
]

#: Kernel op per pool direction for a relay: 0 forward (Kf), 1 backward (Kb), 2 originate.
RELAY_OPS: tuple[int, ...] = (OP_FORWARD, OP_BACKWARD, OP_ORIGINATE)
#: The same with SENDME tags where there are digests: ``forward_tagged_buf``, ``backward_buf``,
#: ``originate_tagged_buf``.
RELAY_TAGGED_OPS: tuple[int, ...] = (OP_FORWARD | OP_TAGS, OP_BACKWARD, OP_ORIGINATE | OP_TAGS)



class HopKeysLike(Protocol):
    """Anything with a hop's four key fields (``tor1.reference.HopKeys`` is one)."""

    @property
    def df(self) -> bytes: ...
    @property
    def db(self) -> bytes: ...
    @property
    def kf(self) -> bytes: ...
    @property
    def kb(self) -> bytes: ...


def _key_tuple(keys: HopKeysLike) -> tuple[bytes, bytes, bytes, bytes]:
    return (keys.df, keys.db, keys.kf, keys.kb)


class FastRelayCrypto:
    """One relay's crypto state for one circuit, on the kernel. API of ``RelayCrypto``.

    Not thread-safe: one thread at a time (the worker that owns the circuit); a concurrent call
    raises ``RuntimeError``.
    """

    __slots__ = ("_state", "keys")

    def __init__(self, keys: HopKeysLike) -> None:
        self.keys = keys
        self._state = RelayState(*_key_tuple(keys))

    # ---- joined buffers: the fast path

    def forward_buf(self, buf: CellBuffer) -> tuple[bytes, bytes]:
        """Decrypt ``n`` joined payloads with Kf; return ``(out, recognized)`` where
        ``recognized[i]`` is 1 for a cell recognized here (forward digest advanced), else 0."""
        return self._state.forward(buf)

    def backward_buf(self, buf: CellBuffer) -> bytes:
        """Encrypt ``n`` joined payloads with Kb (relaying toward the client)."""
        return self._state.backward(buf)

    def originate_buf(self, buf: CellBuffer) -> bytes:
        """Set each payload's digest from Db's running hash, in order; encrypt with Kb."""
        return self._state.originate(buf)

    def forward_tagged_buf(self, buf: CellBuffer) -> tuple[bytes, bytes, bytes]:
        """``forward_buf``, and the tags of the recognized cells: ``(out, recognized, tags)``."""
        return self._state.forward_tagged(buf)

    @property
    def kernel_batch_methods(self) -> tuple[Callable[[CellBuffer], tuple[bytes, bytes, bytes]],
                                            Callable[[CellBuffer], bytes]]:
        """``(forward_tagged_buf, backward_buf)`` as the kernel's own bound methods: the same
        results without this class's Python frame, for a caller that keeps them (a relay's
        small batches on the loop thread)."""
        return self._state.forward_tagged, self._state.backward

    def originate_tagged_buf(self, buf: CellBuffer) -> tuple[bytes, bytes]:
        """``originate_buf``, and the tags of the marked cells: ``(out, tags)``."""
        return self._state.originate_tagged(buf)

    # ---- the reference's one-cell and list forms

    def forward(self, payload: bytes) -> tuple[bool, bytes]:
        """Decrypt one cell moving away from the client; ``(recognized here, plaintext)``."""
        check_payload(payload)
        out, recognized = self._state.forward(payload)
        return bool(recognized[0]), out

    def forward_many(self, payloads: Sequence[bytes]) -> list[tuple[bool, bytes]]:
        """``forward`` for each payload in order (one kernel call)."""
        out, recognized = self._state.forward(join_checked(payloads))
        cells = split_joined(out, len(payloads))
        return [(bool(flag), cell) for flag, cell in zip(recognized, cells, strict=True)]

    def backward(self, payload: bytes) -> bytes:
        """Encrypt one cell moving toward the client with Kb (no digest)."""
        check_payload(payload)
        return self._state.backward(payload)

    def backward_many(self, payloads: Sequence[bytes]) -> list[bytes]:
        """``backward`` for each payload in order (one kernel call)."""
        return split_joined(self._state.backward(join_checked(payloads)), len(payloads))

    def originate(self, payload: bytes) -> bytes:
        """Set the digest with Db's running hash, then encrypt with Kb."""
        check_payload(payload)
        return self._state.originate(payload)

    def originate_many(self, payloads: Sequence[bytes]) -> list[bytes]:
        """``originate`` for each payload in order (one kernel call)."""
        return split_joined(self._state.originate(join_checked(payloads)), len(payloads))


class FastOriginCrypto:
    """The client's crypto state for one circuit of N hops, on the kernel. API of
    ``OriginCrypto``.

    Not thread-safe: one thread at a time (the worker that owns the circuit); a concurrent call
    raises ``RuntimeError``.
    """

    __slots__ = ("_state",)

    def __init__(self, hops: Iterable[HopKeysLike]) -> None:
        self._state = OriginState([_key_tuple(keys) for keys in hops])

    @property
    def n_hops(self) -> int:
        """Number of hops this circuit has keys for."""
        return self._state.n_hops

    def add_hop(self, keys: HopKeysLike) -> None:
        """Append a hop (after an EXTENDED2): its state starts fresh at keystream position 0."""
        self._state.add_hop(*_key_tuple(keys))

    # ---- joined buffers: the fast path

    def encrypt_buf(self, buf: CellBuffer, hop: int) -> bytes:
        """Per payload in order, set the digest with ``hop``'s forward hash; then apply Kf of
        hop, hop-1, ..., 0 to the whole buffer."""
        return self._state.encrypt(buf, hop)

    def decrypt_buf(self, buf: CellBuffer) -> tuple[bytes, bytes]:
        """Decrypt ``n`` joined payloads; return ``(out, hops)``, ``hops[i]`` being the hop that
        recognized cell ``i``. A cell no hop recognizes raises :class:`UnrecognizedCell`
        (``index``, ``results`` of the cells before it); the state is as after those cells."""
        out, hops = self._state.decrypt(buf)
        if len(out) != buffer_len(buf):
            raise _unrecognized(out, hops)
        return out, hops

    def encrypt_tagged_buf(self, buf: CellBuffer, hop: int) -> tuple[bytes, bytes]:
        """``encrypt_buf``, and the tags of the marked cells: ``(out, tags)``."""
        return self._state.encrypt_tagged(buf, hop)

    def decrypt_tagged_buf(self, buf: CellBuffer) -> tuple[bytes, bytes, bytes]:
        """``decrypt_buf``, and the tag of every cell: ``(out, hops, tags)``. Raises like
        ``decrypt_buf`` (the tags of the cells before a bad one are not reported)."""
        out, hops, tags = self._state.decrypt_tagged(buf)
        if len(out) != buffer_len(buf):
            raise _unrecognized(out, hops)
        return out, hops, tags

    # ---- the reference's one-cell and list forms

    def encrypt(self, payload: bytes, hop: int) -> bytes:
        """Set the digest with ``hop``'s forward hash, then apply Kf of hop, hop-1, ..., 0."""
        check_payload(payload)
        return self._state.encrypt(payload, hop)

    def encrypt_many(self, payloads: Sequence[bytes], hop: int) -> list[bytes]:
        """``encrypt`` for each payload in order (one kernel call, one AES call per layer)."""
        return split_joined(self._state.encrypt(join_checked(payloads), hop), len(payloads))

    def decrypt(self, payload: bytes) -> tuple[int, bytes]:
        """Peel Kb layers from hop 0 outward; ``(hop, plaintext)`` of the first hop that
        recognizes the cell. None does: :class:`UnrecognizedCell`, state unchanged."""
        check_payload(payload)
        out, hops = self._state.decrypt(payload)
        if not hops:
            raise UnrecognizedCell(0, [])
        return hops[0], out

    def decrypt_many(self, payloads: Sequence[bytes]) -> list[tuple[int, bytes]]:
        """``decrypt`` for each payload in order; on the first unrecognized cell raise
        :class:`UnrecognizedCell` with its ``index`` and the earlier ``results``."""
        out, hops = self._state.decrypt(join_checked(payloads))
        results = list(zip(hops, split_joined(out, len(hops)), strict=True))
        if len(hops) != len(payloads):
            raise UnrecognizedCell(len(hops), results)
        return results


def _unrecognized(out: bytes, hops: bytes) -> UnrecognizedCell:
    """The exception for a decrypt that stopped at cell ``len(hops)``. Any thread."""
    return UnrecognizedCell(len(hops), list(zip(hops, split_joined(out, len(hops)), strict=True)))


def relay_group(ops: Sequence[int] = RELAY_OPS) -> GroupFn:
    """A pool ``group`` function for :class:`FastRelayCrypto` circuits; direction ``d`` runs
    kernel op ``ops[d]`` (``OP_FORWARD``, ``OP_BACKWARD`` or ``OP_ORIGINATE``, the first and
    the last optionally with ``OP_TAGS``: see :data:`RELAY_TAGGED_OPS`).

    Each job's result is what ``forward_buf`` / ``backward_buf`` / ``originate_buf`` (or their
    ``*_tagged_buf`` forms) returns, or the exception instance it raises. Any thread that owns
    every job's circuit.
    """
    table = tuple(ops)

    def group(jobs: list[tuple[Any, int, Any]]) -> list[Any]:
        return crypt_group([(crypto._state, table[direction], pieces)
                            for crypto, direction, pieces in jobs])

    return group


def origin_group(encrypt_hop: int) -> GroupFn:
    """A pool ``group`` function for :class:`FastOriginCrypto` circuits: direction 0 is
    ``encrypt_buf(pieces, encrypt_hop)``, direction 1 is ``decrypt_buf(pieces)``.

    Each job's result is what that method returns, or the exception instance it raises
    (:class:`~tor1.reference.UnrecognizedCell` for decrypt, as ``decrypt_buf``). Any
    thread that owns every job's circuit.
    """

    def group(jobs: list[tuple[Any, int, Any]]) -> list[Any]:
        results = crypt_group([
            (crypto._state, OP_ENCRYPT, pieces, encrypt_hop) if direction == 0
            else (crypto._state, OP_DECRYPT, pieces)
            for crypto, direction, pieces in jobs
        ])
        for index, (_, direction, pieces) in enumerate(jobs):
            result = results[index]
            if direction != 0 and isinstance(result, tuple):
                out, hops = result
                if len(out) != buffer_len(pieces):
                    results[index] = _unrecognized(out, hops)
        return results

    return group
