"""A relay's exit policy, built from tor's options the way tor 0.4.9 builds it, and the exit checks.

What tor does (``policies_parse_exit_policy_from_options`` and ``..._internal`` in
``src/core/or/policies.c``; ``connection_exit_connect`` in ``src/core/or/connection_edge.c``)
--------------------------------------------------------------------------------------------
* **Not an exit** (``ExitRelay 0``, or ``ExitRelay auto`` with none of ``ExitPolicy``,
  ``ReducedExitPolicy``, ``IPv6Exit`` set: relays are not exits unless configured): the policy
  is ``reject *4:*, reject *6:*`` and the descriptor says ``reject *:*``.
* **An exit**: the rules, in order, are
  1. ``reject *6:*`` unless ``IPv6Exit 1``;
  2. ``ExitPolicyRejectPrivate 1`` (the default): ``reject private:*`` (:data:`PRIVATE_NETS
     <relay.addrpolicy.PRIVATE_NETS>`), then ``reject ADDR:*`` for each *published* address;
  3. ``ExitPolicyRejectLocalInterfaces 1`` (default 0): ``reject ADDR:*`` for each outbound bind
     address, each address a port option is bound to, and each address of every interface;
     the addresses of steps 2-3 only when public (``is_public_for_reject``: private ones are
     what ``reject private`` is for), IPv6 ones only with ``IPv6Exit 1``;
  4. the ``ExitPolicy`` lines;
  5. ``ReducedExitPolicy``'s list, else the default exit policy (both below), each ending in a
     catch-all, so a policy that does not end in ``accept/reject *:*`` *augments* them;
  and then tor removes the redundant rules (:func:`relay.addrpolicy.remove_redundancies`).
  With ``ExitPolicyRejectPrivate 0``, ``ExitPolicy accept 127.0.0.1:7777`` allows that
  target, as in tor (our demos echo on loopback).
* **Descriptor**: the IPv4 rules in descriptor form, one line each, or the single line
  ``reject *:*`` when both families reject everything; with ``IPv6Exit 1`` an ``ipv6-policy``
  line (the IPv6 port summary) unless it is ``reject 1-65535`` (``router.c``).
* **At the exit** (``connection_exit_connect``): an unresolved (null) address is refused; the
  policy refuses with END reason EXITPOLICY (4); then, unless the consensus sets
  ``allow-network-reentry=1`` (default 0), a target that is a known relay's ORPort or DirPort
  is refused with END reason CONNECTREFUSED (3), not EXITPOLICY, so the client does not retry
  elsewhere (tor keeps the relay set as a digest map of address+port, ``nodelist.c``).

What we add
-----------
* An IPv4-mapped IPv6 target (``::ffff:a.b.c.d``) reaches ``a.b.c.d`` through a dual-stack
  socket, so it is allowed only when both its IPv6 form and ``a.b.c.d`` are; a scoped target
  (``fe80::1%eth0``) is judged by its address without the scope (tor cannot parse either form
  as an address; Python's ``ipaddress`` can). The same holds for the known-relay check.
* Interfaces are read from ``/proc/net/fib_trie`` (IPv4 local addresses) and
  ``/proc/net/if_inet6`` (Linux, no new dependency).

Defaults (tor 0.4.9, ``src/app/config/config.c``): ``ExitRelay auto``, ``ExitPolicy`` unset,
``ExitPolicyRejectPrivate 1``, ``ExitPolicyRejectLocalInterfaces 0``, ``IPv6Exit 0``,
``ReducedExitPolicy 0``; ``TestingTorNetwork 1`` sets ``ExitPolicyRejectPrivate 0``.
``BridgeRelay`` (no default policy appended) is not modelled: a bridge is not what this relay is.

Threads: :class:`ExitPolicy` is immutable after :func:`build_exit_policy`: any thread (pure);
:func:`local_interface_addresses` reads ``/proc``: any thread.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from pathlib import Path

from relay.addrpolicy import (
    IPAddress,
    PolicyRule,
    is_public_for_reject,
    is_reject_star,
    parse_policy,
    remove_redundancies,
    summarize,
)
from relay.circuits import END_REASON_CONNECTREFUSED, END_REASON_EXITPOLICY

__all__ = [
    "DEFAULT_EXIT_POLICY",
    "REDUCED_EXIT_POLICY",
    "ExitPolicy",
    "ExitPolicyConfig",
    "ExitVerdict",
    "build_exit_policy",
    "local_interface_addresses",
    "parse_target",
]

#: tor's ``DEFAULT_EXIT_POLICY`` (``policies.c``; the same string is in Debian's tor 0.4.9).
DEFAULT_EXIT_POLICY = (
    "reject *:25,reject *:119,reject *:135-139,reject *:445,reject *:563,reject *:1214,"
    "reject *:4661-4666,reject *:6346-6429,reject *:6699,reject *:6881-6999,accept *:*"
)

#: tor 0.4.9's ``REDUCED_EXIT_POLICY`` (0.4.9 added the Monero ports 18080-18081 and 18089).
REDUCED_EXIT_POLICY = (
    "accept *:20-23,accept *:43,accept *:53,accept *:79-81,accept *:88,accept *:110,"
    "accept *:143,accept *:194,accept *:220,accept *:389,accept *:443,accept *:464,"
    "accept *:465,accept *:531,accept *:543-544,accept *:554,accept *:563,accept *:587,"
    "accept *:636,accept *:706,accept *:749,accept *:873,accept *:902-904,accept *:981,"
    "accept *:989-995,accept *:1194,accept *:1220,accept *:1293,accept *:1500,accept *:1533,"
    "accept *:1677,accept *:1723,accept *:1755,accept *:1863,accept *:2082-2083,"
    "accept *:2086-2087,accept *:2095-2096,accept *:2102-2104,accept *:3128,accept *:3389,"
    "accept *:3690,accept *:4321,accept *:4643,accept *:5050,accept *:5190,"
    "accept *:5222-5223,accept *:5228,accept *:5900,accept *:6660-6669,accept *:6679,"
    "accept *:6697,accept *:8000,accept *:8008,accept *:8074,accept *:8080,accept *:8082,"
    "accept *:8087-8088,accept *:8232-8233,accept *:8332-8333,accept *:8443,accept *:8888,"
    "accept *:9418,accept *:9999,accept *:10000,accept *:11371,accept *:18080-18081,"
    "accept *:18089,accept *:19294,accept *:19638,accept *:50002,accept *:64738,reject *:*"
)

_REJECT_ALL = "reject *4:*,reject *6:*"


@dataclass(frozen=True, slots=True)
class ExitPolicyConfig:
    """tor's exit options; field names follow the torrc names. ``exit_relay=None`` is ``auto``."""

    exit_policy: tuple[str, ...] = ()
    exit_relay: bool | None = None
    ipv6_exit: bool = False
    reduced_exit_policy: bool = False
    exit_policy_reject_private: bool = True
    exit_policy_reject_local_interfaces: bool = False
    allow_network_reentry: bool = False

    @property
    def is_exit(self) -> bool:
        """``ExitRelay 1``, or ``auto`` with an exit option set. Any thread (pure)."""
        if self.exit_relay is not None:
            return self.exit_relay
        return bool(self.exit_policy) or self.reduced_exit_policy or self.ipv6_exit


