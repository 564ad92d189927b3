"""A SOCKS5 client (RFC 1928, no authentication, CONNECT to an IPv4 address) for tor's SocksPort.

The CONNECT is split in two so a controller can act in between: :func:`send_connect` does the
method negotiation and sends the CONNECT request; tor then announces the stream (a ``STREAM NEW``
control event) and, with ``__LeaveStreamsUnattached``, waits for the controller to attach it;
:func:`read_reply` reads the answer, which tor sends once the exit reported the stream open
(or failed). :func:`connect` does both for a stream tor attaches by itself.

Threads: any thread (each call works on the socket it is given).
"""

from __future__ import annotations

import ipaddress
import socket
import struct

__all__ = ["REPLY_MESSAGES", "SocksError", "connect", "read_reply", "send_connect"]

_VERSION = 5
_NO_AUTH = 0
_CONNECT = 1
_ATYP_IPV4 = 1
_ATYP_DOMAIN = 3
_ATYP_IPV6 = 4

REPLY_MESSAGES = {
    1: "general SOCKS server failure",
    2: "connection not allowed by ruleset",
    3: "network unreachable",
    4: "host unreachable",
    5: "connection refused",
    6: "TTL expired",
    7: "command not supported",
    8: "address type not supported",
}
"""RFC 1928 reply codes other than 0 (succeeded); tor maps its stream end reasons onto them."""


class SocksError(ConnectionError):
    """The proxy refused or broke the SOCKS exchange."""


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise SocksError(f"the SOCKS proxy closed the connection after {len(data)} of "
                             f"{n} bytes")
        data += chunk
    return bytes(data)


def send_connect(sock: socket.socket, host: str, port: int) -> None:
    """Negotiate "no authentication" and send CONNECT ``host:port`` (an IPv4 address). Any
    thread."""
    address = ipaddress.IPv4Address(host)
    sock.sendall(bytes([_VERSION, 1, _NO_AUTH]))
    version, method = _recv_exact(sock, 2)
    if version != _VERSION or method != _NO_AUTH:
        raise SocksError(f"the SOCKS proxy chose version {version} method {method}")
    sock.sendall(struct.pack("!BBBB4sH", _VERSION, _CONNECT, 0, _ATYP_IPV4,
                             address.packed, port))


def read_reply(sock: socket.socket) -> tuple[str, int]:
    """Read the CONNECT reply; return the bound address it names, raise :class:`SocksError`
    with the reason when it is not "succeeded". Any thread."""
    version, code, _reserved, atyp = _recv_exact(sock, 4)
    if version != _VERSION:
        raise SocksError(f"SOCKS reply has version {version}")
    if atyp == _ATYP_IPV4:
        host = str(ipaddress.IPv4Address(_recv_exact(sock, 4)))
    elif atyp == _ATYP_IPV6:
        host = str(ipaddress.IPv6Address(_recv_exact(sock, 16)))
    elif atyp == _ATYP_DOMAIN:
        host = _recv_exact(sock, _recv_exact(sock, 1)[0]).decode(errors="replace")
    else:
        raise SocksError(f"SOCKS reply has address type {atyp}")
    (bound_port,) = struct.unpack("!H", _recv_exact(sock, 2))
    if code != 0:
        raise SocksError(f"SOCKS CONNECT failed: {REPLY_MESSAGES.get(code, f'code {code}')}")
    return host, bound_port


def connect(sock: socket.socket, host: str, port: int) -> None:
    """A whole CONNECT on a socket already connected to the proxy. Any thread."""
    send_connect(sock, host, port)
    read_reply(sock)
