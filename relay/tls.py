"""Sans-IO TLS sessions, client and server: TLS over any byte transport, with no I/O of their own.

The reactor's ``Stream`` delivers raw bytes in callbacks and writes raw bytes; it never blocks.
A session sits between it and the link layer. It wraps a pyOpenSSL ``Connection`` made with no
socket (``Connection(ctx, None)``), so OpenSSL reads from and writes to two memory buffers:

* :meth:`~TlsClientSession.start` returns the ClientHello to write (a server session returns
  nothing: it waits for the client's hello);
* :meth:`~_TlsSession.feed` takes bytes read from the socket and returns
  ``(plaintext, to_write)``: application data decrypted so far, and TLS records (handshake
  messages, or nothing) the caller must write back to the socket;
* :meth:`~_TlsSession.encrypt` turns plaintext into records to write (allowed only after the
  handshake, which :attr:`~_TlsSession.handshake_done` reports);
* :meth:`~_TlsSession.close` returns a close_notify alert to write.

Both ends offer what Tor's link authentication needs: the certificates as sent
(:meth:`~_TlsSession.peer_certificate_der`, :meth:`~_TlsSession.own_certificate_der`: the
server's certificate is the server's "own" and the client's "peer") and the RFC 5705 exporter
(:meth:`~_TlsSession.export_keying_material`), which gives the same bytes on both ends of one
session for the same label and context. Python's ``ssl`` module has no exporter, hence pyOpenSSL.
What the TLS settings are, and why, is in ``relay.tlscontext``.

Errors: anything TLS refuses (a peer that does not speak TLS, a failed handshake, a corrupt
record) raises :class:`TlsError` with OpenSSL's reason; the session is then dead and the caller
closes the stream.

Threads: any thread, one thread at a time per session. A session keeps no reference to a loop
or a thread, and OpenSSL's per-thread error queue is read on the thread that made the call, so
a session may move between threads (the loop thread for the handshake, then a worker that owns
the link for record encryption, say), provided the hand-over itself orders memory (a lock or a
queue, as the worker pool's run queues do) and no two threads use one session at once. Sessions
of one context may be used on different threads at the same time.
"""

from __future__ import annotations

from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL

from relay.tlscontext import (
    TlsClientContext,
    TlsError,
    TlsServerContext,
    openssl_reason,
)

__all__ = ["TlsClientContext", "TlsClientSession", "TlsError", "TlsServerContext",
           "TlsServerSession"]

_READ_CHUNK = 1 << 14
"""Plaintext per ``recv``: one TLS record's worth (OpenSSL returns at most one record a call)."""
_DRAIN_CHUNK = 1 << 17
"""Bytes per read of the outgoing buffer; a 64 KiB write (4 records) fits in one read."""


