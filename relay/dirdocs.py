"""The directory documents a cache keeps, parsed just enough to serve them, and checked.

A bridge or directory cache serves what it fetched from the authorities, byte for byte; to
do that it needs only a few facts from each document (dir-spec sections 3.4.1, 3.3, 1.3, 2.1.1
and 3.9):

* a **consensus** (``network-status-version 3`` [``microdesc``]): its flavor, ``valid-after``,
  ``fresh-until``, ``valid-until`` (the refresh schedule and tor's "reasonably live" test),
  the microdescriptor digests of its ``m`` lines, its signatures (who signed: a client may ask
  for a consensus signed by given authorities), and its SHA3-256 "as signed" digest (what a
  client names in ``X-Or-Diff-From-Consensus``: the text from ``network-status-version``
  through the space after the first ``directory-signature``);
* an **authority key certificate**: the authority's v3 identity fingerprint and the digest of
  its signing key (the ``/tor/keys/fp/``, ``sk/`` and ``fp-sk/`` names), its publication and
  expiry times;
* a **microdescriptor**: its SHA-256 digest (the ``m`` line name, and the ``/tor/micro/d/``
  name, base64 without padding); a response is split at each line that starts with
  ``onion-key``, which begins every microdescriptor;
* a **server descriptor**: its fingerprint and its digest (SHA-1 of ``router `` through
  ``router-signature`` and its newline, the ``/tor/server/d/`` name) and ``published``.

Checks, because a cache fetches over plain HTTP from a DirPort: a key certificate must be
signed by the identity key it names (``dir-key-certification``: PKCS#1 v1.5 over the bare
SHA-1 of the text through ``dir-key-certification`` and its newline), and its fingerprint is
recomputed from that key; a consensus must carry valid signatures from more than half of the
authorities the caller trusts, each checked with the signing key of a certificate checked as
above (SHA-1 for ``ns`` signatures without an algorithm, SHA-256 for ``sha256``). Microdesc
and server descriptor bodies are named by their own hashes, so a substitution cannot hide.

Every parser takes bytes, bounds its input size and item counts, and raises
:class:`DirDocError` with the reason; nothing is normalised (what is served is what came).

Threads: pure functions and frozen values; any thread.
"""

from __future__ import annotations

import base64
import binascii
import calendar
import hashlib
import re
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import load_der_public_key

from relay.identity.rsaraw import rsa_recover_raw

__all__ = [
    "MAX_DOCUMENT_SIZE",
    "ConsensusInfo",
    "DirDocError",
    "KeyCertificate",
    "ServerDescriptorInfo",
    "b64_digest",
    "parse_consensus",
    "parse_key_certificates",
    "parse_server_descriptor_info",
    "split_microdescs",
    "verify_consensus",
]

#: The largest document accepted, tor's ``MAX_DIR_DL_SIZE`` (16 MiB - 1).
MAX_DOCUMENT_SIZE = (1 << 24) - 1
#: Bounds on item counts: far above any real network, far below what would hurt.
_MAX_MICRODESCS = 100_000
_MAX_CERTIFICATES = 256
_MAX_SIGNATURES = 64

_TIME = re.compile(rb"(\d{4})-(\d\d)-(\d\d) (\d\d):(\d\d):(\d\d)\Z")
_HEX40 = re.compile(rb"[0-9A-Fa-f]{40}\Z")
_B64_256 = re.compile(rb"[A-Za-z0-9+/]{43}\Z")


class DirDocError(ValueError):
    """A document is malformed, over a bound, or fails a check. The message says which."""


def _timestamp(value: bytes, what: str) -> int:
    match = _TIME.match(value)
    if match is None:
        raise DirDocError(f"bad {what} time {value[:40]!r}")
    fields = tuple(int(x) for x in match.groups())
    try:
        return calendar.timegm((*fields, 0, 0, 0))
    except (ValueError, OverflowError):
        raise DirDocError(f"bad {what} time {value[:40]!r}") from None


def _check_size(data: bytes, what: str) -> None:
    if len(data) > MAX_DOCUMENT_SIZE:
        raise DirDocError(f"{what} of {len(data)} bytes is over {MAX_DOCUMENT_SIZE}")
    if not data.endswith(b"\n"):
        raise DirDocError(f"{what} does not end with a newline")


