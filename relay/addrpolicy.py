"""Tor's address-policy rules: parse, match, write, de-duplicate and summarize, as tor 0.4.9 does.

What tor does (``src/core/or/policies.c``, ``src/feature/dirparse/policy_parse.c``,
``src/lib/net/address.c``)
-----------------------------------------------------------------------------------------
A policy is a list of rules ``accept|reject|accept6|reject6 ADDR[/MASK][:PORT]``, first match
wins. Each torrc value is split on commas (blank items ignored, spaces around items dropped) and
each item is one keyword and exactly one argument (keywords are case-sensitive):

* ``ADDR`` is ``*`` (both families: it becomes two rules, ``*4`` then ``*6``), ``*4``, ``*6``, an
  IPv4 dotted quad, an IPv6 address in brackets (without brackets the first ``:`` starts the
  port, so ``::1:80`` is malformed), or ``private`` (expanded into :data:`PRIVATE_NETS`, both
  families). ``accept6``/``reject6`` turn ``*`` into ``*6`` only; given an IPv4 address, or
  ``private``, they are *ignored* with a warning (tor 0.4.9 logs "IPv4 address ... with
  accept6/reject6 field type in exit policy. Ignoring").
* ``/MASK`` is a bit count (0-32 for IPv4, 0-128 for IPv6) or an IPv4 prefix mask such as
  ``255.255.0.0``; a wildcard with a mask is malformed. On an IPv4-mapped IPv6 address tor
  refuses 33-95 bits and maps the others onto 96-127 (``96 + bits % 32``; so ``/128`` becomes
  ``/96``: tor's quirk, kept so our rules equal tor's).
* ``PORT`` is ``*`` (or absent: 1-65535), ``N`` or ``LOW-HIGH`` with 1 <= LOW <= HIGH <= 65535
  (0.4.9.11 refuses port 0: bug 41292).
Any malformed item discards the whole list (tor refuses to start).

After parsing, :func:`remove_redundancies` drops the rules that can never decide anything, in
tor's three steps (``exit_policy_remove_redundancies``), so our rule lists equal what tor puts
in its descriptor and answers for ``GETINFO exit-policy/full``. :func:`summarize` is
``policy_summarize`` (the ``p`` / ``ipv6-policy`` port summary; rejects of the private nets
and of anything smaller than 2^25 IPv4 addresses or one IPv6 /16 do not count).

What we keep of tor's form: a rule stores the address as written plus its prefix length (tor
writes ``reject 1.2.3.4/8:*`` back as given), and matches by masked comparison.

Threads: everything here is immutable or pure: any thread (pure).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = [
    "PRIVATE_NETS",
    "AddrPolicyError",
    "IPAddress",
    "PolicyRule",
    "is_internal",
    "is_multicast",
    "is_public_for_reject",
    "is_reject_star",
    "parse_policy",
    "remove_redundancies",
    "summarize",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

#: tor's ``private_nets`` (policies.c): what ``private`` expands to, in this order. Also the
#: reject rules a port summary ignores.
PRIVATE_NETS: tuple[str, ...] = (
    "0.0.0.0/8", "169.254.0.0/16", "127.0.0.0/8", "192.168.0.0/16", "10.0.0.0/8",
    "172.16.0.0/12", "[::]/8", "[fc00::]/7", "[fe80::]/10", "[fec0::]/10", "[ff00::]/8",
    "[::]/127",
)

_ALL_PORTS = (1, 65535)
_PORT_NUMBER = re.compile(r"\+?[0-9]+\Z")
_MAX_SUMMARY_LEN = 1000  # MAX_EXITPOLICY_SUMMARY_LEN


class AddrPolicyError(ValueError):
    """A malformed policy item: ``item`` is the offending text, the message says why."""

    def __init__(self, item: str, why: str) -> None:
        """Any thread (pure)."""
        super().__init__(f"malformed policy item {item!r}: {why}")
        self.item = item
        self.why = why


@dataclass(frozen=True, slots=True)
class PolicyRule:
    """One rule: ``accept`` or reject, ``address``/``bits`` (as written), a port range.

    ``bits == 0`` is the family wildcard (``*4`` or ``*6``).
    """

    accept: bool
    address: IPAddress
    bits: int
    port_min: int = 1
    port_max: int = 65535

    @property
    def version(self) -> int:
        """4 or 6. Any thread (pure)."""
        return self.address.version

    @property
    def all_ports(self) -> bool:
        """True when the rule covers ports 1-65535. Any thread (pure)."""
        return self.port_min <= 1 and self.port_max >= 65535

    def _prefix(self, address: IPAddress, bits: int) -> int:
        return int(address) >> (address.max_prefixlen - bits)

    def covers_address(self, address: IPAddress) -> bool:
        """Same family and inside ``address/bits`` (a scope id is ignored). Any thread (pure)."""
        return (address.version == self.address.version
                and self._prefix(address, self.bits) == self._prefix(self.address, self.bits))

    def matches(self, address: IPAddress, port: int) -> bool:
        """``tor_addr_compare_masked`` and the port range. Any thread (pure)."""
        return self.port_min <= port <= self.port_max and self.covers_address(address)

    def covers(self, other: PolicyRule) -> bool:
        """Every (address, port) ``other`` matches, this matches too (``addr_policy_covers``).

        Any thread (pure)."""
        return (self.version == other.version and self.bits <= other.bits
                and self.covers_address(other.address)
                and self.port_min <= other.port_min and self.port_max >= other.port_max)

    def intersects(self, other: PolicyRule) -> bool:
        """Some (address, port) matches both (``addr_policy_intersects``). Any thread (pure)."""
        if self.version != other.version:
            return False
        bits = min(self.bits, other.bits)
        return (self._prefix(self.address, bits) == self._prefix(other.address, bits)
                and not (self.port_max < other.port_min or other.port_max < self.port_min))

    def line(self, for_descriptor: bool = True) -> str:
        """The rule as tor writes it (``policy_write_item``). Any thread (pure).

        Descriptor form (``for_descriptor``): ``accept6``/``reject6`` for IPv6 rules and ``*`` for a
        wildcard; the other form (tor's log and ``exit-policy/default``) writes ``*4``/``*6``.
        """
        verb = "accept" if self.accept else "reject"
        if for_descriptor and self.version == 6:
            verb += "6"
        if self.bits == 0:
            addr = "*" if for_descriptor else f"*{self.version}"
        else:
            addr = f"[{_v6_text(self.address)}]" if self.version == 6 else str(self.address)
            if self.bits < self.address.max_prefixlen:
                addr += f"/{self.bits}"
        if self.all_ports:
            ports = "*"
        elif self.port_min == self.port_max:
            ports = str(self.port_min)
        else:
            ports = f"{self.port_min}-{self.port_max}"
        return f"{verb} {addr}:{ports}"


def _v6_text(address: IPAddress) -> str:
    """``tor_inet_ntop``: RFC 5952 compression, but ``::a.b.c.d`` and ``::ffff:a.b.c.d`` for
    the IPv4-compatible and IPv4-mapped forms. Any thread (pure)."""
    value = int(address)
    words = [(value >> (16 * (7 - i))) & 0xFFFF for i in range(8)]
    if not any(words[:5]) and ((words[5] == 0 and words[6] and words[7]) or words[5] == 0xFFFF):
        quad = str(ipaddress.IPv4Address(value & 0xFFFFFFFF))
        return f"::{quad}" if words[5] == 0 else f"::ffff:{quad}"
    return ipaddress.IPv6Address(value).compressed


# --------------------------------------------------------------------------- parsing


def _parse_ports(item: str, text: str | None) -> tuple[int, int]:
    """``parse_port_range`` as of 0.4.9.11 (no port 0). Any thread (pure)."""
    if text is None or text in ("", "*"):
        return _ALL_PORTS
    low_text, dash, high_text = text.partition("-")
    if not _PORT_NUMBER.match(low_text) or (dash and not _PORT_NUMBER.match(high_text)):
        raise AddrPolicyError(item, f"malformed port {text!r}")
    low = int(low_text)
    high = int(high_text) if dash else low
    if not (1 <= low <= 65535 and 1 <= high <= 65535):
        raise AddrPolicyError(item, f"malformed port {text!r} (ports are 1-65535)")
    if low > high:
        raise AddrPolicyError(item, f"insane port range {text!r}")
    return low, high


def _mask_bits(item: str, mask: str, version: int) -> int:
    """A bit count or an IPv4 prefix mask. Any thread (pure)."""
    if re.fullmatch(r"[+-]?[0-9]+", mask):
        bits = int(mask)
        if not 0 <= bits <= (32 if version == 4 else 128):
            raise AddrPolicyError(item, f"bad number of mask bits ({bits})")
        return bits
    try:
        value = int(ipaddress.IPv4Address(mask))
    except ValueError:
        raise AddrPolicyError(item, f"malformed mask {mask!r}") from None
    bits = value.bit_count()
    if value != (0xFFFFFFFF << (32 - bits)) & 0xFFFFFFFF:
        raise AddrPolicyError(item, f"IPv4-style mask {mask!r} is not a prefix")
    return bits


def _parse_pattern(item: str, pattern: str, accept: bool, six_only: bool) -> list[PolicyRule]:
    """``ADDR[/MASK][:PORTS]`` into one rule, or two for ``*``. Any thread (pure)."""
    rest = pattern
    if rest.startswith("["):
        end = rest.find("]")
        if end < 0:
            raise AddrPolicyError(item, "no closing IPv6 bracket")
        address_text, rest = rest[1:end], rest[end + 1:]
        bracketed = True
    else:
        cut = min((i for i in (rest.find("/"), rest.find(":")) if i >= 0), default=len(rest))
        address_text, rest = rest[:cut], rest[cut:]
        bracketed = False
    mask = ports = None
    if rest.startswith("/"):
        mask, _, tail = rest[1:].partition(":")
        ports = tail if ":" in rest else None
    elif rest.startswith(":"):
        ports = rest[1:]
    elif rest:
        raise AddrPolicyError(item, f"unexpected {rest!r} after the address")

    wildcard: tuple[int, ...] = ()
    if not bracketed and address_text == "*":
        wildcard = (6,) if six_only else (4, 6)
    elif not bracketed and address_text in ("*4", "*6"):
        wildcard = (int(address_text[1]),)
    if wildcard:
        if mask is not None:
            raise AddrPolicyError(item, "bit prefix with a wildcard address")
        port_min, port_max = _parse_ports(item, ports)
        return [PolicyRule(accept, ipaddress.ip_address("0.0.0.0" if v == 4 else "::"), 0,
                           port_min, port_max) for v in wildcard]
    try:
        address: IPAddress = (ipaddress.IPv6Address(address_text) if bracketed
                              else ipaddress.IPv4Address(address_text))
    except ValueError:
        raise AddrPolicyError(item, f"malformed IP {address_text!r}") from None
    if address.version == 6 and address.scope_id:
        raise AddrPolicyError(item, f"malformed IP {address_text!r} (scope id)")
    if mask is None:
        bits = address.max_prefixlen
    else:
        bits = _mask_bits(item, mask, address.version)
        if address.version == 6 and address.ipv4_mapped is not None:
            if 32 < bits < 96:
                raise AddrPolicyError(item, f"bad mask bits {bits} for a v4-mapped address")
            bits = 96 + bits % 32
    port_min, port_max = _parse_ports(item, ports)
    return [PolicyRule(accept, address, bits, port_min, port_max)]


def _private_rules(accept: bool, port_min: int, port_max: int) -> list[PolicyRule]:
    rules = []
    for net in PRIVATE_NETS:
        text, _, bits = net.partition("/")
        rules.append(PolicyRule(accept, ipaddress.ip_address(text.strip("[]")), int(bits),
                                port_min, port_max))
    return rules


def _parse_item(item: str, warnings: list[str]) -> list[PolicyRule]:
    """One comma-separated item. Any thread (pure)."""
    words = item.split()
    if not words or words[0] not in ("accept", "reject", "accept6", "reject6"):
        raise AddrPolicyError(item, "expected 'accept' or 'reject'")
    if len(words) != 2:
        raise AddrPolicyError(item, "expected exactly one ADDR[/MASK][:PORT] after the keyword")
    keyword, pattern = words
    accept = keyword.startswith("accept")
    six = keyword.endswith("6")
    if pattern.startswith("private"):
        rest = pattern[len("private"):]
        if not rest.startswith(":"):
            raise AddrPolicyError(item, "expected 'private:PORTS'")
        port_min, port_max = _parse_ports(item, rest[1:])
        if six:
            warnings.append(f"{item!r}: accept6/reject6 with 'private' is ignored, as tor does "
                            "(use accept/reject private:*)")
            return []
        return _private_rules(accept, port_min, port_max)
    rules = _parse_pattern(item, pattern, accept, six)
    if six and rules[0].version == 4:
        warnings.append(f"{item!r}: IPv4 address with accept6/reject6 is ignored, as tor does")
        return []
    return rules


def parse_policy(values: str | Iterable[str]) -> tuple[list[PolicyRule], list[str]]:
    """Parse torrc policy values (each may hold comma-separated items) into rules, in order.

    Returns ``(rules, warnings)``; the warnings name the items tor ignores. Raises
    :class:`AddrPolicyError` for the first malformed item (tor then discards the whole list).
    Any thread (pure)."""
    if isinstance(values, str):
        values = [values]
    rules: list[PolicyRule] = []
    warnings: list[str] = []
    for value in values:
        for raw in value.split(","):
            item = raw.strip()
            if item:
                rules.extend(_parse_item(item, warnings))
    return rules, warnings


# --------------------------------------------------------------------------- whole policies


def remove_redundancies(rules: Sequence[PolicyRule]) -> list[PolicyRule]:
    """tor's ``exit_policy_remove_redundancies``: the same decisions, fewer rules.

    1. Every rule of a family after that family's catch-all (``*4:*`` / ``*6:*``) goes.
    2. A rule covered by an earlier rule (whatever their verbs) goes.
    3. A rule covered by a later rule of the same verb goes, unless a rule of the other verb
       between them intersects it.
    O(n^2) in the number of rules: for building a policy, not per stream. Any thread (pure)."""
    out: list[PolicyRule] = []
    killed: set[int] = set()
    for rule in rules:
        if rule.version in killed:
            continue
        out.append(rule)
        if rule.bits == 0 and rule.all_ports:
            killed.add(rule.version)
    i = 0
    while i < len(out) - 1:
        out[i + 1:] = [later for later in out[i + 1:] if not out[i].covers(later)]
        i += 1
    i = 0
    while i < len(out) - 1:
        rule = out[i]
        removed = False
        for later in out[i + 1:]:
            if rule.accept != later.accept:
                if rule.intersects(later):
                    break
            elif later.covers(rule):
                del out[i]
                removed = True
                break
        if not removed:
            i += 1
    return out


def is_reject_star(rules: Sequence[PolicyRule], version: int, default_reject: bool = True) -> bool:
    """True when the rules certainly reject every address of ``version`` on every port
    (``policy_is_reject_star``): a reject catch-all comes before any accept. Any thread (pure)."""
    for rule in rules:
        if rule.version != version:
            continue
        if rule.accept:
            return False
        if rule.bits == 0 and rule.all_ports:
            return True
    return default_reject


def is_internal(address: IPAddress) -> bool:
    """tor's ``tor_addr_is_internal(addr, 0)``.

    IPv4 (and the IPv4 form of an IPv4-mapped IPv6 address): 0/8, 10/8, 127/8, 100.64/10,
    169.254/16, 172.16/12, 192.168/16. IPv6: fc00::/7, fe80::/10, fec0::/10, ::/127.
    Any thread (pure)."""
    v4 = address if address.version == 4 else address.ipv4_mapped
    if v4 is not None:
        value = int(v4)
        return ((value >> 24) in (0, 10, 127) or (value >> 22) == 0x64400000 >> 22
                or (value >> 16) in (0xA9FE, 0xC0A8) or (value >> 20) == 0xAC1)
    high = int(address) >> 96
    return ((high >> 25) == 0xFC000000 >> 25
            or (high >> 22) in (0xFE800000 >> 22, 0xFEC00000 >> 22)
            or (int(address) >> 1) == 0)


def is_multicast(address: IPAddress) -> bool:
    """tor's ``tor_addr_is_multicast``: 224/8 (sic: tor tests the first octet only) or
    ff00::/8. Any thread (pure)."""
    if address.version == 4:
        return int(address) >> 24 == 0xE0
    return int(address) >> 120 == 0xFF


def is_public_for_reject(address: IPAddress) -> bool:
    """tor's ``tor_addr_is_public_for_reject``: not null, not internal, not multicast.

    Any thread (pure)."""
    return int(address) != 0 and not is_internal(address) and not is_multicast(address)


def _summary_count(rule: PolicyRule) -> int | None:
    """How many 'addresses' a reject counts for in a summary, or None to ignore it."""
    if rule.version == 4:
        return 1 << (32 - rule.bits)
    if rule.bits > 64:
        return None
    return (1 << 64) if 64 - rule.bits >= 64 else 1 << (64 - rule.bits)


def summarize(rules: Sequence[PolicyRule], version: int) -> str:
    """tor's ``policy_summarize``: ``accept PORTS`` or ``reject PORTS``, the shorter one.

    A port is accepted when an ``accept`` of all addresses covers it before rejects of more
    than 2^25 IPv4 addresses (two /8s' worth; one IPv6 /16, counted in /64s) do. Rejects of
    the private nets are ignored. Nothing accepted gives ``reject 1-65535``; nothing rejected
    ``accept 1-65535``; a list over 1000 characters is cut at a comma. Any thread (pure)."""
    cutoff = (1 << 25) if version == 4 else (1 << 48)
    private = {(r.address, r.bits) for r in _private_rules(False, 1, 65535)}
    # Items [low, high, reject_count, accepted], contiguous over 1-65535.
    items: list[list[int]] = [[1, 65535, 0, 0]]

    def split(low: int, high: int) -> int:
        i = 0
        while items[i][1] < low:
            i += 1
        if items[i][0] != low:
            item = items[i]
            items.insert(i + 1, [low, item[1], item[2], item[3]])
            item[1] = low - 1
            i += 1
        start = i
        while items[i][1] < high:
            i += 1
        if items[i][1] != high:
            item = items[i]
            items.insert(i + 1, [high + 1, item[1], item[2], item[3]])
            item[1] = high
        return start

    for rule in rules:
        if rule.version != version:
            continue
        if rule.accept:
            if rule.bits == 0:
                i = split(rule.port_min, rule.port_max)
                while i < len(items) and items[i][1] <= rule.port_max:
                    if not items[i][3] and items[i][2] <= cutoff:
                        items[i][3] = 1
                    i += 1
        elif (rule.address, rule.bits) not in private:
            count = _summary_count(rule)
            if count is None:
                continue
            i = split(rule.port_min, rule.port_max)
            while i < len(items) and items[i][1] <= rule.port_max:
                items[i][2] = min(items[i][2] + count, (1 << 64) - 1)
                i += 1

    accepts: list[str] = []
    rejects: list[str] = []
    start = 1
    for i, item in enumerate(items):
        if i == len(items) - 1 or item[3] != items[i + 1][3]:
            text = str(start) if start == item[1] else f"{start}-{item[1]}"
            (accepts if item[3] else rejects).append(text)
            if i < len(items) - 1:
                start = items[i + 1][0]
    if not accepts:
        return "reject 1-65535"
    if not rejects:
        return "accept 1-65535"
    accept_text, reject_text = ",".join(accepts), ",".join(rejects)
    if (len(reject_text) > _MAX_SUMMARY_LEN - len("reject") - 1
            and len(accept_text) > _MAX_SUMMARY_LEN - len("accept") - 1):
        cut = accept_text.rfind(",", 0, _MAX_SUMMARY_LEN - len("accept") - 1 + 1)
        return f"accept {accept_text[:cut]}"
    if len(reject_text) < len(accept_text):
        return f"reject {reject_text}"
    return f"accept {accept_text}"
