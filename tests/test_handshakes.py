"""CREATE_FAST and ntor handshakes (relay.handshakes): agreement, rejection, exact derivation.

The derivations are recomputed here from the tor-spec formulas with hashlib/hmac directly
(not through relay.handshakes or kdf_tor), so a wrong concatenation order or split shows up.
The real proof, a real tor accepting both, is tests/test_tor_interop.py.
"""

from __future__ import annotations

import hashlib
import hmac

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from relay.handshakes import (
    CREATED_FAST_LEN,
    NTOR_ONIONSKIN_LEN,
    NTOR_REPLY_LEN,
    CreateFastClient,
    HandshakeError,
    NtorClient,
    NtorServerKey,
    create_fast_server,
    ntor_server,
)
from tor1.reference import HopKeys

PROTOID = b"ntor-curve25519-sha256-1"

# A curve25519 point of small order: EXP() with it is all zero whatever the private key.
LOW_ORDER_POINTS = [
    bytes(32),
    (1).to_bytes(32, "little"),
    bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"),
]


def _sha1_kdf(k0: bytes, n: int) -> bytes:
    out = b"".join(hashlib.sha1(k0 + bytes((i,))).digest() for i in range(n // 20 + 1))
    return out[:n]


def _hkdf_sha256(ikm: bytes, salt: bytes, info: bytes, n: int) -> bytes:
    prk = hmac.digest(salt, ikm, "sha256")
    out, block, counter = b"", b"", 1
    while len(out) < n:
        block = hmac.digest(prk, block + info + bytes((counter,)), "sha256")
        out += block
        counter += 1
    return out[:n]


def _raw(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


# --------------------------------------------------------------------------- CREATE_FAST


def test_create_fast_both_sides_derive_the_spec_material() -> None:
    x = bytes(range(20))
    y = bytes(range(100, 120))
    client = CreateFastClient(x)
    assert client.onionskin == x
    reply, server_material = create_fast_server(client.onionskin + bytes(489), y=y)
    k = _sha1_kdf(x + y, 92)
    assert reply == y + k[:20]
    assert len(reply) == CREATED_FAST_LEN
    assert server_material == k[20:92]
    assert client.complete(reply + bytes(469)) == k[20:92]
    keys = HopKeys.from_material(server_material)
    assert (keys.df, keys.db, keys.kf, keys.kb) == (k[20:40], k[40:60], k[60:76], k[76:92])


def test_create_fast_random_x_differs_and_agrees() -> None:
    a, b = CreateFastClient(), CreateFastClient()
    assert a.onionskin != b.onionskin
    reply, material = create_fast_server(a.onionskin)
    assert a.complete(reply) == material


@pytest.mark.parametrize("flip", [0, 19, 20, 39])
def test_create_fast_rejects_a_bad_kh(flip: int) -> None:
    client = CreateFastClient()
    reply, _ = create_fast_server(client.onionskin)
    bad = bytearray(reply)
    bad[flip] ^= 1
    with pytest.raises(HandshakeError, match="KH"):
        client.complete(bytes(bad))


def test_create_fast_rejects_short_input() -> None:
    with pytest.raises(HandshakeError, match="at least 40"):
        CreateFastClient().complete(bytes(39))
    with pytest.raises(HandshakeError, match="at least 20"):
        create_fast_server(bytes(19))
    with pytest.raises(ValueError):
        CreateFastClient(bytes(5))


# --------------------------------------------------------------------------- ntor


def test_ntor_matches_the_spec_formulas() -> None:
    ident = hashlib.sha1(b"some relay").digest()
    b_key = X25519PrivateKey.from_private_bytes(bytes(range(32)))
    x_key = X25519PrivateKey.from_private_bytes(bytes(range(32, 64)))
    y_key = X25519PrivateKey.from_private_bytes(bytes(range(64, 96)))
    server_key = NtorServerKey(ident, b_key)
    client = NtorClient(ident, server_key.onion_key_public, ephemeral=x_key)
    skin = client.onionskin
    assert len(skin) == NTOR_ONIONSKIN_LEN
    assert skin == ident + _raw(b_key) + _raw(x_key)

    reply, server_material = ntor_server(server_key, skin, ephemeral=y_key)
    assert len(reply) == NTOR_REPLY_LEN

    big_x, big_y, big_b = _raw(x_key), _raw(y_key), _raw(b_key)
    secret_input = (
        y_key.exchange(x_key.public_key())
        + b_key.exchange(x_key.public_key())
        + ident + big_b + big_x + big_y + PROTOID
    )
    verify = hmac.digest(PROTOID + b":verify", secret_input, "sha256")
    auth_input = verify + ident + big_b + big_y + big_x + PROTOID + b"Server"
    auth = hmac.digest(PROTOID + b":mac", auth_input, "sha256")
    assert reply == big_y + auth
    expected = _hkdf_sha256(secret_input, PROTOID + b":key_extract", PROTOID + b":key_expand", 72)
    assert server_material == expected
    assert client.complete(reply) == expected


def test_ntor_random_keys_agree() -> None:
    server_key = NtorServerKey.generate(bytes(20))
    client = NtorClient(bytes(20), server_key.onion_key_public)
    reply, material = ntor_server(server_key, client.onionskin)
    assert client.complete(reply) == material
    assert len(material) == 72


@pytest.mark.parametrize("flip", [0, 31, 32, 63])
def test_ntor_client_rejects_a_tampered_reply(flip: int) -> None:
    server_key = NtorServerKey.generate(bytes(20))
    client = NtorClient(bytes(20), server_key.onion_key_public)
    reply, _ = ntor_server(server_key, client.onionskin)
    bad = bytearray(reply)
    bad[flip] ^= 0x40
    with pytest.raises(HandshakeError):
        client.complete(bytes(bad))


def test_ntor_client_rejects_a_reply_from_another_onion_key() -> None:
    real = NtorServerKey.generate(bytes(20))
    other = NtorServerKey(bytes(20), X25519PrivateKey.generate())
    client = NtorClient(bytes(20), real.onion_key_public)
    forged_skin = client.onionskin[:20] + other.onion_key_public + client.onionskin[52:]
    reply, _ = ntor_server(other, forged_skin)
    with pytest.raises(HandshakeError, match="AUTH"):
        client.complete(reply)


def test_ntor_server_rejects_wrong_identity_or_onion_key() -> None:
    key = NtorServerKey.generate(b"\x01" * 20)
    with pytest.raises(HandshakeError, match="identity"):
        ntor_server(key, NtorClient(b"\x02" * 20, key.onion_key_public).onionskin)
    other_b = NtorServerKey.generate(b"\x01" * 20).onion_key_public
    with pytest.raises(HandshakeError, match="onion key"):
        ntor_server(key, NtorClient(b"\x01" * 20, other_b).onionskin)


@pytest.mark.parametrize("point", LOW_ORDER_POINTS)
def test_ntor_rejects_all_zero_exp(point: bytes) -> None:
    key = NtorServerKey.generate(bytes(20))
    skin = bytes(20) + key.onion_key_public + point
    with pytest.raises(HandshakeError, match="all-zero"):
        ntor_server(key, skin)
    client = NtorClient(bytes(20), key.onion_key_public)
    with pytest.raises(HandshakeError, match="all-zero"):
        client.complete(point + bytes(32))
    with pytest.raises(HandshakeError, match="all-zero"):
        NtorClient(bytes(20), point).complete(_raw(X25519PrivateKey.generate()) + bytes(32))


def test_ntor_rejects_short_input() -> None:
    key = NtorServerKey.generate(bytes(20))
    with pytest.raises(HandshakeError, match="84"):
        ntor_server(key, bytes(83))
    with pytest.raises(HandshakeError, match="64"):
        NtorClient(bytes(20), key.onion_key_public).complete(bytes(63))
    with pytest.raises(ValueError):
        NtorClient(bytes(19), key.onion_key_public)
    with pytest.raises(ValueError):
        NtorClient(bytes(20), bytes(31))
