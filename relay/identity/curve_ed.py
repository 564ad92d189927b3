"""Ed25519 signing with an *expanded* secret key, and tor's curve25519 -> ed25519 conversion.

Why this module exists
----------------------
tor keeps Ed25519 secret keys in their expanded 64-byte form ``a | prefix`` (``a`` the clamped
scalar, ``prefix`` the nonce key; RFC 8032 5.1.5 computes both from a 32-byte seed with
SHA-512). Its key files hold only that form, and the ntor onion key's cross-certificate is
signed with an Ed25519 key that has *no* seed at all: ``a`` is the curve25519 onion secret
itself and ``prefix = SHA-512(a | "Derive high part of ed25519 key from curve25519 key\\0")[:32]``
(tor's ``ed25519_keypair_from_curve25519_keypair``, proposal 228). ``cryptography`` signs only
from a seed, so :class:`ExpandedEd25519Key` signs from the expanded form (RFC 8032 5.1.6 steps
2-6) with libsodium's group and scalar primitives (PyNaCl), which run in constant time.

The curve25519 public key ``u`` and that Ed25519 key ``A = a*B`` are the same point on two
birationally equivalent curves: ``y = (u - 1) / (u + 1) mod p`` gives ``A``'s y coordinate,
and the one bit a Montgomery u coordinate loses, the sign of ``x``, travels beside the
certificate (the ``ntor-onion-key-crosscert 0|1`` line). :func:`ed25519_public_from_curve25519`
is that map (public values only, plain integer arithmetic).

Verification uses ``cryptography`` (:func:`ed25519_verify`).

Threads: no shared state; every function and method may be called from any thread (pure).
"""

from __future__ import annotations

import hashlib
import os

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from nacl import bindings as _sodium

__all__ = [
    "CURVE25519_DERIVE_STRING",
    "CURVE25519_KEY_LEN",
    "ED25519_EXPANDED_KEY_LEN",
    "ED25519_KEY_LEN",
    "ED25519_SIG_LEN",
    "ExpandedEd25519Key",
    "clamp_curve25519",
    "ed25519_from_curve25519",
    "ed25519_public_from_curve25519",
    "ed25519_verify",
]

#: The string (with its terminating NUL, as tor hashes ``sizeof(string)`` bytes) that derives
#: the nonce half of the Ed25519 key made from a curve25519 secret.
CURVE25519_DERIVE_STRING = b"Derive high part of ed25519 key from curve25519 key\x00"

#: Bytes of a curve25519 key (secret or public).
CURVE25519_KEY_LEN = 32
#: Bytes of an Ed25519 public key or seed.
ED25519_KEY_LEN = 32
#: Bytes of an expanded Ed25519 secret key ``a | prefix``.
ED25519_EXPANDED_KEY_LEN = 64
#: Bytes of an Ed25519 signature.
ED25519_SIG_LEN = 64

_P = 2**255 - 19


def clamp_curve25519(secret: bytes) -> bytes:
    """``secret`` with RFC 7748's clamping applied (low 3 bits clear, bit 255 clear, bit 254
    set), as tor stores curve25519 secrets. X25519 clamps anyway, so the key is unchanged; the
    Ed25519 key derived from it needs the clamped bytes. Any thread (pure)."""
    if len(secret) != CURVE25519_KEY_LEN:
        raise ValueError(f"a curve25519 secret key is {CURVE25519_KEY_LEN} bytes, "
                         f"got {len(secret)}")
    clamped = bytearray(secret)
    clamped[0] &= 248
    clamped[31] &= 127
    clamped[31] |= 64
    return bytes(clamped)


def _reduce(wide: bytes) -> bytes:
    """A 64-byte little-endian integer modulo the group order L, as 32 bytes."""
    return _sodium.crypto_core_ed25519_scalar_reduce(wide)


