"""CREATE2 / CREATED2 / EXTEND2 / EXTENDED2 bodies and link specifiers (relay.handshakes)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.handshakes import (
    HTYPE_NTOR,
    LSTYPE_IPV4,
    LSTYPE_LEGACY_ID,
    BodyError,
    Create2Body,
    Extend2Body,
    LinkSpecifier,
    decode_create2,
    decode_created2,
    decode_extended2,
    encode_create2,
    encode_created2,
    encode_extended2,
)


def test_create2_known_bytes_and_padding_ignored() -> None:
    body = encode_create2(HTYPE_NTOR, b"\xaa" * 84)
    assert body == bytes.fromhex("00020054") + b"\xaa" * 84
    assert decode_create2(body + bytes(509 - len(body))) == Create2Body(2, b"\xaa" * 84)


def test_created2_and_extended2_known_bytes() -> None:
    assert encode_created2(b"\x01\x02\x03") == bytes.fromhex("0003010203")
    assert decode_created2(bytes.fromhex("0003010203") + bytes(100)) == b"\x01\x02\x03"
    assert encode_extended2(b"\x05" * 64) == b"\x00\x40" + b"\x05" * 64
    assert decode_extended2(b"\x00\x40" + b"\x05" * 64 + bytes(10)) == b"\x05" * 64


def test_extend2_known_bytes() -> None:
    ident = bytes(range(20))
    body = Extend2Body(
        (LinkSpecifier.ipv4("127.0.0.1", 9001), LinkSpecifier.legacy_id(ident)),
        HTYPE_NTOR,
        b"\x11" * 84,
    ).encode()
    expected = (
        bytes.fromhex("02")
        + bytes.fromhex("0006 7f000001 2329".replace(" ", ""))
        + bytes.fromhex("0214") + ident
        + bytes.fromhex("00020054") + b"\x11" * 84
    )
    assert body == expected
    decoded = Extend2Body.decode(body + bytes(30))
    assert decoded.address() == ("127.0.0.1", 9001)
    assert decoded.legacy_id() == ident
    assert decoded.htype == HTYPE_NTOR and decoded.hdata == b"\x11" * 84


def test_extend2_ipv6_and_unknown_specifier_kept() -> None:
    unknown = LinkSpecifier(99, b"opaque")
    body = Extend2Body((unknown, LinkSpecifier.ipv6("::1", 443)), 2, b"x").encode()
    decoded = Extend2Body.decode(body)
    assert decoded.specifiers[0] == unknown
    assert decoded.address() == ("::1", 443)
    assert decoded.legacy_id() is None


@pytest.mark.parametrize(
    "body, message",
    [
        (b"", "EXTEND2: truncated"),
        (b"\x01", "link specifier: truncated"),
        (b"\x01\x00\x06\x7f\x00", "link specifier: truncated"),
        (b"\x00\x00\x02", "handshake: truncated"),
        (b"\x00\x00\x02\x00\x54" + bytes(83), "handshake: truncated"),
        (b"\x01\x00\x05" + bytes(5) + b"\x00\x02\x00\x00", "must be 6 bytes"),
    ],
)
def test_extend2_malformed_is_a_clear_body_error(body: bytes, message: str) -> None:
    with pytest.raises(BodyError, match=message):
        Extend2Body.decode(body)


@pytest.mark.parametrize("decode", [decode_create2, decode_created2, decode_extended2])
def test_short_bodies_raise_body_error(decode: object) -> None:
    assert callable(decode)
    with pytest.raises(BodyError, match="truncated"):
        decode(b"\x00")
    with pytest.raises(BodyError, match="truncated"):
        decode(b"\x00\x50\x00\x50" + bytes(3))


def test_oversized_bodies_are_refused() -> None:
    with pytest.raises(BodyError, match="exceeds 509"):
        encode_create2(2, bytes(506))
    with pytest.raises(BodyError, match="exceeds 498"):
        encode_extended2(bytes(497))
    with pytest.raises(BodyError, match="exceeds 498"):
        Extend2Body((LinkSpecifier.legacy_id(bytes(20)),), 2, bytes(480)).encode()
    with pytest.raises(BodyError):
        LinkSpecifier(LSTYPE_LEGACY_ID, bytes(19))
    with pytest.raises(BodyError, match="not an address"):
        LinkSpecifier.legacy_id(bytes(20)).address()
    assert LinkSpecifier(LSTYPE_IPV4, bytes(6)).address() == ("0.0.0.0", 0)


specifiers = st.one_of(
    st.builds(
        LinkSpecifier.ipv4,
        st.ip_addresses(v=4).map(str),
        st.integers(0, 65535),
    ),
    st.builds(LinkSpecifier.legacy_id, st.binary(min_size=20, max_size=20)),
    st.builds(LinkSpecifier, st.integers(4, 255), st.binary(max_size=40)),
)


@given(
    st.lists(specifiers, max_size=4),
    st.integers(0, 0xFFFF),
    st.binary(max_size=200),
    st.binary(max_size=40),
)
def test_extend2_round_trip(
    specs: list[LinkSpecifier], htype: int, hdata: bytes, padding: bytes
) -> None:
    original = Extend2Body(tuple(specs), htype, hdata)
    assert Extend2Body.decode(original.encode() + padding) == original


@given(st.integers(0, 0xFFFF), st.binary(max_size=505), st.binary(max_size=10))
def test_create2_round_trip(htype: int, hdata: bytes, padding: bytes) -> None:
    assert decode_create2(encode_create2(htype, hdata) + padding) == Create2Body(htype, hdata)
