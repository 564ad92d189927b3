"""The documents a bridge or directory cache serves, each kept in every encoding it serves.

A request must cost no compression, so every document is compressed once, when it enters the
store, into each encoding a server may choose for it (:mod:`relay.dirhttp`):

* a consensus (either flavor), which tor serves from precompressed copies, in ``identity``,
  ``deflate``, ``gzip`` and ``x-tor-lzma``;
* key certificates, microdescriptors and the relay's own server descriptor, which tor
  compresses while sending (never with lzma), in ``identity``, ``deflate`` and ``gzip``, *one
  member per document*: an answer naming several documents is the concatenation of their
  members, which tor's decoder reads as one body (it restarts on leftover input).

Making a :class:`Stored` document is pure and may run on any thread (the cache compresses off
the loop thread); the :class:`DirStore` that holds them is the loop thread's. Documents are
installed whole and replaced whole, so a reader never sees half of an update.

Threads: :func:`store_document`, :func:`stored_consensus`, the ``stored_*`` helpers and the
frozen values are pure (any thread); :class:`DirStore` is loop thread only (no locks: one
thread reads and writes it).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from relay.dirdocs import (
    ConsensusInfo,
    KeyCertificate,
    ServerDescriptorInfo,
    parse_server_descriptor_info,
)
from relay.dirhttp import IDENTITY, compress, is_compression_bomb

__all__ = [
    "CONSENSUS_ENCODINGS",
    "ITEM_ENCODINGS",
    "DirStore",
    "Stored",
    "StoredCertificate",
    "StoredConsensus",
    "StoredDescriptor",
    "store_document",
    "stored_certificate",
    "stored_consensus",
    "stored_descriptor",
]

#: Encodings kept for a consensus (tor's precompressed set, less zstd).
CONSENSUS_ENCODINGS = ("x-tor-lzma", "deflate", "gzip", IDENTITY)
#: Encodings kept for documents tor compresses while sending (its streaming set, less zstd).
ITEM_ENCODINGS = ("deflate", "gzip", IDENTITY)


@dataclass(frozen=True)
class Stored:
    """One document: ``forms[encoding]`` is its bytes in that encoding (``identity``: as
    fetched)."""

    forms: dict[str, bytes]

    @property
    def text(self) -> bytes:
        """The document itself. Any thread."""
        return self.forms[IDENTITY]


def store_document(text: bytes, encodings: Iterable[str]) -> Stored:
    """Compress ``text`` once per encoding. An encoding whose result tor would call a
    compression bomb is left out (a server then picks another). Any thread (pure, CPU-bound)."""
    forms = {IDENTITY: text}
    for encoding in encodings:
        if encoding != IDENTITY:
            packed = compress(text, encoding)
            if not is_compression_bomb(len(packed), len(text)):
                forms[encoding] = packed
    return Stored(forms)


@dataclass(frozen=True)
class StoredConsensus:
    """A consensus and what was parsed from it."""

    info: ConsensusInfo
    document: Stored


@dataclass(frozen=True)
class StoredCertificate:
    """An authority key certificate and what was parsed from it."""

    info: KeyCertificate
    document: Stored


@dataclass(frozen=True)
class StoredDescriptor:
    """A server descriptor and what was parsed from it."""

    info: ServerDescriptorInfo
    document: Stored


def stored_consensus(info: ConsensusInfo) -> StoredConsensus:
    """``info``'s text in :data:`CONSENSUS_ENCODINGS`. Any thread (pure, CPU-bound)."""
    return StoredConsensus(info, store_document(info.text, CONSENSUS_ENCODINGS))


def stored_certificate(info: KeyCertificate) -> StoredCertificate:
    """``info``'s text in :data:`ITEM_ENCODINGS`. Any thread (pure)."""
    return StoredCertificate(info, store_document(info.text, ITEM_ENCODINGS))


def stored_descriptor(text: str | bytes) -> StoredDescriptor:
    """A server descriptor (``str`` as :mod:`relay.identity` makes them, or bytes), parsed
    for its names and kept in :data:`ITEM_ENCODINGS`. Raises
    :class:`relay.dirdocs.DirDocError`. Any thread (pure)."""
    data = text.encode("ascii") if isinstance(text, str) else text
    return StoredDescriptor(parse_server_descriptor_info(data),
                            store_document(data, ITEM_ENCODINGS))


