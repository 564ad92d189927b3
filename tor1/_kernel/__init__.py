"""The tor1 batch kernel: a C extension that crypts a whole circuit batch with the GIL released.

``_tor1`` (built from ``tor1kernel.c`` by ``setup.py build_ext --inplace``, which ``make venv``
runs) provides ``RelayState`` and ``OriginState`` (each method also in a ``*_tagged`` form that
returns the SENDME tags of chosen cells, ``TAG_LEN`` bytes each), and ``crypt_group(jobs)``,
which runs several circuits' batches (``(state, OP_*, buf[, hop])`` each, ``OP_TAGS`` or'ed in
for a tagged form) with one release of the GIL; see the C
source's top comment for the design, and :mod:`tor1.fast` for the reference-compatible
wrappers and the pool's group functions. The types follow the usual rule of circuit crypto
state: any thread, one thread at a time per object (a violation raises RuntimeError).

Importing this package never fails: ``setup.py`` imports ``tor1._kernel.build`` before the
extension exists. The names below are loaded from ``_tor1`` on first access, which raises
``ImportError`` when the extension is not built; :mod:`tor1.backend` then falls back
to the pure-Python reference.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "CELL_LEN",
    "GIL_RELEASE_MIN_CELLS",
    "MAX_HOPS",
    "OPENSSL_VERSION",
    "OP_BACKWARD",
    "OP_DECRYPT",
    "OP_ENCRYPT",
    "OP_FORWARD",
    "OP_ORIGINATE",
    "OP_TAGS",
    "TAG_LEN",
    "OriginState",
    "RelayState",
    "crypt_group",
]


def __getattr__(name: str) -> Any:
    """Load the extension's public names lazily (PEP 562)."""
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module("tor1._kernel._tor1"), name)
