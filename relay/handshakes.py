"""Circuit handshakes: CREATE_FAST and ntor, and the CREATE2 / EXTEND2 family of cell bodies.

Both handshakes end in the same thing: 72 bytes of hop key material ``Df | Db | Kf | Kb`` that
``tor1.reference.HopKeys.from_material`` turns into a hop's keys. They are plain
computations (no I/O, no shared state), split into a client object that keeps its ephemeral
secret between "send the onionskin" and "got the reply", and a server function that answers an
onionskin in one call.

CREATE_FAST (tor-spec 5.1.4)
    The client sends ``X`` (20 random bytes); the relay answers ``Y | KH`` (20 + 20 bytes).
    ``K = KDF-TOR(X | Y)``; ``KH = K[0:20]`` proves the relay saw ``X``; the hop's material is
    ``K[20:92]``. It authenticates nothing: it is only for the first hop, whose link (TLS) already
    authenticated the relay.

ntor (tor-spec 5.1.5, CREATE2 handshake type 2)
    The client knows the relay's RSA identity digest ``ID`` (20 bytes) and its curve25519 onion
    key ``B`` (32 bytes). It sends ``ID | B | X`` with ``X`` a fresh X25519 public key. The
    server answers ``Y | AUTH``. Both sides compute::

        secret_input = EXP(X,y) | EXP(X,b) | ID | B | X | Y | PROTOID     (server)
                     = EXP(Y,x) | EXP(B,x) | ID | B | X | Y | PROTOID     (client)
        verify       = HMAC-SHA256(key=t_verify, msg=secret_input)
        auth_input   = verify | ID | B | Y | X | PROTOID | "Server"
        AUTH         = HMAC-SHA256(key=t_mac, msg=auth_input)
        keys         = HKDF-SHA256(secret_input, salt=t_key, info=m_expand)  (kdf_ntor)

    An all-zero ``EXP()`` (a low-order point from a hostile peer) is rejected on both sides, and
    the client compares ``AUTH`` in constant time. Any failure raises :class:`HandshakeError`.

Cell bodies (tor-spec 5.1, 5.1.2, 5.1.3)
    CREATE2 ``HTYPE(2) HLEN(2) HDATA``; CREATED2 and EXTENDED2 ``HLEN(2) HDATA``; EXTEND2
    ``NSPEC(1) {LSTYPE(1) LSLEN(1) LSPEC}* HTYPE(2) HLEN(2) HDATA``. Encoders return the body
    without padding (the cell codec pads the payload); decoders ignore trailing padding and raise
    :class:`BodyError` (a ``ValueError``) with a clear message on anything malformed.

Threads: nothing here touches shared state. Every function may be called from any thread; a
client handshake object belongs to whichever single thread drives it.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import struct
from dataclasses import dataclass
from hashlib import sha256

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from relay.identity.curve_ed import CURVE25519_KEY_LEN
from tor1 import CELL_PAYLOAD_LEN, RELAY_DATA_MAX
from tor1.reference import DIGEST_LEN, HOP_MATERIAL_LEN, NTOR_PROTOID, kdf_ntor, kdf_tor

__all__ = [
    "CREATED_FAST_LEN",
    "CREATE_FAST_LEN",
    "HTYPE_FAST",
    "HTYPE_NTOR",
    "HTYPE_TAP",
    "LSTYPE_ED25519_ID",
    "LSTYPE_IPV4",
    "LSTYPE_IPV6",
    "LSTYPE_LEGACY_ID",
    "NTOR_ONIONSKIN_LEN",
    "NTOR_REPLY_LEN",
    "BodyError",
    "Create2Body",
    "CreateFastClient",
    "Extend2Body",
    "HandshakeError",
    "LinkSpecifier",
    "NtorClient",
    "NtorServerKey",
    "create_fast_server",
    "decode_create2",
    "decode_created2",
    "decode_extended2",
    "encode_create2",
    "encode_created2",
    "encode_extended2",
    "ntor_onion_key_named",
    "ntor_server",
]

CREATE_FAST_LEN = 20
"""Bytes of a CREATE_FAST onionskin (the client's X)."""
CREATED_FAST_LEN = 40
"""Bytes of a CREATED_FAST reply: Y(20) | KH(20)."""
_DIGEST_LEN = DIGEST_LEN

HTYPE_TAP = 0
"""CREATE2 handshake type of the obsolete TAP handshake (not implemented)."""
HTYPE_FAST = 1
"""CREATE2 handshake type of CREATE_FAST's handshake (tor refuses it in CREATE2)."""
HTYPE_NTOR = 2
"""CREATE2 handshake type of ntor."""

_ID_LEN = DIGEST_LEN  # the relay's RSA identity digest (SHA-1)
_KEY_LEN = CURVE25519_KEY_LEN
NTOR_ONIONSKIN_LEN = _ID_LEN + 2 * _KEY_LEN
"""Bytes of an ntor onionskin: ID(20) | B(32) | X(32)."""
NTOR_REPLY_LEN = 2 * _KEY_LEN
"""Bytes of an ntor reply: Y(32) | AUTH(32)."""

_T_MAC = NTOR_PROTOID + b":mac"
_T_VERIFY = NTOR_PROTOID + b":verify"
_SERVER = b"Server"
_ZERO_KEY = bytes(_KEY_LEN)

LSTYPE_IPV4 = 0
"""Link specifier: IPv4 address (4) and port (2)."""
LSTYPE_IPV6 = 1
"""Link specifier: IPv6 address (16) and port (2)."""
LSTYPE_LEGACY_ID = 2
"""Link specifier: the relay's RSA identity digest (20)."""
LSTYPE_ED25519_ID = 3
"""Link specifier: the relay's Ed25519 identity key (32)."""
_PORT = struct.Struct(">H")
_LSPEC_FIXED_LEN = {LSTYPE_IPV4: 6, LSTYPE_IPV6: 18, LSTYPE_LEGACY_ID: 20, LSTYPE_ED25519_ID: 32}

# A CREATE2 body must fit a cell payload; EXTEND2 a relay body.
_RELAY_BODY_MAX = RELAY_DATA_MAX
_CELL_BODY_MAX = CELL_PAYLOAD_LEN


class HandshakeError(Exception):
    """A handshake failed: wrong reply length, bad KH / AUTH, all-zero shared secret, wrong
    identity or onion key. The circuit must not be used."""


class BodyError(ValueError):
    """A CREATE2 / CREATED2 / EXTEND2 / EXTENDED2 body is malformed (message says how)."""


# --------------------------------------------------------------------------- CREATE_FAST


def _fast_keys(x: bytes, y: bytes) -> tuple[bytes, bytes]:
    k = kdf_tor(x + y, _DIGEST_LEN + HOP_MATERIAL_LEN)
    return k[:_DIGEST_LEN], k[_DIGEST_LEN:]


class CreateFastClient:
    """The client's side of one CREATE_FAST handshake. Any thread (one at a time)."""

    __slots__ = ("_x",)

    def __init__(self, x: bytes | None = None) -> None:
        """``x`` is for tests; by default 20 fresh random bytes. Any thread."""
        if x is None:
            x = os.urandom(CREATE_FAST_LEN)
        if len(x) != CREATE_FAST_LEN:
            raise ValueError(f"CREATE_FAST X must be {CREATE_FAST_LEN} bytes, got {len(x)}")
        self._x = bytes(x)

    @property
    def onionskin(self) -> bytes:
        """The CREATE_FAST payload body: X (20 bytes). Any thread."""
        return self._x

    def complete(self, reply: bytes) -> bytes:
        """Check a CREATED_FAST body (``Y | KH``, trailing padding ignored) and return the hop's
        72 bytes of key material. Raises :class:`HandshakeError` if KH does not match.
        Any thread."""
        if len(reply) < CREATED_FAST_LEN:
            raise HandshakeError(
                f"CREATED_FAST body must be at least {CREATED_FAST_LEN} bytes, got {len(reply)}"
            )
        y = bytes(reply[:_DIGEST_LEN])
        kh_received = bytes(reply[_DIGEST_LEN:CREATED_FAST_LEN])
        kh, material = _fast_keys(self._x, y)
        if not hmac.compare_digest(kh, kh_received):
            raise HandshakeError("CREATED_FAST: KH does not match; the relay did not see our X")
        return material


def create_fast_server(onionskin: bytes, y: bytes | None = None) -> tuple[bytes, bytes]:
    """Answer a CREATE_FAST body (X, trailing padding ignored): return ``(reply, material)``
    with ``reply = Y | KH`` (40 bytes) and the hop's 72 bytes. ``y`` is for tests. Any thread."""
    if len(onionskin) < CREATE_FAST_LEN:
        raise HandshakeError(
            f"CREATE_FAST body must be at least {CREATE_FAST_LEN} bytes, got {len(onionskin)}"
        )
    x = bytes(onionskin[:CREATE_FAST_LEN])
    if y is None:
        y = os.urandom(_DIGEST_LEN)
    if len(y) != _DIGEST_LEN:
        raise ValueError(f"CREATED_FAST Y must be {_DIGEST_LEN} bytes, got {len(y)}")
    kh, material = _fast_keys(x, y)
    return bytes(y) + kh, material


# --------------------------------------------------------------------------- ntor


def _public_bytes(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def _exp(private: X25519PrivateKey, public: bytes, what: str) -> bytes:
    """X25519(private, public), rejecting the all-zero result of a low-order point."""
    try:
        shared = private.exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError as exc:  # OpenSSL refuses an all-zero shared secret itself
        raise HandshakeError(f"ntor: {what} is a low-order point (all-zero EXP)") from exc
    if hmac.compare_digest(shared, _ZERO_KEY):
        raise HandshakeError(f"ntor: {what} is a low-order point (all-zero EXP)")
    return shared


def _ntor_finish(
    exp_y: bytes, exp_b: bytes, ident: bytes, b: bytes, x: bytes, y: bytes
) -> tuple[bytes, bytes]:
    """Return ``(AUTH, material)`` from the two shared secrets and the public values."""
    secret_input = exp_y + exp_b + ident + b + x + y + NTOR_PROTOID
    verify = hmac.digest(_T_VERIFY, secret_input, sha256)
    auth_input = verify + ident + b + y + x + NTOR_PROTOID + _SERVER
    auth = hmac.digest(_T_MAC, auth_input, sha256)
    return auth, kdf_ntor(secret_input, HOP_MATERIAL_LEN)


@dataclass(frozen=True)
class NtorServerKey:
    """A relay's ntor identity: RSA identity digest (20 bytes) and curve25519 onion key."""

    identity_digest: bytes
    onion_key: X25519PrivateKey

    @classmethod
    def generate(cls, identity_digest: bytes) -> NtorServerKey:
        """A fresh onion key for the given identity digest. Any thread."""
        if len(identity_digest) != _ID_LEN:
            raise ValueError(f"identity digest must be {_ID_LEN} bytes")
        return cls(bytes(identity_digest), X25519PrivateKey.generate())

    @property
    def onion_key_public(self) -> bytes:
        """B: the 32-byte public onion key a client needs. Any thread."""
        return _public_bytes(self.onion_key)


class NtorClient:
    """The client's side of one ntor handshake with a relay. Any thread (one at a time)."""

    __slots__ = ("_b", "_id", "_x", "_x_public")

    def __init__(
        self,
        identity_digest: bytes,
        onion_key: bytes,
        *,
        ephemeral: X25519PrivateKey | None = None,
    ) -> None:
        """``identity_digest``: the relay's RSA identity digest (20 bytes); ``onion_key``: its
        ntor onion key B (32 bytes). ``ephemeral`` is for tests; by default a fresh key.
        Any thread."""
        if len(identity_digest) != _ID_LEN:
            raise ValueError(f"ntor identity digest must be {_ID_LEN} bytes")
        if len(onion_key) != _KEY_LEN:
            raise ValueError(f"ntor onion key must be {_KEY_LEN} bytes, got {len(onion_key)}")
        self._id = bytes(identity_digest)
        self._b = bytes(onion_key)
        self._x = ephemeral if ephemeral is not None else X25519PrivateKey.generate()
        self._x_public = _public_bytes(self._x)

    @property
    def onionskin(self) -> bytes:
        """The handshake data to send in CREATE2 / EXTEND2: ``ID | B | X`` (84 bytes).
        Any thread."""
        return self._id + self._b + self._x_public

    def complete(self, reply: bytes) -> bytes:
        """Check the server's ``Y | AUTH`` (64 bytes, longer input: the first 64) and return
        the hop's 72 bytes of key material. Raises :class:`HandshakeError`. Any thread."""
        if len(reply) < NTOR_REPLY_LEN:
            raise HandshakeError(
                f"ntor reply must be {NTOR_REPLY_LEN} bytes, got {len(reply)}"
            )
        y = bytes(reply[:_KEY_LEN])
        auth_received = bytes(reply[_KEY_LEN:NTOR_REPLY_LEN])
        exp_y = _exp(self._x, y, "the server's Y")
        exp_b = _exp(self._x, self._b, "the onion key B")
        auth, material = _ntor_finish(exp_y, exp_b, self._id, self._b, self._x_public, y)
        if not hmac.compare_digest(auth, auth_received):
            raise HandshakeError("ntor: AUTH does not match (wrong relay keys or a forged reply)")
        return material


def ntor_onion_key_named(onionskin: bytes) -> bytes:
    """The onion key ``B`` an ntor onionskin (``ID | B | X``) names; short input gives fewer
    bytes. Any thread (pure)."""
    return bytes(onionskin[_ID_LEN : _ID_LEN + _KEY_LEN])


def ntor_server(
    key: NtorServerKey,
    onionskin: bytes,
    *,
    ephemeral: X25519PrivateKey | None = None,
) -> tuple[bytes, bytes]:
    """Answer an ntor onionskin (``ID | B | X``, longer input: the first 84 bytes) for the relay
    ``key``: return ``(reply, material)`` with ``reply = Y | AUTH`` (64 bytes) and the hop's 72
    bytes. Raises :class:`HandshakeError` if ID or B is not ours, or X is a low-order point.
    ``ephemeral`` (y) is for tests. Any thread."""
    if len(onionskin) < NTOR_ONIONSKIN_LEN:
        raise HandshakeError(
            f"ntor onionskin must be {NTOR_ONIONSKIN_LEN} bytes, got {len(onionskin)}"
        )
    ident = bytes(onionskin[:_ID_LEN])
    b = ntor_onion_key_named(onionskin)
    x = bytes(onionskin[_ID_LEN + _KEY_LEN : NTOR_ONIONSKIN_LEN])
    if not hmac.compare_digest(ident, key.identity_digest):
        raise HandshakeError("ntor: onionskin is for another relay identity")
    if not hmac.compare_digest(b, key.onion_key_public):
        raise HandshakeError("ntor: onionskin names an onion key we do not have")
    y_key = ephemeral if ephemeral is not None else X25519PrivateKey.generate()
    y = _public_bytes(y_key)
    exp_y = _exp(y_key, x, "the client's X")
    exp_b = _exp(key.onion_key, x, "the client's X")
    auth, material = _ntor_finish(exp_y, exp_b, ident, b, x, y)
    return y + auth, material


# --------------------------------------------------------------------------- CREATE2 family


@dataclass(frozen=True)
class Create2Body:
    """A decoded CREATE2 body (also the handshake part of EXTEND2)."""

    htype: int
    hdata: bytes


def _need(body: bytes, offset: int, count: int, what: str) -> None:
    if offset + count > len(body):
        raise BodyError(
            f"{what}: truncated (needs {count} bytes at offset {offset}, body is {len(body)})"
        )


def _encode_handshake(htype: int, hdata: bytes) -> bytes:
    if not 0 <= htype <= 0xFFFF:
        raise BodyError(f"handshake type {htype} does not fit 2 bytes")
    return struct.pack(">HH", htype, len(hdata)) + bytes(hdata)


def _decode_handshake(body: bytes, offset: int, what: str) -> Create2Body:
    _need(body, offset, 4, what)
    htype, hlen = struct.unpack_from(">HH", body, offset)
    _need(body, offset + 4, hlen, what)
    return Create2Body(htype, bytes(body[offset + 4 : offset + 4 + hlen]))


def encode_create2(htype: int, hdata: bytes) -> bytes:
    """CREATE2 body ``HTYPE HLEN HDATA`` (unpadded). Any thread."""
    out = _encode_handshake(htype, hdata)
    if len(out) > _CELL_BODY_MAX:
        raise BodyError(f"CREATE2 body of {len(out)} bytes exceeds {_CELL_BODY_MAX}")
    return out


def decode_create2(body: bytes) -> Create2Body:
    """Decode a CREATE2 body (trailing padding ignored). Any thread."""
    return _decode_handshake(body, 0, "CREATE2")


def _encode_hdata_only(hdata: bytes, what: str, limit: int) -> bytes:
    out = struct.pack(">H", len(hdata)) + bytes(hdata)
    if len(out) > limit:
        raise BodyError(f"{what} body of {len(out)} bytes exceeds {limit}")
    return out


def _decode_hdata_only(body: bytes, what: str) -> bytes:
    _need(body, 0, 2, what)
    (hlen,) = struct.unpack_from(">H", body, 0)
    _need(body, 2, hlen, what)
    return bytes(body[2 : 2 + hlen])


def encode_created2(hdata: bytes) -> bytes:
    """CREATED2 body ``HLEN HDATA`` (unpadded). Any thread."""
    return _encode_hdata_only(hdata, "CREATED2", _CELL_BODY_MAX)


def decode_created2(body: bytes) -> bytes:
    """The HDATA of a CREATED2 body (trailing padding ignored). Any thread."""
    return _decode_hdata_only(body, "CREATED2")


def encode_extended2(hdata: bytes) -> bytes:
    """EXTENDED2 relay body ``HLEN HDATA`` (same layout as CREATED2). Any thread."""
    return _encode_hdata_only(hdata, "EXTENDED2", _RELAY_BODY_MAX)


def decode_extended2(body: bytes) -> bytes:
    """The HDATA of an EXTENDED2 relay body. Any thread."""
    return _decode_hdata_only(body, "EXTENDED2")


@dataclass(frozen=True)
class LinkSpecifier:
    """One EXTEND2 link specifier: ``lstype`` and its raw bytes (unknown types kept as-is)."""

    lstype: int
    data: bytes

    def __post_init__(self) -> None:
        if not 0 <= self.lstype <= 0xFF or len(self.data) > 0xFF:
            raise BodyError(f"link specifier type {self.lstype} / length {len(self.data)}")
        want = _LSPEC_FIXED_LEN.get(self.lstype)
        if want is not None and len(self.data) != want:
            raise BodyError(
                f"link specifier type {self.lstype} must be {want} bytes, got {len(self.data)}"
            )

    @classmethod
    def ipv4(cls, host: str, port: int) -> LinkSpecifier:
        """An IPv4 address and port. Any thread."""
        return cls(LSTYPE_IPV4, ipaddress.IPv4Address(host).packed + _PORT.pack(port))

    @classmethod
    def ipv6(cls, host: str, port: int) -> LinkSpecifier:
        """An IPv6 address and port. Any thread."""
        return cls(LSTYPE_IPV6, ipaddress.IPv6Address(host).packed + _PORT.pack(port))

    @classmethod
    def legacy_id(cls, identity_digest: bytes) -> LinkSpecifier:
        """The relay's RSA identity digest (20 bytes). Any thread."""
        return cls(LSTYPE_LEGACY_ID, bytes(identity_digest))

    def ip_address(self) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]:
        """``(address, port)`` of an IPv4 / IPv6 specifier; ``BodyError`` otherwise.
        Any thread."""
        if self.lstype == LSTYPE_IPV4:
            return ipaddress.IPv4Address(self.data[:4]), _PORT.unpack(self.data[4:])[0]
        if self.lstype == LSTYPE_IPV6:
            return ipaddress.IPv6Address(self.data[:16]), _PORT.unpack(self.data[16:])[0]
        raise BodyError(f"link specifier type {self.lstype} is not an address")

    def address(self) -> tuple[str, int]:
        """``(host, port)`` of an IPv4 / IPv6 specifier; ``BodyError`` otherwise. Any thread."""
        address, port = self.ip_address()
        return str(address), port


@dataclass(frozen=True)
class Extend2Body:
    """A decoded EXTEND2 relay body: where to extend to, and the handshake to pass on."""

    specifiers: tuple[LinkSpecifier, ...]
    htype: int
    hdata: bytes

    def encode(self) -> bytes:
        """The relay-cell body (unpadded, at most 498 bytes). Any thread."""
        if len(self.specifiers) > 0xFF:
            raise BodyError("EXTEND2: more than 255 link specifiers")
        parts = [bytes((len(self.specifiers),))]
        for spec in self.specifiers:
            parts.append(bytes((spec.lstype, len(spec.data))) + spec.data)
        parts.append(_encode_handshake(self.htype, self.hdata))
        out = b"".join(parts)
        if len(out) > _RELAY_BODY_MAX:
            raise BodyError(f"EXTEND2 body of {len(out)} bytes exceeds {_RELAY_BODY_MAX}")
        return out

    @classmethod
    def decode(cls, body: bytes) -> Extend2Body:
        """Decode an EXTEND2 relay body (trailing bytes ignored). Any thread."""
        _need(body, 0, 1, "EXTEND2")
        nspec = body[0]
        offset = 1
        specs: list[LinkSpecifier] = []
        for _ in range(nspec):
            _need(body, offset, 2, "EXTEND2 link specifier")
            lstype, lslen = body[offset], body[offset + 1]
            _need(body, offset + 2, lslen, "EXTEND2 link specifier")
            specs.append(LinkSpecifier(lstype, bytes(body[offset + 2 : offset + 2 + lslen])))
            offset += 2 + lslen
        hs = _decode_handshake(body, offset, "EXTEND2 handshake")
        return cls(tuple(specs), hs.htype, hs.hdata)

    def address(self) -> tuple[str, int] | None:
        """The first IPv4 (else IPv6) ``(host, port)`` among the specifiers, or None.
        Any thread."""
        for wanted in (LSTYPE_IPV4, LSTYPE_IPV6):
            for spec in self.specifiers:
                if spec.lstype == wanted:
                    return spec.address()
        return None

    def legacy_id(self) -> bytes | None:
        """The RSA identity digest specifier, or None. Any thread."""
        for spec in self.specifiers:
            if spec.lstype == LSTYPE_LEGACY_ID:
                return spec.data
        return None

    def ed25519_id(self) -> bytes | None:
        """The Ed25519 identity specifier, or None. Any thread."""
        for spec in self.specifiers:
            if spec.lstype == LSTYPE_ED25519_ID:
                return spec.data
        return None
