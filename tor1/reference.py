"""Tor's "tor1" relay-cell crypto: byte-exact pure-Python reference.

What a circuit's crypto is
--------------------------
Every hop of a circuit shares 72 bytes of key material with the client: ``Df | Db | Kf | Kb``
(:class:`HopKeys`). Each direction (forward = away from the client, backward = toward it) of
each hop owns two pieces of *stream* state that live as long as the circuit:

* an AES-128-CTR keystream (IV zero, full 128-bit big-endian counter); each 509-byte cell
  payload continues where the previous one stopped. One persistent ``cryptography`` encryptor
  per direction per hop holds it (CTR encryption and decryption are the same operation);
* a running SHA-1, seeded with ``Df`` (forward) or ``Db`` (backward). "Setting" a cell's digest
  feeds the whole payload (digest field zeroed) into the running hash and writes the first four
  bytes of a finalized *copy* at offset 5; "checking" does the same on a copy and keeps the
  advanced copy only when the four bytes match (compared in constant time).

Because both are streams, a circuit's cells must be processed strictly in order, per direction.

Roles
-----
* :class:`OriginCrypto` is the client's side of one circuit (all its hops).
  ``encrypt(payload, hop)`` sets the digest with that hop's forward hash and applies Kf of that
  hop, then of every hop before it. ``decrypt(payload)`` peels Kb layers from hop 0 outward and
  returns the first hop that recognizes the cell.
* :class:`RelayCrypto` is one relay's side of one circuit. ``forward`` decrypts with Kf and
  checks recognition; ``backward`` encrypts with Kb; ``originate`` sets the digest with Db's
  hash and then encrypts with Kb.

Batch forms (``*_many``) give exactly the results of the one-cell calls in sequence; they join
the payloads and run each AES layer over the whole batch in one call where the algorithm allows
it (one call per hop layer for ``encrypt_many``, one call in total for ``forward_many``,
``backward_many`` and ``originate_many``). Calls of 2048 bytes or more let ``cryptography``
release the GIL for the cipher work.

SENDME tags (flow control v1)
-----------------------------
tor authenticates a circuit-level SENDME with the *tag* of the DATA cell that triggered it:
the whole 20-byte running digest as it stands after that cell (tor's ``sendme_digest``,
``relay_crypto_get_sendme_tag``), kept by the cell's sender and sent back by its receiver. The
*tagged* batch forms return it next to the usual result, for chosen cells, joined in order:

* ``RelayCrypto.forward_tagged_many`` / ``OriginCrypto.decrypt_tagged_many``: every cell
  recognized (the recognizing hop's digest);
* ``RelayCrypto.originate_tagged_many`` / ``OriginCrypto.encrypt_tagged_many``: every *marked*
  cell, one whose digest field (``payload[5:9]``) is not zero on input. That field is taken as
  zero and overwritten in any case, so marking changes no output byte: it only says "remember
  this one", in the payload itself, so the mark survives any joining of batches.

Unrecognized cells at the origin
--------------------------------
``OriginCrypto.decrypt`` raises :class:`UnrecognizedCell` when no hop recognizes a cell; the
caller must close the circuit. The state is then rewound to what it was before the cell (the
backward keystreams are re-positioned), so a failed call has no effect. ``decrypt_many`` stops
at the first such cell and raises :class:`UnrecognizedCell` whose ``index`` is that cell's
position and whose ``results`` are the ``(hop, plaintext)`` pairs of the cells before it; the
state is exactly as after the last good cell.

Threads
-------
Nothing here touches global mutable state. The key-derivation functions and :class:`HopKeys` are
immutable and may be used from any thread. An :class:`OriginCrypto` or :class:`RelayCrypto` is
*not* thread-safe: exactly one thread at a time may call its methods (the worker pool gives a
circuit to at most one worker at a time, and that hand-over is what orders the memory accesses).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from tor1 import CELL_PAYLOAD_LEN, RELAY_DIGEST_LEN, RELAY_DIGEST_OFFSET
from tor1.payloads import check_payload, join_checked, split_joined

__all__ = [
    "DIGEST_LEN",
    "HOP_MATERIAL_LEN",
    "KEY_LEN",
    "NTOR_M_EXPAND",
    "NTOR_PROTOID",
    "NTOR_T_KEY",
    "HopKeys",
    "OriginCrypto",
    "RelayCrypto",
    "UnrecognizedCell",
    "aes128_ctr_encryptor",
    "kdf_ntor",
    "kdf_tor",
]

DIGEST_LEN = 20
"""Length of Df / Db (SHA-1 seeds)."""
KEY_LEN = 16
"""Length of Kf / Kb (AES-128 keys)."""
HOP_MATERIAL_LEN = 2 * DIGEST_LEN + 2 * KEY_LEN
"""72 bytes of key material per hop: Df | Db | Kf | Kb."""

NTOR_PROTOID = b"ntor-curve25519-sha256-1"
NTOR_T_KEY = NTOR_PROTOID + b":key_extract"
NTOR_M_EXPAND = NTOR_PROTOID + b":key_expand"

_KDF_TOR_MAX = 256 * hashlib.sha1().digest_size
_NTOR_HKDF_MAX = 255 * hashlib.sha256().digest_size
_AES_BLOCK = 16
_COUNTER_SPACE = 1 << 128
_DIGEST_SLICE_START = RELAY_DIGEST_OFFSET
_DIGEST_SLICE_END = RELAY_DIGEST_OFFSET + RELAY_DIGEST_LEN
_ZERO_DIGEST = bytes(RELAY_DIGEST_LEN)
_ZERO_IV = bytes(_AES_BLOCK)


# --------------------------------------------------------------------------- key derivation


def kdf_tor(key0: bytes, length: int) -> bytes:
    """KDF-TOR: ``SHA1(K0|00) | SHA1(K0|01) | ...`` truncated to ``length`` bytes.

    Used by CREATE_FAST (``K0 = X | Y``). At most 5120 bytes (one-byte counter). Any thread.
    """
    if not 0 <= length <= _KDF_TOR_MAX:
        raise ValueError(f"kdf_tor: length must be 0..{_KDF_TOR_MAX}, got {length}")
    key0 = bytes(key0)
    blocks = (length + 19) // 20
    out = b"".join(hashlib.sha1(key0 + bytes((i,))).digest() for i in range(blocks))
    return out[:length]


def kdf_ntor(secret_input: bytes, length: int) -> bytes:
    """HKDF-SHA256 (RFC 5869) with Tor's ntor salt ``t_key`` and info ``m_expand``.

    ``secret_input`` is the IKM. For a hop: ``Df, Db, Kf, Kb`` (72 bytes) then a 20-byte nonce
    KH. At most 8160 bytes. Any thread.
    """
    if not 0 <= length <= _NTOR_HKDF_MAX:
        raise ValueError(f"kdf_ntor: length must be 0..{_NTOR_HKDF_MAX}, got {length}")
    if length == 0:
        return b""
    hkdf = HKDF(algorithm=hashes.SHA256(), length=length, salt=NTOR_T_KEY, info=NTOR_M_EXPAND)
    return hkdf.derive(bytes(secret_input))


def aes128_ctr_encryptor(key: bytes, byte_offset: int = 0) -> Callable[[bytes], bytes]:
    """Return the ``update`` of an AES-128-CTR stream (IV zero) positioned ``byte_offset`` in.

    The counter is the full 128-bit big-endian block number, so it wraps after ``2**128``
    blocks: ``byte_offset`` is taken modulo ``2**132``. Used to re-position a circuit's
    keystream, and by tests to reach the counter wrap. The returned callable belongs to the
    caller's thread like any other stream state.
    """
    if len(key) != KEY_LEN:
        raise ValueError(f"AES-128 key must be {KEY_LEN} bytes, got {len(key)}")
    if byte_offset < 0:
        raise ValueError(f"byte_offset must be >= 0, got {byte_offset}")
    block, skip = divmod(byte_offset, _AES_BLOCK)
    iv = (block % _COUNTER_SPACE).to_bytes(_AES_BLOCK, "big")
    update = Cipher(algorithms.AES(bytes(key)), modes.CTR(iv)).encryptor().update
    if skip:
        update(bytes(skip))
    return update


# --------------------------------------------------------------------------- keys


@dataclass(frozen=True, slots=True)
class HopKeys:
    """One hop's key material: forward/backward digest seeds and AES keys. Immutable."""

    df: bytes
    db: bytes
    kf: bytes
    kb: bytes

    def __post_init__(self) -> None:
        for name, value, size in (
            ("df", self.df, DIGEST_LEN),
            ("db", self.db, DIGEST_LEN),
            ("kf", self.kf, KEY_LEN),
            ("kb", self.kb, KEY_LEN),
        ):
            if not isinstance(value, bytes) or len(value) != size:
                raise ValueError(f"HopKeys.{name} must be {size} bytes")

    @classmethod
    def from_material(cls, material: bytes) -> HopKeys:
        """Split ``Df | Db | Kf | Kb`` from the first 72 bytes; shorter input: ``ValueError``."""
        if len(material) < HOP_MATERIAL_LEN:
            raise ValueError(
                f"hop key material must be at least {HOP_MATERIAL_LEN} bytes, got {len(material)}"
            )
        m = bytes(material[:HOP_MATERIAL_LEN])
        keys = 2 * DIGEST_LEN
        return cls(df=m[:DIGEST_LEN], db=m[DIGEST_LEN:keys], kf=m[keys:keys + KEY_LEN],
                   kb=m[keys + KEY_LEN:HOP_MATERIAL_LEN])


