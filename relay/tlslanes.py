"""A link's TLS record work as a worker-pool circuit: the pool functions, not wired to links yet.

A link, like a circuit, is an ordered unit that one worker at a time may own. OpenSSL forbids
more: one thread reading a session while another writes it is a race too, so BOTH directions of
a link go to ONE pool circuit whose state is the link's session (``relay.tls``, a
``relay._tls.TlsSession``), in two lanes:

* :data:`LANE_DECRYPT`: items are TLS bytes exactly as the socket delivered them (any split;
  a record cut short waits inside the session for the rest); each result is the plaintext they
  complete (``TlsSession.decrypt``): feed it to the link's framer in delivery order.
* :data:`LANE_ENCRYPT`: items are plaintext (a loop iteration's cells: bytes or a list of
  pieces); each result is the records to write (``TlsSession.encrypt``): write them to the
  stream in delivery order.

The pool delivers each lane's results in submission order and never lets two workers into one
circuit, so the session sees its calls one thread at a time and each direction's bytes in
order; the two directions are independent TLS streams, so their relative order does not matter
(bytes OpenSSL makes while reading wait inside the session and leave at the head of the next
encrypt result). Open the circuit with ``process=process, group=group, joined=True``; submit
with ``count=count(item)`` (the pool counts cells for batch budgets and back-pressure, and TLS
bytes are not whole cells). A job's :class:`~relay.tlscontext.TlsError` comes back as the
circuit's error: the session is dead, close the link.

The handshake stays on the loop thread (``feed``, once per link); hand the session to the
circuit only once ``handshake_done`` is true, and from then on send every write and every read
of the link through the circuit (a loop-thread call on a session a worker holds raises
RuntimeError; one made while it is idle would still reorder the byte stream against the
lanes). ``peer_closed`` and ``wants_write`` may be read on the loop thread at any time, e.g.
after each decrypt result; ``close()`` only once no job of the circuit is in flight.

Threads: :func:`process` and :func:`group` run on a worker that owns every job's circuit;
:func:`count` any thread (pure).
"""

from __future__ import annotations

from typing import Any

from relay._tls import OP_DECRYPT, OP_ENCRYPT, tls_group
from relay.framing import FIXED_CELL_LEN

__all__ = ["LANE_DECRYPT", "LANE_ENCRYPT", "count", "group", "process"]

LANE_DECRYPT = 0
"""The lane of TLS bytes read from the socket; results are plaintext."""
LANE_ENCRYPT = 1
"""The lane of plaintext to send; results are TLS records."""

_OPS = (OP_DECRYPT, OP_ENCRYPT)


def count(item: Any) -> int:
    """The cell count to submit ``item`` with: a list (or tuple) counts one cell per element,
    as the pool requires; a buffer its bytes in fixed cells, at least 1. Any thread (pure)."""
    if isinstance(item, list | tuple):
        return len(item)
    return max(1, len(item) // FIXED_CELL_LEN)


def process(session: Any, lane: int, batch: Any) -> bytes:
    """The circuit's process function: decrypt or encrypt ``batch`` on ``session``.
    Worker thread owning the circuit."""
    return session.decrypt(batch) if lane == LANE_DECRYPT else session.encrypt(batch)


def group(jobs: list[tuple[Any, int, Any]]) -> list[Any]:
    """The circuit's group function: several links' batches (lists of pieces) in ONE
    ``tls_group`` call, the GIL released once; one result or exception instance per job.
    Worker thread owning every job's circuit."""
    return tls_group([(session, _OPS[lane], pieces) for session, lane, pieces in jobs])
