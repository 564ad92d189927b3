"""relay.identity.curve_ed: Ed25519 from expanded keys and tor's curve25519 -> Ed25519 keys.

Known answers are tor's own (src/test/ed25519_vectors.inc, used by tor's
test_crypto_ed25519_testvectors): seeds, the expanded secret keys tor stores, public keys,
the curve25519 public key of each expanded key's scalar (the ``derive ed25519 from
curve25519`` vectors) and each key's signature of its own public key. RFC 8032's first test
vector checks plain Ed25519. That the nonce half of the derived key is tor's too is proved
against a running tor in tests/test_identity_tor.py (byte-identical ntor cross-certificates).
"""

from __future__ import annotations

import os
from typing import NamedTuple

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from relay.identity.curve_ed import (
    ExpandedEd25519Key,
    clamp_curve25519,
    ed25519_from_curve25519,
    ed25519_public_from_curve25519,
    ed25519_verify,
)


class _Vector(NamedTuple):
    seed: str
    expanded: str
    public: str
    curve25519_public: str
    self_signature: str


TOR_VECTORS = [
    _Vector(
        "26c76712d89d906e6672dafa614c42e5cb1caac8c6568e4d2493087db51f0d36",
        "c0a4de23cc64392d85aa1da82b3defddbea946d13bb053bf8489fa9296281f49"
        "5022f1f7ec0dcf52f07d4c7965c4eaed121d5d88d0a8ff546b06116a20e97755",
        "c2247870536a192d142d056abefca68d6193158e7c1a59c1654c954eccaff894",
        "17ba77846e04c7ee5ca17cade774ac1884408f9701f439d4df32cbd8736c6a1f",
        "d23188eac3773a316d46006fa59c095060be8b1a23582a0dd99002a82a0662bd"
        "246d8449e172e04c5f46ac0d1404cebe4aabd8a75a1457aa06cae41f3334f104",
    ),
    _Vector(
        "fba7a5366b5cb98c2667a18783f5cf8f4f8d1a2ce939ad22a6e685edde85128d",
        "18a8a69a06790dac778e882f7e868baacfa12521a5c058f5194f3a729184514a"
        "2a656fe7799c3e41f43d756da8d9cd47a061316cfe6147e23ea2f90d1ca45f30",
        "1519a3b15816a1aafab0b213892026ebf5c0dc232c58b21088d88cb90e9b940d",
        "022be2124bc1899a78ba2b4167d191af3b59cadf94f0382bc31ce183a117f161",
        "3a785ac1201c97ee5f6f0d99323960d5f264c7825e61aa7cc81262f15bef75eb"
        "4fa5723add9b9d45b12311b6d403eb3ac79ff8e4e631fc3cd51e4ad2185b200b",
    ),
    _Vector(
        "67e3aa7a14fac8445d15e45e38a523481a69ae35513c9e4143eb1c2196729a0e",
        "58d84f8862d2ecfa30eb491a81c36d05b574310ea69dae18ecb57e992a896656"
        "b982187ee96c15bf4caeeab2d0b0ae4cd0b8d17470fc7efa98bb26428f4ef36d",
        "081faa81992e360ea22c06af1aba096e7a73f1c665bc8b3e4e531c46455fd1dd",
        "bf4fd38ef22f718f03c0a12ba5127bd1e3afd494793753f519728b29cc577571",
        "cf431fd0416bfbd20c9d95ef9b723e2acddffb33900edc72195dea95965d52d8"
        "88d30b7b8a677c0bd8ae1417b1e1a0ec6700deadd5d8b54b6689275e04a04509",
    ),
    _Vector(
        "d51385942033a76dc17f089a59e6a5a7fe80d9c526ae8ddd8c3a506b99d3d0a6",
        "50702d20b3550c6e16033db5ad4fba16436f1ecc7485be6af62b0732ceb5d173"
        "c47ccd9d044b6ea99dd99256adcc9c62191be194e7cb1a5b58ddcec85d876a2b",
        "73cfa1189a723aad7966137cbffa35140bb40d7e16eae4c40b79b5f0360dd65a",
        "56c493e490261cef31633efd2461d2b896908e90459e4eecde950a895aef681d",
        "2375380cd72d1a6c642aeddff862be8a5804b916acb72c02d9ed052c1561881a"
        "a658a5af856fcd6d43113e42f698cd6687c99efeef7f2ce045824440d26c5d00",
    ),
    _Vector(
        "5c8eac469bb3f1b85bc7cd893f52dc42a9ab66f1b02b5ce6a68e9b175d3bb433",
        "7077464c864c2ed5ed21c9916dc3b3ba6256f8b742fec67658d8d233dadc8d5a"
        "7a82c371083cc86892c2c8782dda2a09b6baf016aec51b689183ae59ce932ff2",
        "66c1a77104d86461b6f98f73acf3cd229c80624495d2d74d6fda1e940080a96b",
        "089675a3e8ff2a7d8b2844a79269c95b7f97a4b8b5ea0cbeec669c6f2dea9b39",
        "2385a472f599ca965bbe4d610e391cdeabeba9c336694b0d6249e551458280be"
        "122c2441dd9746a81bbfb9cd619364bab0df37ff4ceb7aefd24469c39d3bc508",
    ),
    _Vector(
        "eda433d483059b6d1ff8b7cfbd0fe406bfb23722c8f3c8252629284573b61b86",
        "8883c1387a6c86fc0bd7b9f157b4e4cd83f6885bf55e2706d2235d4527a2f053"
        "11a3595953282e436df0349e1bb313a19b3ddbf7a7b91ecce8a2c34abadb38b3",
        "d21c294db0e64cb2d8976625786ede1d9754186ae8197a64d72f68c792eecc19",
        "59e20dcb691c4a345fe86c8a79ac817e5b514d84bbf0512a842a08e43f7f087e",
        "e500cd0b8cfff35442f88008d894f3a2fa26ef7d3a0ca5714ae0d3e2d40caae5"
        "8ba7cdf69dd126994dad6be536fcda846d89dd8138d1683cc144c8853dce7607",
    ),
    _Vector(
        "4377c40431c30883c5fbd9bc92ae48d1ed8a47b81d13806beac5351739b5533d",
        "186791ac8d03a3ac8efed6ac360467edd5a3bed2d02b3be713ddd5be53b3287e"
        "e37436e5fd7ac43794394507ad440ecfdf59c4c255f19b768a273109e06d7d8e",
        "c4d58b4cf85a348ff3d410dd936fa460c4f18da962c01b1963792b9dcc8a6ea6",
        "9e43b820b320eda35f66f122c155b2bf8e2192c468617b7115bf067d19e08369",
        "d187b9e334b0050154de10bf69b3e4208a584e1a65015ec28b14bcc252cf84b8"
        "baa9c94867daa60f2a82d09ba9652d41e8dde292b624afc8d2c26441b95e3c0e",
    ),
    _Vector(
        "c6bbcce615839756aed2cc78b1de13884dd3618f48367a17597a16c1cd7a290b",
        "b003077c1e52a62308eef7950b2d532e1d4a7eea50ad22d8ac11b892851f1c40"
        "ffb9c9ff8dcd0c6c233f665a2e176324d92416bfcfcd1f787424c0c667452d86",
        "95126f14d86494020665face03f2d42ee2b312a85bc729903eb17522954a1c4a",
        "861f33296cb57f8f01e4a5e8a7e5d5d7043a6247586ab36dea8a1a3c4403ee30",
        "815213640a643d198bd056e02bba74e1c8d2d931643e84497adf3347eb485079"
        "c9afe0afce9284cdc084946b561abbb214f1304ca11228ff82702185cf28f60d",
    ),
]