# --------------------------------------------------------------------------- exceptions


class UnrecognizedCell(Exception):
    """No hop recognized a cell arriving at the origin: the caller must close the circuit.

    ``index`` is the position of the bad cell in the batch (0 for a one-cell call) and
    ``results`` the ``(hop, plaintext)`` results of the cells before it, already applied.
    """

    def __init__(self, index: int = 0, results: list[tuple[int, bytes]] | None = None) -> None:
        self.index = index
        self.results: list[tuple[int, bytes]] = results if results is not None else []
        super().__init__(f"relay cell {index} not recognized by any hop; close the circuit")


# --------------------------------------------------------------------------- helpers


def _set_digest(running: hashlib._Hash, payload: bytes) -> tuple[bytes, bytes]:
    """Feed ``payload`` (digest field zeroed) to ``running``; return it with the digest set,
    and the whole 20-byte digest (the cell's SENDME tag)."""
    head = payload[:_DIGEST_SLICE_START]
    tail = payload[_DIGEST_SLICE_END:]
    running.update(head)
    running.update(_ZERO_DIGEST)
    running.update(tail)
    digest = running.copy().digest()
    return head + digest[:4] + tail, digest


def _recognized(running: hashlib._Hash, plain: bytes) -> tuple[hashlib._Hash, bytes] | None:
    """The advanced digest state and the whole 20-byte digest (the cell's SENDME tag) if
    ``plain`` is recognized by ``running``, else None.

    ``running`` itself is never modified: on a match the caller swaps in the returned copy,
    which is the "checkpoint and restore" of the spec without a restore step.
    """
    if plain[1] or plain[2]:
        return None
    trial = running.copy()
    trial.update(plain[:_DIGEST_SLICE_START])
    trial.update(_ZERO_DIGEST)
    trial.update(plain[_DIGEST_SLICE_END:])
    digest = trial.digest()
    if hmac.compare_digest(digest[:RELAY_DIGEST_LEN],
                           plain[_DIGEST_SLICE_START:_DIGEST_SLICE_END]):
        return trial, digest
    return None


