"""Why a TCP stream ended: libuv error codes turned into :class:`CloseReason` and words.

Errors never escape as exceptions into the loop: a libuv error code becomes a
:class:`CloseReason` (:func:`reason_for`) and a human ``detail`` (:func:`describe`, the errno
name and text), which ``reactor.stream.Stream`` reports through ``on_close`` / ``on_error``.
``reactor.net`` and ``reactor`` re-export :class:`CloseReason` and :class:`StreamClosedError`.

Threads: pure functions and plain values; any thread.
"""

from __future__ import annotations

import enum
import ipaddress

import pyuv

__all__ = [
    "CloseReason",
    "StreamClosedError",
    "check_ip",
    "check_watermarks",
    "describe",
    "error_code",
    "reason_for",
]


class CloseReason(enum.Enum):
    """Why a stream ended (or a connection attempt failed)."""

    EOF = "eof"  # the peer closed its side cleanly
    RESET = "reset"  # the peer reset the connection (ECONNRESET, EPIPE, ECONNABORTED)
    REFUSED = "refused"  # connect(): nobody listens there (ECONNREFUSED)
    LOCAL = "local"  # this side called close()
    ERROR = "error"  # anything else: timeouts, unreachable networks, a raising on_data


class StreamClosedError(RuntimeError):
    """``write`` on a stream that this side closed or whose ``on_close`` has been called."""


_RESET_ERRORS = frozenset({pyuv.errno.UV_ECONNRESET, pyuv.errno.UV_EPIPE,
                           pyuv.errno.UV_ECONNABORTED})


def reason_for(code: int) -> CloseReason:
    """The :class:`CloseReason` of a libuv error code. Any thread."""
    if code == pyuv.errno.UV_EOF:
        return CloseReason.EOF
    if code in _RESET_ERRORS:
        return CloseReason.RESET
    if code == pyuv.errno.UV_ECONNREFUSED:
        return CloseReason.REFUSED
    return CloseReason.ERROR


def describe(code: int) -> str:
    """``"UV_ENAME: text"`` for a libuv error code. Any thread."""
    name = pyuv.errno.errorcode.get(code, str(code))
    return f"{name}: {pyuv.errno.strerror(code)}"


def error_code(exc: pyuv.error.UVError) -> int:
    """The libuv error code a pyuv exception carries (``UV_EINVAL`` if none). Any thread."""
    code = exc.args[0] if exc.args else None
    return code if isinstance(code, int) else pyuv.errno.UV_EINVAL


def check_ip(host: str) -> None:
    """``ValueError`` unless ``host`` is an IPv4 or IPv6 address literal. Any thread."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"host must be an IP address literal, not {host!r}") from None


def check_watermarks(high: int, low: int) -> None:
    """``ValueError`` unless ``0 <= low <= high``. Any thread."""
    if not 0 <= low <= high:
        raise ValueError(f"need 0 <= low <= high, got high={high}, low={low}")
