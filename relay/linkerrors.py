"""How a Tor link ends, and how it is misused: the vocabulary shared by the link's modules.

:class:`CloseKind` is the category of a link's end (``relay.link.Link.close_kind``; the words
are in ``Link.close_reason``); :class:`LinkError` is raised to a caller that misuses a link.
``relay.link`` re-exports both: import them from there.

Threads: plain values; any thread.
"""

from __future__ import annotations

import enum

__all__ = ["CloseKind", "LinkError"]


class CloseKind(enum.Enum):
    """Why a link ended, as a category (``Link.close_reason`` has the words)."""

    LOCAL = "local"  # close() on this side
    PEER_CLOSED = "peer-closed"  # the peer hung up or reset after the handshake
    CONNECT_FAILED = "connect-failed"  # TCP connect did not succeed
    NOT_TOR = "not-tor"  # the peer does not speak the Tor link protocol
    TLS_FAILED = "tls-failed"  # TLS handshake or record failure
    UNSUPPORTED_VERSION = "unsupported-version"  # no link protocol in common
    AUTH_FAILED = "auth-failed"  # CERTS missing or not binding the TLS certificate
    PROTOCOL = "protocol"  # a malformed or unexpected cell, or a handler that raised
    TIMEOUT = "timeout"  # the handshake did not finish in time


class LinkError(RuntimeError):
    """Misuse of a link: sending circuit cells before it is open or after it closed, or an
    invalid circuit id."""
