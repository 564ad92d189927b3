"""The checks tor makes on an EXTEND2 cell before dialing the next hop, and what it answers.

What tor does (tor 0.4.9: ``handle_relay_cell_command`` in ``src/core/or/relay.c``,
``circuit_extend`` and its helpers in ``src/feature/relay/circuitbuild_relay.c``,
``extend_cell_from_extend2_cell_body`` / ``check_extend_cell`` in ``src/core/or/onion.c``,
``connection_or_connect`` in ``src/core/or/connection_or.c``), in this order:

1. **Dropped, circuit kept** (no answer): an EXTEND2 with a non-zero stream id, or one not
   carried in a RELAY_EARLY cell (unless the consensus sets ``AllowNonearlyExtend=1``; default
   0).
2. **Circuit destroyed with reason PROTOCOL (1)**: ``circuit_extend`` returns -1, the relay
   cell handler returns ``-END_CIRC_REASON_TORPROTOCOL`` and the circuit is marked for close,
   which sends DESTROY(PROTOCOL) back (not TRUNCATED). That happens when the circuit already
   has a next hop; the body does not parse; it has no RSA identity (legacy id) link specifier,
   two of them, or two Ed25519 ones; the RSA identity is all zero; neither an IPv4 nor an IPv6
   specifier holds a usable address (non-null address, non-zero port) that is also allowed:
   a private/internal address (``tor_addr_is_internal``: see
   :func:`relay.addrpolicy.is_internal`) is refused unless
   ``ExtendAllowPrivateAddresses 1`` (default 0; ``TestingTorNetwork 1`` sets it to 1); the
   handshake is TAP or CREATE_FAST, or ntor with HLEN != 84; or the target is the previous hop
   (same RSA identity as the channel the circuit came from, or the same Ed25519 identity).
   Of several IPv4 (or IPv6) specifiers the first counts.
3. **Circuit destroyed with reason CONNECTFAILED (6)**: only an IPv6 address is usable and we
   cannot extend over IPv6; or the target is ourselves (our RSA or Ed25519 identity:
   ``connection_or_connect`` refuses, the launch fails). We also refuse our own ORPort
   address:port under another identity up front with the same reason (tor would dial it and
   fail the identity check, closing the circuit all the same).
With both an IPv4 and an IPv6 address usable and IPv6 supported, tor picks IPv6 one time in two
(``IPV6_CONNECTION_ONE_IN_N``): :meth:`ExtendDecision.choose`.

Threads: any thread (pure); :meth:`ExtendDecision.choose` uses the ``random.Random`` it is given.
"""

from __future__ import annotations

import random
from collections.abc import Collection
from dataclasses import dataclass
from enum import Enum

from relay.addrpolicy import IPAddress, is_internal
from relay.cells import DestroyReason
from relay.handshakes import (
    HTYPE_FAST,
    HTYPE_NTOR,
    HTYPE_TAP,
    LSTYPE_ED25519_ID,
    LSTYPE_IPV4,
    LSTYPE_IPV6,
    LSTYPE_LEGACY_ID,
    NTOR_ONIONSKIN_LEN,
    BodyError,
    Extend2Body,
)

__all__ = [
    "ExtendAction",
    "ExtendConfig",
    "ExtendDecision",
    "OurRelay",
    "check_extend2",
]

IPV6_CONNECTION_ONE_IN_N = 2


class ExtendAction(Enum):
    """What the relay does with the EXTEND2 cell."""

    EXTEND = "extend"  # dial (or reuse a link to) the chosen address
    DROP = "drop"  # ignore the cell, keep the circuit
    DESTROY = "destroy"  # close the circuit: DESTROY(reason) toward the client


@dataclass(frozen=True, slots=True)
class ExtendConfig:
    """``ExtendAllowPrivateAddresses`` (tor default 0), whether we can dial IPv6 (tor: we have
    an IPv6 ORPort), and the consensus parameter ``AllowNonearlyExtend`` (default 0)."""

    extend_allow_private_addresses: bool = False
    can_extend_over_ipv6: bool = False
    allow_nonearly_extend: bool = False


@dataclass(frozen=True, slots=True)
class OurRelay:
    """Who we are: our RSA identity digest, Ed25519 identity key (or None), and the
    ``(address, port)`` pairs our ORPort listens on or advertises."""

    rsa_id: bytes
    ed_id: bytes | None = None
    or_addresses: Collection[tuple[IPAddress, int]] = ()


@dataclass(frozen=True, slots=True)
class ExtendDecision:
    """The verdict: ``action``; for DESTROY the ``reason``; ``why`` for the log; for EXTEND the
    target's identities and usable ``ipv4`` / ``ipv6`` ``(address, port)`` (None if unusable)."""

    action: ExtendAction
    reason: DestroyReason | None = None
    why: str = ""
    rsa_id: bytes = b""
    ed_id: bytes | None = None
    ipv4: tuple[IPAddress, int] | None = None
    ipv6: tuple[IPAddress, int] | None = None

    def choose(self, rng: random.Random) -> tuple[IPAddress, int]:
        """The address to dial: IPv6 one time in two when both are usable, as tor does.

        Only for an EXTEND decision. Any thread (uses ``rng``)."""
        if self.ipv4 is not None and self.ipv6 is not None:
            return self.ipv6 if rng.randrange(IPV6_CONNECTION_ONE_IN_N) == 0 else self.ipv4
        target = self.ipv4 or self.ipv6
        if target is None:
            raise ValueError("no usable address: not an EXTEND decision")
        return target


