"""A relay's configuration, with tor's option names and defaults where tor has one.

:class:`RelayConfig` is what ``relay.node.RelayNode`` runs with; ``examples.relay`` fills it
from torrc-style command-line options (``--dirauth "LINE"``, ``--exit-policy "accept ...,
reject *:*"``, ``--bridge``, ``--testing-network``, ...). :func:`parse_dir_authority` reads a
torrc ``DirAuthority`` line::

    DirAuthority NAME [flags] [orport=PORT] [v3ident=HEX40] [ipv6=[ADDR]:PORT] ADDR:DIRPORT FP

(the fingerprint may be written in groups of four, as tor prints it).

What each option means follows tor:

* ``exit_policy`` empty means not an exit (tor's ``ExitRelay auto`` with no ``ExitPolicy``):
  every BEGIN is refused. Given, it is parsed with tor's syntax, preceded by tor's private-net
  and own-address rejections unless ``reject_private_exits`` is off
  (``ExitPolicyRejectPrivate``, default 1, 0 in a testing network), and by every local
  interface address when ``exit_policy_reject_local_interfaces`` is on (default 0).
* ``bridge`` (``BridgeRelay 1``): the descriptor is not uploaded to the directory authorities
  (there is no bridge authority in a private network; clients name the bridge in their
  ``Bridge`` line), and the relay serves the directory documents a bridge client bootstraps
  with.
* ``testing_network`` (``TestingTorNetwork 1``): the short intervals of a private test network
  (descriptor uploads, key rotation checks) and tor's testing relaxations
  (``ExtendAllowPrivateAddresses 1``, ``ExitPolicyRejectPrivate 0``, ``AssumeReachable 1``).
  ``allow_private_extends`` sets ``ExtendAllowPrivateAddresses`` on its own.
* ``plain_links``: links without TLS and without certificates, for the in-process demos only;
  never the default, and refused by every tor.
* ``dos``: tor's ``DoS*`` options (:mod:`relay.dos`), with the values the live network's
  consensus sets: per-IP connection and circuit-creation limits on; stream creation off.
* ``publish_tap_key``: whether the descriptor carries the TAP onion key (tor 0.4.9's
  ``publish-dummy-tap-key``). None (the default) starts with it, as tor 0.4.9.11 does and
  its authorities require, and switches to the other form when an authority refuses the
  descriptor and none has accepted it yet (later authorities refuse TAP keys; proposal 350).
* ``max_mem_in_queues`` (``MaxMemInQueues``, 0: tor's default from the RAM) and
  ``cell_queue_caps`` (``circ_max_cell_queue_size``/``_out``): :mod:`relay.relaylimits`.

Threads: plain values and pure functions; any thread.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field

from relay.connlimit import CONN_LIMIT_DEFAULT
from relay.dos import DosConfig
from relay.identity.descriptor import DEFAULT_BANDWIDTH
from relay.relaylimits import CellQueueCaps, compute_max_mem_in_queues

__all__ = ["DirAuthority", "RelayConfig", "parse_dir_authority", "split_policy"]

_FINGERPRINT = re.compile(r"^[0-9A-Fa-f]{40}$")


@dataclass(frozen=True)
class DirAuthority:
    """One ``DirAuthority`` line: where to upload descriptors and fetch documents."""

    nickname: str
    address: str
    dir_port: int
    fingerprint: str  # RSA identity of the authority's relay, 40 upper-case hex
    or_port: int = 0
    v3ident: str | None = None
    flags: tuple[str, ...] = ()

    @property
    def line(self) -> str:
        """The torrc line this was parsed from (normalized). Any thread."""
        parts = [self.nickname, *self.flags]
        if self.or_port:
            parts.append(f"orport={self.or_port}")
        if self.v3ident:
            parts.append(f"v3ident={self.v3ident}")
        parts += [f"{self.address}:{self.dir_port}", self.fingerprint]
        return " ".join(parts)


def parse_dir_authority(line: str) -> DirAuthority:
    """Parse a ``DirAuthority`` value (the option name itself may be included); ValueError
    names what is wrong. Any thread."""
    words = line.split()
    if words and words[0].lower() == "dirauthority":
        words = words[1:]
    if len(words) < 3:
        raise ValueError(f"DirAuthority {line!r}: expected NAME ... ADDR:PORT FINGERPRINT")
    nickname = words[0]
    # The fingerprint is the tail: 40 hex digits, possibly in ten groups of four.
    tail: list[str] = []
    while words and len("".join(tail)) < 40:
        tail.insert(0, words.pop())
    fingerprint = "".join(tail).upper()
    if not _FINGERPRINT.match(fingerprint):
        raise ValueError(f"DirAuthority {line!r}: fingerprint {fingerprint!r} is not 40 hex")
    if len(words) < 2:
        raise ValueError(f"DirAuthority {line!r}: no ADDR:DIRPORT")
    host, colon, port = words.pop().rpartition(":")
    if not colon or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"DirAuthority {line!r}: {host}{colon}{port} is not ADDR:DIRPORT")
    ipaddress.ip_address(host.strip("[]"))
    or_port, v3ident, flags = 0, None, []
    for word in words[1:]:
        key, eq, value = word.partition("=")
        if key == "orport" and eq and value.isdigit():
            or_port = int(value)
        elif key == "v3ident" and eq and _FINGERPRINT.match(value):
            v3ident = value.upper()
        elif eq and key in ("ipv6", "weight"):
            flags.append(word)
        elif not eq:
            flags.append(word)
        else:
            raise ValueError(f"DirAuthority {line!r}: cannot read {word!r}")
    return DirAuthority(nickname, host.strip("[]"), int(port), fingerprint, or_port, v3ident,
                        tuple(flags))


def split_policy(text: str) -> tuple[str, ...]:
    """``"accept 127.0.0.1:7777, reject *:*"`` -> its items, as torrc's ``ExitPolicy`` takes
    a comma-separated list. Any thread."""
    return tuple(item.strip() for item in text.split(",") if item.strip())


@dataclass(frozen=True)
class RelayConfig:
    """Everything a relay node is configured with. See the module docstring."""

    nickname: str = "Unnamed"
    or_host: str = "127.0.0.1"  # where the OR port listens
    or_port: int = 0  # 0: any free port
    address: str | None = None  # published address (tor's ``Address``); default: or_host
    dir_authorities: tuple[DirAuthority, ...] = ()
    exit_policy: tuple[str, ...] = ()  # empty: not an exit
    reject_private_exits: bool | None = None  # ExitPolicyRejectPrivate; None: not testing
    exit_policy_reject_local_interfaces: bool = False
    bridge: bool = False
    testing_network: bool = False
    allow_private_extends: bool | None = None  # ExtendAllowPrivateAddresses; None: as testing
    contact: str | None = None
    publish_tap_key: bool | None = None  # None: with it first, switch on a refusal
    bandwidth_rate: int = DEFAULT_BANDWIDTH  # bytes/s (tor's BandwidthRate)
    bandwidth_burst: int = DEFAULT_BANDWIDTH
    plain_links: bool = False
    threads: int = 2
    dos: DosConfig = field(default_factory=DosConfig)  # the DoS* options (tor's consensus values)
    max_mem_in_queues: int = 0  # bytes; 0: tor's default from the machine's RAM
    conn_limit: int = CONN_LIMIT_DEFAULT  # tor's ConnLimit: descriptors the relay must be allowed
    cell_queue_caps: CellQueueCaps = field(default_factory=CellQueueCaps)

    @property
    def published_address(self) -> str:
        """The IPv4 address the descriptor and NETINFO give. Any thread."""
        return self.address or self.or_host

    @property
    def max_mem_in_queues_bytes(self) -> int:
        """``MaxMemInQueues`` in bytes: as configured, or tor's default for this machine
        (0). Any thread (reads /proc/meminfo for the default)."""
        return compute_max_mem_in_queues(self.max_mem_in_queues)

    @property
    def exit_policy_reject_private(self) -> bool:
        """``ExitPolicyRejectPrivate``: default 1, 0 in a testing network. Any thread."""
        if self.reject_private_exits is not None:
            return self.reject_private_exits
        return not self.testing_network

    @property
    def extend_allow_private_addresses(self) -> bool:
        """``ExtendAllowPrivateAddresses``: default 0, 1 in a testing network. Any thread."""
        if self.allow_private_extends is not None:
            return self.allow_private_extends
        return self.testing_network

    @property
    def is_exit(self) -> bool:
        """True when an exit policy was given (tor: ``ExitRelay auto``). Any thread."""
        return bool(self.exit_policy)
