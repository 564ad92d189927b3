"""tor's key file formats, read and written byte for byte as tor does.

=================================  =========================================================
file (under ``DATADIR/keys/``)     format
=================================  =========================================================
``secret_id_key``                  PEM ``RSA PRIVATE KEY`` (PKCS#1), 1024-bit RSA identity
``secret_onion_key`` (``.old``)    the same, the TAP onion key
``secret_onion_key_ntor``          tagged ``c25519v1`` / ``onion``: secret(32) | public(32)
(``.old``)
``ed25519_master_id_secret_key``   tagged ``ed25519v1-secret`` / ``type0``: expanded key (64)
``ed25519_master_id_public_key``   tagged ``ed25519v1-public`` / ``type0``: public key (32)
``ed25519_signing_secret_key``     tagged ``ed25519v1-secret`` / ``type4``: expanded key (64)
``ed25519_signing_cert``           tagged ``ed25519v1-cert`` / ``type4``: the type 4 cert
=================================  =========================================================

A *tagged* file (tor's ``crypto_write_tagged_contents_to_file``) is a 32-byte header, the
string ``"== TYPE: TAG =="`` padded with NUL bytes, then the data. :func:`read_tagged` checks
the header as tor does (prefix, suffix, NUL padding, type) and returns the tag. A curve25519
file must hold a public key that matches its secret key; tor refuses it otherwise and so does
:func:`read_curve25519`.

Every file is written to a temporary name in the same directory with mode 0600 and then
renamed over the old one, so a crash leaves the old or the new file, never half of one.

Threads: blocking file I/O and no shared state; called at start-up and from the key rotation
timer on the loop thread (any thread would do).
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from relay.identity.curve_ed import CURVE25519_KEY_LEN

__all__ = [
    "CURVE25519_TYPE",
    "ED_CERT_TYPE",
    "ED_PUBLIC_TYPE",
    "ED_SECRET_TYPE",
    "KeyFileError",
    "ensure_private_dir",
    "read_curve25519",
    "read_rsa_private",
    "read_tagged",
    "write_curve25519",
    "write_private_file",
    "write_rsa_private",
    "write_tagged",
]

CURVE25519_TYPE = "c25519v1"
ED_SECRET_TYPE = "ed25519v1-secret"
ED_PUBLIC_TYPE = "ed25519v1-public"
ED_CERT_TYPE = "ed25519v1-cert"

_HEADER_LEN = 32
_FILE_MODE = 0o600
_DIR_MODE = 0o700


class KeyFileError(ValueError):
    """A key file exists but is not what tor would have written (the message names it)."""


def ensure_private_dir(path: str | os.PathLike[str]) -> Path:
    """Create ``path`` (and parents) if needed and make it mode 0700, as tor's
    ``check_private_dir``. Returns it as a :class:`Path`. Start-up (any thread)."""
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, _DIR_MODE)
    return directory


def write_private_file(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically with mode 0600 (temporary file, fsync, rename).
    Start-up or the rotation timer (any thread)."""
    target = Path(path)
    temporary = target.with_name(f".{target.name}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, _FILE_MODE)
    try:
        os.fchmod(fd, _FILE_MODE)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temporary, target)


def write_tagged(path: str | os.PathLike[str], type_string: str, tag: str, data: bytes) -> None:
    """Write a tagged file: ``"== TYPE: TAG =="`` NUL-padded to 32 bytes, then ``data``.
    Start-up or the rotation timer (any thread)."""
    header = f"== {type_string}: {tag} ==".encode("ascii")
    if len(header) >= _HEADER_LEN:
        raise ValueError(f"tagged header {header!r} does not fit {_HEADER_LEN} bytes")
    write_private_file(path, header.ljust(_HEADER_LEN, b"\x00") + data)


def read_tagged(path: str | os.PathLike[str], type_string: str, length: int) -> tuple[str, bytes]:
    """Read a tagged file whose type is ``type_string`` and whose data is ``length`` bytes;
    returns ``(tag, data)``. Raises :class:`KeyFileError` (or ``OSError`` if unreadable).
    Start-up (any thread)."""
    content = Path(path).read_bytes()
    if len(content) != _HEADER_LEN + length:
        raise KeyFileError(f"{path}: {len(content)} bytes, expected {_HEADER_LEN + length}")
    header = content[:_HEADER_LEN]
    text = header.rstrip(b"\x00")
    if b"\x00" in text or not text.startswith(b"== ") or not text.endswith(b" =="):
        raise KeyFileError(f"{path}: not a tagged key file (header {header!r})")
    prefix = f"== {type_string}: ".encode("ascii")
    if not text.startswith(prefix) or len(text) < len(prefix) + 3:
        raise KeyFileError(f"{path}: header {text!r} is not of type {type_string!r}")
    return text[len(prefix) : -3].decode("ascii", "replace"), content[_HEADER_LEN:]


def write_rsa_private(path: str | os.PathLike[str], key: rsa.RSAPrivateKey) -> None:
    """Write an RSA private key as tor does: PEM ``RSA PRIVATE KEY`` (PKCS#1).
    Start-up or the rotation timer (any thread)."""
    pem = key.private_bytes(serialization.Encoding.PEM,
                            serialization.PrivateFormat.TraditionalOpenSSL,
                            serialization.NoEncryption())
    write_private_file(path, pem)


def read_rsa_private(path: str | os.PathLike[str]) -> rsa.RSAPrivateKey:
    """Read an RSA private key in PEM (tor's PKCS#1, or PKCS#8). Raises :class:`KeyFileError`.
    Start-up (any thread)."""
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), None)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"{path}: not an unencrypted PEM private key") from exc
    if not isinstance(key, rsa.RSAPrivateKey):
        raise KeyFileError(f"{path}: not an RSA private key")
    return key


def _x25519_public(secret: bytes) -> bytes:
    return X25519PrivateKey.from_private_bytes(secret).public_key().public_bytes(
        Encoding.Raw, PublicFormat.Raw)


def write_curve25519(path: str | os.PathLike[str], secret: bytes, tag: str = "onion") -> None:
    """Write a curve25519 key pair file (secret then public key, tagged ``c25519v1``).
    Start-up or the rotation timer (any thread)."""
    write_tagged(path, CURVE25519_TYPE, tag, secret + _x25519_public(secret))


def read_curve25519(path: str | os.PathLike[str], tag: str = "onion") -> bytes:
    """Read a curve25519 key pair file and return the 32-byte secret; the tag must be ``tag``
    and the stored public key must match the secret. Start-up (any thread)."""
    got_tag, data = read_tagged(path, CURVE25519_TYPE, 2 * CURVE25519_KEY_LEN)
    if got_tag != tag:
        raise KeyFileError(f"{path}: tag {got_tag!r}, expected {tag!r}")
    secret, public = data[:CURVE25519_KEY_LEN], data[CURVE25519_KEY_LEN:]
    if _x25519_public(secret) != public:
        raise KeyFileError(f"{path}: stored public key does not match the secret key")
    return secret
