"""Build description of the TLS kernel (C extension ``relay._tls._tlskernel``).

``setup.py`` at the repository root calls :func:`extension`; ``make venv`` builds it in place
with ``setup.py build_ext --inplace``. It links against the system's libssl and libcrypto
(OpenSSL 3, ``libssl-dev`` headers): the library tor and Python's ``ssl`` use, and the one the
other kernels' libcrypto belongs to. Importing this module has no side effects; it is only read
at build time.
"""

from __future__ import annotations

import os
from pathlib import Path

from setuptools import Extension

SOURCE = Path(__file__).with_name("tlskernel.c")
"""The kernel's one C source file."""


def extension() -> Extension:
    """Return the setuptools Extension for ``relay._tls._tlskernel``. Build time, any thread
    (pure)."""
    return Extension(
        name="relay._tls._tlskernel",
        # setuptools wants source paths relative to where setup.py runs (the repository root).
        sources=[os.path.relpath(SOURCE)],
        libraries=["ssl", "crypto"],
        extra_compile_args=["-Wall", "-Wextra", "-Wno-unused-parameter", "-std=c11"],
    )
