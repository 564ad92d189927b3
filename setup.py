"""Build hook for the C kernels (tor1/_kernel, relay/_ntor, relay/_tls, relay/_cells). Metadata
lives in pyproject.toml.

Each kernel's build description is loaded by file path, not imported as a module: importing
``tor1._kernel``, ``relay._ntor``, ``relay._tls`` or ``relay._cells`` would run its
``__init__.py``, which serves names from the very extension this script is about to build.
"""

import importlib.util
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
BUILD_FILES = {
    "relaycrypt_kernel_build": ROOT / "tor1" / "_kernel" / "build.py",
    "relaycrypt_ntor_build": ROOT / "relay" / "_ntor" / "build.py",
    "relaycrypt_tls_build": ROOT / "relay" / "_tls" / "build.py",
    "relaycrypt_cells_build": ROOT / "relay" / "_cells" / "build.py",
}


def load_build(name: str, path: Path):
    """The build description module at ``path``."""
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"setup.py: cannot load the kernel build description {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


setup(ext_modules=[load_build(name, path).extension() for name, path in BUILD_FILES.items()])
