"""relay.dirdocs on real tor 0.4.9 documents (tests/data/dirserv, captured by
tools/capture_dir_data.py from a private authority): the names and times parsed, the
cross-references between documents (consensus ``m`` lines name the microdescriptors, the ns
consensus ``r`` line names the relay's server descriptor), and every check failing on a
one-byte change."""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path

import pytest

from relay.dirdocs import (
    DirDocError,
    b64_digest,
    parse_consensus,
    parse_key_certificates,
    parse_server_descriptor_info,
    split_microdescs,
    verify_consensus,
)

DATA = Path(__file__).parent / "data" / "dirserv"
MICRO = (DATA / "consensus-microdesc").read_bytes()
NS = (DATA / "consensus").read_bytes()
KEYS = (DATA / "keys-all").read_bytes()
MICRODESCS = (DATA / "microdescs").read_bytes()
DESCRIPTOR = (DATA / "server-descriptor").read_bytes()
V3IDENT = "6BC484E589C54B9562B2AABC00A2DC0CC43F1A13"


def _certs() -> dict:
    return {c.fingerprint: c for c in parse_key_certificates(KEYS)}


def test_consensus_fields() -> None:
    micro, ns = parse_consensus(MICRO), parse_consensus(NS)
    assert (micro.flavor, ns.flavor) == ("microdesc", "ns")
    assert micro.fresh_until - micro.valid_after == 10  # the 10-second testing interval
    assert micro.valid_until - micro.valid_after == 20  # V3AuthNIntervalsValid 2
    assert [b64_digest(d) for d in micro.microdesc_digests] == [
        "N8SWxQIOVDG2Am1IqF86FVxwmwH7mQoDUQANtZgcxRM",
        "j/aDW62M06HqzeQIz2+MaqCpKjuL/g2WlbYt/Yf/REI"]
    assert ns.microdesc_digests == ()
    assert micro.signatories == ns.signatories == (V3IDENT,)
    assert micro.signatures[0].algorithm == "sha256" and ns.signatures[0].algorithm == "sha1"
    end = MICRO.index(b"\ndirectory-signature ") + len(b"\ndirectory-signature ")
    assert micro.sha3_as_signed == hashlib.sha3_256(MICRO[:end]).digest()


def test_key_certificate_names_and_times() -> None:
    (cert,) = parse_key_certificates(KEYS)
    assert cert.fingerprint == V3IDENT
    assert cert.signing_key_digest == parse_consensus(MICRO).signatures[0].signing_key_digest
    assert cert.expires - cert.published == 365 * 24 * 3600  # tor-gencert -m 12
    assert cert.text == KEYS
    assert [c.fingerprint for c in parse_key_certificates(KEYS + KEYS)] == [V3IDENT] * 2


def test_consensus_signatures_verify_with_the_certificate() -> None:
    certs = _certs()
    assert verify_consensus(parse_consensus(MICRO), certs, frozenset({V3IDENT})) == 1
    assert verify_consensus(parse_consensus(NS), certs, frozenset({V3IDENT})) == 1
    # Two trusted authorities and one signature: not more than half.
    with pytest.raises(DirDocError, match="more than half"):
        verify_consensus(parse_consensus(MICRO), certs, frozenset({V3IDENT, "A" * 40}))
    with pytest.raises(DirDocError, match="0 valid signatures"):
        verify_consensus(parse_consensus(MICRO), {}, frozenset({V3IDENT}))


def test_a_changed_consensus_fails_its_signature() -> None:
    changed = MICRO.replace(b"127.0.0.1 53625", b"127.0.0.1 53626")
    assert changed != MICRO
    with pytest.raises(DirDocError, match="0 valid signatures"):
        verify_consensus(parse_consensus(changed), _certs(), frozenset({V3IDENT}))


def test_a_changed_certificate_is_refused() -> None:
    changed = KEYS.replace(b"dir-key-published 2026", b"dir-key-published 2027")
    with pytest.raises(DirDocError, match="not signed by its identity key"):
        parse_key_certificates(changed)
    wrong_fp = KEYS.replace(V3IDENT.encode(), b"0" * 40)
    with pytest.raises(DirDocError, match="fingerprint is not its identity key"):
        parse_key_certificates(wrong_fp)
    with pytest.raises(DirDocError, match="text between"):
        parse_key_certificates(KEYS + b"junk\n")


def test_microdescs_are_named_by_their_digests() -> None:
    items = split_microdescs(MICRODESCS)
    assert sorted(d for d, _ in items) == sorted(parse_consensus(MICRO).microdesc_digests)
    assert b"".join(text for _, text in items) == MICRODESCS
    assert all(text.startswith(b"onion-key\n") for _, text in items)
    with pytest.raises(DirDocError, match="more than 1"):
        split_microdescs(MICRODESCS, limit=1)
    with pytest.raises(DirDocError, match="start with onion-key"):
        split_microdescs(b"ntor-onion-key x\n")
    assert split_microdescs(b"") == []


def test_server_descriptor_digest_is_the_one_the_ns_consensus_lists() -> None:
    info = parse_server_descriptor_info(DESCRIPTOR)
    assert info.fingerprint == "54E456FEB06B9898DC527D419F818D4929223F3E"
    line = next(x for x in NS.split(b"\n") if x.startswith(b"r capturerelay "))
    identity, digest = line.split()[2:4]
    assert base64.b64decode(identity + b"=").hex().upper() == info.fingerprint
    assert base64.b64decode(digest + b"=").hex().upper() == info.digest


@pytest.mark.parametrize("document, message", [
    (b"network-status-version 2\n", "not a v3 consensus"),
    (MICRO.replace(b"vote-status consensus", b"vote-status vote"), "vote-status"),
    (MICRO.replace(b"valid-after ", b"valid-after 1", 1), "bad valid-after time"),
    (MICRO.replace(b"\nm N8SW", b"\nm !8SW"), "bad m line"),
    (MICRO[:MICRO.index(b"directory-signature")], "no directory-signature"),
    (MICRO.rstrip(b"\n"), "does not end with a newline"),
    (MICRO.replace(b"fresh-until ", b"fresh-until 1999-01-01 00:00:00\nx "), "fresh-until"),
])
def test_malformed_consensuses_say_why(document: bytes, message: str) -> None:
    with pytest.raises(DirDocError, match=message):
        parse_consensus(document)


def test_size_bound() -> None:
    with pytest.raises(DirDocError, match="over"):
        parse_consensus(b"x" * (1 << 24) + b"\n")
