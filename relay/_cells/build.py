"""Build description of the link data path's cell kernel (C extension
``relay._cells._cellkernel``).

``setup.py`` at the repository root calls :func:`extension`; ``make venv`` builds it in place
with ``setup.py build_ext --inplace``. Plain C on the CPython API: no library to link. Importing
this module has no side effects; it is only read at build time.
"""

from __future__ import annotations

import os
from pathlib import Path

from setuptools import Extension

SOURCE = Path(__file__).with_name("cellkernel.c")
"""The kernel's one C source file."""


def extension() -> Extension:
    """Return the setuptools Extension for ``relay._cells._cellkernel``. Build time, any thread
    (pure)."""
    return Extension(
        name="relay._cells._cellkernel",
        # setuptools wants source paths relative to where setup.py runs (the repository root).
        sources=[os.path.relpath(SOURCE)],
        extra_compile_args=["-Wall", "-Wextra", "-Wno-unused-parameter", "-std=c11", "-O2"],
    )
