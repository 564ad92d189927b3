"""The pool's malloc setting (``workers.tuning.retain_freed_memory``): applied through glibc's
``mallopt`` on this project's platform, refused arguments checked, nothing from the crypto
kernel needed (the generic pool knows nothing of tor1)."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from workers.tuning import retain_freed_memory


def test_applied_on_glibc_and_arguments_checked() -> None:
    applied = retain_freed_memory(32 << 20)
    assert applied is (platform.libc_ver()[0] == "glibc")
    with pytest.raises(ValueError):
        retain_freed_memory(-1)


def test_needs_no_crypto_kernel() -> None:
    """In a fresh interpreter, applying it imports no module of tor1 or relay."""
    code = ("import sys, workers.tuning as t; t.retain_freed_memory(1 << 20); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('tor1', 'relay')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "[]"