def _keyword_lines(data: bytes, keyword: bytes) -> list[bytes]:
    """The arguments of every line starting with ``keyword`` and a space (or alone)."""
    pattern = re.compile(rb"^" + re.escape(keyword) + rb"(?: ([^\n]*))?$", re.M)
    return [m.group(1) or b"" for m in pattern.finditer(data)]


def _one(data: bytes, keyword: bytes, what: str) -> bytes:
    found = _keyword_lines(data, keyword)
    if len(found) != 1:
        raise DirDocError(f"{what} has {len(found)} {keyword.decode()} lines, not 1")
    return found[0]


def _signed_through(data: bytes, start: bytes, end: bytes, end_char: bytes) -> bytes:
    """tor's ``router_get_hash_impl_helper``: from ``start`` (at a line start) through the
    first ``end_char`` after the first ``end`` that follows."""
    begin = data.find(start)
    if begin < 0 or (begin > 0 and data[begin - 1:begin] != b"\n"):
        raise DirDocError(f"no {start.decode()!r} line to start the signed text")
    stop = data.find(end, begin + len(start))
    if stop < 0:
        raise DirDocError(f"no {end.decode().strip()!r} to end the signed text")
    stop = data.find(end_char, stop + len(end))
    if stop < 0:
        raise DirDocError("the signed text has no end of line")
    return data[begin:stop + 1]


def _object_after(data: bytes, keyword: bytes, kind: bytes) -> bytes:
    """The decoded ``-----BEGIN kind-----`` object on the lines after ``keyword``."""
    pattern = re.compile(rb"^" + re.escape(keyword) + rb"\n-----BEGIN " + kind +
                         rb"-----\n([A-Za-z0-9+/=\n]+?)-----END " + kind + rb"-----$", re.M)
    match = pattern.search(data)
    if match is None:
        raise DirDocError(f"no {kind.decode()} object after {keyword.decode()}")
    try:
        return base64.b64decode(match.group(1).replace(b"\n", b""), validate=True)
    except binascii.Error:
        raise DirDocError(f"bad base64 in the {kind.decode()} after {keyword.decode()}") from None


def b64_digest(digest: bytes) -> str:
    """A 256-bit digest as tor names microdescriptors: base64 without ``=``. Any thread."""
    return base64.b64encode(digest).decode("ascii").rstrip("=")


# --------------------------------------------------------------------------- consensus


@dataclass(frozen=True)
class ConsensusSignature:
    """One ``directory-signature``: the algorithm, the signer and its signing key digest
    (hex, upper case) and the signature bytes."""

    algorithm: str
    identity: str
    signing_key_digest: str
    signature: bytes


@dataclass(frozen=True)
class ConsensusInfo:
    """What a cache needs to know of a consensus; ``text`` is the document as fetched."""

    flavor: str
    valid_after: int
    fresh_until: int
    valid_until: int
    microdesc_digests: tuple[bytes, ...]
    signatures: tuple[ConsensusSignature, ...]
    sha3_as_signed: bytes
    text: bytes

    @property
    def signatories(self) -> tuple[str, ...]:
        """The v3 identity fingerprints (hex) that signed it. Any thread."""
        return tuple(s.identity for s in self.signatures)


_SIGNATURE = re.compile(
    rb"^directory-signature (?:(sha1|sha256) )?([0-9A-Fa-f]{40}) ([0-9A-Fa-f]{40})\n"
    rb"-----BEGIN SIGNATURE-----\n([A-Za-z0-9+/=\n]+?)-----END SIGNATURE-----$", re.M)


