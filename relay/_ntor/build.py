"""Build description of the handshake kernel (C extension ``relay._ntor._ntorkernel``).

``setup.py`` at the repository root calls :func:`extension`; ``make venv`` builds it in place
with ``setup.py build_ext --inplace``. Like the tor1 kernel it links against the system's
libcrypto (OpenSSL 3, ``libssl-dev`` headers), the library ``cryptography`` uses too.
Importing this module has no side effects; it is only read at build time.
"""

from __future__ import annotations

import os
from pathlib import Path

from setuptools import Extension

SOURCE = Path(__file__).with_name("ntorkernel.c")
"""The kernel's one C source file."""


def extension() -> Extension:
    """Return the setuptools Extension for ``relay._ntor._ntorkernel``. Build time, any thread
    (pure)."""
    return Extension(
        name="relay._ntor._ntorkernel",
        # setuptools wants source paths relative to where setup.py runs (the repository root).
        sources=[os.path.relpath(SOURCE)],
        libraries=["crypto"],
        extra_compile_args=["-Wall", "-Wextra", "-Wno-unused-parameter", "-std=c11"],
    )
