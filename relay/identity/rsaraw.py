"""tor's RSA signatures: PKCS#1 v1.5 padding around the bare data, with no DigestInfo.

tor signs with OpenSSL's ``RSA_private_encrypt(..., RSA_PKCS1_PADDING)``
(``crypto_pk_private_sign``): the block is ``00 01 FF..FF 00 | data`` and ``data`` is whatever
tor chose to sign, not an ASN.1 DigestInfo. Descriptors sign a bare SHA-1 digest, the RSA->Ed25519
cross-certificate a bare SHA-256 digest, and the TAP ``onion-key-crosscert`` the raw 52 bytes
``identity digest | Ed25519 master key``. ``cryptography`` can verify such signatures
(``recover_data_from_signature`` with no hash) but cannot make them, so :func:`rsa_sign_raw`
does the private-key operation with the key's private numbers (CRT) and checks the result with
the public exponent before returning it (a fault in the computation never leaves the process).

Also here: the identity digests tor names RSA keys by (SHA-1 / SHA-256 of the PKCS#1 DER).

Threads: pure functions; any thread.
"""

from __future__ import annotations

import hashlib

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

__all__ = [
    "PKCS1_OVERHEAD",
    "RSA_KEY_BITS",
    "rsa_der",
    "rsa_digest",
    "rsa_digest256",
    "rsa_recover_raw",
    "rsa_sign_raw",
]

#: Bytes of PKCS#1 v1.5 type-1 padding around the data at least (``00 01``, 8 x ``FF``, ``00``).
PKCS1_OVERHEAD = 11

#: tor's RSA key size (``PK_BYTES * 8``): the identity key and the TAP onion key.
RSA_KEY_BITS = 1024


def rsa_der(public_key: rsa.RSAPublicKey) -> bytes:
    """The PKCS#1 ``RSAPublicKey`` DER of a key (what tor hashes and puts in PEM blocks).
    Any thread (pure)."""
    return public_key.public_bytes(Encoding.DER, PublicFormat.PKCS1)


def rsa_digest(public_key: rsa.RSAPublicKey) -> bytes:
    """SHA-1 of the key's PKCS#1 DER: a relay's 20-byte identity digest (its fingerprint).
    Any thread (pure)."""
    return hashlib.sha1(rsa_der(public_key)).digest()


def rsa_digest256(public_key: rsa.RSAPublicKey) -> bytes:
    """SHA-256 of the key's PKCS#1 DER (the CID/SID of an AUTHENTICATE cell). Any thread (pure)."""
    return hashlib.sha256(rsa_der(public_key)).digest()


def rsa_sign_raw(key: rsa.RSAPrivateKey, data: bytes) -> bytes:
    """``data`` PKCS#1 v1.5 type-1 padded and raised to the private exponent, as tor's
    ``crypto_pk_private_sign``; the signature is as long as the modulus. Raises ``ValueError``
    if ``data`` does not fit (it must leave :data:`PKCS1_OVERHEAD` bytes). Any thread (pure)."""
    size = (key.key_size + 7) // 8
    if len(data) > size - PKCS1_OVERHEAD:
        raise ValueError(f"{len(data)} bytes do not fit a PKCS#1 v1.5 block of {size} bytes")
    block = b"\x00\x01" + b"\xff" * (size - 3 - len(data)) + b"\x00" + data
    message = int.from_bytes(block, "big")
    numbers = key.private_numbers()
    public = numbers.public_numbers
    # Chinese remainder theorem: two half-size exponentiations instead of one full one.
    m1 = pow(message, numbers.dmp1, numbers.p)
    m2 = pow(message, numbers.dmq1, numbers.q)
    h = numbers.iqmp * (m1 - m2) % numbers.p
    signature = m2 + h * numbers.q
    if pow(signature, public.e, public.n) != message:
        raise ValueError("RSA signature failed its own check (fault in the computation)")
    return signature.to_bytes(size, "big")


def rsa_recover_raw(public_key: rsa.RSAPublicKey, signature: bytes) -> bytes:
    """The data a :func:`rsa_sign_raw` signature carries, checked against ``public_key``
    (tor's ``crypto_pk_public_checksig``). Raises ``ValueError`` if the signature is not a
    valid PKCS#1 v1.5 type-1 block under this key. Any thread (pure)."""
    try:
        return public_key.recover_data_from_signature(signature, padding.PKCS1v15(), None)
    except (InvalidSignature, ValueError) as exc:
        raise ValueError("RSA signature does not verify under this key") from exc