def _destroy(reason: DestroyReason, why: str) -> ExtendDecision:
    return ExtendDecision(ExtendAction.DESTROY, reason, why)


def _protocol(why: str) -> ExtendDecision:
    return _destroy(DestroyReason.PROTOCOL, why)


def _usable(address: IPAddress, port: int, allow_private: bool) -> str | None:
    """None when tor would dial ``address:port``, else why not. Any thread (pure)."""
    if int(address) == 0 or port == 0:
        return "a zero address or port"
    if not allow_private and is_internal(address):
        return f"a private {'IPv4' if address.version == 4 else 'IPv6'} address"
    return None


def check_extend2(
    body: Extend2Body | bytes,
    *,
    via_relay_early: bool,
    stream_id: int,
    already_extended: bool,
    previous_rsa_id: bytes | None,
    previous_ed_id: bytes | None,
    ours: OurRelay,
    config: ExtendConfig = ExtendConfig(),
) -> ExtendDecision:
    """tor's verdict on one EXTEND2 relay cell (see the module docstring for the rules).

    ``body`` is the relay-cell body (or an already decoded one); ``previous_*`` are the
    identities proven on the link the circuit came from (None for a client link).
    Any thread (pure)."""
    if stream_id != 0:
        return ExtendDecision(ExtendAction.DROP, why="EXTEND2 on a non-zero stream id")
    if not via_relay_early and not config.allow_nonearly_extend:
        return ExtendDecision(ExtendAction.DROP, why="EXTEND2 not in a RELAY_EARLY cell")
    if already_extended:
        return _protocol("EXTEND2 on a circuit that already has a next hop")
    if isinstance(body, (bytes, bytearray, memoryview)):
        try:
            body = Extend2Body.decode(bytes(body))
        except (BodyError, ValueError) as exc:
            return _protocol(f"cannot parse EXTEND2: {exc}")

    ipv4: tuple[IPAddress, int] | None = None
    ipv6: tuple[IPAddress, int] | None = None
    rsa_id: bytes | None = None
    ed_id: bytes | None = None
    for spec in body.specifiers:
        if spec.lstype == LSTYPE_IPV4 and ipv4 is None:
            ipv4 = spec.ip_address()
        elif spec.lstype == LSTYPE_IPV6 and ipv6 is None:
            ipv6 = spec.ip_address()
        elif spec.lstype == LSTYPE_LEGACY_ID:
            if rsa_id is not None:
                return _protocol("EXTEND2 with two RSA identity link specifiers")
            rsa_id = spec.data
        elif spec.lstype == LSTYPE_ED25519_ID:
            if ed_id is not None:
                return _protocol("EXTEND2 with two Ed25519 identity link specifiers")
            ed_id = spec.data
    if rsa_id is None:
        return _protocol("EXTEND2 without an RSA identity (legacy id) link specifier")
    if ipv4 is None and ipv6 is None:
        return _protocol("EXTEND2 without an IPv4 or IPv6 link specifier")
    if not any(rsa_id):
        return _protocol("EXTEND2 to an all-zero RSA identity")
    if body.htype in (HTYPE_TAP, HTYPE_FAST):
        return _protocol(f"EXTEND2 with handshake type {body.htype} (TAP/CREATE_FAST)")
    if body.htype == HTYPE_NTOR and len(body.hdata) != NTOR_ONIONSKIN_LEN:
        return _protocol(f"EXTEND2 ntor handshake of {len(body.hdata)} bytes, not 84")

    allow_private = config.extend_allow_private_addresses
    why4 = "no IPv4 specifier" if ipv4 is None else _usable(*ipv4, allow_private)
    why6 = "no IPv6 specifier" if ipv6 is None else _usable(*ipv6, allow_private)
    if why4 is not None and why6 is not None:
        return _protocol(f"EXTEND2 to no usable address (IPv4: {why4}; IPv6: {why6})")
    if why4 is not None:
        ipv4 = None
    if why6 is not None:
        ipv6 = None
    if previous_rsa_id is not None and rsa_id == previous_rsa_id:
        return _protocol("EXTEND2 back to the previous hop")
    if ed_id is not None and any(ed_id) and previous_ed_id is not None and ed_id == previous_ed_id:
        return _protocol("EXTEND2 back to the previous hop (by Ed25519 identity)")
    if not config.can_extend_over_ipv6:
        ipv6 = None
    if ipv4 is None and ipv6 is None:
        return _destroy(DestroyReason.CONNECTFAILED,
                        "IPv6-only EXTEND2, but we cannot extend over IPv6")
    if rsa_id == ours.rsa_id or (ed_id is not None and ed_id == ours.ed_id):
        return _destroy(DestroyReason.CONNECTFAILED, "EXTEND2 to ourselves (our identity)")
    for target in (ipv4, ipv6):
        if target is not None and target in ours.or_addresses:
            return _destroy(DestroyReason.CONNECTFAILED,
                            f"EXTEND2 to our own ORPort {target[0]}:{target[1]}")
    return ExtendDecision(ExtendAction.EXTEND, rsa_id=rsa_id, ed_id=ed_id, ipv4=ipv4, ipv6=ipv6)
