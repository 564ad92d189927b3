"""Known answers for tor1.reference, and byte-exact checks against an independent model.

The model below re-derives tor1 from the spec with nothing shared with the module: the CTR
keystream is built from AES-ECB of the big-endian block counter, and digests are plain SHA-1
over the concatenated payloads.
"""

from __future__ import annotations

import hashlib

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from tor1 import CELL_PAYLOAD_LEN, RELAY_DATA_MAX, RELAY_HEADER_LEN
from tor1.reference import (
    HOP_MATERIAL_LEN,
    HopKeys,
    OriginCrypto,
    RelayCrypto,
    UnrecognizedCell,
    aes128_ctr_encryptor,
    kdf_ntor,
    kdf_tor,
)

KDF_TOR_EMPTY = (
    "5ba93c9db0cff93f52b521d7420e43f6eda2784fbf8b4530d8d246dd74ac53a13471bba17941dff7c4ea21bb"
    "365bbeeaf5f2c654883e56d11e43c44e9842926af7ca0a8cca12604f945414f07b01e13da42c6cf1de3abfde"
    "a9b95f34687cbbe92b9a7383"
)
KDF_TOR_TOR = (
    "776c6214fc647aaa5f683c737ee66ec44f03d0372e1cce69227950f236ddf1e329a7ce7c227903303f525a8c"
    "6662426e8034870642a6dabbd41b5d97ec9bf2312ea729992f48f8ea2d0ba83f45dfda1a80bdc8b80de01b23"
    "e3e0ffae099b3e4ccf28dc28"
)
NTOR_HKDF_TOR = (
    "5521492a85139a8d9107a2d5c0d9c91610d0f95989975ebee6c02a4f8d622a6cfdf9b7c7edd3832e2760ded1"
    "eac309b76f8d66c4a3c4d6225429b3a016e3c3d45911152fc87bc2de9630c3961be9fdb9f93197ea8e597718"
    "0801926d3321fa21513e59ac"
)
AES_KEY_80 = bytes.fromhex("80000000000000000000000000000000")
AES_IV0_16 = "0edd33d3c621e546455bd8ba1418bec8"
AES_WRAP_64 = (
    "2aed2bff0de54f9328efd070bf48f70a0edd33d3c621e546455bd8ba1418bec893e2c5243d6839eac5850391"
    "9192f7ae1908e67cafa08d508816659c2e693191"
)


# --------------------------------------------------------------------------- known answers


def test_constants() -> None:
    assert (CELL_PAYLOAD_LEN, RELAY_HEADER_LEN, RELAY_DATA_MAX, HOP_MATERIAL_LEN) == (
        509, 11, 498, 72)


def test_kdf_tor_known_answers() -> None:
    assert kdf_tor(b"", 100).hex() == KDF_TOR_EMPTY
    assert kdf_tor(b"Tor", 100).hex() == KDF_TOR_TOR


def test_kdf_tor_prefix_and_bounds() -> None:
    assert kdf_tor(b"Tor", 7) == bytes.fromhex(KDF_TOR_TOR)[:7]
    assert kdf_tor(b"x", 0) == b""
    assert len(kdf_tor(b"x", 5120)) == 5120
    with pytest.raises(ValueError, match="length"):
        kdf_tor(b"x", 5121)


def test_kdf_ntor_known_answer() -> None:
    assert kdf_ntor(b"Tor", 100).hex() == NTOR_HKDF_TOR
    assert kdf_ntor(b"Tor", 72) == bytes.fromhex(NTOR_HKDF_TOR)[:72]
    assert kdf_ntor(b"Tor", 0) == b""
    with pytest.raises(ValueError, match="length"):
        kdf_ntor(b"Tor", 255 * 32 + 1)


def test_aes_ctr_known_answers_with_cryptography() -> None:
    enc = Cipher(algorithms.AES(AES_KEY_80), modes.CTR(bytes(16))).encryptor()
    assert enc.update(bytes(16)).hex() == AES_IV0_16
    wrap = Cipher(algorithms.AES(AES_KEY_80), modes.CTR(b"\xff" * 16)).encryptor()
    assert wrap.update(bytes(64)).hex() == AES_WRAP_64


def test_aes_ctr_known_answers_with_own_helper() -> None:
    assert aes128_ctr_encryptor(AES_KEY_80)(bytes(16)).hex() == AES_IV0_16
    # Block number 2**128 - 1 is IV ff..ff; the next block wraps to counter 0.
    at_last_block = aes128_ctr_encryptor(AES_KEY_80, (2**128 - 1) * 16)
    assert at_last_block(bytes(64)).hex() == AES_WRAP_64
    # Offsets are taken modulo the counter space.
    assert aes128_ctr_encryptor(AES_KEY_80, 2**132)(bytes(16)).hex() == AES_IV0_16


def test_aes_ctr_helper_unaligned_offsets_continue_the_stream() -> None:
    key = bytes(range(16))
    whole = aes128_ctr_encryptor(key)(bytes(3 * CELL_PAYLOAD_LEN))
    for offset in (1, 15, 16, 17, CELL_PAYLOAD_LEN, 2 * CELL_PAYLOAD_LEN + 3):
        assert aes128_ctr_encryptor(key, offset)(bytes(100)) == whole[offset : offset + 100]
    with pytest.raises(ValueError):
        aes128_ctr_encryptor(bytes(15))
    with pytest.raises(ValueError):
        aes128_ctr_encryptor(key, -1)


