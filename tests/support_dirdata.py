"""The real tor 0.4.9 directory documents of tests/data/dirserv (tools/capture_dir_data.py),
loaded into a DirStore for the directory tests."""

from __future__ import annotations

from pathlib import Path

from relay.dirdocs import parse_consensus, parse_key_certificates, split_microdescs
from relay.dirstore import (
    ITEM_ENCODINGS,
    DirStore,
    store_document,
    stored_certificate,
    stored_consensus,
    stored_descriptor,
)

DATA = Path(__file__).parent / "data" / "dirserv"
MICRO = (DATA / "consensus-microdesc").read_bytes()
NS = (DATA / "consensus").read_bytes()
KEYS = (DATA / "keys-all").read_bytes()
MICRODESCS = (DATA / "microdescs").read_bytes()
DESCRIPTOR = (DATA / "server-descriptor").read_bytes()
#: The authority's v3 identity in those documents.
V3IDENT = parse_key_certificates(KEYS)[0].fingerprint
MICRO_INFO = parse_consensus(MICRO)
NS_INFO = parse_consensus(NS)
#: A moment when the consensus is live: three seconds after valid-after.
NOW = MICRO_INFO.valid_after + 3


def load_store(*, own: bool = True, consensus: bool = True) -> DirStore:
    """A store holding every captured document (the relay's descriptor as our own when
    ``own``). Loop thread only (the store's rule; tests call it on theirs)."""
    store = DirStore()
    if consensus:
        store.install_consensus(stored_consensus(MICRO_INFO))
        store.install_consensus(stored_consensus(NS_INFO))
    store.install_certificates([stored_certificate(c) for c in parse_key_certificates(KEYS)])
    store.install_microdescs({d: store_document(t, ITEM_ENCODINGS)
                              for d, t in split_microdescs(MICRODESCS)})
    if own:
        store.set_own_descriptor(stored_descriptor(DESCRIPTOR))
    return store
