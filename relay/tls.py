"""Sans-IO TLS sessions, client and server: TLS over any byte transport, with no I/O of their own.

The reactor's ``Stream`` delivers raw bytes in callbacks and writes raw bytes; it never blocks.
A session sits between it and the link layer. Both classes here are the C sessions of
``relay._tls`` (``TlsSession``, on the system's libssl) with the constructors a link uses; every
method below is C:

* ``start()`` returns the ClientHello to write (a server session returns ``b""``: it waits for
  the client's hello);
* ``feed(data)`` takes bytes read from the socket and returns ``(plaintext, to_write)``:
  application data decrypted so far, and TLS records (handshake messages, or nothing) the
  caller must write back to the socket;
* ``encrypt(plaintext)`` turns plaintext (bytes-like, or a list of pieces) into records to write
  (allowed only after the handshake, which ``handshake_done`` reports);
* ``decrypt(records)`` is ``feed`` after the handshake, without the second item: the record
  work a worker thread can own (``relay._tls.tls_group`` runs several links' at once);
* ``close()`` returns a close_notify alert to write.

Both ends offer what Tor's link authentication needs: the certificates as sent
(``peer_certificate_der()``, ``own_certificate_der()``: the server's certificate is the server's
"own" and the client's "peer") and the RFC 5705 exporter (``export_keying_material(label,
length, context=None)``), which gives the same bytes on both ends of one session for the same
label and context. What the TLS settings are, and why, is in ``relay.tlscontext``.

Errors: anything TLS refuses (a peer that does not speak TLS, a failed handshake, a corrupt
record) raises :class:`TlsError` with OpenSSL's reason; the session is then dead and the caller
closes the stream.

Threads: any thread, one thread at a time per session, reads and writes included (OpenSSL's SSL
object is not thread-safe; a second thread's call raises RuntimeError). A session keeps no
reference to a loop or a thread, and OpenSSL's per-thread error queue is read on the thread that
made the call, so a session may move between threads (the loop thread for the handshake, then a
worker that owns the link for record crypto), provided the hand-over itself orders memory (a
lock or a queue, as the worker pool's run queues do). ``version()``, ``cipher()``, the
certificates, ``server_name()`` and the flags (``handshake_done``, ``peer_closed``, ``closed``,
``wants_write``, ``in_use``) may be read from any thread at any time. Sessions of one context
may be used on different threads at the same time.
"""

from __future__ import annotations

from relay import _tls
from relay.tlscontext import TlsClientContext, TlsError, TlsServerContext

__all__ = ["TlsClientContext", "TlsClientSession", "TlsError", "TlsServerContext",
           "TlsServerSession"]


class TlsClientSession(_tls.TlsSession):  # type: ignore[misc]
    """One TLS client connection over memory: an outgoing Tor link. Any thread, one at a
    time."""

    __slots__ = ()

    def __new__(cls, server_hostname: str | None = None,
                context: TlsClientContext | None = None) -> TlsClientSession:
        """``server_hostname`` only sets SNI (nothing is verified; tor's own client sends a
        random name). ``context`` shares one client context between sessions (a new one is
        built when None). Any thread."""
        name = server_hostname.encode("idna").decode("ascii") if server_hostname else None
        return super().__new__(cls, (context or TlsClientContext()).kernel, name)


class TlsServerSession(_tls.TlsSession):  # type: ignore[misc]
    """One TLS server connection over memory: an incoming Tor link, presenting the certificate
    ``context`` holds when the session is created (a later ``context.rotate`` does not affect
    it). Any thread, one at a time."""

    __slots__ = ()

    def __new__(cls, context: TlsServerContext) -> TlsServerSession:
        """A session that answers a client's hello with ``context``'s current certificate.
        Any thread."""
        return super().__new__(cls, context.kernel)