def test_hop_keys_from_material() -> None:
    material = bytes(range(80))
    keys = HopKeys.from_material(material)
    assert keys.df == material[0:20]
    assert keys.db == material[20:40]
    assert keys.kf == material[40:56]
    assert keys.kb == material[56:72]
    assert HopKeys.from_material(material[:72]) == keys
    with pytest.raises(ValueError, match="72"):
        HopKeys.from_material(material[:71])
    with pytest.raises(ValueError):
        HopKeys(df=bytes(20), db=bytes(20), kf=bytes(15), kb=bytes(16))


def test_create_fast_key_split() -> None:
    x, y = bytes(range(20)), bytes(range(20, 40))
    k = kdf_tor(x + y, 92)
    keys = HopKeys.from_material(k[20:])
    assert k[:20] == hashlib.sha1(x + y + b"\x00").digest()
    assert keys.df == k[20:40] and keys.kb == k[76:92]


# --------------------------------------------------------------------------- independent model


class ModelDirection:
    """One direction of one hop, from the spec: ECB-built CTR keystream and a SHA-1 transcript."""

    def __init__(self, aes_key: bytes, digest_seed: bytes) -> None:
        self.ecb = Cipher(algorithms.AES(aes_key), modes.ECB()).encryptor()
        self.position = 0
        self.transcript = digest_seed

    def keystream(self, n: int) -> bytes:
        first_block, skip = divmod(self.position, 16)
        blocks = (skip + n + 15) // 16
        counters = b"".join(
            ((first_block + i) % 2**128).to_bytes(16, "big") for i in range(blocks)
        )
        self.position += n
        return self.ecb.update(counters)[skip : skip + n]

    def crypt(self, data: bytes) -> bytes:
        return bytes(a ^ b for a, b in zip(data, self.keystream(len(data)), strict=True))

    def set_digest(self, payload: bytes) -> bytes:
        zeroed = payload[:5] + bytes(4) + payload[9:]
        self.transcript += zeroed
        return zeroed[:5] + hashlib.sha1(self.transcript).digest()[:4] + zeroed[9:]


def _payload(n: int) -> bytes:
    body = hashlib.sha256(n.to_bytes(4, "big")).digest() * 16
    return bytes([2, 0, 0]) + body[: CELL_PAYLOAD_LEN - 3]


def _keys(n: int) -> HopKeys:
    return HopKeys.from_material(kdf_tor(n.to_bytes(2, "big"), 72))


def test_origin_encrypt_matches_model_byte_for_byte() -> None:
    hops = [_keys(i) for i in range(3)]
    origin = OriginCrypto(hops)
    fwd = [ModelDirection(k.kf, k.df) for k in hops]
    for n, hop in enumerate([2, 0, 1, 2, 2, 0]):
        cell = fwd[hop].set_digest(_payload(n))
        for i in range(hop, -1, -1):
            cell = fwd[i].crypt(cell)
        assert origin.encrypt(_payload(n), hop) == cell


def test_relay_originate_and_backward_match_model() -> None:
    keys = _keys(7)
    relay = RelayCrypto(keys)
    back = ModelDirection(keys.kb, keys.db)
    for n in range(4):
        assert relay.originate(_payload(n)) == back.crypt(back.set_digest(_payload(n)))
        assert relay.backward(_payload(n + 100)) == back.crypt(_payload(n + 100))


def test_forward_bad_digest_leaves_digest_state_and_next_cell_is_recognized() -> None:
    """A sender injects a cell with recognized == 0 but a wrong digest: the relay must not count
    it in its running digest, while its keystream moves on."""
    keys = _keys(9)
    relay = RelayCrypto(keys)
    sender = ModelDirection(keys.kf, keys.df)
    good = sender.set_digest(_payload(1))
    assert relay.forward(sender.crypt(good)) == (True, good)
    forged = bytearray(good)
    forged[20] ^= 1  # body changed, digest stale: recognized stays zero, the digest check fails
    ok, plain = relay.forward(sender.crypt(bytes(forged)))
    assert (ok, plain) == (False, bytes(forged))
    good2 = sender.set_digest(_payload(2))
    assert relay.forward(sender.crypt(good2)) == (True, good2)


def test_payload_size_is_checked() -> None:
    origin = OriginCrypto([_keys(1)])
    relay = RelayCrypto(_keys(1))
    for bad in (b"", bytes(508), bytes(510)):
        with pytest.raises(ValueError, match="509"):
            origin.encrypt(bad, 0)
        with pytest.raises(ValueError, match="509"):
            relay.forward(bad)
        with pytest.raises(ValueError, match="509"):
            relay.forward_many([bytes(509), bad])
    with pytest.raises(ValueError, match="hop index"):
        origin.encrypt(bytes(509), 1)


def test_single_unrecognized_cell_raises_and_leaves_state() -> None:
    hops = [_keys(1), _keys(2)]
    origin = OriginCrypto(hops)
    relays = [RelayCrypto(k) for k in hops]
    garbage = bytes(range(256)) * 2
    with pytest.raises(UnrecognizedCell) as info:
        origin.decrypt(garbage[:CELL_PAYLOAD_LEN])
    assert info.value.index == 0 and info.value.results == []
    cell = relays[0].backward(relays[1].originate(_payload(5)))
    hop, plain = origin.decrypt(cell)
    assert hop == 1 and plain[9:] == _payload(5)[9:]


def test_add_hop_extends_the_circuit() -> None:
    origin = OriginCrypto([_keys(1)])
    relays = [RelayCrypto(_keys(1)), RelayCrypto(_keys(2))]
    assert relays[0].forward(origin.encrypt(_payload(0), 0))[0]
    origin.add_hop(_keys(2))
    assert origin.n_hops == 2
    ok0, mid = relays[0].forward(origin.encrypt(_payload(1), 1))
    assert not ok0
    assert relays[1].forward(mid)[0]