def parse_consensus(data: bytes) -> ConsensusInfo:
    """Parse a consensus of either flavor. Raises :class:`DirDocError`. Any thread (pure)."""
    _check_size(data, "consensus")
    first = data[:data.find(b"\n")]
    if first == b"network-status-version 3":
        flavor = "ns"
    elif first == b"network-status-version 3 microdesc":
        flavor = "microdesc"
    else:
        raise DirDocError(f"not a v3 consensus: first line {first[:60]!r}")
    if _one(data, b"vote-status", "consensus") != b"consensus":
        raise DirDocError("vote-status is not 'consensus'")
    valid_after = _timestamp(_one(data, b"valid-after", "consensus"), "valid-after")
    fresh_until = _timestamp(_one(data, b"fresh-until", "consensus"), "fresh-until")
    valid_until = _timestamp(_one(data, b"valid-until", "consensus"), "valid-until")
    if not valid_after < fresh_until <= valid_until:
        raise DirDocError("valid-after < fresh-until <= valid-until does not hold")
    digests: list[bytes] = []
    if flavor == "microdesc":
        for value in _keyword_lines(data, b"m"):
            if not _B64_256.match(value):
                raise DirDocError(f"bad m line {value[:60]!r}")
            digests.append(base64.b64decode(value + b"="))
            if len(digests) > _MAX_MICRODESCS:
                raise DirDocError(f"more than {_MAX_MICRODESCS} microdescriptors")
    signatures = []
    for match in _SIGNATURE.finditer(data):
        algorithm = (match.group(1) or b"sha1").decode()
        try:
            signature = base64.b64decode(match.group(4).replace(b"\n", b""), validate=True)
        except binascii.Error:
            raise DirDocError("bad base64 in a directory-signature") from None
        signatures.append(ConsensusSignature(algorithm, match.group(2).decode().upper(),
                                             match.group(3).decode().upper(), signature))
        if len(signatures) > _MAX_SIGNATURES:
            raise DirDocError(f"more than {_MAX_SIGNATURES} signatures")
    if not signatures:
        raise DirDocError("the consensus has no directory-signature")
    signed = _signed_through(data, b"network-status-version", b"\ndirectory-signature", b" ")
    return ConsensusInfo(flavor, valid_after, fresh_until, valid_until, tuple(digests),
                         tuple(signatures), hashlib.sha3_256(signed).digest(), data)


def verify_consensus(info: ConsensusInfo, certificates: dict[str, KeyCertificate],
                     trusted: frozenset[str]) -> int:
    """Check the signatures of ``info`` by the ``trusted`` v3 identities (hex, upper case)
    with ``certificates`` (by fingerprint, each already checked by
    :func:`parse_key_certificates`). Returns how many verified; raises :class:`DirDocError`
    unless more than half of ``trusted`` did (tor's rule). Any thread (pure)."""
    signed = _signed_through(info.text, b"network-status-version", b"\ndirectory-signature",
                             b" ")
    good = set()
    for sig in info.signatures:
        cert = certificates.get(sig.identity)
        if sig.identity not in trusted or cert is None:
            continue
        if cert.signing_key_digest != sig.signing_key_digest:
            continue
        digest = (hashlib.sha256 if sig.algorithm == "sha256" else hashlib.sha1)(signed).digest()
        try:
            if rsa_recover_raw(_rsa_public(cert.signing_key_der),
                               sig.signature) == digest:
                good.add(sig.identity)
        except ValueError:
            continue
    if len(good) * 2 <= len(trusted):
        raise DirDocError(f"the consensus has {len(good)} valid signatures from the "
                          f"{len(trusted)} trusted authorities; more than half are needed")
    return len(good)


def _rsa_public(der: bytes) -> rsa.RSAPublicKey:
    """An RSA public key from the PKCS#1 DER tor puts in its PEM blocks."""
    try:
        key = load_der_public_key(der)
    except ValueError:
        raise DirDocError("bad RSA public key") from None
    if not isinstance(key, rsa.RSAPublicKey):
        raise DirDocError("not an RSA public key")
    return key


# --------------------------------------------------------------------------- key certificates


@dataclass(frozen=True)
class KeyCertificate:
    """An authority key certificate that verified; ``text`` is the certificate as fetched."""

    fingerprint: str
    signing_key_digest: str
    signing_key_der: bytes
    published: int
    expires: int
    text: bytes


_CERT_START = b"dir-key-certificate-version 3\n"
_CERT_END = re.compile(rb"^dir-key-certification\n-----BEGIN SIGNATURE-----\n"
                       rb"[A-Za-z0-9+/=\n]+?-----END SIGNATURE-----\n", re.M)


