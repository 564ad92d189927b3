"""The tor1 batch kernel: a C extension that crypts a whole circuit batch with the GIL released.

``_tor1`` (built from ``tor1kernel.c`` by ``setup.py build_ext --inplace``, which ``make venv``
runs) provides ``RelayState`` and ``OriginState``; see the C source's top comment for the
design, and :mod:`workers.fastcrypto` for the reference-compatible wrappers. Importing this
package raises ``ImportError`` when the extension is not built; :mod:`workers.crypto_backend`
then falls back to the pure-Python reference. The types follow the usual rule of circuit
crypto state: any thread, one thread at a time per object (a violation raises RuntimeError).
"""

from workers._kernel._tor1 import (
    CELL_LEN,
    GIL_RELEASE_MIN_CELLS,
    MAX_HOPS,
    OPENSSL_VERSION,
    OriginState,
    RelayState,
)

__all__ = [
    "CELL_LEN",
    "GIL_RELEASE_MIN_CELLS",
    "MAX_HOPS",
    "OPENSSL_VERSION",
    "OriginState",
    "RelayState",
]
