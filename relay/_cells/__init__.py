"""The link data path's per-cell work in C: ``route`` (an open link's read, cut into cells and
grouped per circuit), ``frame`` (a circuit's payloads with their cell headers),
``crypt_frame`` (a small batch crypted and framed in one call) and ``data_runs`` (the DATA
bodies of decrypted payloads, joined per stream).

``_cellkernel`` is built from ``cellkernel.c`` by ``setup.py build_ext --inplace`` (``make
venv``); see the C source's top comment for the contract. Importing this package never fails
(``setup.py`` reads ``relay/_cells/build.py`` before the extension exists); the names below are
loaded on first access and raise ``ImportError`` when the extension is not built, in which
case :mod:`relay.framing` uses its Python framing.

Threads: pure functions over bytes with the GIL held; any thread.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["CELL_LEN", "PAYLOAD_LEN", "crypt_frame", "data_runs", "frame", "route"]


def __getattr__(name: str) -> Any:
    """Load the extension's public names lazily (PEP 562)."""
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module("relay._cells._cellkernel"), name)
