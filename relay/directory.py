"""Relay identities and the small JSON directory a local network publishes to its clients.

What a client must know about a relay
-------------------------------------
To build a circuit a client needs, per relay, where to connect (``address``, ``port``) and, for
every hop after the first, the two public values the ntor handshake binds to: the relay's RSA
identity digest ``ID`` (SHA-1 of the DER-encoded PKCS#1 RSA public key, as in Tor) and its
curve25519 ntor onion key ``B``. :class:`RelayDescriptor` holds exactly that.

Keys on disk
------------
:class:`RelayKeys` is a relay's secret side: a 1024-bit RSA identity key (Tor's legacy identity;
here it only names the relay) and an X25519 ntor onion key. :meth:`RelayKeys.load_or_create`
keeps them in the relay's data directory (``identity_key.pem`` and ``ntor_onion_key.pem``,
PKCS#8 PEM, mode 600), so a relay restarted on the same data directory keeps its identity and
the directory a client read earlier stays valid.

The directory file
------------------
``{"version": 1, "relays": [{"nickname", "address", "port", "identity", "ntor_onion_key"},
...]}`` with the identity digest in upper-case hex and the onion key in unpadded base64 (Tor's
spellings). :func:`write_directory` writes it atomically (temporary file + rename);
:func:`read_directory` validates every field and raises :class:`DirectoryError` with a message
saying which entry is wrong.

Threads: no shared state. Everything here may be called from any thread; the file helpers do
blocking file I/O, so call them at set-up, not from inside a busy loop callback.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from relay.handshakes import NtorServerKey

__all__ = [
    "DIRECTORY_VERSION",
    "DirectoryError",
    "RelayDescriptor",
    "RelayKeys",
    "read_directory",
    "write_directory",
]

DIRECTORY_VERSION = 1
_IDENTITY_FILE = "identity_key.pem"
_ONION_FILE = "ntor_onion_key.pem"
_NICKNAME = re.compile(r"^[A-Za-z0-9]{1,19}$")


class DirectoryError(ValueError):
    """A directory file or descriptor is malformed (the message says which field)."""


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


@dataclass(frozen=True)
class RelayDescriptor:
    """What a client knows about one relay: its nickname, OR address and ntor public values."""

    nickname: str
    address: str
    port: int
    identity_digest: bytes
    ntor_onion_key: bytes

    def __post_init__(self) -> None:
        if not _NICKNAME.match(self.nickname):
            raise DirectoryError(f"nickname {self.nickname!r}: 1-19 letters or digits")
        if not 0 < self.port < 65536:
            raise DirectoryError(f"relay {self.nickname}: port {self.port} out of range")
        if len(self.identity_digest) != 20:
            raise DirectoryError(f"relay {self.nickname}: identity digest must be 20 bytes")
        if len(self.ntor_onion_key) != 32:
            raise DirectoryError(f"relay {self.nickname}: ntor onion key must be 32 bytes")

    def to_json(self) -> dict[str, Any]:
        """The descriptor as a JSON-ready dict. Any thread."""
        return {
            "nickname": self.nickname,
            "address": self.address,
            "port": self.port,
            "identity": self.identity_digest.hex().upper(),
            "ntor_onion_key": _b64(self.ntor_onion_key),
        }

    @classmethod
    def from_json(cls, entry: Any) -> RelayDescriptor:
        """Parse and validate one descriptor dict; raises :class:`DirectoryError`. Any thread."""
        if not isinstance(entry, dict):
            raise DirectoryError(f"relay entry must be an object, got {type(entry).__name__}")
        try:
            nickname = str(entry["nickname"])
            address = str(entry["address"])
            port = entry["port"]
            identity = bytes.fromhex(str(entry["identity"]))
            onion = _unb64(str(entry["ntor_onion_key"]))
        except KeyError as exc:
            raise DirectoryError(f"relay entry {entry!r} lacks {exc.args[0]!r}") from None
        except (ValueError, binascii.Error) as exc:
            raise DirectoryError(f"relay entry {entry!r}: {exc}") from None
        if not isinstance(port, int) or isinstance(port, bool):
            raise DirectoryError(f"relay {nickname}: port must be an integer, got {port!r}")
        return cls(nickname, address, port, identity, onion)


class RelayKeys:
    """A relay's secret keys: RSA identity (names the relay) and the ntor onion key."""

    __slots__ = ("identity_digest", "identity_key", "ntor")

    def __init__(self, identity_key: rsa.RSAPrivateKey, onion_key: X25519PrivateKey) -> None:
        """Wrap existing keys. Any thread."""
        self.identity_key = identity_key
        der = identity_key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.PKCS1
        )
        self.identity_digest = hashlib.sha1(der).digest()
        self.ntor = NtorServerKey(self.identity_digest, onion_key)

    @classmethod
    def generate(cls) -> RelayKeys:
        """Fresh keys (RSA-1024 identity, as Tor's legacy identity). Any thread."""
        return cls(rsa.generate_private_key(65537, 1024), X25519PrivateKey.generate())

    @classmethod
    def load_or_create(cls, data_dir: str | os.PathLike[str]) -> RelayKeys:
        """Load the keys kept in ``data_dir``, creating (and saving) them the first time.

        Any thread (blocking file I/O)."""
        directory = Path(data_dir)
        directory.mkdir(parents=True, exist_ok=True)
        identity_path = directory / _IDENTITY_FILE
        onion_path = directory / _ONION_FILE
        if identity_path.exists() and onion_path.exists():
            identity = serialization.load_pem_private_key(identity_path.read_bytes(), None)
            onion = serialization.load_pem_private_key(onion_path.read_bytes(), None)
            if not isinstance(identity, rsa.RSAPrivateKey):
                raise DirectoryError(f"{identity_path} does not hold an RSA private key")
            if not isinstance(onion, X25519PrivateKey):
                raise DirectoryError(f"{onion_path} does not hold an X25519 private key")
            return cls(identity, onion)
        keys = cls.generate()
        for path, key in ((identity_path, keys.identity_key), (onion_path, keys.ntor.onion_key)):
            pem = key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as handle:
                handle.write(pem)
        return keys

    def descriptor(self, nickname: str, address: str, port: int) -> RelayDescriptor:
        """The public descriptor of these keys at ``address:port``. Any thread."""
        return RelayDescriptor(
            nickname, address, port, self.identity_digest, self.ntor.onion_key_public
        )