class DirStore:
    """What a directory server answers from: consensuses by flavor, key certificates, the
    microdescriptors by digest, and the relay's own descriptor. Loop thread only."""

    def __init__(self) -> None:
        """An empty store. Loop thread only."""
        self._consensus: dict[str, StoredConsensus] = {}
        self._certificates: dict[tuple[str, str], StoredCertificate] = {}
        self._microdescs: dict[bytes, Stored] = {}
        self._own: StoredDescriptor | None = None

    # ---------------------------------------------------------------- consensus

    def consensus(self, flavor: str) -> StoredConsensus | None:
        """The current consensus of ``flavor`` (``"ns"`` or ``"microdesc"``), if any.
        Loop thread only."""
        return self._consensus.get(flavor)

    def install_consensus(self, consensus: StoredConsensus) -> None:
        """Serve ``consensus`` from now on, replacing any of its flavor. Loop thread only."""
        self._consensus[consensus.info.flavor] = consensus

    # ---------------------------------------------------------------- key certificates

    def install_certificates(self, certificates: Iterable[StoredCertificate]) -> None:
        """Add (or replace) certificates, keyed by (identity, signing key). Loop thread only."""
        for cert in certificates:
            self._certificates[(cert.info.fingerprint, cert.info.signing_key_digest)] = cert

    def drop_expired_certificates(self, now: float) -> int:
        """Forget certificates past ``dir-key-expires``; returns how many. Loop thread only."""
        expired = [key for key, cert in self._certificates.items() if cert.info.expires < now]
        for key in expired:
            del self._certificates[key]
        return len(expired)

    def certificates(self) -> list[StoredCertificate]:
        """Every certificate, ordered by (identity, signing key). Loop thread only."""
        return [self._certificates[key] for key in sorted(self._certificates)]

    def certificate(self, fingerprint: str, signing_key_digest: str) -> StoredCertificate | None:
        """The certificate of that (identity, signing key) pair (hex). Loop thread only."""
        return self._certificates.get((fingerprint.upper(), signing_key_digest.upper()))

    def newest_certificate(self, fingerprint: str) -> StoredCertificate | None:
        """The most recently published certificate of an identity (hex). Loop thread only."""
        found = [c for (fp, _), c in self._certificates.items() if fp == fingerprint.upper()]
        return max(found, key=lambda c: c.info.published, default=None)

    def certificate_by_signing_key(self, signing_key_digest: str) -> StoredCertificate | None:
        """The certificate of a signing key (hex digest). Loop thread only."""
        wanted = signing_key_digest.upper()
        return next((c for (_, sk), c in self._certificates.items() if sk == wanted), None)

    # ---------------------------------------------------------------- microdescriptors

    def microdesc(self, digest: bytes) -> Stored | None:
        """The microdescriptor whose SHA-256 is ``digest``. Loop thread only."""
        return self._microdescs.get(digest)

    def has_microdesc(self, digest: bytes) -> bool:
        """True if the store holds that microdescriptor. Loop thread only."""
        return digest in self._microdescs

    def install_microdescs(self, microdescs: dict[bytes, Stored]) -> None:
        """Add microdescriptors by digest. Loop thread only."""
        self._microdescs.update(microdescs)

    def retain_microdescs(self, digests: Iterable[bytes]) -> int:
        """Keep only the microdescriptors in ``digests``; returns how many were dropped.
        Loop thread only."""
        keep = set(digests)
        gone = [d for d in self._microdescs if d not in keep]
        for digest in gone:
            del self._microdescs[digest]
        return len(gone)

    @property
    def microdesc_count(self) -> int:
        """How many microdescriptors are held. Loop thread only."""
        return len(self._microdescs)

    # ---------------------------------------------------------------- our descriptor

    def own_descriptor(self) -> StoredDescriptor | None:
        """This relay's server descriptor, if the caller gave one. Loop thread only."""
        return self._own

    def set_own_descriptor(self, descriptor: StoredDescriptor | None) -> None:
        """Serve ``descriptor`` as this relay's own (``/tor/server/authority``). Loop thread
        only (make it with :func:`stored_descriptor`, on any thread)."""
        self._own = descriptor
