"""The Tor link handshake (tor-spec 4) as a state machine, without I/O of its own.

Both sides start with ``VERSIONS`` (2-byte circuit ids; the highest common version wins, none
in common is ``UNSUPPORTED_VERSION``, a first cell that is anything else means the peer is not
Tor). After that cells use the negotiated format (4-byte circuit ids).

Responder (``relay.link.Link.accept``): on the initiator's ``VERSIONS`` it answers ``VERSIONS``
and, with :class:`relay.linkauth.LinkCredentials` (a relay over TLS), ``CERTS`` (types 1, 2, 4,
5, 7) and ``AUTH_CHALLENGE`` (method 3), then ``NETINFO``. The initiator then either sends
``NETINFO`` at once (a client: the link stays unauthenticated), or ``CERTS`` (2, 4, 6, 7),
``AUTHENTICATE`` and ``NETINFO`` (a relay): its certificates are verified
(``RelayCerts.verify_initiator``) and its AUTHENTICATE checked against what this side computes
(``relay.identity.authenticate``), and a failure closes the link with ``AUTH_FAILED``.

Initiator (``Link.connect``): it sends ``VERSIONS``, then takes the responder's ``CERTS`` (over
TLS they must bind the TLS certificate the peer presented: ``RelayCerts.verify``),
``AUTH_CHALLENGE`` and ``NETINFO``. With credentials (a relay) and a method-3 challenge it
answers ``CERTS``, ``AUTHENTICATE`` and ``NETINFO``; without (a client) just ``NETINFO``.

AUTHENTICATE binds the link's transcript: SLOG is SHA-256 of every byte the responder sent up
to and including AUTH_CHALLENGE, CLOG of every byte the initiator sent before AUTHENTICATE,
both in wire format (``relay.identity.authenticate.HandshakeDigests``); each side records its
own bytes as it sends them and the peer's as :meth:`LinkHandshake.next_cell` frames them, and
takes the digest at the moment the spec fixes it. TLSSECRETS is the TLS session's RFC 5705
exporter with context CID (tor's behaviour; see ``relay.identity.authenticate``).

How a link drives it
--------------------
The link owns the bytes: it frames one handshake cell at a time with :meth:`next_cell` (the
format changes after VERSIONS, so cells cannot be framed ahead) and passes it to :meth:`handle`,
which returns True once the handshake is complete. Whatever the handshake sends goes through the
``send(data, cells)`` callable the link gives it (``cells`` is what the link's ``cells_out``
counts: VERSIONS is not counted). A failure raises :class:`HandshakeFailed` with the
:class:`relay.linkerrors.CloseKind` and the reason the link closes with. What was learnt about
the peer (``link_version``, ``peer_versions``, ``peer_certs``, ``peer_cert_bindings``,
``peer_netinfo``, ``auth_challenge_seen``, ``peer_identity``) stays here; the link exposes it.

Threads: loop thread only (one handshake belongs to one link); :func:`command_name` is pure,
any thread.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from relay.cells import (
    AnyCell,
    CellCommand,
    CellFormatError,
    encode_versions,
    highest_common_version,
    parse_cell,
    parse_versions,
)
from relay.framing import fixed_cell, var_cell
from relay.identity.authenticate import (
    AUTH_METHOD_ED25519_SHA256_RFC5705,
    EXPORTER_LABEL,
    EXPORTER_LENGTH,
    AuthenticateError,
    AuthInputs,
    HandshakeDigests,
    build_auth_challenge,
    build_authenticate,
    parse_auth_challenge,
    verify_authenticate,
)
from relay.identity.certscell import CertsError, InitiatorIdentity, RelayCerts, parse_certs_cell
from relay.linkauth import LinkCredentials, PeerIdentity
from relay.linkerrors import CloseKind
from relay.netinfo import NetInfo, decode_netinfo, encode_netinfo

__all__ = ["AWAITING_NETINFO", "AWAITING_VERSIONS", "DONE", "HandshakeFailed", "LinkHandshake"]

AWAITING_VERSIONS = "awaiting-versions"
AWAITING_NETINFO = "awaiting-netinfo"
DONE = "done"

_VERSIONS_PREFIX = b"\x00\x00\x07"
_IGNORED = frozenset({CellCommand.PADDING, CellCommand.VPADDING})

SendFn = Callable[[bytes, int], None]
"""``send(data, cells)``: write handshake bytes on the link; ``cells`` to count as sent."""
Address = tuple[Any, ...] | None


class TlsBinding(Protocol):
    """What the handshake needs of the link's TLS session (``relay.tls``)."""

    def peer_certificate_der(self) -> bytes | None: ...
    def own_certificate_der(self) -> bytes | None: ...
    def export_keying_material(self, label: bytes, length: int,
                               context: bytes | None = None) -> bytes: ...


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
        "_clock",
        "_credentials",
        "_digests",
        "_initiator_claim",
        "_recording",
        "_require_certs",
        "_send",
        "_slog",
        "_tls",
        "auth_challenge_seen",
        "authenticate_sent",
        "initiator",
        "link_version",
        "peer_cert_bindings",
        "peer_certs",
        "peer_identity",
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
        tls: TlsBinding | None = None,
        credentials: LinkCredentials | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``addresses()`` gives ``(peer, local)`` socket addresses for NETINFO; ``tls`` the
        session whose certificate CERTS must bind (and whose exporter AUTHENTICATE uses);
        ``credentials`` make this side authenticate as a relay (TLS only). ``clock`` gives the
        time certificates are checked at and NETINFO carries. Loop thread only."""
        if credentials is not None and tls is None:
            raise ValueError("link authentication needs TLS (AUTHENTICATE binds the session)")
        self.initiator = initiator
        self.versions = tuple(versions)
        self._require_certs = require_certs
        self._send = send
        self._addresses = addresses
        self._tls = tls
        self._credentials = credentials
        self._clock = clock
        self._digests = HandshakeDigests(initiator)
        self._recording = credentials is not None  # digests matter only to authentication
        self._slog: bytes | None = None
        self._initiator_claim: InitiatorIdentity | None = None
        self.phase = AWAITING_VERSIONS
        self.link_version = 0
        self.peer_versions: tuple[int, ...] = ()
        self.peer_certs: RelayCerts | None = None
        self.peer_cert_bindings: tuple[str, ...] = ()  # which CERTS bindings held (over TLS)
        self.peer_netinfo: NetInfo | None = None
        self.peer_identity: PeerIdentity | None = None
        self.auth_challenge_seen = False
        self.authenticate_sent = False

    @property
    def done(self) -> bool:
        """True once the handshake completed. Loop thread only."""
        return self.phase == DONE

    def begin(self) -> None:
        """The transport is ready: an initiator sends its VERSIONS (a responder waits).
        Loop thread only."""
        if self.initiator:
            self._emit(encode_versions(self.versions), 0)

    def next_cell(self, buf: bytes, offset: int) -> tuple[AnyCell, int] | None:
        """Frame the handshake cell at ``buf[offset]``: ``(cell, offset after it)``, or None
        until it is complete. ``HandshakeFailed`` (``NOT_TOR``) when the first bytes cannot
        be a VERSIONS cell. Loop thread only."""
        if self.phase == AWAITING_VERSIONS and len(buf) - offset >= 3 and (
            buf[offset : offset + 3] != _VERSIONS_PREFIX
        ):
            raise HandshakeFailed(CloseKind.NOT_TOR, "peer is not a Tor relay: its first bytes "
                                  f"{bytes(buf[offset:offset + 8]).hex()} are not a VERSIONS cell")
        framed = parse_cell(buf, offset, self.link_version)
        if framed is not None and self._recording:
            cell, end = framed
            if not (not self.initiator and cell.command == CellCommand.AUTHENTICATE):
                self._digests.received(bytes(buf[offset:end]))  # CLOG / SLOG input
        return framed

    def handle(self, circ_id: int, command: int, payload: bytes) -> bool:
        """Take one handshake cell; True when the handshake is now complete.
        ``HandshakeFailed`` when it cannot be. Loop thread only."""
        try:
            return self._handle(circ_id, command, payload)
        except (CellFormatError, CertsError) as exc:
            raise HandshakeFailed(CloseKind.PROTOCOL,
                                  f"malformed {command_name(command)} cell: {exc}") from exc

    # ------------------------------------------------------------------ both sides

    def _emit(self, data: bytes, cells: int) -> None:
        if self._recording:
            self._digests.sent(data)
        self._send(data, cells)

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
            if self.initiator:
                self._on_responder_certs(certs)
            else:
                self._on_initiator_certs(certs)
            self.peer_certs = certs
            return False
        if command == CellCommand.AUTH_CHALLENGE and self.initiator:
            if self.auth_challenge_seen:
                raise CellFormatError("a second AUTH_CHALLENGE cell")
            self._on_auth_challenge(payload)
            return False
        if command == CellCommand.AUTHENTICATE and not self.initiator:
            self._on_authenticate(payload)
            return False
        if command == CellCommand.NETINFO:
            self._on_netinfo(payload)
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
        self.link_version = chosen
        self.phase = AWAITING_NETINFO
        if self.initiator:
            return
        self._emit(encode_versions(self.versions), 0)
        credentials = self._credentials
        if credentials is not None:
            self._emit(var_cell(0, CellCommand.CERTS, credentials.responder_certs), 1)
            self._emit(var_cell(0, CellCommand.AUTH_CHALLENGE, build_auth_challenge()), 1)
            self._slog = self._digests.slog()  # SLOG ends with AUTH_CHALLENGE
            self._recording = True  # still needed: CLOG is what the initiator sends
        self._send_netinfo()

    def _on_netinfo(self, payload: bytes) -> None:
        if self.initiator and self._require_certs and self.peer_certs is None:
            raise HandshakeFailed(CloseKind.AUTH_FAILED, "peer sent NETINFO without a CERTS cell")
        if not self.initiator and self.peer_certs is not None and self.peer_identity is None:
            # tor treats an initiator that sent CERTS without AUTHENTICATE as a client.
            self.peer_certs = None
        self.peer_netinfo = decode_netinfo(payload)
        if self.initiator:
            self._authenticate_if_asked()
            self._send_netinfo()
        self.phase = DONE
        self._recording = False

    def _send_netinfo(self) -> None:
        peer, local = self._addresses()
        relay = self._credentials is not None
        info = NetInfo(
            timestamp=int(self._clock()) if relay or not self.initiator else 0,
            other_address=str(peer[0]) if peer else None,
            my_addresses=(str(local[0]),) if local and (relay or not self.initiator) else (),
        )
        self._send(fixed_cell(0, CellCommand.NETINFO, encode_netinfo(info)), 1)

    # ------------------------------------------------------------------ initiator

    def _on_responder_certs(self, certs: RelayCerts) -> None:
        tls_der = self._tls.peer_certificate_der() if self._tls is not None else None
        try:
            self.peer_cert_bindings = tuple(certs.verify(tls_der, now=self._clock()))
        except CertsError as exc:
            raise HandshakeFailed(CloseKind.AUTH_FAILED,
                                  f"CERTS do not authenticate the peer: {exc}") from exc
        ed25519 = certs.ed25519_identity if "ed25519-link" in self.peer_cert_bindings else None
        self.peer_identity = PeerIdentity(certs.identity_digest, ed25519,
                                          authenticated=tls_der is not None)

    def _on_auth_challenge(self, payload: bytes) -> None:
        try:
            challenge = parse_auth_challenge(payload)
        except AuthenticateError as exc:
            raise CellFormatError(str(exc)) from exc
        self.auth_challenge_seen = True
        if self._recording and AUTH_METHOD_ED25519_SHA256_RFC5705 in challenge.methods:
            self._slog = self._digests.slog()  # SLOG ends with AUTH_CHALLENGE

    def _authenticate_if_asked(self) -> None:
        """A relay answers a method-3 AUTH_CHALLENGE with CERTS and AUTHENTICATE. A responder
        without an Ed25519 identity cannot be authenticated to (AUTHENTICATE names it)."""
        credentials, tls, identity = self._credentials, self._tls, self.peer_identity
        certs = self.peer_certs
        if credentials is None or tls is None or self._slog is None or certs is None:
            return
        if identity is None or identity.ed25519 is None:
            return
        self._emit(var_cell(0, CellCommand.CERTS, credentials.initiator_certs), 1)
        inputs = AuthInputs(
            cid=credentials.identity_digest256,
            sid=certs.identity_digest256,
            cid_ed=credentials.ed25519_identity,
            sid_ed=identity.ed25519,
            slog=self._slog,
            clog=self._digests.clog(),
            scert=hashlib.sha256(tls.peer_certificate_der() or b"").digest(),
            tlssecrets=tls.export_keying_material(EXPORTER_LABEL, EXPORTER_LENGTH,
                                                  credentials.identity_digest256),
        )
        body = build_authenticate(inputs, credentials.auth_key)
        self._send(var_cell(0, CellCommand.AUTHENTICATE, body), 1)
        self.authenticate_sent = True

    # ------------------------------------------------------------------ responder

    def _on_initiator_certs(self, certs: RelayCerts) -> None:
        if self._credentials is None:
            raise HandshakeFailed(CloseKind.PROTOCOL, "unexpected CERTS cell from the "
                                  "initiator: this link did not offer authentication")
        try:
            self._initiator_claim = certs.verify_initiator(now=self._clock())
        except CertsError as exc:
            raise HandshakeFailed(CloseKind.AUTH_FAILED,
                                  f"initiator's CERTS are not valid: {exc}") from exc

    def _on_authenticate(self, payload: bytes) -> None:
        credentials, tls, claim = self._credentials, self._tls, self._initiator_claim
        if credentials is None or tls is None or self._slog is None:
            raise HandshakeFailed(CloseKind.PROTOCOL, "unexpected AUTHENTICATE cell: this "
                                  "link did not offer authentication")
        if claim is None:
            raise HandshakeFailed(CloseKind.AUTH_FAILED, "AUTHENTICATE before CERTS")
        if self.peer_identity is not None:
            raise HandshakeFailed(CloseKind.PROTOCOL, "a second AUTHENTICATE cell")
        expected = AuthInputs(
            cid=claim.identity_digest256,
            sid=credentials.identity_digest256,
            cid_ed=claim.ed25519_identity,
            sid_ed=credentials.ed25519_identity,
            slog=self._slog,
            clog=self._digests.clog(),
            scert=hashlib.sha256(tls.own_certificate_der() or b"").digest(),
            tlssecrets=tls.export_keying_material(EXPORTER_LABEL, EXPORTER_LENGTH,
                                                  claim.identity_digest256),
        )
        try:
            verify_authenticate(payload, expected, claim.auth_key)
        except AuthenticateError as exc:
            raise HandshakeFailed(CloseKind.AUTH_FAILED,
                                  f"AUTHENTICATE refused: {exc}") from exc
        self.peer_identity = PeerIdentity(claim.identity_digest, claim.ed25519_identity,
                                          authenticated=True)