def parse_key_certificates(data: bytes) -> list[KeyCertificate]:
    """Split and check one or more concatenated certificates (a ``/tor/keys/`` answer).
    Raises :class:`DirDocError` for anything malformed or badly signed. Any thread (pure)."""
    _check_size(data, "key certificates")
    certs = []
    position = 0
    while position < len(data):
        if not data.startswith(_CERT_START, position):
            raise DirDocError("text between key certificates")
        match = _CERT_END.search(data, position)
        if match is None:
            raise DirDocError("a key certificate without dir-key-certification")
        certs.append(_check_certificate(data[position:match.end()]))
        position = match.end()
        if len(certs) > _MAX_CERTIFICATES:
            raise DirDocError(f"more than {_MAX_CERTIFICATES} key certificates")
    return certs


def _check_certificate(text: bytes) -> KeyCertificate:
    identity_der = _object_after(text, b"dir-identity-key", b"RSA PUBLIC KEY")
    signing_der = _object_after(text, b"dir-signing-key", b"RSA PUBLIC KEY")
    fingerprint = _one(text, b"fingerprint", "key certificate")
    if not _HEX40.match(fingerprint):
        raise DirDocError("bad fingerprint line in a key certificate")
    if hashlib.sha1(identity_der).hexdigest().upper() != fingerprint.decode().upper():
        raise DirDocError("a key certificate's fingerprint is not its identity key's")
    signed = _signed_through(text, b"dir-key-certificate-version", b"\ndir-key-certification",
                             b"\n")
    signature = _object_after(text, b"dir-key-certification", b"SIGNATURE")
    try:
        recovered = rsa_recover_raw(_rsa_public(identity_der), signature)
    except ValueError:
        recovered = b""
    if recovered != hashlib.sha1(signed).digest():
        raise DirDocError(f"key certificate {fingerprint.decode()} is not signed by its "
                          "identity key")
    return KeyCertificate(
        fingerprint.decode().upper(), hashlib.sha1(signing_der).hexdigest().upper(),
        signing_der, _timestamp(_one(text, b"dir-key-published", "certificate"), "published"),
        _timestamp(_one(text, b"dir-key-expires", "certificate"), "expires"), text)


# --------------------------------------------------------------------------- descriptors


def split_microdescs(data: bytes, limit: int = _MAX_MICRODESCS) -> list[tuple[bytes, bytes]]:
    """``(sha256 digest, text)`` for each microdescriptor in a ``/tor/micro/d/`` answer, in
    order. Raises :class:`DirDocError` if it does not start with ``onion-key`` or has more
    than ``limit``. Any thread (pure)."""
    if not data:
        return []
    _check_size(data, "microdescriptors")
    if not data.startswith(b"onion-key"):
        raise DirDocError("microdescriptors do not start with onion-key")
    starts = [m.start() for m in re.finditer(rb"^onion-key\b", data, re.M)]
    if len(starts) > limit:
        raise DirDocError(f"more than {limit} microdescriptors")
    ends = [*starts[1:], len(data)]
    return [(hashlib.sha256(data[a:b]).digest(), data[a:b]) for a, b in zip(starts, ends,
                                                                               strict=True)]


@dataclass(frozen=True)
class ServerDescriptorInfo:
    """A server descriptor's names: fingerprint and digest (hex, upper case), ``published``."""

    fingerprint: str
    digest: str
    published: int
    text: bytes


def parse_server_descriptor_info(data: bytes) -> ServerDescriptorInfo:
    """The names of one server descriptor (its signatures are the identity module's job:
    :func:`relay.identity.descparse.parse_server_descriptor`). Raises :class:`DirDocError`.
    Any thread (pure)."""
    _check_size(data, "server descriptor")
    if not data.startswith(b"router "):
        raise DirDocError("a server descriptor starts with 'router '")
    fingerprint = _one(data, b"fingerprint", "server descriptor").replace(b" ", b"")
    if not _HEX40.match(fingerprint):
        raise DirDocError("bad fingerprint line in the server descriptor")
    signed = _signed_through(data, b"router ", b"\nrouter-signature", b"\n")
    published = _timestamp(_one(data, b"published", "server descriptor"), "published")
    return ServerDescriptorInfo(fingerprint.decode().upper(),
                                hashlib.sha1(signed).hexdigest().upper(), published, data)