def _marked(payload: bytes) -> bool:
    """True when the caller asks for this plaintext's tag: its digest field is not zero."""
    return payload[_DIGEST_SLICE_START:_DIGEST_SLICE_END] != _ZERO_DIGEST


def _set_digests(running: hashlib._Hash, payloads: Sequence[bytes],
                 tags: list[bytes] | None) -> bytes:
    """Set the digest of each payload in order and join them; with ``tags``, append the tag
    of every marked payload to it. Every size is checked before any digest moves."""
    checked = [bytes(check_payload(payload)) for payload in payloads]
    cells: list[bytes] = []
    for payload in checked:
        cell, digest = _set_digest(running, payload)
        if tags is not None and _marked(payload):
            tags.append(digest)
        cells.append(cell)
    return b"".join(cells)


# --------------------------------------------------------------------------- origin


class OriginCrypto:
    """The client's crypto state for one circuit of N hops (hop 0 is the guard).

    Not thread-safe: one thread at a time (the worker that owns the circuit).
    """

    __slots__ = ("_back_cells", "_back_ciphers", "_back_digests", "_fwd_ciphers",
                 "_fwd_digests", "_keys")

    def __init__(self, hops: Sequence[HopKeys]) -> None:
        self._keys: list[HopKeys] = []
        self._fwd_ciphers: list[Callable[[bytes], bytes]] = []
        self._back_ciphers: list[Callable[[bytes], bytes]] = []
        self._fwd_digests: list[hashlib._Hash] = []
        self._back_digests: list[hashlib._Hash] = []
        self._back_cells: list[int] = []
        for keys in hops:
            self.add_hop(keys)

    @property
    def n_hops(self) -> int:
        """Number of hops this circuit has keys for."""
        return len(self._keys)

    def add_hop(self, keys: HopKeys) -> None:
        """Append a hop (after an EXTENDED2): its state starts fresh at keystream position 0."""
        self._keys.append(keys)
        self._fwd_ciphers.append(aes128_ctr_encryptor(keys.kf))
        self._back_ciphers.append(aes128_ctr_encryptor(keys.kb))
        self._fwd_digests.append(hashlib.sha1(keys.df))
        self._back_digests.append(hashlib.sha1(keys.db))
        self._back_cells.append(0)

    def _check_hop(self, hop: int) -> None:
        if not 0 <= hop < len(self._keys):
            raise ValueError(f"hop index {hop} out of range for a {len(self._keys)}-hop circuit")

    def encrypt(self, payload: bytes, hop: int) -> bytes:
        """Set the digest with ``hop``'s forward hash, then apply Kf of hop, hop-1, ..., 0.

        ``payload`` is a 509-byte plaintext relay payload whose ``recognized`` field is zero
        (its digest field is overwritten). Returns the 509 bytes to send.
        """
        self._check_hop(hop)
        cell, _ = _set_digest(self._fwd_digests[hop], bytes(check_payload(payload)))
        ciphers = self._fwd_ciphers
        for i in range(hop, -1, -1):
            cell = ciphers[i](cell)
        return cell

    def encrypt_many(self, payloads: Sequence[bytes], hop: int) -> list[bytes]:
        """``encrypt`` for each payload in order, with one AES call per hop layer."""
        return self._encrypt_all(payloads, hop, None)

    def encrypt_tagged_many(self, payloads: Sequence[bytes], hop: int
                            ) -> tuple[list[bytes], bytes]:
        """``encrypt_many``, and the tags of the marked payloads joined: ``hop``'s forward
        digest after each (see "SENDME tags" above)."""
        tags: list[bytes] = []
        cells = self._encrypt_all(payloads, hop, tags)
        return cells, b"".join(tags)

    def _encrypt_all(self, payloads: Sequence[bytes], hop: int,
                     tags: list[bytes] | None) -> list[bytes]:
        self._check_hop(hop)
        if not payloads:
            return []
        joined = _set_digests(self._fwd_digests[hop], payloads, tags)
        ciphers = self._fwd_ciphers
        for i in range(hop, -1, -1):
            joined = ciphers[i](joined)
        return split_joined(joined, len(payloads))

    def decrypt(self, payload: bytes) -> tuple[int, bytes]:
        """Peel Kb layers from hop 0 outward; return ``(hop, plaintext)`` of the first hop that
        recognizes the cell. None does: raise :class:`UnrecognizedCell`, state unchanged."""
        hop, cell, _ = self._decrypt_one(payload)
        return hop, cell

    def _decrypt_one(self, payload: bytes) -> tuple[int, bytes, bytes]:
        """``decrypt``, plus the cell's tag (the recognizing hop's backward digest after it)."""
        cell = bytes(check_payload(payload))
        ciphers = self._back_ciphers
        digests = self._back_digests
        counts = self._back_cells
        for i in range(len(ciphers)):
            cell = ciphers[i](cell)
            counts[i] += 1
            match = _recognized(digests[i], cell)
            if match is not None:
                digests[i] = match[0]
                return i, cell, match[1]
        self._rewind_backward(len(ciphers))
        raise UnrecognizedCell(0, [])

    def decrypt_many(self, payloads: Sequence[bytes]) -> list[tuple[int, bytes]]:
        """``decrypt`` for each payload in order.

        On the first unrecognized cell, raises :class:`UnrecognizedCell` with ``index`` set to
        its position and ``results`` holding the results of the cells before it; the state is
        exactly as after those cells.
        """
        return self._decrypt_all(payloads, None)

    def decrypt_tagged_many(self, payloads: Sequence[bytes]
                            ) -> tuple[list[tuple[int, bytes]], bytes]:
        """``decrypt_many``, and the tag of every cell joined: the backward digest of the hop
        that recognized it, after it. An unrecognized cell raises as ``decrypt_many`` does (the
        tags of the cells before it are not reported)."""
        tags: list[bytes] = []
        results = self._decrypt_all(payloads, tags)
        return results, b"".join(tags)

    def _decrypt_all(self, payloads: Sequence[bytes],
                     tags: list[bytes] | None) -> list[tuple[int, bytes]]:
        results: list[tuple[int, bytes]] = []
        for index, payload in enumerate(payloads):
            try:
                hop, cell, tag = self._decrypt_one(payload)
            except UnrecognizedCell:
                raise UnrecognizedCell(index, results) from None
            results.append((hop, cell))
            if tags is not None:
                tags.append(tag)
        return results

    def _rewind_backward(self, touched: int) -> None:
        """Undo one cell on the backward keystreams of hops 0..touched-1."""
        for i in range(touched):
            self._back_cells[i] -= 1
            self._back_ciphers[i] = aes128_ctr_encryptor(
                self._keys[i].kb, self._back_cells[i] * CELL_PAYLOAD_LEN
            )