class _TlsSession:
    """What client and server sessions share: feeding, encrypting, closing, inspecting.
    Any thread, one at a time (module doc)."""

    __slots__ = ("_closed", "_conn", "_handshake_done", "_peer_eof")

    def __init__(self, conn: SSL.Connection) -> None:
        self._conn = conn
        self._handshake_done = False
        self._closed = False
        self._peer_eof = False

    @property
    def handshake_done(self) -> bool:
        """True once the TLS handshake has completed. Any thread, one at a time."""
        return self._handshake_done

    @property
    def peer_closed(self) -> bool:
        """True once the peer sent close_notify. Any thread, one at a time."""
        return self._peer_eof

    def version(self) -> str | None:
        """The negotiated protocol (``"TLSv1.3"`` or ``"TLSv1.2"``), None before the handshake.
        Any thread, one at a time."""
        return self._conn.get_protocol_version_name() if self._handshake_done else None

    def cipher(self) -> str | None:
        """The negotiated cipher suite's OpenSSL name, None before the handshake.
        Any thread, one at a time."""
        return self._conn.get_cipher_name() if self._handshake_done else None

    def peer_certificate_der(self) -> bytes | None:
        """The DER certificate the peer presented (unverified), None before the handshake or
        when the peer sent none (a client never does on a Tor link). Any thread, one at a
        time."""
        if not self._handshake_done:
            return None
        cert = self._conn.get_peer_certificate(as_cryptography=True)
        return cert.public_bytes(serialization.Encoding.DER) if cert is not None else None

    def own_certificate_der(self) -> bytes | None:
        """The DER certificate this end presented: the server's, as its client received it;
        None on a client (which sends none). Any thread, one at a time."""
        cert = self._conn.get_certificate(as_cryptography=True)
        return cert.public_bytes(serialization.Encoding.DER) if cert is not None else None

    def export_keying_material(self, label: bytes, length: int,
                               context: bytes | None = None) -> bytes:
        """RFC 5705 keying material: ``length`` bytes that only the two ends of this session
        can compute, equal on both for the same ``label`` and ``context`` (None is "no
        context", which TLS 1.2 distinguishes from an empty one). Raises :class:`TlsError`
        before the handshake. Any thread, one at a time."""
        if not self._handshake_done:
            raise TlsError("cannot export keying material before the TLS handshake completes")
        if length <= 0:
            raise ValueError(f"keying material length must be positive, not {length}")
        try:
            return self._conn.export_keying_material(bytes(label), length,
                                                     None if context is None else bytes(context))
        except SSL.Error as exc:
            raise TlsError(f"TLS keying-material export failed: {openssl_reason(exc)}") from exc

    def _drain(self) -> bytes:
        """Everything OpenSSL wrote to the outgoing buffer."""
        conn = self._conn
        chunks: list[bytes] = []
        while True:
            try:
                chunk = conn.bio_read(_DRAIN_CHUNK)
            except SSL.WantReadError:
                break
            chunks.append(chunk)
            if len(chunk) < _DRAIN_CHUNK:
                break  # a memory buffer hands out all it has: it is empty now
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def _step_handshake(self) -> None:
        try:
            self._conn.do_handshake()
        except SSL.WantReadError:
            return
        except SSL.Error as exc:
            self._closed = True
            raise TlsError(f"TLS handshake failed: {openssl_reason(exc)}") from exc
        self._handshake_done = True

    def feed(self, data: bytes) -> tuple[bytes, bytes]:
        """Take ``data`` read from the transport; return ``(plaintext, to_write)``.

        ``plaintext`` is the application data that became available (possibly empty);
        ``to_write`` are TLS records to send back (handshake messages, session tickets),
        possibly empty. Raises :class:`TlsError` when the peer's bytes are not acceptable TLS.
        Any thread, one at a time.
        """
        if self._closed:
            raise TlsError("TLS session is closed")
        conn = self._conn
        if data:
            conn.bio_write(data)
        if not self._handshake_done:
            self._step_handshake()
            if not self._handshake_done:
                return b"", self._drain()
        chunks: list[bytes] = []
        while True:
            try:
                chunks.append(conn.recv(_READ_CHUNK))
            except SSL.WantReadError:
                break
            except SSL.ZeroReturnError:
                self._peer_eof = True
                break
            except SSL.Error as exc:
                self._closed = True
                raise TlsError(f"TLS record error: {openssl_reason(exc)}") from exc
        return b"".join(chunks), self._drain()

    def encrypt(self, plaintext: bytes) -> bytes:
        """Return the TLS records carrying ``plaintext``. The handshake must be done.
        Any thread, one at a time."""
        if self._closed:
            raise TlsError("TLS session is closed")
        if not self._handshake_done:
            raise TlsError("cannot send application data before the TLS handshake completes")
        try:
            self._conn.sendall(plaintext)
        except SSL.Error as exc:
            self._closed = True
            raise TlsError(f"TLS write failed: {openssl_reason(exc)}") from exc
        return self._drain()

    def close(self) -> bytes:
        """End the session: return a close_notify alert to write (best effort, may be empty).
        Idempotent. Any thread, one at a time."""
        if self._closed:
            return b""
        self._closed = True
        if not self._handshake_done:
            return b""
        try:
            self._conn.shutdown()
        except SSL.Error:
            return b""
        return self._drain()


class TlsClientSession(_TlsSession):
    """One TLS client connection over memory buffers: an outgoing Tor link. Any thread, one at
    a time."""

    __slots__ = ()

    def __init__(self, server_hostname: str | None = None,
                 context: TlsClientContext | None = None) -> None:
        """``server_hostname`` only sets SNI (nothing is verified; tor's own client sends a
        random name). ``context`` shares one client context between sessions (a new one is
        built when None). Any thread."""
        conn = SSL.Connection((context or TlsClientContext()).ssl_context, None)
        if server_hostname is not None:
            conn.set_tlsext_host_name(server_hostname.encode("idna"))
        conn.set_connect_state()
        super().__init__(conn)

    def start(self) -> bytes:
        """Begin the handshake: return the ClientHello bytes to write. Any thread, one at a
        time."""
        if self._closed:
            raise TlsError("TLS session is closed")
        self._step_handshake()
        return self._drain()


class TlsServerSession(_TlsSession):
    """One TLS server connection over memory buffers: an incoming Tor link, presenting the
    certificate ``context`` holds when the session is created. Any thread, one at a time."""

    __slots__ = ()

    def __init__(self, context: TlsServerContext) -> None:
        """A session that answers a client's hello with ``context``'s current certificate;
        a later ``context.rotate`` does not affect it. Any thread."""
        conn = SSL.Connection(context.ssl_context, None)
        conn.set_accept_state()
        super().__init__(conn)

    def start(self) -> bytes:
        """Nothing to send: the client speaks first. Returns ``b""`` (so a link drives client
        and server sessions alike). Any thread, one at a time."""
        if self._closed:
            raise TlsError("TLS session is closed")
        return b""

    def server_name(self) -> str | None:
        """The SNI host name the client sent, if any (tor's client sends a random one; it is
        not checked). Any thread, one at a time."""
        name = self._conn.get_servername()
        return name.decode("ascii", "replace") if name is not None else None
