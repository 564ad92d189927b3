"""The TLS kernel: Tor links' TLS sessions on the system's libssl, record work GIL-free.

``_tlskernel`` (built from ``tlskernel.c`` by ``setup.py build_ext --inplace``, which
``make venv`` runs) provides:

* ``TlsContext(server, cert_der, key_der, *, max_version=0)``: the settings of one side of Tor
  links (``relay.tlscontext`` explains them), with a server's DER certificate and key.
  Immutable: any thread, many at once.
* ``TlsSession(context, server_hostname=None)``: one TLS connection over in-memory transport:
  ``start``, ``feed`` (handshake driving and reading), ``decrypt``, ``encrypt``, ``close``,
  ``export_keying_material``, the certificates, version, cipher and SNI the handshake fixed, and
  lock-free flags (``handshake_done``, ``peer_closed``, ``closed``, ``wants_write``,
  ``in_use``). Any thread, one thread at a time per session (RuntimeError otherwise), reads and
  writes included: OpenSSL's SSL object is not thread-safe. ``relay.tls``'s session classes are
  its subclasses.
* ``tls_group(jobs)``: several sessions' ``(session, OP_DECRYPT | OP_ENCRYPT, data)`` jobs with
  one release of the GIL; one result per job, in order, or the exception instance it raised.

Errors are ``relay.tlscontext.TlsError`` with OpenSSL's reasons. See the C source's top
comment for the design (the copy-free pipe BIO, the threads rules, when the GIL is released).

Importing this package never fails: ``setup.py`` reads ``relay/_tls/build.py`` before the
extension exists. The names below are loaded from ``_tlskernel`` on first access, which raises
``ImportError`` when the extension is not built.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "GIL_RELEASE_MIN_BYTES",
    "OPENSSL_VERSION",
    "OP_DECRYPT",
    "OP_ENCRYPT",
    "RECORD_PLAIN_MAX",
    "SERVER_TLS12_CIPHERS",
    "TLS1_2_VERSION",
    "TLS1_3_VERSION",
    "TlsContext",
    "TlsSession",
    "tls_group",
]


def __getattr__(name: str) -> Any:
    """Load the extension's public names lazily (PEP 562)."""
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module("relay._tls._tlskernel"), name)
