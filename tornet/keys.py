"""Keys of a directory authority, made before it starts, and the identity files tor writes.

An authority needs two identities in its own ``DirAuthority`` line, so both exist before its
first start: the v3 authority identity (``tor-gencert`` makes the identity key, a signing key
and the certificate binding them; ``v3ident`` is the certificate's ``fingerprint`` line) and
the relay identity (``tor --list-fingerprint`` creates the relay keys in the data directory
and writes ``DataDirectory/fingerprint``). Neither program touches the network.

:func:`read_identity` reads the ``fingerprint`` and ``fingerprint-ed25519`` files any tor relay
writes into its data directory at start (the stand-in relay reports them on its READY line).

Threads: any thread (blocking file and subprocess work; no shared state).
"""

from __future__ import annotations

import os
import re
import secrets
import subprocess
from dataclasses import dataclass
from pathlib import Path

from tornet.netns import LOOPBACK

__all__ = ["AuthorityKeys", "KeygenError", "make_authority_keys", "read_identity"]

_CERT_LIFETIME_MONTHS = 12
_HEX40 = re.compile(r"^[0-9A-F]{40}$")


class KeygenError(RuntimeError):
    """tor-gencert or tor --list-fingerprint failed (their output is in the message)."""


@dataclass(frozen=True)
class AuthorityKeys:
    """The two fingerprints a ``DirAuthority`` line names."""

    v3ident: str
    """HEX40 of the v3 authority identity key (from the certificate)."""
    fingerprint: str
    """HEX40 of the relay (RSA) identity key."""


def _run(argv: list[str], stdin: bytes = b"") -> None:
    result = subprocess.run(argv, input=stdin, capture_output=True, timeout=60)
    if result.returncode != 0:
        raise KeygenError(f"{argv[0]} exited with {result.returncode}:\n"
                          + result.stdout.decode(errors="replace")
                          + result.stderr.decode(errors="replace"))


def make_authority_keys(
    tor: str, tor_gencert: str, data_dir: Path, nickname: str, orport: int, dirport: int,
) -> AuthorityKeys:
    """Create the authority's v3 keys (in ``data_dir/keys``) and its relay keys, and return the
    fingerprints. The identity key is encrypted with a throw-away passphrase: tor itself only
    reads the signing key and the certificate. Any thread (blocks about 1 s)."""
    keys = data_dir / "keys"
    keys.mkdir(mode=0o700, parents=True, exist_ok=True)
    data_dir.chmod(0o700)
    _run([tor_gencert, "--create-identity-key", "--passphrase-fd", "0",
          "-m", str(_CERT_LIFETIME_MONTHS), "-a", f"{LOOPBACK}:{dirport}",
          "-i", str(keys / "authority_identity_key"),
          "-s", str(keys / "authority_signing_key"),
          "-c", str(keys / "authority_certificate")],
         stdin=secrets.token_hex(16).encode() + b"\n")
    v3ident = ""
    for line in (keys / "authority_certificate").read_text().splitlines():
        if line.startswith("fingerprint "):
            v3ident = line.split()[1].upper()
    if not _HEX40.match(v3ident):
        raise KeygenError("authority_certificate has no fingerprint line")
    empty = data_dir / "empty-torrc"
    empty.write_text("")
    try:
        _run([tor, "--list-fingerprint", "--defaults-torrc", str(empty), "-f", str(empty),
              "--DataDirectory", str(data_dir), "--Nickname", nickname,
              "--ORPort", f"{LOOPBACK}:{orport}", "--Address", LOOPBACK,
              "--Log", "warn stderr"])
    finally:
        os.unlink(empty)
    fingerprint, _ = read_identity(data_dir)
    return AuthorityKeys(v3ident=v3ident, fingerprint=fingerprint)


def read_identity(data_dir: Path) -> tuple[str, str]:
    """``(HEX40 RSA fingerprint, unpadded base64 Ed25519 identity)`` from the files tor writes
    into its data directory; raises FileNotFoundError before tor wrote them (and KeygenError
    if they are malformed). Any thread."""
    fingerprint = (data_dir / "fingerprint").read_text().split()[-1].upper()
    if not _HEX40.match(fingerprint):
        raise KeygenError(f"malformed fingerprint file in {data_dir}")
    ed_path = data_dir / "fingerprint-ed25519"
    ed25519 = ed_path.read_text().split()[-1] if ed_path.exists() else ""
    return fingerprint, ed25519