@dataclass(frozen=True, slots=True)
class ExitVerdict:
    """The answer for one target: ``allowed``, else the END reason to send and why (to log)."""

    allowed: bool
    end_reason: int = 0
    why: str = ""


def parse_target(address: str | IPAddress) -> IPAddress:
    """An address string or object as an ``ipaddress`` object (brackets allowed, a scope kept).

    Raises ``ValueError`` for anything that is not an IP address. Any thread (pure)."""
    if isinstance(address, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        return address
    text = address.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    return ipaddress.ip_address(text)


def _forms(address: IPAddress) -> list[IPAddress]:
    """The addresses a connect to ``address`` may reach: itself without a scope id, and the
    IPv4 address of an IPv4-mapped IPv6 address. Any thread (pure)."""
    if address.version == 4:
        return [address]
    plain = ipaddress.IPv6Address(int(address))
    mapped = plain.ipv4_mapped
    return [plain] if mapped is None else [plain, mapped]


@dataclass(frozen=True)
class ExitPolicy:
    """A built exit policy: ``rules`` (after tor's redundancy removal), first match wins."""

    rules: tuple[PolicyRule, ...]
    ipv6_exit: bool = False
    allow_network_reentry: bool = False
    warnings: tuple[str, ...] = ()

    def _rule_allows(self, address: IPAddress, port: int) -> bool:
        for rule in self.rules:
            if rule.matches(address, port):
                return rule.accept
        return True  # tor: "accept all by default" (our rules always end in catch-alls)

    def allows(self, address: str | IPAddress, port: int) -> bool:
        """True when the policy accepts a connection to this resolved address and port.

        Null addresses, ports outside 1-65535 and non-addresses are refused; see the module
        docstring for mapped and scoped forms. Any thread (pure)."""
        return self.check(address, port).allowed

    def check(self, address: str | IPAddress, port: int,
              known_relays: Collection[tuple[IPAddress, int]] = ()) -> ExitVerdict:
        """What ``connection_exit_connect`` decides for a BEGIN to ``address:port``.

        ``known_relays`` holds ``(ip_address, port)`` pairs: the ORPorts and DirPorts of the
        relays in the consensus (the caller keeps it; a set makes this O(1) per form).
        Any thread (pure)."""
        try:
            target = parse_target(address)
        except ValueError:
            return ExitVerdict(False, END_REASON_EXITPOLICY, f"{address!r} is not an address")
        if not 1 <= port <= 65535:
            return ExitVerdict(False, END_REASON_EXITPOLICY, f"port {port} is out of range")
        forms = _forms(target)
        for form in forms:
            if int(form) == 0:
                return ExitVerdict(False, END_REASON_EXITPOLICY, "null address")
            if not self._rule_allows(form, port):
                why = " (IPv6 address without IPv6Exit configured)" if (
                    form.version == 6 and not self.ipv6_exit) else ""
                return ExitVerdict(False, END_REASON_EXITPOLICY,
                                   f"{form}:{port} failed exit policy{why}")
        if not self.allow_network_reentry and known_relays:
            for form in forms:
                if (form, port) in known_relays:
                    return ExitVerdict(False, END_REASON_CONNECTREFUSED,
                                       f"{form}:{port} is a known relay's address")
        return ExitVerdict(True)

    @property
    def is_exit(self) -> bool:
        """False when both families certainly reject everything. Any thread (pure)."""
        return not (is_reject_star(self.rules, 4) and is_reject_star(self.rules, 6))

    def descriptor_lines(self) -> list[str]:
        """The server-descriptor exit-policy lines, in order (``reject *:*`` alone for a
        non-exit). Any thread (pure)."""
        if not self.is_exit:
            return ["reject *:*"]
        lines = [rule.line() for rule in self.rules if rule.version == 4]
        return lines or ["reject *:*"]

    def full_lines(self) -> list[str]:
        """All rules, IPv4 and IPv6, as ``GETINFO exit-policy/full`` gives them.

        Any thread (pure)."""
        if not self.is_exit:
            return ["reject *:*"]
        return [rule.line() for rule in self.rules]

    def ipv6_policy_line(self) -> str | None:
        """The descriptor's ``ipv6-policy`` line, or None when tor emits none.

        Any thread (pure)."""
        if not self.ipv6_exit:
            return None
        summary = summarize(self.rules, 6)
        return None if summary == "reject 1-65535" else f"ipv6-policy {summary}"

    def summary(self, version: int = 4) -> str:
        """The port summary of one family (a consensus ``p`` line's value). Any thread (pure)."""
        return summarize(self.rules, version)

    def describe(self) -> str:
        """One line for logs. Any thread (pure)."""
        if not self.is_exit:
            return "exit policy: not an exit (reject *:*)"
        return (f"exit policy: {len(self.rules)} rules; IPv4 {self.summary(4)}; IPv6 "
                f"{self.summary(6) if self.ipv6_exit else 'rejected (IPv6Exit 0)'}")


def _read_fib_trie(text: str) -> set[IPAddress]:
    found: set[IPAddress] = set()
    last: str | None = None
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("|--"):
            last = stripped[3:].strip()
        elif stripped.startswith("/32 host LOCAL") and last is not None:
            found.add(ipaddress.IPv4Address(last))
    return found


def _read_if_inet6(text: str) -> set[IPAddress]:
    found: set[IPAddress] = set()
    for line in text.splitlines():
        fields = line.split()
        if fields and len(fields[0]) == 32:
            found.add(ipaddress.IPv6Address(int(fields[0], 16)))
    return found


def local_interface_addresses(proc: Path = Path("/proc/net")) -> set[IPAddress]:
    """Every address of every local interface, both families (Linux ``/proc``).

    An unreadable file gives no addresses of that family (not an error: the caller's policy
    still has ``reject private:*`` and its published addresses). Any thread."""
    found: set[IPAddress] = set()
    for name, reader in (("fib_trie", _read_fib_trie), ("if_inet6", _read_if_inet6)):
        try:
            found |= reader((proc / name).read_text())
        except OSError:
            continue
    return found


def _reject_addresses(addresses: Iterable[IPAddress], ipv6_exit: bool) -> list[PolicyRule]:
    rules: list[PolicyRule] = []
    for address in addresses:
        plain = _forms(address)[0]
        if is_public_for_reject(plain) and (plain.version == 4 or ipv6_exit):
            rules.append(PolicyRule(False, plain, plain.max_prefixlen))
    return rules


def build_exit_policy(
    config: ExitPolicyConfig,
    *,
    published_addresses: Iterable[str | IPAddress] = (),
    outbound_addresses: Iterable[str | IPAddress] = (),
    port_addresses: Iterable[str | IPAddress] = (),
    interface_addresses: Iterable[str | IPAddress] | None = None,
) -> ExitPolicy:
    """The exit policy tor would build from ``config`` (see the module docstring for the order).

    ``published_addresses`` are the relay's advertised IPv4/IPv6 addresses;
    ``outbound_addresses`` its OutboundBindAddress values; ``port_addresses`` the addresses its
    listeners are bound to; ``interface_addresses`` defaults to
    :func:`local_interface_addresses` (read only when ExitPolicyRejectLocalInterfaces is 1).
    Raises :class:`relay.addrpolicy.AddrPolicyError` naming the first malformed item.
    Any thread (reads ``/proc`` only for the interfaces)."""
    if not config.is_exit:
        rules, _ = parse_policy(_REJECT_ALL)
        return ExitPolicy(tuple(rules), False, config.allow_network_reentry)
    head: list[PolicyRule] = []
    if not config.ipv6_exit:
        head += parse_policy("reject *6:*")[0]
    if config.exit_policy_reject_private:
        head += parse_policy("reject private:*")[0]
    configured: list[IPAddress] = []
    if config.exit_policy_reject_private:
        configured += [parse_target(a) for a in published_addresses]
    if config.exit_policy_reject_local_interfaces:
        configured += [parse_target(a) for a in outbound_addresses]
        configured += [parse_target(a) for a in port_addresses]
        interfaces = (local_interface_addresses() if interface_addresses is None
                      else [parse_target(a) for a in interface_addresses])
        configured += sorted(interfaces, key=lambda a: (a.version, int(a)))
    own = _reject_addresses(configured, config.ipv6_exit)
    rules = remove_redundancies(head + own)
    user, warnings = parse_policy(config.exit_policy)
    rules += user
    tail = REDUCED_EXIT_POLICY if config.reduced_exit_policy else DEFAULT_EXIT_POLICY
    rules += parse_policy(tail)[0]
    return ExitPolicy(tuple(remove_redundancies(rules)), config.ipv6_exit,
                      config.allow_network_reentry, tuple(warnings))
