"""The handshake kernel: the relay's ntor and CREATE_FAST answers in batches, GIL released.

``_ntorkernel`` (built from ``ntorkernel.c`` by ``setup.py build_ext --inplace``, which
``make venv`` runs) provides:

* ``NtorKey(secret, identity)``: an onion key (X25519 secret b, 32 bytes) with the relay's RSA
  identity digest (20 bytes); B is computed once, here. Immutable: any thread, many at once.
* ``ntor_server_batch(jobs)``: jobs ``(keys, hdata)`` with ``keys`` an ``NtorKey`` or a tuple
  of them (current, then previous onion keys: the one the onionskin names answers); one
  result per job, ``(reply: Y|AUTH 64 bytes, material: 92 bytes = 72 of hop keys + KH)`` or
  the exception instance :func:`relay.handshakes.ntor_server` would raise.
* ``create_fast_server_batch(jobs)``: jobs are CREATE_FAST onionskins; results
  ``(reply: Y|KH 40 bytes, material: 72 bytes)``, exactly
  :func:`relay.handshakes.create_fast_server`.

Both batch functions may be called from any thread, several at once; each releases the GIL
once for the whole batch (see the C source's top comment). Results are byte-for-byte those of
:mod:`relay.handshakes` (tests/test_ntorkernel.py).

Importing this package never fails: ``setup.py`` reads ``relay/_ntor/build.py`` before the
extension exists. The names below are loaded from ``_ntorkernel`` on first access, which raises
``ImportError`` when the extension is not built.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "FAST_GIL_RELEASE_MIN_JOBS",
    "NTOR_MATERIAL_LEN",
    "OPENSSL_VERSION",
    "NtorKey",
    "create_fast_server_batch",
    "ntor_server_batch",
]


def __getattr__(name: str) -> Any:
    """Load the extension's public names lazily (PEP 562)."""
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module("relay._ntor._ntorkernel"), name)
