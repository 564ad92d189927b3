"""Which tor1 implementation a circuit gets: the C batch kernel, or the pure-Python reference.

``relay_crypto_for(keys)`` and ``origin_crypto_for(hops)`` are the one place the rest of the
project builds a circuit's crypto state. They return :class:`tor1.fast.FastRelayCrypto`
/ :class:`~tor1.fast.FastOriginCrypto` when the kernel extension is importable, and the
reference :class:`tor1.reference.RelayCrypto` / :class:`~tor1.reference.OriginCrypto`
otherwise, or whenever the environment variable ``RELAYCRYPT_PURE`` is set to anything but
``""`` or ``"0"`` (read at each call, so a test or a benchmark can switch per circuit). Both
backends give the same bytes and offer the same methods, including the joined-buffer forms
(``forward_buf``, ``backward_buf``, ``originate_buf``, ``encrypt_buf``, ``decrypt_buf``) and their
SENDME-tagged forms (``*_tagged_buf``): for the reference they are the thin adapters below,
which split the buffer, call the list form and join.

Threads: the factories, :func:`kernel_available`, :func:`kernel_missing_reason` and
:func:`backend_name` may be called from any thread; the objects the factories return are one
circuit's state, used by one thread at a time. No global mutable state: whether the kernel
imported is decided once, at import.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Literal, Protocol

from tor1.payloads import CellBuffer, split_buffer
from tor1.reference import HopKeys, OriginCrypto, RelayCrypto, UnrecognizedCell

try:
    from tor1.fast import FastOriginCrypto, FastRelayCrypto
except ImportError as exc:  # the extension is not built: only the reference is available
    _KERNEL_MISSING: str | None = f"{type(exc).__name__}: {exc}"
else:
    _KERNEL_MISSING = None

__all__ = [
    "FORCE_PURE_ENV",
    "OriginCryptoLike",
    "ReferenceOriginCrypto",
    "ReferenceRelayCrypto",
    "RelayCryptoLike",
    "UnrecognizedCell",
    "backend_name",
    "kernel_available",
    "kernel_missing_reason",
    "origin_crypto_for",
    "relay_crypto_for",
]

FORCE_PURE_ENV = "RELAYCRYPT_PURE"
"""Environment variable: set to ``1`` to force the pure-Python reference backend."""



class RelayCryptoLike(Protocol):
    """What both relay backends offer (one circuit, one thread at a time)."""

    def forward(self, payload: bytes) -> tuple[bool, bytes]: ...
    def forward_many(self, payloads: Sequence[bytes]) -> list[tuple[bool, bytes]]: ...
    def backward(self, payload: bytes) -> bytes: ...
    def backward_many(self, payloads: Sequence[bytes]) -> list[bytes]: ...
    def originate(self, payload: bytes) -> bytes: ...
    def originate_many(self, payloads: Sequence[bytes]) -> list[bytes]: ...
    def forward_buf(self, buf: CellBuffer) -> tuple[bytes, bytes]: ...
    def backward_buf(self, buf: CellBuffer) -> bytes: ...
    def originate_buf(self, buf: CellBuffer) -> bytes: ...
    def forward_tagged_buf(self, buf: CellBuffer) -> tuple[bytes, bytes, bytes]: ...
    def originate_tagged_buf(self, buf: CellBuffer) -> tuple[bytes, bytes]: ...


class OriginCryptoLike(Protocol):
    """What both origin backends offer (one circuit, one thread at a time)."""

    @property
    def n_hops(self) -> int: ...
    def add_hop(self, keys: HopKeys) -> None: ...
    def encrypt(self, payload: bytes, hop: int) -> bytes: ...
    def encrypt_many(self, payloads: Sequence[bytes], hop: int) -> list[bytes]: ...
    def decrypt(self, payload: bytes) -> tuple[int, bytes]: ...
    def decrypt_many(self, payloads: Sequence[bytes]) -> list[tuple[int, bytes]]: ...
    def encrypt_buf(self, buf: CellBuffer, hop: int) -> bytes: ...
    def decrypt_buf(self, buf: CellBuffer) -> tuple[bytes, bytes]: ...
    def encrypt_tagged_buf(self, buf: CellBuffer, hop: int) -> tuple[bytes, bytes]: ...
    def decrypt_tagged_buf(self, buf: CellBuffer) -> tuple[bytes, bytes, bytes]: ...


class ReferenceRelayCrypto(RelayCrypto):
    """The reference ``RelayCrypto`` plus joined-buffer adapters (split, list form, join)."""

    __slots__ = ()

    def forward_buf(self, buf: CellBuffer) -> tuple[bytes, bytes]:
        """``forward_many`` on a joined buffer; ``(out, recognized flags as 0/1 bytes)``."""
        results = self.forward_many(split_buffer(buf))
        return b"".join(cell for _, cell in results), bytes(ok for ok, _ in results)

    def backward_buf(self, buf: CellBuffer) -> bytes:
        """``backward_many`` on a joined buffer."""
        return b"".join(self.backward_many(split_buffer(buf)))

    def originate_buf(self, buf: CellBuffer) -> bytes:
        """``originate_many`` on a joined buffer."""
        return b"".join(self.originate_many(split_buffer(buf)))

    def forward_tagged_buf(self, buf: CellBuffer) -> tuple[bytes, bytes, bytes]:
        """``forward_tagged_many`` on a joined buffer; ``(out, recognized flags, tags)``."""
        results, tags = self.forward_tagged_many(split_buffer(buf))
        return b"".join(cell for _, cell in results), bytes(ok for ok, _ in results), tags

    def originate_tagged_buf(self, buf: CellBuffer) -> tuple[bytes, bytes]:
        """``originate_tagged_many`` on a joined buffer; ``(out, tags)``."""
        cells, tags = self.originate_tagged_many(split_buffer(buf))
        return b"".join(cells), tags


class ReferenceOriginCrypto(OriginCrypto):
    """The reference ``OriginCrypto`` plus joined-buffer adapters (split, list form, join)."""

    __slots__ = ()

    def encrypt_buf(self, buf: CellBuffer, hop: int) -> bytes:
        """``encrypt_many`` on a joined buffer."""
        return b"".join(self.encrypt_many(split_buffer(buf), hop))

    def decrypt_buf(self, buf: CellBuffer) -> tuple[bytes, bytes]:
        """``decrypt_many`` on a joined buffer; ``(out, hop index per cell)``. Raises
        :class:`UnrecognizedCell` like ``decrypt_many``."""
        results = self.decrypt_many(split_buffer(buf))
        return b"".join(cell for _, cell in results), bytes(hop for hop, _ in results)

    def encrypt_tagged_buf(self, buf: CellBuffer, hop: int) -> tuple[bytes, bytes]:
        """``encrypt_tagged_many`` on a joined buffer; ``(out, tags)``."""
        cells, tags = self.encrypt_tagged_many(split_buffer(buf), hop)
        return b"".join(cells), tags

    def decrypt_tagged_buf(self, buf: CellBuffer) -> tuple[bytes, bytes, bytes]:
        """``decrypt_tagged_many`` on a joined buffer; ``(out, hops, tags)``. Raises
        :class:`UnrecognizedCell` like ``decrypt_many``."""
        results, tags = self.decrypt_tagged_many(split_buffer(buf))
        return (b"".join(cell for _, cell in results), bytes(hop for hop, _ in results), tags)


def kernel_available() -> bool:
    """True when the C kernel extension imported (built with ``setup.py build_ext``)."""
    return _KERNEL_MISSING is None


def kernel_missing_reason() -> str | None:
    """Why the kernel is unavailable (the import error), or None when it is available."""
    return _KERNEL_MISSING


def _pure_forced() -> bool:
    return os.environ.get(FORCE_PURE_ENV, "") not in ("", "0")


def backend_name() -> Literal["kernel", "reference"]:
    """The backend the factories would use right now."""
    return "kernel" if kernel_available() and not _pure_forced() else "reference"


def relay_crypto_for(keys: HopKeys) -> RelayCryptoLike:
    """One relay's crypto state for one circuit, on the current backend."""
    if backend_name() == "kernel":
        return FastRelayCrypto(keys)
    return ReferenceRelayCrypto(keys)


def origin_crypto_for(hops: Iterable[HopKeys]) -> OriginCryptoLike:
    """The client's crypto state for one circuit (hop 0 is the guard), on the current
    backend."""
    if backend_name() == "kernel":
        return FastOriginCrypto(hops)
    return ReferenceOriginCrypto(list(hops))

