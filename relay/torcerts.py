"""The responder's CERTS cell: kept as the old import path of :mod:`relay.identity.certscell`.

The parsing and verification moved to :mod:`relay.identity.certscell` (which also checks expiry
and verifies an initiator's certificates); this module re-exports its names so existing imports
keep working.

Threads: pure functions over bytes; any thread.
"""

from __future__ import annotations

from relay.identity.certscell import (
    CERT_LINK,
    CERT_RSA_AUTH,
    CERT_RSA_ED_CROSS,
    CERT_RSA_ID,
    CertsError,
    RelayCerts,
    parse_certs_cell,
    rsa_fingerprint,
)

__all__ = [
    "CERT_LINK",
    "CERT_RSA_AUTH",
    "CERT_RSA_ED_CROSS",
    "CERT_RSA_ID",
    "CertsError",
    "RelayCerts",
    "parse_certs_cell",
    "rsa_fingerprint",
]