@pytest.mark.parametrize("vector", TOR_VECTORS, ids=range(len(TOR_VECTORS)))
def test_tor_vectors_expanded_key_public_key_and_self_signature(vector: _Vector) -> None:
    key = ExpandedEd25519Key(bytes.fromhex(vector.expanded))
    assert key.public.hex() == vector.public
    assert key.sign(key.public).hex() == vector.self_signature
    assert ExpandedEd25519Key.from_seed(bytes.fromhex(vector.seed)) == key
    assert ed25519_verify(key.public, bytes.fromhex(vector.self_signature), key.public)


@pytest.mark.parametrize("vector", TOR_VECTORS, ids=range(len(TOR_VECTORS)))
def test_tor_vectors_curve25519_to_ed25519(vector: _Vector) -> None:
    scalar = bytes.fromhex(vector.expanded)[:32]
    curve_public = X25519PrivateKey.from_private_bytes(scalar).public_key().public_bytes_raw()
    assert curve_public.hex() == vector.curve25519_public
    derived, sign_bit = ed25519_from_curve25519(scalar)
    assert derived.public.hex() == vector.public
    assert sign_bit == bytes.fromhex(vector.public)[31] >> 7
    rebuilt = ed25519_public_from_curve25519(curve_public, sign_bit)
    assert rebuilt.hex() == vector.public
    wrong = ed25519_public_from_curve25519(curve_public, 1 - sign_bit)
    assert wrong != rebuilt and wrong[:31] == rebuilt[:31]


