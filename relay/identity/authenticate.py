"""AUTH_CHALLENGE and AUTHENTICATE (tor-spec 4.3, 4.4.2): an initiating relay proves its identity.

AUTH_CHALLENGE (responder -> initiator)::

    Challenge(32)  N_Methods(2)  Methods(2 x N_Methods)

tor 0.4.9 offers and accepts only method 3, Ed25519-SHA256-RFC5705.

AUTHENTICATE (initiator -> responder), method 3::

    AuthType(2)=3  AuthLen(2)=352  Authentication:
      TYPE "AUTH0003"(8)  CID(32)  SID(32)  CID_ED(32)  SID_ED(32)  SLOG(32)  CLOG(32)
      SCERT(32)  TLSSECRETS(32)  RAND(24)  SIG(64)

* ``CID`` / ``SID``: SHA-256 of the initiator's / responder's RSA identity key (PKCS#1 DER,
  :func:`relay.identity.rsaraw.rsa_digest256`); ``CID_ED`` / ``SID_ED``: their Ed25519
  identity keys.
* ``SLOG``: SHA-256 of every byte the responder sent on the link, exactly as on the wire, from
  its VERSIONS cell up to and including AUTH_CHALLENGE (with any padding cells between; not
  the NETINFO that follows). ``CLOG``: SHA-256 of every byte the initiator sent, from its
  VERSIONS cell up to its CERTS cell, AUTHENTICATE excluded. (tor hashes each cell as it is
  sent or received; :class:`HandshakeDigests` does the same for a link implementation.)
* ``SCERT``: SHA-256 of the responder's TLS certificate (DER).
* ``TLSSECRETS``: the TLS session's RFC 5705 keying-material exporter, called **with label
  :data:`EXPORTER_LABEL` (``b"EXPORTER FOR TOR TLS CLIENT BINDING AUTH0003"``), context =
  CID (the 32-byte SHA-256 of the initiator's RSA identity key) and length 32**; with a
  ``relay.tls`` session, ``session.export_keying_material(EXPORTER_LABEL, 32, cid)``. tor-spec says
  the context is the initiator's Ed25519 key, but tor passes CID
  (``connection_or_compute_authenticate_cell_body``), and tor's behaviour is what peers check.
* ``RAND``: 24 random bytes; ``SIG``: Ed25519 signature of everything before it by the
  initiator's link authentication key (the one its type 6 certificate certifies).

The responder (:func:`verify_authenticate`) computes every field from TYPE through TLSSECRETS
itself, requires the cell's to be equal (tor compares exactly these bytes), and checks the
signature with the key from the initiator's verified CERTS cell
(:meth:`relay.identity.certscell.RelayCerts.verify_initiator`). This module needs no TLS
library: the TLS-derived values are plain ``bytes`` parameters of :class:`AuthInputs`.

Threads: pure functions (and :class:`HandshakeDigests`, owned by one link, i.e. the loop
thread); any thread.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass, fields

from relay.identity.curve_ed import ED25519_SIG_LEN, ExpandedEd25519Key, ed25519_verify

__all__ = [
    "AUTHENTICATE_AUTH_LEN",
    "AUTH_CHALLENGE_LEN",
    "AUTH_METHOD_ED25519_SHA256_RFC5705",
    "AUTH_TYPE_STRING",
    "EXPORTER_LABEL",
    "EXPORTER_LENGTH",
    "AuthChallenge",
    "AuthInputs",
    "AuthenticateError",
    "HandshakeDigests",
    "build_auth_challenge",
    "build_authenticate",
    "parse_auth_challenge",
    "verify_authenticate",
]

AUTH_METHOD_ED25519_SHA256_RFC5705 = 3
AUTH_TYPE_STRING = b"AUTH0003"
AUTH_CHALLENGE_LEN = 32
EXPORTER_LABEL = b"EXPORTER FOR TOR TLS CLIENT BINDING AUTH0003"
EXPORTER_LENGTH = 32
_RAND_LEN = 24
_FIXED_LEN = 8 + 8 * 32
#: AuthLen of a method 3 AUTHENTICATE: the fixed part, RAND and the signature.
AUTHENTICATE_AUTH_LEN = _FIXED_LEN + _RAND_LEN + ED25519_SIG_LEN


class AuthenticateError(ValueError):
    """An AUTH_CHALLENGE or AUTHENTICATE body is malformed, or AUTHENTICATE does not prove what
    it must (the message names the field or the signature)."""


@dataclass(frozen=True)
class AuthChallenge:
    """A decoded AUTH_CHALLENGE: the challenge and the methods the responder accepts."""

    challenge: bytes
    methods: tuple[int, ...]


def build_auth_challenge(challenge: bytes | None = None,
                         methods: Sequence[int] = (AUTH_METHOD_ED25519_SHA256_RFC5705,)) -> bytes:
    """An AUTH_CHALLENGE body with a fresh random challenge (or ``challenge``).
    Any thread."""
    if challenge is None:
        challenge = os.urandom(AUTH_CHALLENGE_LEN)
    if len(challenge) != AUTH_CHALLENGE_LEN:
        raise ValueError(f"a challenge is {AUTH_CHALLENGE_LEN} bytes, got {len(challenge)}")
    return challenge + struct.pack(f">H{len(methods)}H", len(methods), *methods)


def parse_auth_challenge(body: bytes) -> AuthChallenge:
    """Decode an AUTH_CHALLENGE body, ignoring bytes after the methods (tor-spec 4.3).
    Raises :class:`AuthenticateError`. Any thread (pure)."""
    if len(body) < AUTH_CHALLENGE_LEN + 2:
        raise AuthenticateError(f"AUTH_CHALLENGE of {len(body)} bytes is too short")
    (count,) = struct.unpack_from(">H", body, AUTH_CHALLENGE_LEN)
    end = AUTH_CHALLENGE_LEN + 2 + 2 * count
    if len(body) < end:
        raise AuthenticateError(f"AUTH_CHALLENGE lists {count} methods but is truncated")
    methods = struct.unpack_from(f">{count}H", body, AUTH_CHALLENGE_LEN + 2)
    return AuthChallenge(bytes(body[:AUTH_CHALLENGE_LEN]), tuple(methods))


@dataclass(frozen=True)
class AuthInputs:
    """The fields of a method 3 AUTHENTICATE that both sides compute (TYPE is implied).

    ``cid``/``sid``: SHA-256 of the initiator's/responder's RSA identity key; ``cid_ed``/
    ``sid_ed``: their Ed25519 identities; ``slog``/``clog``: the handshake digests; ``scert``:
    SHA-256 of the responder's TLS certificate; ``tlssecrets``: the exporter output (see the
    module docstring for the exact call)."""

    cid: bytes
    sid: bytes
    cid_ed: bytes
    sid_ed: bytes
    slog: bytes
    clog: bytes
    scert: bytes
    tlssecrets: bytes

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            if not isinstance(value, bytes | bytearray) or len(value) != 32:
                raise ValueError(f"AuthInputs.{field.name} must be 32 bytes")

    def fixed_part(self) -> bytes:
        """TYPE through TLSSECRETS, as they appear in the cell. Any thread (pure)."""
        return AUTH_TYPE_STRING + b"".join(
            bytes(getattr(self, field.name)) for field in fields(self))


def build_authenticate(inputs: AuthInputs, auth_key: ExpandedEd25519Key,
                       rand: bytes | None = None) -> bytes:
    """The initiator's AUTHENTICATE body for method 3: header, the fixed part, ``rand``
    (24 fresh random bytes by default) and the signature by ``auth_key`` (the key its type 6
    certificate certifies). Any thread."""
    if rand is None:
        rand = os.urandom(_RAND_LEN)
    if len(rand) != _RAND_LEN:
        raise ValueError(f"RAND is {_RAND_LEN} bytes, got {len(rand)}")
    signed = inputs.fixed_part() + rand
    authentication = signed + auth_key.sign(signed)
    return struct.pack(">HH", AUTH_METHOD_ED25519_SHA256_RFC5705,
                       len(authentication)) + authentication


_FIELD_NAMES = ("TYPE", *(f.name.upper() for f in fields(AuthInputs)))
_FIELD_OFFSETS = (0, *range(8, _FIXED_LEN, 32))


def _first_difference(got: bytes, expected: bytes) -> str:
    for name, offset in zip(_FIELD_NAMES, _FIELD_OFFSETS, strict=True):
        size = 8 if name == "TYPE" else 32
        if got[offset : offset + size] != expected[offset : offset + size]:
            return name
    return "?"


def verify_authenticate(body: bytes, expected: AuthInputs, auth_key: bytes) -> None:
    """Check an AUTHENTICATE body as the responder: method 3, AuthLen 352, TYPE through
    TLSSECRETS equal to ``expected`` (what this side computed), and an Ed25519 signature by
    ``auth_key`` (from the initiator's verified type 6 certificate) over everything before the
    signature. Bytes after AuthLen are ignored (tor-spec 4.4). Raises
    :class:`AuthenticateError` naming the first wrong field. Any thread (pure)."""
    if len(body) < 4:
        raise AuthenticateError(f"AUTHENTICATE of {len(body)} bytes is too short")
    auth_type, auth_len = struct.unpack_from(">HH", body)
    if auth_type != AUTH_METHOD_ED25519_SHA256_RFC5705:
        raise AuthenticateError(f"authentication type {auth_type} is not supported")
    if 4 + auth_len > len(body):
        raise AuthenticateError(f"AuthLen {auth_len} runs past the {len(body)}-byte cell")
    if auth_len != AUTHENTICATE_AUTH_LEN:
        raise AuthenticateError(f"AuthLen {auth_len}, expected {AUTHENTICATE_AUTH_LEN}")
    authentication = bytes(body[4 : 4 + auth_len])
    fixed = authentication[:_FIXED_LEN]
    wanted = expected.fixed_part()
    if not hmac.compare_digest(fixed, wanted):
        raise AuthenticateError(f"AUTHENTICATE field {_first_difference(fixed, wanted)} "
                                "is not as expected")
    signed, signature = authentication[:-ED25519_SIG_LEN], authentication[-ED25519_SIG_LEN:]
    if not ed25519_verify(auth_key, signature, signed):
        raise AuthenticateError("AUTHENTICATE signature is not valid for the "
                                "initiator's authentication key")


class HandshakeDigests:
    """The running SHA-256 digests of one link's handshake bytes, as tor keeps them.

    Feed every byte sent with :meth:`sent` and every byte received with :meth:`received`, in
    wire format, from the VERSIONS cell on; stop feeding a direction where tor stops (the
    responder's sent bytes after AUTH_CHALLENGE, the initiator's sent bytes before
    AUTHENTICATE, the received AUTHENTICATE). :meth:`slog` and :meth:`clog` read the digests
    without ending them. Owned by one link (its thread)."""

    __slots__ = ("_received", "_sent", "initiator")

    def __init__(self, initiator: bool) -> None:
        """``initiator``: whether this side opened the link. Any thread."""
        self.initiator = initiator
        self._sent = hashlib.sha256()
        self._received = hashlib.sha256()

    def sent(self, data: bytes) -> None:
        """Record bytes this side sent. The owning link's thread."""
        self._sent.update(data)

    def received(self, data: bytes) -> None:
        """Record bytes this side received. The owning link's thread."""
        self._received.update(data)

    def slog(self) -> bytes:
        """SHA-256 of what the responder sent so far. The owning link's thread."""
        return (self._received if self.initiator else self._sent).copy().digest()

    def clog(self) -> bytes:
        """SHA-256 of what the initiator sent so far. The owning link's thread."""
        return (self._sent if self.initiator else self._received).copy().digest()
