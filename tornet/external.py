"""How a relay that is not one of tor's own joins the network: its command line and READY line.

An *external relay* is any program that behaves as a Tor relay (relaycrypt's
``python -m examples.relay``, the default; or the stand-in ``python -m tornet.standin``, a real
tor configured from the same options). The network runs it as

    <command prefix> --testing-network --nickname NAME --data-dir DIR
                     --orport 127.0.0.1:PORT --dirauth "LINE" [--dirauth "LINE" ...]
                     --exit-policy "POLICY" [--bridge]

where each ``LINE`` is the value of a torrc ``DirAuthority`` option of this network
(``NAME orport=P no-v2 v3ident=HEX40 127.0.0.1:DIRPORT HEX40``), ``POLICY`` a torrc
``ExitPolicy`` value (``"accept 127.0.0.1:ECHOPORT, reject *:*"`` for an exit,
``"reject *:*"`` otherwise), ``--bridge`` means run as a bridge (``BridgeRelay 1``: do not
publish to the authorities; a bridge client fetches the descriptor from the relay itself), and
``--testing-network`` means the rules of ``TestingTorNetwork 1`` (private addresses allowed).
``DIR`` exists (mode 700) and is the relay's own. The program runs until SIGTERM (or SIGINT);
its stdin is a pipe from the network, which it may watch for EOF to exit if the network dies.

When its OR port accepts connections it prints one line on stdout:

    READY orport=127.0.0.1:PORT fingerprint=HEX40 ed25519=BASE64

``HEX40``: the SHA-1 of its RSA identity key (upper or lower case hex); ``BASE64``: its Ed25519
identity key, 32 bytes in base64 with or without the trailing ``=`` (tor's
``fingerprint-ed25519`` file has none). Anything else on stdout or stderr is logged.

:class:`RelayCommand` is the prefix (``python`` as its first word means this interpreter);
:class:`RelayOptions` the options above; :func:`parse_ready` the READY line.

Threads: any thread (pure).
"""

from __future__ import annotations

import base64
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from tornet.netns import LOOPBACK

__all__ = [
    "DEFAULT_RELAY_COMMAND",
    "READY_PATTERN",
    "RELAYCRYPT_COMMAND",
    "STANDIN_COMMAND",
    "ReadyInfo",
    "RelayCommand",
    "RelayOptions",
    "exit_policy_for",
    "format_ready",
    "parse_ready",
    "ready_from_match",
]

STANDIN_COMMAND = "python -m tornet.standin"
"""The stand-in external relay: a real tor run from the external-relay options."""
RELAYCRYPT_COMMAND = "python -m examples.relay"
"""relaycrypt's relay program."""
DEFAULT_RELAY_COMMAND = RELAYCRYPT_COMMAND
"""What external relays run unless told otherwise: relaycrypt's relay."""

READY_PATTERN = re.compile(
    r"^READY orport=(?P<host>127(?:\.\d{1,3}){3}):(?P<port>\d{1,5}) "
    r"fingerprint=(?P<fingerprint>[0-9A-Fa-f]{40}) "
    r"ed25519=(?P<ed25519>[A-Za-z0-9+/]{43}=?)(?:\s+\S.*)?\s*$"  # more words may follow
)
"""The line an external relay prints when it listens (see the module docstring)."""


def exit_policy_for(echo_port: int | None) -> str:
    """The ``--exit-policy`` value: exits to 127.0.0.1:``echo_port`` only, or none. Any thread
    (pure)."""
    if echo_port is None:
        return "reject *:*"
    return f"accept {LOOPBACK}:{echo_port}, reject *:*"


@dataclass(frozen=True)
class RelayOptions:
    """The options an external relay is started with."""

    nickname: str
    data_dir: Path
    orport: int
    dirauths: tuple[str, ...]
    exit_policy: str = "reject *:*"
    bridge: bool = False
    testing_network: bool = True

    def argv(self) -> list[str]:
        """The options as command-line arguments, in the documented form. Any thread
        (pure)."""
        if not self.dirauths:
            raise ValueError("an external relay needs at least one --dirauth")
        args = ["--testing-network"] if self.testing_network else []
        args += ["--nickname", self.nickname, "--data-dir", str(self.data_dir),
                 "--orport", f"{LOOPBACK}:{self.orport}"]
        for line in self.dirauths:
            args += ["--dirauth", line]
        args += ["--exit-policy", self.exit_policy]
        if self.bridge:
            args.append("--bridge")
        return args


@dataclass(frozen=True)
class RelayCommand:
    """The command-line prefix of an external relay program."""

    prefix: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> RelayCommand:
        """From a shell-like string (``"python -m examples.relay"``); a first word ``python``
        or ``python3`` becomes this interpreter (the venv's). Any thread (pure)."""
        words = shlex.split(text)
        if not words:
            raise ValueError("empty relay command")
        if words[0] in ("python", "python3"):
            words[0] = sys.executable
        return cls(tuple(words))

    def argv(self, options: RelayOptions) -> list[str]:
        """The full command line for one relay. Any thread (pure)."""
        return [*self.prefix, *options.argv()]


@dataclass(frozen=True)
class ReadyInfo:
    """What an external relay's READY line says."""

    orport: int
    fingerprint: str
    """Upper-case HEX40."""
    ed25519: str
    """Unpadded base64 of the 32-byte Ed25519 identity."""


def parse_ready(line: str) -> ReadyInfo:
    """Parse a READY line; ValueError if it is not one. Any thread (pure)."""
    match = READY_PATTERN.match(line.strip())
    if match is None:
        raise ValueError(f"not a READY line: {line!r}")
    return ready_from_match(match)


def ready_from_match(match: re.Match[str]) -> ReadyInfo:
    """A :class:`ReadyInfo` from a :data:`READY_PATTERN` match (checks the key's length). Any
    thread (pure)."""
    ed25519 = match["ed25519"].rstrip("=")
    if len(base64.b64decode(ed25519 + "=")) != 32:
        raise ValueError(f"ed25519 identity is not 32 bytes: {ed25519}")
    return ReadyInfo(int(match["port"]), match["fingerprint"].upper(), ed25519)


def format_ready(orport: int, fingerprint: str, ed25519: str) -> str:
    """The READY line (the stand-in prints it). Any thread (pure)."""
    return f"READY orport={LOOPBACK}:{orport} fingerprint={fingerprint} ed25519={ed25519}"

