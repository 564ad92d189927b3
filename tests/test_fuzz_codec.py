"""Fuzzing the parsers a relay runs on a stranger's bytes: cell framing, relay payloads,
NETINFO, VERSIONS, CERTS, BEGIN, and the CREATE_FAST / CREATE2 / EXTEND2 handshake bodies.

What is checked, and why
------------------------
A relay parses input from anyone who connects. The contract of every parser here is: on any
input it either returns a value or raises its *own* documented error type (``CellFormatError``,
``BodyError``, ``HandshakeError``, ``CertsError``, ``ValueError`` for BEGIN), never
``IndexError``/``struct.error``/``UnicodeDecodeError`` leaking from inside it, and never hangs.
The callers (``relay.link``, ``relay.node``, ``relay.orcircuit``, ``relay.exit``) catch exactly
those types to close the one link or circuit the input belongs to, so an undocumented
exception would escape that handling.

Beyond "no unexpected exception", each parser is held to a structural property, so a parser
that silently mis-reads is caught too:

* framing: whatever ``parse_cells`` cuts out re-encodes to exactly the bytes it consumed, the
  rest holds no complete cell, and feeding the same bytes in arbitrary chunks (a stream decoder
  keeping its leftover) yields the same cells as feeding them at once;
* relay payloads: ``RelayPayload.unpack``, ``relay.circuits.relay_body`` and the raw header
  struct agree on every 509-byte input (a differential test of the two parsers on the data
  path), and the error is raised exactly when the length field exceeds 498;
* bodies (CREATE2, CREATED2, EXTENDED2, EXTEND2, NETINFO, VERSIONS): what decodes re-encodes
  to a prefix of the input;
* handshake servers and clients (``create_fast_server``, ``ntor_server``,
  ``CreateFastClient.complete``, ``NtorClient.complete``) given hostile bodies, including
  valid ntor onionskins with arbitrary or low-order X, raise only ``HandshakeError``.

Inputs are either arbitrary bytes or *mutated valid inputs* (valid encodings with bytes flipped,
inserted, deleted or truncated), which reach much deeper than random bytes. The number of
examples is bounded in the suite; ``make fuzz`` raises it with ``RELAYCRYPT_FUZZ_EXAMPLES``.
"""

from __future__ import annotations

import itertools
import struct

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from hypothesis import given
from hypothesis import strategies as st
from reliability_support import fuzz_settings, mutated_bytes

from relay.cells import (
    Cell,
    CellFormatError,
    PayloadSizeError,
    RelayLengthError,
    RelayPayload,
    TrailingBytesError,
    TruncatedCellError,
    VarCell,
    VersionsFormatError,
    decode_cell,
    encode_versions,
    is_var_length,
    parse_cell,
    parse_cells,
    parse_versions,
)
from relay.circuits import RELAY_HEADER, relay_body
from relay.exit import parse_begin
from relay.handshakes import (
    BodyError,
    CreateFastClient,
    Extend2Body,
    HandshakeError,
    LinkSpecifier,
    NtorClient,
    NtorServerKey,
    create_fast_server,
    decode_create2,
    decode_created2,
    decode_extended2,
    encode_create2,
    encode_created2,
    ntor_server,
)
from relay.link import NetInfo, decode_netinfo, encode_netinfo
from relay.torcerts import CertsError, parse_certs_cell
from tor1 import CELL_PAYLOAD_LEN, RELAY_DATA_MAX, RELAY_HEADER_LEN

# --------------------------------------------------------------------------- strategies

LINK_VERSIONS = st.sampled_from([0, 1, 2, 3, 4, 5, 6])


@st.composite
def valid_cells(draw: st.DrawFn, link_version: int) -> bytes:
    """The wire bytes of one valid cell for ``link_version`` (fixed or variable-length)."""
    circ_max = 0xFFFFFFFF if link_version >= 4 else 0xFFFF
    circ_id = draw(st.one_of(st.just(0), st.integers(0, circ_max)))
    command = draw(st.integers(0, 255))
    if is_var_length(command, link_version):
        payload = draw(st.binary(max_size=700))
        return VarCell(circ_id, command, payload).encode(link_version)
    payload = draw(st.binary(max_size=CELL_PAYLOAD_LEN))
    return Cell(circ_id, command, payload).encode(link_version)


def mutated(base: bytes) -> st.SearchStrategy[bytes]:
    """``base`` with a few random edits (0 to 6): flip, overwrite, insert, delete, truncate."""
    return mutated_bytes(base, st.integers(0, 6), [0x00, 0x07, 0x80, 0xFF, 0x01, 0xFE])