def test_rfc8032_test_1_and_agreement_with_cryptography() -> None:
    seed = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
    key = ExpandedEd25519Key.from_seed(seed)
    assert key.public.hex() == (
        "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")
    assert key.sign(b"").hex() == (
        "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e06522490155"
        "5fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b")
    for length in (0, 1, 64, 1000):
        message = os.urandom(length)
        seed = os.urandom(32)
        assert ExpandedEd25519Key.from_seed(seed).sign(message) == (
            Ed25519PrivateKey.from_private_bytes(seed).sign(message))


def test_derived_keys_sign_and_rebuild_from_the_public_curve25519_key() -> None:
    for _ in range(20):
        secret = clamp_curve25519(os.urandom(32))
        curve_public = X25519PrivateKey.from_private_bytes(secret).public_key().public_bytes_raw()
        derived, sign_bit = ed25519_from_curve25519(secret)
        assert ed25519_public_from_curve25519(curve_public, sign_bit) == derived.public
        message = os.urandom(40)
        signature = derived.sign(message)
        assert ed25519_verify(derived.public, signature, message)
        assert not ed25519_verify(derived.public, signature, message + b"x")
        flipped = bytes((signature[0] ^ 1,)) + signature[1:]
        assert not ed25519_verify(derived.public, flipped, message)


def test_unclamped_curve25519_secret_derives_the_same_key_as_its_clamped_form() -> None:
    secret = bytes(range(32))
    assert clamp_curve25519(secret) != secret
    assert ed25519_from_curve25519(secret) == ed25519_from_curve25519(clamp_curve25519(secret))


@pytest.mark.parametrize("bad", [b"", bytes(63), bytes(65)])
def test_expanded_key_length_refused(bad: bytes) -> None:
    with pytest.raises(ValueError, match="64 bytes"):
        ExpandedEd25519Key(bad)


def test_expanded_key_with_bit_255_refused() -> None:
    with pytest.raises(ValueError, match="bit 255"):
        ExpandedEd25519Key(bytes(31) + b"\x80" + bytes(32))


def test_curve_conversion_refuses_bad_input() -> None:
    with pytest.raises(ValueError, match="sign bit"):
        ed25519_public_from_curve25519(bytes(32), 2)
    with pytest.raises(ValueError, match="32 bytes"):
        ed25519_public_from_curve25519(bytes(31), 0)
    assert not ed25519_verify(bytes(31), bytes(64), b"")
    assert not ed25519_verify(bytes(32), bytes(63), b"")