def write_directory(path: str | os.PathLike[str], relays: Iterable[RelayDescriptor]) -> None:
    """Write the directory file atomically (temporary file, then rename). Any thread."""
    target = Path(path)
    document = {"version": DIRECTORY_VERSION, "relays": [r.to_json() for r in relays]}
    temporary = target.with_name(target.name + ".tmp")
    temporary.write_text(json.dumps(document, indent=2) + "\n")
    os.replace(temporary, target)


def read_directory(path: str | os.PathLike[str]) -> list[RelayDescriptor]:
    """Read and validate a directory file; raises :class:`DirectoryError`. Any thread."""
    try:
        document = json.loads(Path(path).read_text())
    except json.JSONDecodeError as exc:
        raise DirectoryError(f"{path}: not JSON: {exc}") from None
    if not isinstance(document, dict) or document.get("version") != DIRECTORY_VERSION:
        raise DirectoryError(f"{path}: not a version {DIRECTORY_VERSION} relay directory")
    relays = document.get("relays")
    if not isinstance(relays, list):
        raise DirectoryError(f"{path}: 'relays' must be a list")
    descriptors = [RelayDescriptor.from_json(entry) for entry in relays]
    nicknames = [d.nickname for d in descriptors]
    if len(set(nicknames)) != len(nicknames):
        raise DirectoryError(f"{path}: duplicate nicknames in {nicknames}")
    return descriptors