@st.composite
def cell_streams(draw: st.DrawFn) -> tuple[int, bytes]:
    """``(link_version, bytes)``: several valid cells, mutated, or plain random bytes."""
    link_version = draw(LINK_VERSIONS)
    if draw(st.booleans()):
        blob = draw(st.binary(max_size=2000))
    else:
        cells = draw(st.lists(valid_cells(link_version), max_size=6))
        blob = draw(mutated(b"".join(cells)))
    return link_version, blob


def chunked(blob: bytes, cuts: list[int]) -> list[bytes]:
    """``blob`` cut at the positions ``cuts`` (taken modulo its length, sorted)."""
    points = sorted({c % (len(blob) + 1) for c in cuts} | {0, len(blob)})
    return [blob[a:b] for a, b in itertools.pairwise(points)]


# --------------------------------------------------------------------------- cell framing


@fuzz_settings(400)
@given(stream=cell_streams(), offset=st.integers(0, 16))
def test_parse_cells_consumes_exactly_what_it_reencodes(
    stream: tuple[int, bytes], offset: int
) -> None:
    link_version, blob = stream
    offset = min(offset, len(blob))
    cells, end = parse_cells(blob, offset, link_version)
    assert offset <= end <= len(blob)
    assert b"".join(c.encode(link_version) for c in cells) == blob[offset:end]
    assert parse_cell(blob, end, link_version) is None  # the rest is not a whole cell yet


@fuzz_settings(300)
@given(stream=cell_streams(), cuts=st.lists(st.integers(0, 4000), max_size=12))
def test_stream_decoder_is_independent_of_chunking(
    stream: tuple[int, bytes], cuts: list[int]
) -> None:
    link_version, blob = stream
    whole, whole_end = parse_cells(blob, 0, link_version)
    got: list[Cell | VarCell] = []
    leftover = b""
    for piece in chunked(blob, cuts):
        buf = leftover + piece
        cells, end = parse_cells(buf, 0, link_version)
        got.extend(cells)
        leftover = buf[end:]
    assert got == whole
    assert leftover == blob[whole_end:]


@fuzz_settings(300)
@given(stream=cell_streams())
def test_decode_cell_accepts_exactly_one_whole_cell(stream: tuple[int, bytes]) -> None:
    link_version, blob = stream
    try:
        cell = decode_cell(blob, link_version)
    except TruncatedCellError:
        assert parse_cell(blob, 0, link_version) is None
    except TrailingBytesError:
        framed = parse_cell(blob, 0, link_version)
        assert framed is not None and framed[1] < len(blob)
    else:
        assert cell.encode(link_version) == blob


# --------------------------------------------------------------------------- relay payloads


@st.composite
def relay_payloads(draw: st.DrawFn) -> bytes:
    """509 bytes: a valid packed relay payload (mutated or not) or random bytes, with the length
    field often near its limit."""
    if draw(st.booleans()):
        payload = bytearray(draw(st.binary(min_size=CELL_PAYLOAD_LEN, max_size=CELL_PAYLOAD_LEN)))
    else:
        data = draw(st.binary(max_size=RELAY_DATA_MAX))
        payload = bytearray(RelayPayload(draw(st.integers(0, 255)), 0, draw(st.integers(0, 0xFFFF)),
                                         data=data).pack())
    if draw(st.booleans()):
        length = draw(st.sampled_from([0, 1, 497, 498, 499, 500, 509, 0xFFFF]))
        struct.pack_into(">H", payload, 9, length)
    return bytes(payload)


@fuzz_settings(400)
@given(payload=relay_payloads(), prefix=st.binary(max_size=CELL_PAYLOAD_LEN * 2))
def test_relay_payload_parsers_agree(payload: bytes, prefix: bytes) -> None:
    """RelayPayload.unpack (readable form) and relay_body (data path, at an offset inside a
    joined buffer) read the same fields and refuse the same inputs."""
    command, recognized, stream_id, digest, length = RELAY_HEADER.unpack_from(payload, 0)
    joined = prefix + payload + prefix
    if length > RELAY_DATA_MAX:
        for parse in (lambda: RelayPayload.unpack(payload),
                      lambda: relay_body(joined, len(prefix))):
            try:
                parse()
            except RelayLengthError:
                pass
            except ValueError as exc:
                assert "exceeds" in str(exc)
            else:
                raise AssertionError(f"length field {length} was accepted")
        return
    unpacked = RelayPayload.unpack(payload)
    data = payload[RELAY_HEADER_LEN : RELAY_HEADER_LEN + length]
    fields = (command, recognized, stream_id, digest, length, data)
    assert (unpacked.command, unpacked.recognized, unpacked.stream_id, unpacked.digest,
            unpacked.length, unpacked.data) == fields
    assert relay_body(joined, len(prefix)) == (command, stream_id, data)
    repacked = unpacked.pack(padding=lambda n: payload[CELL_PAYLOAD_LEN - n :])
    assert repacked[: RELAY_HEADER_LEN + length] == payload[: RELAY_HEADER_LEN + length]


