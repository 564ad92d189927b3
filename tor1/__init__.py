"""relaycrypt: tor1 - Tor's "tor1" relay-cell crypto (AES-128-CTR layers, running SHA-1 digests).

* :mod:`tor1.reference`: the byte-exact pure-Python reference (``RelayCrypto``,
  ``OriginCrypto``, ``HopKeys``, the KDFs);
* :mod:`tor1._kernel`: the C batch kernel on libcrypto, which crypts whole batches with the GIL
  released, and :mod:`tor1.fast`: its wrappers with the reference's API and the pool's group
  functions;
* :mod:`tor1.backend`: which of the two a circuit gets (``relay_crypto_for``,
  ``origin_crypto_for``).

Every batch operation that sets or checks digests also comes in a *tagged* form that returns
the SENDME tags of chosen cells (:data:`SENDME_TAG_LEN` bytes each, joined): the running digest
as it stands after the cell, which is what tor's SENDME v1 carries (see
:mod:`tor1.reference` for which cells are chosen).

This package knows nothing of links, sockets, the loop or the worker pool: a circuit's crypto
state is a plain object used by one thread at a time.
"""

CELL_PAYLOAD_LEN = 509
"""Bytes of a fixed-size cell's payload: what relay crypto covers (not circuit id, command)."""
RELAY_HEADER_LEN = 11
"""Relay header inside the payload: command(1) recognized(2) stream_id(2) digest(4) length(2)."""
RELAY_DIGEST_OFFSET = 5
"""Where the relay header's digest field starts in the payload."""
RELAY_DIGEST_LEN = 4
"""Bytes of the relay header's digest field (the first bytes of the running digest)."""
RELAY_DATA_MAX = CELL_PAYLOAD_LEN - RELAY_HEADER_LEN
"""At most 498 bytes of relay data per cell."""
SENDME_TAG_LEN = 20
"""A cell's SENDME tag (flow control v1): the whole SHA-1 running digest after that cell."""
