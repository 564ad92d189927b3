"""Build a pyuv 1.4.0 wheel that works on Python 3.11+, once, into a cache.

pyuv's only release (1.4.0, 2017) does not compile on Python >= 3.10: two C lines use APIs
that were removed (``Py_REFCNT`` as an lvalue, ``PyUnicode_EncodeUTF8``). The same fixes are
merged upstream but were never released. This script:

1. downloads the pinned sdist with pip (or reuses the cached copy),
2. checks its sha256 against the pinned value,
3. applies the two one-line build fixes, and one line that stops ``write()`` of a list from
   leaking the list (relaycrypt's ``Stream.writelines`` relies on it), refusing to go on if
   the source differs,
4. builds a wheel into the cache directory (default ``.cache/pyuv``, git-ignored), in a
   subdirectory named after the patch level, so a wheel built with other fixes is never reused.

It prints the path of the wheel on stdout and nothing else there, so a Makefile
can do ``pip install $(python tools/build_pyuv.py)``. Progress goes to stderr.
Nothing of pyuv's code is committed to this repository.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

VERSION = "1.4.0"
SDIST = f"pyuv-{VERSION}.tar.gz"
SHA256 = "caea2004d1125fe17cbde3c211c8abc72844e9b8dd7dfa007711e98fbc96fbc2"

# (file inside the sdist, the exact text to replace, its replacement)
FIXES: tuple[tuple[str, str, str], ...] = (
    (
        "src/handle.c",
        "Py_REFCNT(self) = refcnt;",
        "Py_SET_REFCNT(self, refcnt);",
    ),
    (
        "src/common.c",
        "return PyUnicode_EncodeUTF8(PyUnicode_AS_UNICODE(unicode), "
        'PyUnicode_GET_SIZE(unicode), "surrogateescape");',
        'return PyUnicode_AsEncodedString(unicode, "utf-8", "surrogateescape");',
    ),
    # Not a build fix: a reference leak. On success, write() of a sequence keeps the reference
    # PySequence_Fast took, so the list and every buffer in it leak (the buffer views it holds
    # until the write completes keep the data alive; the sequence itself is not needed).
    (
        "src/stream.c",
        "    /* Increase refcount so that object is not removed before the callback is called */\n"
        "    Py_INCREF(self);\n"
        "\n"
        "    Py_RETURN_NONE;\n"
        "\n"
        "error:\n"
        "    for (j = 0; j < i; j++)",
        "    /* Increase refcount so that object is not removed before the callback is called */\n"
        "    Py_INCREF(self);\n"
        "    Py_DECREF(data_fast);\n"
        "\n"
        "    Py_RETURN_NONE;\n"
        "\n"
        "error:\n"
        "    for (j = 0; j < i; j++)",
    ),
)
# Bumped whenever FIXES changes, so a cached wheel built with other fixes is never reused.
PATCH_LEVEL = 3


class BuildError(RuntimeError):
    """The pyuv wheel could not be produced; the message says why and what to do."""


def log(msg: str) -> None:
    print(f"build_pyuv: {msg}", file=sys.stderr, flush=True)


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 16), b""):
            h.update(block)
    return h.hexdigest()


def fetch_sdist(cache: Path) -> Path:
    sdist = cache / SDIST
    if not sdist.exists():
        log(f"downloading {SDIST}")
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
             "--no-binary", ":all:", "--dest", str(cache), f"pyuv=={VERSION}"],
            check=True, stdout=sys.stderr,
        )
    if not sdist.exists():
        raise BuildError(f"pip did not produce {sdist}")
    digest = sha256_of(sdist)
    if digest != SHA256:
        sdist.unlink()
        raise BuildError(
            f"{SDIST} has sha256 {digest}, expected {SHA256}; the file was deleted, "
            "refusing to build an unverified pyuv"
        )
    return sdist


def apply_fixes(src: Path) -> None:
    for rel, old, new in FIXES:
        path = src / rel
        text = path.read_text()
        if text.count(old) != 1:
            raise BuildError(
                f"cannot apply the Python 3.11 fix to {rel}: expected exactly one "
                f"occurrence of {old!r}, found {text.count(old)}. The pyuv source "
                "differs from the pinned 1.4.0; update tools/build_pyuv.py"
            )
        path.write_text(text.replace(old, new))
        log(f"patched {rel}")


def build(cache: Path) -> Path:
    sdist_cache = cache
    cache = cache / f"patch{PATCH_LEVEL}"
    cache.mkdir(parents=True, exist_ok=True)
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    existing = sorted(cache.glob(f"pyuv-{VERSION}-{tag}-*.whl"))
    if existing:
        return existing[-1]
    sdist = fetch_sdist(sdist_cache)
    with tempfile.TemporaryDirectory(prefix="pyuv-build-") as tmp:
        with tarfile.open(sdist) as tar:
            tar.extractall(tmp, filter="data")
        src = Path(tmp) / f"pyuv-{VERSION}"
        apply_fixes(src)
        log("building the wheel (about a minute: it compiles libuv)")
        out = Path(tmp) / "dist"
        subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
             "--no-build-isolation", "--wheel-dir", str(out), str(src)],
            check=True, stdout=sys.stderr,
        )
        wheels = list(out.glob("pyuv-*.whl"))
        if len(wheels) != 1:
            raise BuildError(f"expected one wheel, got {wheels}")
        dest = cache / wheels[0].name
        shutil.copy2(wheels[0], dest)
    log(f"built {dest}")
    return dest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=Path(".cache/pyuv"),
                        help="where the sdist and the wheel are kept (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        wheel = build(args.cache)
    except (BuildError, subprocess.CalledProcessError) as exc:
        print(f"build_pyuv: error: {exc}", file=sys.stderr)
        return 1
    print(wheel)
    return 0


if __name__ == "__main__":
    sys.exit(main())