@fuzz_settings(200)
@given(blob=st.binary(max_size=1100))
def test_relay_payload_of_any_other_size_is_refused(blob: bytes) -> None:
    if len(blob) == CELL_PAYLOAD_LEN:
        return
    try:
        RelayPayload.unpack(blob)
    except PayloadSizeError:
        return
    raise AssertionError(f"{len(blob)}-byte relay payload accepted")


# --------------------------------------------------------------------------- link bodies


@fuzz_settings(300)
@given(blob=st.one_of(
    st.binary(max_size=600),
    st.builds(lambda v: encode_versions(v)[5:], st.lists(st.integers(0, 0xFFFF), max_size=20))
    .flatmap(mutated),
))
def test_versions_payload(blob: bytes) -> None:
    try:
        versions = parse_versions(blob)
    except VersionsFormatError:
        assert len(blob) % 2 == 1
        return
    assert encode_versions(versions)[5:] == blob


addresses = st.one_of(
    st.none(),
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(str),
)


@fuzz_settings(300)
@given(blob=st.one_of(
    st.binary(max_size=CELL_PAYLOAD_LEN),
    st.builds(NetInfo, st.integers(0, 0xFFFFFFFF), addresses,
              st.lists(addresses.filter(lambda a: a is not None), max_size=6).map(tuple))
    .map(encode_netinfo).flatmap(mutated),
))
def test_netinfo_decoder(blob: bytes) -> None:
    try:
        info = decode_netinfo(blob)
    except CellFormatError:
        return
    assert 0 <= info.timestamp <= 0xFFFFFFFF
    again = decode_netinfo(encode_netinfo(info))
    # An unknown or absent "other address" decodes to None and is re-sent as 0.0.0.0.
    expected_other = "0.0.0.0" if info.other_address is None else info.other_address
    assert again == NetInfo(info.timestamp, expected_other, info.my_addresses)


@st.composite
def certs_bodies(draw: st.DrawFn) -> bytes:
    """A CERTS body: count, then (type, length, bytes) entries, mutated; or random bytes."""
    if draw(st.booleans()):
        return draw(st.binary(max_size=800))
    entries = draw(st.lists(st.tuples(st.integers(0, 10), st.binary(max_size=300)), max_size=5))
    body = bytes((len(entries),)) + b"".join(
        struct.pack(">BH", t, len(raw)) + raw for t, raw in entries
    )
    return draw(mutated(body))


@fuzz_settings(300)
@given(body=certs_bodies())
def test_certs_parser_raises_only_certs_error(body: bytes) -> None:
    try:
        parse_certs_cell(body)
    except CertsError:
        pass


@fuzz_settings(300)
@given(body=st.one_of(
    st.binary(max_size=200),
    st.builds(lambda host, port: f"{host}:{port}".encode() + b"\0",
              st.one_of(st.ip_addresses().map(str), st.text(max_size=20)),
              st.integers(-5, 100000)).flatmap(mutated),
))
def test_begin_parser_raises_only_value_error(body: bytes) -> None:
    try:
        host, port = parse_begin(body)
    except ValueError:  # UnicodeDecodeError is one
        return
    target = body.partition(b"\0")[0].decode("ascii")
    host_text, _, port_text = target.rpartition(":")
    assert port == int(port_text) >= 0
    assert host_text in (host, f"[{host}]")


# --------------------------------------------------------------------------- handshake bodies


@fuzz_settings(300)
@given(blob=st.one_of(
    st.binary(max_size=CELL_PAYLOAD_LEN),
    st.builds(encode_create2, st.integers(0, 0xFFFF), st.binary(max_size=200)).flatmap(mutated),
))
def test_create2_and_created2_decoders(blob: bytes) -> None:
    try:
        body = decode_create2(blob)
    except BodyError:
        pass
    else:
        assert blob.startswith(encode_create2(body.htype, body.hdata))
    for decode in (decode_created2, decode_extended2):
        try:
            hdata = decode(blob)
        except BodyError:
            continue
        assert blob.startswith(encode_created2(hdata))


