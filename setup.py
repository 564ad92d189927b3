"""Build hook for the C batch kernel (tor1/_kernel). Metadata lives in pyproject.toml.

The kernel's build description is loaded by file path, not imported as ``tor1._kernel.build``:
importing the package would run ``tor1/_kernel/__init__.py``, which needs the very extension
this script is about to build.
"""

import importlib.util
from pathlib import Path

from setuptools import setup

BUILD_FILE = Path(__file__).resolve().parent / "tor1" / "_kernel" / "build.py"

spec = importlib.util.spec_from_file_location("relaycrypt_kernel_build", BUILD_FILE)
if spec is None or spec.loader is None:
    raise SystemExit(f"setup.py: cannot load the kernel build description {BUILD_FILE}")
kernel_build = importlib.util.module_from_spec(spec)
spec.loader.exec_module(kernel_build)

setup(ext_modules=[kernel_build.extension()])
