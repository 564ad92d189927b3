"""The NETINFO cell body (tor-spec 4.5): the sender's clock and the addresses it knows.

::

    TIME        4 bytes, seconds since the epoch (0 from a client that hides its clock)
    OTHERADDR   address: the address the sender sees the receiver at
    NMYADDR     1 byte
    MYADDRS     NMYADDR addresses: the sender's own
    address  =  ATYPE (1) ALEN (1) AVAL (ALEN): 4 = IPv4 (4 bytes), 6 = IPv6 (16 bytes)

:func:`encode_netinfo` writes the unpadded body (the link pads it to a fixed cell);
:func:`decode_netinfo` reads one, ignoring trailing padding and skipping addresses of unknown
types, and raises ``relay.cells.CellFormatError`` when the body is truncated. Used by the link
handshake (:mod:`relay.linkhandshake`); ``relay.link`` re-exports the three names.

Threads: pure functions and a frozen dataclass; any thread.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass, field

from relay.cells import CellFormatError

__all__ = ["ADDR_IPV4", "ADDR_IPV6", "NetInfo", "decode_netinfo", "encode_netinfo"]

#: Address types of NETINFO and RESOLVED (tor-spec 6.4).
ADDR_IPV4 = 4
ADDR_IPV6 = 6


@dataclass(frozen=True)
class NetInfo:
    """A NETINFO cell: the sender's clock, the address it sees us at, and its own addresses."""

    timestamp: int
    other_address: str | None
    my_addresses: tuple[str, ...] = field(default=())


def _encode_address(address: str | None) -> bytes:
    if address is None:
        return bytes((ADDR_IPV4, 4)) + bytes(4)
    ip = ipaddress.ip_address(address)
    atype = ADDR_IPV4 if ip.version == 4 else ADDR_IPV6
    return bytes((atype, len(ip.packed))) + ip.packed


def encode_netinfo(info: NetInfo) -> bytes:
    """The NETINFO payload (unpadded). Any thread (pure)."""
    parts = [struct.pack(">I", info.timestamp & 0xFFFFFFFF), _encode_address(info.other_address),
             bytes((len(info.my_addresses),))]
    parts.extend(_encode_address(a) for a in info.my_addresses)
    return b"".join(parts)


def decode_netinfo(payload: bytes) -> NetInfo:
    """Parse a NETINFO payload (trailing padding ignored); ``CellFormatError`` if truncated.
    Unknown address types are skipped. Any thread (pure)."""

    def address(offset: int) -> tuple[str | None, int]:
        if offset + 2 > len(payload):
            raise CellFormatError("NETINFO truncated in an address header")
        atype, alen = payload[offset], payload[offset + 1]
        end = offset + 2 + alen
        if end > len(payload):
            raise CellFormatError("NETINFO truncated in an address")
        raw = payload[offset + 2 : end]
        if (atype, alen) == (ADDR_IPV4, 4):
            return str(ipaddress.IPv4Address(raw)), end
        if (atype, alen) == (ADDR_IPV6, 16):
            return str(ipaddress.IPv6Address(raw)), end
        return None, end

    if len(payload) < 5:
        raise CellFormatError("NETINFO shorter than its timestamp")
    (timestamp,) = struct.unpack_from(">I", payload, 0)
    other, offset = address(4)
    if offset >= len(payload):
        raise CellFormatError("NETINFO truncated before its address count")
    count = payload[offset]
    offset += 1
    mine: list[str] = []
    for _ in range(count):
        addr, offset = address(offset)
        if addr is not None:
            mine.append(addr)
    return NetInfo(timestamp, other, tuple(mine))