@st.composite
def extend2_bodies(draw: st.DrawFn) -> bytes:
    """An EXTEND2 body with known and unknown link specifiers (mutated), or random bytes."""
    if draw(st.booleans()):
        return draw(st.binary(max_size=RELAY_DATA_MAX))
    specs = draw(st.lists(st.one_of(
        st.builds(LinkSpecifier.ipv4, st.ip_addresses(v=4).map(str), st.integers(0, 0xFFFF)),
        st.builds(LinkSpecifier.ipv6, st.ip_addresses(v=6).map(str), st.integers(0, 0xFFFF)),
        st.builds(LinkSpecifier.legacy_id, st.binary(min_size=20, max_size=20)),
        st.builds(LinkSpecifier, st.integers(4, 255), st.binary(max_size=40)),
    ), max_size=4))
    body = Extend2Body(tuple(specs), draw(st.integers(0, 0xFFFF)),
                       draw(st.binary(max_size=120))).encode()
    return draw(mutated(body))


@fuzz_settings(400)
@given(blob=extend2_bodies())
def test_extend2_decoder(blob: bytes) -> None:
    """What decodes re-encodes to a prefix; address() and legacy_id() never raise on it."""
    try:
        body = Extend2Body.decode(blob)
    except BodyError:
        return
    address = body.address()
    if address is not None:
        host, port = address
        assert 0 <= port <= 0xFFFF and host
    legacy = body.legacy_id()
    assert legacy is None or len(legacy) == 20
    try:
        encoded = body.encode()
    except BodyError:
        assert len(blob) > RELAY_DATA_MAX  # only an over-long input can decode to too much
        return
    assert blob.startswith(encoded)


SERVER_KEY = NtorServerKey.generate(bytes(range(20)))
# Low-order curve25519 points: X25519 with them gives the all-zero secret ntor must refuse.
LOW_ORDER_POINTS = [
    bytes(32),
    (1).to_bytes(32, "little"),
    bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"),
    bytes.fromhex("5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157"),
    bytes.fromhex("ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f"),
]


@st.composite
def ntor_onionskins(draw: st.DrawFn) -> bytes:
    """An onionskin for SERVER_KEY with an arbitrary or low-order X (mutated or not), or
    random bytes."""
    choice = draw(st.integers(0, 2))
    if choice == 0:
        return draw(st.binary(max_size=120))
    x = draw(st.one_of(st.binary(min_size=32, max_size=32), st.sampled_from(LOW_ORDER_POINTS)))
    skin = SERVER_KEY.identity_digest + SERVER_KEY.onion_key_public + x
    return draw(mutated(skin)) if choice == 2 else skin


def is_low_order(x: bytes) -> bool:
    """Independent oracle: X25519 with a low-order point is all-zero for every private key
    (OpenSSL refuses to return it and raises ValueError)."""
    try:
        shared = X25519PrivateKey.generate().exchange(X25519PublicKey.from_public_bytes(x))
    except ValueError:
        return True
    return shared == bytes(32)


@fuzz_settings(200)
@given(skin=ntor_onionskins())
def test_ntor_server_on_hostile_onionskins(skin: bytes) -> None:
    """Refused exactly when it is short, names another identity or onion key, or X is a
    low-order point; otherwise answered with a 64-byte reply and 72 bytes of keys."""
    ours = SERVER_KEY.identity_digest + SERVER_KEY.onion_key_public
    should_refuse = len(skin) < 84 or skin[:52] != ours or is_low_order(skin[52:84])
    try:
        reply, material = ntor_server(SERVER_KEY, skin)
    except HandshakeError:
        assert should_refuse
        return
    assert not should_refuse
    assert len(reply) == 64 and len(material) == 72


@fuzz_settings(200)
@given(reply=st.one_of(st.binary(max_size=120),
                       st.sampled_from(LOW_ORDER_POINTS).flatmap(
                           lambda y: st.binary(min_size=32, max_size=40).map(lambda a: y + a))))
def test_handshake_clients_on_hostile_replies(reply: bytes) -> None:
    """A forged CREATED_FAST / ntor reply is a HandshakeError, never a crash or a success."""
    for complete in (CreateFastClient().complete,
                     NtorClient(SERVER_KEY.identity_digest, SERVER_KEY.onion_key_public,
                                ephemeral=X25519PrivateKey.generate()).complete):
        try:
            complete(reply)
        except HandshakeError:
            continue
        raise AssertionError(f"a random reply of {len(reply)} bytes completed a handshake")


@fuzz_settings(200)
@given(blob=st.binary(max_size=CELL_PAYLOAD_LEN))
def test_create_fast_server_on_any_body(blob: bytes) -> None:
    try:
        reply, material = create_fast_server(blob)
    except HandshakeError:
        assert len(blob) < 20
        return
    assert len(reply) == 40 and len(material) == 72
    assert CreateFastClient(blob[:20]).complete(reply) == material