class ExpandedEd25519Key:
    """An Ed25519 key pair held as tor holds it: the 64-byte expanded secret ``a | prefix``.

    ``public`` is ``a*B`` encoded (RFC 8032); :meth:`sign` makes standard Ed25519 signatures
    that any verifier accepts. Immutable. Any thread (pure)."""

    __slots__ = ("_a_reduced", "_expanded", "public")

    def __init__(self, expanded: bytes) -> None:
        """Wrap an expanded secret key (64 bytes: clamped scalar, then nonce key).
        Any thread (pure)."""
        if len(expanded) != ED25519_EXPANDED_KEY_LEN:
            raise ValueError(f"an expanded Ed25519 secret key is {ED25519_EXPANDED_KEY_LEN} bytes, "
                             f"got {len(expanded)}")
        scalar = expanded[:ED25519_KEY_LEN]
        if scalar[31] & 0x80:
            raise ValueError("expanded Ed25519 secret key: bit 255 of the scalar is set")
        self._expanded = bytes(expanded)
        self._a_reduced = _reduce(scalar + bytes(ED25519_KEY_LEN))
        try:
            self.public = _sodium.crypto_scalarmult_ed25519_base_noclamp(scalar)
        except Exception as exc:  # libsodium refuses a zero scalar (identity point)
            raise ValueError("expanded Ed25519 secret key has a degenerate scalar") from exc

    @classmethod
    def from_seed(cls, seed: bytes) -> ExpandedEd25519Key:
        """The key RFC 8032 derives from a 32-byte seed (SHA-512, clamp the low half).
        Any thread (pure)."""
        if len(seed) != ED25519_KEY_LEN:
            raise ValueError(f"an Ed25519 seed is {ED25519_KEY_LEN} bytes, got {len(seed)}")
        digest = hashlib.sha512(seed).digest()
        scalar = bytearray(digest[:ED25519_KEY_LEN])
        scalar[0] &= 248
        scalar[31] &= 127
        scalar[31] |= 64
        return cls(bytes(scalar) + digest[ED25519_KEY_LEN:])

    @classmethod
    def generate(cls) -> ExpandedEd25519Key:
        """A fresh key from 32 bytes of the OS's randomness. Any thread."""
        return cls.from_seed(os.urandom(ED25519_KEY_LEN))

    @property
    def expanded(self) -> bytes:
        """The 64-byte expanded secret key (what tor's key files hold). Any thread (pure)."""
        return self._expanded

    def sign(self, message: bytes) -> bytes:
        """The 64-byte Ed25519 signature ``R | S`` of ``message`` (RFC 8032 5.1.6 from step 2):
        ``r = H(prefix | M) mod L``, ``R = r*B``, ``S = r + H(R | A | M)*a mod L``.
        Any thread (pure)."""
        r = _reduce(hashlib.sha512(self._expanded[ED25519_KEY_LEN:] + message).digest())
        big_r = _sodium.crypto_scalarmult_ed25519_base_noclamp(r)
        k = _reduce(hashlib.sha512(big_r + self.public + message).digest())
        s = _sodium.crypto_core_ed25519_scalar_add(
            _sodium.crypto_core_ed25519_scalar_mul(k, self._a_reduced), r
        )
        return big_r + s

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ExpandedEd25519Key) and other._expanded == self._expanded

    def __hash__(self) -> int:
        return hash(self.public)

    def __repr__(self) -> str:
        return f"ExpandedEd25519Key(public={self.public.hex()})"


def ed25519_from_curve25519(curve_secret: bytes) -> tuple[ExpandedEd25519Key, int]:
    """tor's Ed25519 key pair for a curve25519 onion secret, and the sign bit of its public key.

    The scalar is the (clamped) curve25519 secret itself, the nonce key the first half of
    ``SHA-512(secret | CURVE25519_DERIVE_STRING)``; the sign bit is bit 255 of the public key,
    which :func:`ed25519_public_from_curve25519` needs to rebuild it from the curve25519 public
    key. Only for cross-certifying the onion key (never sign what a peer chose with it).
    Any thread (pure)."""
    secret = clamp_curve25519(curve_secret)
    nonce_key = hashlib.sha512(secret + CURVE25519_DERIVE_STRING).digest()[:ED25519_KEY_LEN]
    key = ExpandedEd25519Key(secret + nonce_key)
    return key, key.public[31] >> 7


def ed25519_public_from_curve25519(curve_public: bytes, sign_bit: int) -> bytes:
    """The Ed25519 public key whose Montgomery form is ``curve_public`` and whose x coordinate
    has sign ``sign_bit``: ``y = (u - 1) / (u + 1) mod p`` with the sign in bit 255. Like tor,
    bit 255 of ``u`` is ignored and ``u = -1`` maps to ``y = 0``. Any thread (pure)."""
    if len(curve_public) != CURVE25519_KEY_LEN:
        raise ValueError(f"a curve25519 public key is {CURVE25519_KEY_LEN} bytes, "
                         f"got {len(curve_public)}")
    if sign_bit not in (0, 1):
        raise ValueError(f"sign bit must be 0 or 1, got {sign_bit!r}")
    u = int.from_bytes(curve_public, "little") & ((1 << 255) - 1)
    y = (u - 1) * pow(u + 1, _P - 2, _P) % _P
    encoded = bytearray(y.to_bytes(ED25519_KEY_LEN, "little"))
    encoded[31] |= sign_bit << 7
    return bytes(encoded)


def ed25519_verify(public: bytes, signature: bytes, message: bytes) -> bool:
    """Whether ``signature`` is a valid Ed25519 signature of ``message`` by ``public`` (False
    for malformed keys or signatures too). Any thread (pure)."""
    if len(public) != ED25519_KEY_LEN or len(signature) != ED25519_SIG_LEN:
        return False
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True
