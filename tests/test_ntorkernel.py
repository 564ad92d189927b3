"""The handshake kernel (relay._ntor) gives relay.handshakes' exact bytes, and errors per job.

Layout: known answers (Tor's own test-suite vectors for HKDF and KDF-TOR, and Arti's full ntor
handshake vector: fixed b, x, y, ID -> the exact CREATED2 reply and keys), the property tests
against :func:`relay.handshakes.ntor_server` / :func:`create_fast_server` with the same
ephemeral secret, clients completing the handshake with the kernel's reply, every error case
compared message for message with the Python server, onion key rotation, and the threads
(the GIL is released for a batch; two batches run at the same moment). No timing assertions.
"""

from __future__ import annotations

import threading

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from hypothesis import given, settings
from hypothesis import strategies as st
from support_kernel import Runner

from relay._ntor import (
    NTOR_MATERIAL_LEN,
    NtorKey,
    create_fast_server_batch,
    ntor_server_batch,
)
from relay._ntor import _ntorkernel as kernel
from relay.handshakes import (
    CREATE_FAST_LEN,
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
from tor1.reference import HOP_MATERIAL_LEN, NTOR_PROTOID, kdf_ntor

H = bytes.fromhex
KH_LEN = 20

# Known answers from Tor's own test suite (test_crypto.c), 100 bytes each.
KDF_TOR_EMPTY = H(
    "5ba93c9db0cff93f52b521d7420e43f6eda2784fbf8b4530d8d246dd74ac53a13471bba17941dff7c4ea21bb365b"
    "beeaf5f2c654883e56d11e43c44e9842926af7ca0a8cca12604f945414f07b01e13da42c6cf1de3abfdea9b95f34"
    "687cbbe92b9a7383"
)
KDF_TOR_TOR = H(
    "776c6214fc647aaa5f683c737ee66ec44f03d0372e1cce69227950f236ddf1e329a7ce7c227903303f525a8c6662"
    "426e8034870642a6dabbd41b5d97ec9bf2312ea729992f48f8ea2d0ba83f45dfda1a80bdc8b80de01b23e3e0ffae"
    "099b3e4ccf28dc28"
)
KDF_NTOR_TOR = H(
    "5521492a85139a8d9107a2d5c0d9c91610d0f95989975ebee6c02a4f8d622a6cfdf9b7c7edd3832e2760ded1eac3"
    "09b76f8d66c4a3c4d6225429b3a016e3c3d45911152fc87bc2de9630c3961be9fdb9f93197ea8e5977180801926d"
    "3321fa21513e59ac"
)

# Arti's ntor test vector (tor-proto, crypto/handshake/ntor.rs, testvec): a whole handshake.
ARTI_B_SECRET = H("4820544f4c4420594f5520444f474954204b454550532048415050454e494e47")
ARTI_B_PUBLIC = H("ccbc8541904d18af08753eae967874749e6149f873de937f57f8fd903a21c471")
ARTI_X_SECRET = H("706f6461792069207075742e2e2e2e2e2e2e2e4a454c4c59206f6e2074686973")
ARTI_Y_SECRET = H("70686520737175697272656c2e2e2e2e2e2e2e2e686173206869732067616d65")
ARTI_ID = H("69546f6c64596f7541626f75745374616972732e")
ARTI_ONIONSKIN = H(
    "69546f6c64596f7541626f75745374616972732eccbc8541904d18af08753eae967874749e6149f873de937f57f8"
    "fd903a21c471e65dfdbef8b2635837fe2cebc086a8096eae3213e6830dc407516083d412b078"
)
ARTI_REPLY = H(
    "390480a14362761d6aec1fea840f6e9e928fb2adb7b25c670be1045e35133a371cbdf68b89923e1f85e8e18ee6e8"
    "05ea333fe4849c790ffd2670bd80fec95cc8"
)
ARTI_KEYS = H(
    "0c62dee7f48893370d0ef896758d35729867beef1a5121df80e00f79ed349af39b51cae125719182f19d932a667d"
    "ae1afbf2e336e6910e7822223e763afad0a13342157969dc6b79"
)

# Curve25519 u-coordinates of small order (0, 1, the order-8 points, and p-1, p, p+1).
LOW_ORDER_POINTS = [
    bytes(32),
    b"\x01" + bytes(31),
    H("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"),
    H("5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157"),
    H("ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f"),
    H("edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f"),
    H("eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f"),
]

secrets32 = st.binary(min_size=32, max_size=32)
ident20 = st.binary(min_size=20, max_size=20)


def kernel_key(server: NtorServerKey) -> NtorKey:
    return NtorKey(server.onion_key.private_bytes_raw(), server.identity_digest)


def expected_material(server: NtorServerKey, skin: bytes, y: X25519PrivateKey) -> bytes:
    """The 92 bytes of HKDF output, computed from tor-spec's formulas with cryptography."""
    ident, b_pub, x_pub = skin[:20], skin[20:52], skin[52:84]
    x = X25519PublicKey.from_public_bytes(x_pub)
    y_pub = y.public_key().public_bytes_raw()
    secret_input = (y.exchange(x) + server.onion_key.exchange(x) + ident + b_pub + x_pub + y_pub
                    + NTOR_PROTOID)
    return kdf_ntor(secret_input, HOP_MATERIAL_LEN + KH_LEN)


def python_outcome(server: NtorServerKey, skin: bytes) -> str:
    """What ntor_server says about an onionskin it refuses (its HandshakeError's message)."""
    with pytest.raises(HandshakeError) as info:
        ntor_server(server, skin)
    return str(info.value)


# --------------------------------------------------------------------------- known answers


def test_kernel_hkdf_matches_the_spec_known_answer() -> None:
    assert NTOR_MATERIAL_LEN == HOP_MATERIAL_LEN + KH_LEN == 92
    assert kernel._kdf_ntor(b"Tor") == KDF_NTOR_TOR[:NTOR_MATERIAL_LEN]


def test_kernel_kdf_tor_matches_the_spec_known_answers() -> None:
    assert kernel._kdf_tor(b"") == KDF_TOR_EMPTY[:92]
    assert kernel._kdf_tor(b"Tor") == KDF_TOR_TOR[:92]


def test_arti_full_handshake_vector() -> None:
    """Fixed b, x, y and ID: the kernel's CREATED2 reply and keys are Arti's, and an ntor
    client with Arti's x accepts the reply."""
    key = NtorKey(ARTI_B_SECRET, ARTI_ID)
    assert key.public == ARTI_B_PUBLIC
    assert key.identity == ARTI_ID
    [(reply, material)] = ntor_server_batch([(key, ARTI_ONIONSKIN, ARTI_Y_SECRET)])
    assert reply == ARTI_REPLY
    assert material[: len(ARTI_KEYS)] == ARTI_KEYS
    client = NtorClient(ARTI_ID, ARTI_B_PUBLIC,
                        ephemeral=X25519PrivateKey.from_private_bytes(ARTI_X_SECRET))
    assert client.onionskin == ARTI_ONIONSKIN
    assert client.complete(reply) == ARTI_KEYS


# --------------------------------------------------------------------------- properties


@settings(max_examples=60, deadline=None)
@given(b=secrets32, x=secrets32, y=secrets32, ident=ident20, padding=st.integers(0, 425))
def test_kernel_equals_python_ntor_server(
    b: bytes, x: bytes, y: bytes, ident: bytes, padding: int
) -> None:
    """Same keys, same y: the kernel's reply and first 72 bytes are ntor_server's; all 92 are
    the HKDF of tor-spec's secret_input; the client completes with the kernel's reply."""
    server = NtorServerKey(ident, X25519PrivateKey.from_private_bytes(b))
    y_key = X25519PrivateKey.from_private_bytes(y)
    client = NtorClient(ident, server.onion_key_public,
                        ephemeral=X25519PrivateKey.from_private_bytes(x))
    skin = client.onionskin + bytes(padding)  # a CREATE2 HDATA may carry more than 84 bytes
    [(reply, material)] = ntor_server_batch([(kernel_key(server), skin, y)])
    py_reply, py_material = ntor_server(server, skin, ephemeral=y_key)
    assert (len(reply), len(material)) == (NTOR_REPLY_LEN, NTOR_MATERIAL_LEN)
    assert reply == py_reply
    assert material[:HOP_MATERIAL_LEN] == py_material
    assert material == expected_material(server, client.onionskin, y_key)
    assert client.complete(reply) == py_material


def test_fresh_y_per_handshake_and_clients_complete() -> None:
    """Without the test hook every job gets its own y from OpenSSL's RNG, and each client
    completes with its own reply (the keys agree)."""
    server = NtorServerKey.generate(b"\x07" * 20)
    key = kernel_key(server)
    clients = [NtorClient(server.identity_digest, server.onion_key_public) for _ in range(40)]
    results = ntor_server_batch([(key, c.onionskin) for c in clients])
    assert len({reply[:32] for reply, _ in results}) == len(clients)
    for client, (reply, material) in zip(clients, results, strict=True):
        assert client.complete(reply) == material[:HOP_MATERIAL_LEN]


@settings(max_examples=60, deadline=None)
@given(x=st.binary(min_size=20, max_size=20), y=st.binary(min_size=20, max_size=20),
       padding=st.integers(0, 489))
def test_create_fast_equals_python(x: bytes, y: bytes, padding: int) -> None:
    [(reply, material)] = create_fast_server_batch([(x + bytes(padding), y)])
    assert (reply, material) == create_fast_server(x + bytes(padding), y=y)
    assert len(reply) == CREATED_FAST_LEN
    assert CreateFastClient(x).complete(reply) == material


def test_create_fast_batch_with_fresh_nonces() -> None:
    """A batch big enough to release the GIL, random Y: every client completes."""
    clients = [CreateFastClient() for _ in range(3 * kernel.FAST_GIL_RELEASE_MIN_JOBS)]
    results = create_fast_server_batch([c.onionskin for c in clients])
    assert len({reply[:CREATE_FAST_LEN] for reply, _ in results}) == len(clients)
    for client, (reply, material) in zip(clients, results, strict=True):
        assert client.complete(reply) == material


# --------------------------------------------------------------------------- errors


def test_every_refusal_matches_python_and_stays_with_its_job() -> None:
    """Short onionskin, another identity, an unknown onion key and every low-order X: each
    job gets the HandshakeError (same message) ntor_server raises; the good jobs around them
    are answered and complete."""
    server = NtorServerKey.generate(b"\x01" * 20)
    other = NtorServerKey.generate(b"\x02" * 20)
    good = NtorClient(server.identity_digest, server.onion_key_public)
    bad_skins = [
        good.onionskin[: NTOR_ONIONSKIN_LEN - 1],
        b"",
        NtorClient(b"\x02" * 20, server.onion_key_public).onionskin,
        NtorClient(server.identity_digest, other.onion_key_public).onionskin,
        *(server.identity_digest + server.onion_key_public + point
          for point in LOW_ORDER_POINTS),
    ]
    key = kernel_key(server)
    skins = [good.onionskin, *bad_skins, good.onionskin]
    results = ntor_server_batch([(key, s) for s in skins])
    for skin, result in zip(bad_skins, results[1:-1], strict=True):
        assert isinstance(result, HandshakeError)
        assert str(result) == python_outcome(server, skin)
    for reply, material in (results[0], results[-1]):
        assert good.complete(reply) == material[:HOP_MATERIAL_LEN]
    assert key.in_use == 0


HOSTILE_SERVER = NtorServerKey(b"\x0b" * 20, X25519PrivateKey.from_private_bytes(b"\x0c" * 32))


@settings(max_examples=100, deadline=None)
@given(x=st.one_of(st.binary(min_size=32, max_size=32), st.sampled_from(LOW_ORDER_POINTS)),
       y=secrets32)
def test_any_x_gets_the_python_answer(x: bytes, y: bytes) -> None:
    """Any 32 bytes as X (non-canonical and low-order points included): the kernel answers
    exactly as ntor_server does, reply and keys or the same refusal."""
    server = HOSTILE_SERVER
    skin = server.identity_digest + server.onion_key_public + x
    [result] = ntor_server_batch([(kernel_key(server), skin, y)])
    try:
        expected = ntor_server(server, skin, ephemeral=X25519PrivateKey.from_private_bytes(y))
    except HandshakeError as exc:
        assert isinstance(result, HandshakeError)
        assert str(result) == str(exc)
        return
    reply, material = result
    assert (reply, material[:HOP_MATERIAL_LEN]) == expected


def test_malformed_jobs_fail_alone() -> None:
    server = NtorServerKey.generate(b"\x03" * 20)
    key = kernel_key(server)
    skin = NtorClient(server.identity_digest, server.onion_key_public).onionskin
    jobs = [
        "not a tuple",
        (key,),
        (key, skin, bytes(32), "extra"),
        ("not a key", skin),
        ((), skin),
        ((key, "not a key"), skin),
        (key, 12345),
        (key, skin, bytes(31)),
        (key, skin),
    ]
    results = ntor_server_batch(jobs)
    kinds = [type(r) for r in results[:-1]]
    assert kinds == [TypeError, TypeError, TypeError, TypeError, ValueError, TypeError,
                     TypeError, ValueError]
    reply, material = results[-1]
    assert len(reply) == NTOR_REPLY_LEN and len(material) == NTOR_MATERIAL_LEN
    assert create_fast_server_batch([b"short", (b"x" * 20,), (b"x" * 20, b"y")])[0].args == (
        "CREATE_FAST body must be at least 20 bytes, got 5",
    )
    fast = create_fast_server_batch([b"short", (b"x" * 20,), (b"x" * 20, b"y")])
    assert [type(r) for r in fast] == [HandshakeError, TypeError, ValueError]


def test_batch_arguments() -> None:
    assert ntor_server_batch([]) == []
    assert create_fast_server_batch(()) == []
    with pytest.raises(TypeError):
        ntor_server_batch(None)
    with pytest.raises(TypeError):
        create_fast_server_batch(42)


def test_ntor_key_construction() -> None:
    onion = X25519PrivateKey.generate()
    key = NtorKey(onion.private_bytes_raw(), b"\x05" * 20)
    assert key.public == onion.public_key().public_bytes_raw()
    assert key.identity == b"\x05" * 20
    assert onion.private_bytes_raw().hex()[:8] not in repr(key)
    assert key.public.hex()[:8] in repr(key)
    with pytest.raises(ValueError):
        NtorKey(bytes(31), b"\x05" * 20)
    with pytest.raises(ValueError):
        NtorKey(bytes(32), b"\x05" * 19)
    with pytest.raises(TypeError):
        NtorKey("x" * 32, b"\x05" * 20)


# --------------------------------------------------------------------------- key rotation


def test_onion_key_rotation_answers_with_the_named_key() -> None:
    """A job's keys tuple (current, previous): each onionskin is answered by the key it
    names, exactly as ntor_server with that key; a key we no longer hold is refused."""
    ident = b"\x09" * 20
    current, previous, dropped = (NtorServerKey.generate(ident) for _ in range(3))
    keys = (kernel_key(current), kernel_key(previous))
    y = X25519PrivateKey.generate()
    skins = {name: NtorClient(ident, s.onion_key_public).onionskin
             for name, s in (("current", current), ("previous", previous), ("dropped", dropped))}
    y_raw = y.private_bytes_raw()
    results = ntor_server_batch([(keys, skin, y_raw) for skin in skins.values()])
    for name, server in (("current", current), ("previous", previous)):
        reply, material = results[list(skins).index(name)]
        py_reply, py_material = ntor_server(server, skins[name], ephemeral=y)
        assert (reply, material[:HOP_MATERIAL_LEN]) == (py_reply, py_material)
    refused = results[2]
    assert isinstance(refused, HandshakeError)
    assert str(refused) == "ntor: onionskin names an onion key we do not have"


# --------------------------------------------------------------------------- threads


def _batch_for(tag: int, n: int) -> tuple[NtorKey, list[NtorClient], list[tuple]]:
    server = NtorServerKey.generate(bytes([tag]) * 20)
    key = kernel_key(server)
    clients = [NtorClient(server.identity_digest, server.onion_key_public) for _ in range(n)]
    return key, clients, [(key, c.onionskin) for c in clients]


def test_python_runs_while_a_batch_is_in_the_kernel() -> None:
    """The test thread sees the key in use: only possible if the worker's call released the
    GIL (in_use is raised and lowered inside one call)."""
    key, _, jobs = _batch_for(1, 300)
    runner = Runner(lambda: ntor_server_batch(jobs))
    runner.start()
    seen_inside = 0
    while runner.is_alive() and seen_inside < 100:
        if key.in_use:
            seen_inside += 1
    runner.stop.set()
    runner.join()
    assert runner.error is None and runner.failed_jobs == 0
    assert seen_inside > 0
    assert key.in_use == 0


def test_two_threads_answer_at_the_same_moment_and_correctly() -> None:
    """Two workers with two keys are observed inside the kernel at once, and one key shared
    by both threads gives correct answers to both."""
    (key_a, _, jobs_a), (key_b, _, jobs_b) = _batch_for(2, 300), _batch_for(3, 300)
    runners = [Runner(lambda: ntor_server_batch(jobs_a)),
               Runner(lambda: ntor_server_batch(jobs_b))]
    for r in runners:
        r.start()
    both_inside = False
    while not both_inside and all(r.is_alive() for r in runners):
        both_inside = bool(key_a.in_use and key_b.in_use)
    for r in runners:
        r.stop.set()
        r.join()
    assert [r.error for r in runners] == [None, None]
    assert both_inside

    shared, clients, jobs = _batch_for(4, 64)
    outputs: list[list] = [[], []]
    sharing = [threading.Thread(target=lambda i=i: outputs[i].append(ntor_server_batch(jobs)))
               for i in (0, 1)]
    for t in sharing:
        t.start()
    for t in sharing:
        t.join()
    assert [len(o) for o in outputs] == [1, 1]
    for results in (outputs[0][0], outputs[1][0]):
        for client, (reply, material) in zip(clients, results, strict=True):
            assert client.complete(reply) == material[:HOP_MATERIAL_LEN]
    assert shared.in_use == 0

