"""Relay identities and the small JSON directory a local network publishes to its clients.

What a client must know about a relay
-------------------------------------
To build a circuit a client needs, per relay, where to connect (``address``, ``port``) and, for
every hop after the first, the two public values the ntor handshake binds to: the relay's RSA
identity digest ``ID`` (SHA-1 of the DER-encoded PKCS#1 RSA public key, as in Tor) and its
curve25519 ntor onion key ``B``. :class:`RelayDescriptor` holds exactly that.

Keys
----
A relay's keys are tor's, in its data directory (:class:`relay.identity.keys.RelayIdentity`);
:meth:`relay.node.RelayNode.descriptor` makes the entry this directory file lists.

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
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from relay.identity.curve_ed import CURVE25519_KEY_LEN
from relay.identity.descriptor import NICKNAME_RE
from tor1.reference import DIGEST_LEN

__all__ = [
    "DIRECTORY_VERSION",
    "DirectoryError",
    "RelayDescriptor",
    "read_directory",
    "write_directory",
]

DIRECTORY_VERSION = 1
_IDENTITY_FILE = "identity_key.pem"
_ONION_FILE = "ntor_onion_key.pem"


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
        if not NICKNAME_RE.match(self.nickname):
            raise DirectoryError(f"nickname {self.nickname!r}: 1-19 letters or digits")
        if not 0 < self.port < 65536:
            raise DirectoryError(f"relay {self.nickname}: port {self.port} out of range")
        if len(self.identity_digest) != DIGEST_LEN:
            raise DirectoryError(f"relay {self.nickname}: identity digest must be "
                                 f"{DIGEST_LEN} bytes")
        if len(self.ntor_onion_key) != CURVE25519_KEY_LEN:
            raise DirectoryError(f"relay {self.nickname}: ntor onion key must be "
                                 f"{CURVE25519_KEY_LEN} bytes")

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
