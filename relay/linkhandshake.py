"""The Tor link handshake (tor-spec 4) as a state machine, without I/O of its own.

Initiator (``relay.link.Link.connect``, optionally over TLS to a real tor): :meth:`begin` sends
``VERSIONS`` offering ``versions`` with a 2-byte circuit id; the responder answers ``VERSIONS``
(a first cell that is anything else means the peer is not Tor) and the highest common version
wins (none in common: ``UNSUPPORTED_VERSION``). From then on cells use the negotiated format
(4-byte circuit ids). A tor responder then sends ``CERTS`` (parsed with ``relay.torcerts``; over
TLS it must authenticate the TLS certificate), ``AUTH_CHALLENGE`` (noted and ignored: a client
need not authenticate) and ``NETINFO``; the initiator answers ``NETINFO`` and the handshake is
done.

Responder (``Link.accept``, plain TCP between this project's own relays): wait for ``VERSIONS``,
answer ``VERSIONS`` and ``NETINFO`` (no certificates: our relays trust the loopback), and be done
when the initiator's ``NETINFO`` arrives.

How a link drives it
--------------------
The link owns the bytes: it frames one handshake cell at a time with :meth:`next_cell` (the
format changes after VERSIONS, so cells cannot be framed ahead) and passes it to :meth:`handle`,
which returns True once the handshake is complete. Whatever the handshake sends goes through the
``send(data, cells)`` callable the link gives it (``cells`` is what the link's ``cells_out``
counts: VERSIONS is not counted, NETINFO is). A failure raises :class:`HandshakeFailed` with the
:class:`relay.linkerrors.CloseKind` and the reason the link closes with. What was learnt about
the peer (``link_version``, ``peer_versions``, ``peer_certs``, ``peer_cert_bindings``,
``peer_netinfo``, ``auth_challenge_seen``) stays here; the link exposes it.

Threads: loop thread only (one handshake belongs to one link).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from relay.cells import (
    AnyCell,
    CellCommand,
    CellFormatError,
    encode_versions,
    highest_common_version,
    parse_cell,
    parse_versions,
)
from relay.framing import fixed_cell
from relay.linkerrors import CloseKind
from relay.netinfo import NetInfo, decode_netinfo, encode_netinfo
from relay.torcerts import CertsError, RelayCerts, parse_certs_cell

__all__ = ["AWAITING_NETINFO", "AWAITING_VERSIONS", "DONE", "HandshakeFailed", "LinkHandshake"]

AWAITING_VERSIONS = "awaiting-versions"
AWAITING_NETINFO = "awaiting-netinfo"
DONE = "done"

_VERSIONS_PREFIX = b"\x00\x00\x07"
_IGNORED = frozenset({CellCommand.PADDING, CellCommand.VPADDING})

SendFn = Callable[[bytes, int], None]
"""``send(data, cells)``: write handshake bytes on the link; ``cells`` to count as sent."""
Address = tuple[Any, ...] | None


class HandshakeFailed(Exception):
    """The handshake cannot succeed: the link closes with ``kind`` and ``reason``."""

    def __init__(self, kind: CloseKind, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason


def command_name(command: int) -> str:
    """``CellCommand`` name of ``command``, or ``"command N"``. Any thread (pure)."""
    try:
        return CellCommand(command).name
    except ValueError:
        return f"command {command}"


class LinkHandshake:
    """One link's handshake, initiator or responder. Loop thread only. See the module doc."""

    __slots__ = (
        "_addresses",
        "_peer_certificate_der",
        "_require_certs",
        "_send",
        "auth_challenge_seen",
        "initiator",
        "link_version",
        "peer_cert_bindings",
        "peer_certs",
        "peer_netinfo",
        "peer_versions",
        "phase",
        "versions",
    )

    def __init__(
        self,
        *,
        initiator: bool,
        versions: Sequence[int],
        require_certs: bool,
        send: SendFn,
        addresses: Callable[[], tuple[Address, Address]],
        peer_certificate_der: Callable[[], bytes | None] | None = None,
    ) -> None:
        """``addresses()`` gives ``(peer, local)`` socket addresses for NETINFO;
        ``peer_certificate_der()`` (TLS only) the certificate CERTS must authenticate.
        Loop thread only."""
        self.initiator = initiator
        self.versions = tuple(versions)
        self._require_certs = require_certs
        self._send = send
        self._addresses = addresses
        self._peer_certificate_der = peer_certificate_der
        self.phase = AWAITING_VERSIONS
        self.link_version = 0
        self.peer_versions: tuple[int, ...] = ()
        self.peer_certs: RelayCerts | None = None
        self.peer_cert_bindings: tuple[str, ...] = ()  # which CERTS bindings held (over TLS)
        self.peer_netinfo: NetInfo | None = None
        self.auth_challenge_seen = False

    @property
    def done(self) -> bool:
        """True once the handshake completed. Loop thread only."""
        return self.phase == DONE

    def begin(self) -> None:
        """The transport is ready: an initiator sends its VERSIONS (a responder waits).
        Loop thread only."""
        if self.initiator:
            self._send(encode_versions(self.versions), 0)

    def next_cell(self, buf: bytes, offset: int) -> tuple[AnyCell, int] | None:
        """Frame the handshake cell at ``buf[offset]``: ``(cell, offset after it)``, or None
        until it is complete. ``HandshakeFailed`` (``NOT_TOR``) when the first bytes cannot
        be a VERSIONS cell. Loop thread only."""
        if self.phase == AWAITING_VERSIONS and len(buf) - offset >= 3 and (
            buf[offset : offset + 3] != _VERSIONS_PREFIX
        ):
            raise HandshakeFailed(CloseKind.NOT_TOR, "peer is not a Tor relay: its first bytes "
                                  f"{bytes(buf[offset:offset + 8]).hex()} are not a VERSIONS cell")
        return parse_cell(buf, offset, self.link_version)

    def handle(self, circ_id: int, command: int, payload: bytes) -> bool:
        """Take one handshake cell; True when the handshake is now complete.
        ``HandshakeFailed`` when it cannot be. Loop thread only."""
        try:
            return self._handle(circ_id, command, payload)
        except (CellFormatError, CertsError) as exc:
            raise HandshakeFailed(CloseKind.PROTOCOL,
                                  f"malformed {command_name(command)} cell: {exc}") from exc

    def _handle(self, circ_id: int, command: int, payload: bytes) -> bool:
        if self.phase == AWAITING_VERSIONS:
            self._on_versions(payload)
            return False
        if command in _IGNORED:
            return False
        if command == CellCommand.CERTS:
            if self.peer_certs is not None:
                raise CellFormatError("a second CERTS cell")
            certs = parse_certs_cell(payload)
            if self._peer_certificate_der is not None:
                try:
                    self.peer_cert_bindings = tuple(certs.verify(self._peer_certificate_der()))
                except CertsError as exc:
                    raise HandshakeFailed(CloseKind.AUTH_FAILED,
                                          f"CERTS do not authenticate the peer: {exc}") from exc
            self.peer_certs = certs
            return False
        if command == CellCommand.AUTH_CHALLENGE:
            self.auth_challenge_seen = True  # a client need not authenticate
            return False
        if command == CellCommand.NETINFO:
            if self._require_certs and self.peer_certs is None:
                raise HandshakeFailed(CloseKind.AUTH_FAILED,
                                      "peer sent NETINFO without a CERTS cell")
            self.peer_netinfo = decode_netinfo(payload)
            if self.initiator:
                self._send_netinfo()
            self.phase = DONE
            return True
        raise HandshakeFailed(CloseKind.PROTOCOL, f"unexpected {command_name(command)} cell "
                              f"(circuit {circ_id:#x}) during the link handshake")

    def _on_versions(self, payload: bytes) -> None:
        theirs = parse_versions(payload)
        self.peer_versions = tuple(theirs)
        chosen = highest_common_version(self.versions, theirs)
        if chosen is None:
            raise HandshakeFailed(CloseKind.UNSUPPORTED_VERSION,
                                  f"no common link protocol version: we speak "
                                  f"{list(self.versions)}, the peer speaks {theirs}")
        if not self.initiator:
            self._send(encode_versions(self.versions), 0)
        self.link_version = chosen
        self.phase = AWAITING_NETINFO
        if not self.initiator:
            self._send_netinfo()

    def _send_netinfo(self) -> None:
        peer, local = self._addresses()
        info = NetInfo(
            timestamp=0 if self.initiator else int(time.time()),
            other_address=str(peer[0]) if peer else None,
            my_addresses=() if self.initiator or not local else (str(local[0]),),
        )
        self._send(fixed_cell(0, CellCommand.NETINFO, encode_netinfo(info)), 1)