# --------------------------------------------------------------------------- relay


class RelayCrypto:
    """One relay's crypto state for one circuit (its own hop's keys only).

    Not thread-safe: one thread at a time (the worker that owns the circuit).
    """

    __slots__ = ("_back_cipher", "_back_digest", "_fwd_cipher", "_fwd_digest", "keys")

    def __init__(self, keys: HopKeys) -> None:
        self.keys = keys
        self._fwd_cipher = aes128_ctr_encryptor(keys.kf)
        self._back_cipher = aes128_ctr_encryptor(keys.kb)
        self._fwd_digest = hashlib.sha1(keys.df)
        self._back_digest = hashlib.sha1(keys.db)

    def forward(self, payload: bytes) -> tuple[bool, bytes]:
        """Decrypt a cell moving away from the client with Kf.

        ``(True, plaintext)`` if it is recognized and its digest matches (forward digest state
        advances); ``(False, decrypted)`` to pass on otherwise (digest state untouched).
        """
        plain = self._fwd_cipher(bytes(check_payload(payload)))
        match = _recognized(self._fwd_digest, plain)
        if match is None:
            return False, plain
        self._fwd_digest = match[0]
        return True, plain

    def forward_many(self, payloads: Sequence[bytes]) -> list[tuple[bool, bytes]]:
        """``forward`` for each payload in order, with one AES call for the whole batch."""
        return self._forward_all(payloads, None)

    def forward_tagged_many(self, payloads: Sequence[bytes]
                            ) -> tuple[list[tuple[bool, bytes]], bytes]:
        """``forward_many``, and the tag of every recognized cell joined: the forward digest
        after it (see "SENDME tags" above)."""
        tags: list[bytes] = []
        results = self._forward_all(payloads, tags)
        return results, b"".join(tags)

    def _forward_all(self, payloads: Sequence[bytes],
                     tags: list[bytes] | None) -> list[tuple[bool, bytes]]:
        if not payloads:
            return []
        plains = split_joined(self._fwd_cipher(join_checked(payloads)), len(payloads))
        results: list[tuple[bool, bytes]] = []
        append = results.append
        for plain in plains:
            if plain[1] or plain[2]:
                append((False, plain))
                continue
            match = _recognized(self._fwd_digest, plain)
            if match is None:
                append((False, plain))
            else:
                self._fwd_digest = match[0]
                if tags is not None:
                    tags.append(match[1])
                append((True, plain))
        return results

    def backward(self, payload: bytes) -> bytes:
        """Encrypt a cell moving toward the client with Kb (relaying; no digest)."""
        return self._back_cipher(bytes(check_payload(payload)))

    def backward_many(self, payloads: Sequence[bytes]) -> list[bytes]:
        """``backward`` for each payload in order, in one AES call."""
        if not payloads:
            return []
        return split_joined(self._back_cipher(join_checked(payloads)), len(payloads))

    def originate(self, payload: bytes) -> bytes:
        """Set the digest with Db's running hash, then encrypt with Kb (a cell this relay sends
        toward the client). ``recognized`` must be zero; the digest field is overwritten."""
        cell, _ = _set_digest(self._back_digest, bytes(check_payload(payload)))
        return self._back_cipher(cell)

    def originate_many(self, payloads: Sequence[bytes]) -> list[bytes]:
        """``originate`` for each payload in order, in one AES call."""
        return self._originate_all(payloads, None)

    def originate_tagged_many(self, payloads: Sequence[bytes]) -> tuple[list[bytes], bytes]:
        """``originate_many``, and the tags of the marked payloads joined: the backward digest
        after each (see "SENDME tags" above)."""
        tags: list[bytes] = []
        cells = self._originate_all(payloads, tags)
        return cells, b"".join(tags)

    def _originate_all(self, payloads: Sequence[bytes],
                       tags: list[bytes] | None) -> list[bytes]:
        if not payloads:
            return []
        joined = _set_digests(self._back_digest, payloads, tags)
        return split_joined(self._back_cipher(joined), len(payloads))
