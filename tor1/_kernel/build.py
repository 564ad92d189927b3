"""Build description of the tor1 batch kernel (C extension ``tor1._kernel._tor1``).

``setup.py`` at the repository root calls :func:`extension`; ``make venv`` builds it in place
with ``setup.py build_ext --inplace``. The kernel links against the system's libcrypto
(OpenSSL 3, ``libssl-dev`` headers), the same library ``cryptography`` and ``hashlib`` use.
Importing this module has no side effects; it is only read at build time.
"""

from __future__ import annotations

import os
from pathlib import Path

from setuptools import Extension

SOURCE = Path(__file__).with_name("tor1kernel.c")
"""The kernel's one C source file."""


def extension() -> Extension:
    """Return the setuptools Extension for ``tor1._kernel._tor1``. Build time, any thread
    (pure)."""
    return Extension(
        name="tor1._kernel._tor1",
        # setuptools wants source paths relative to where setup.py runs (the repository root).
        sources=[os.path.relpath(SOURCE)],
        libraries=["crypto"],
        extra_compile_args=["-Wall", "-Wextra", "-Wno-unused-parameter", "-std=c11"],
    )
