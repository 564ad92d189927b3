"""Sans-IO TLS client session: TLS over any byte transport, driven by the event loop.

The reactor's ``Stream`` delivers raw bytes in callbacks and writes raw bytes; it never blocks.
:class:`TlsClientSession` sits between it and the link layer without doing any I/O itself. It
wraps an ``ssl.SSLObject`` between two ``ssl.MemoryBIO`` buffers:

* :meth:`~TlsClientSession.start` returns the ClientHello to write;
* :meth:`~TlsClientSession.feed` takes bytes read from the socket and returns
  ``(plaintext, to_write)``: application data decrypted so far, and TLS records (handshake
  messages, or nothing) the caller must write back to the socket;
* :meth:`~TlsClientSession.encrypt` turns plaintext into records to write (allowed only after
  the handshake, which :attr:`~TlsClientSession.handshake_done` reports);
* :meth:`~TlsClientSession.close` returns a close_notify alert to write.

So TLS runs in the loop thread with no blocking socket and no second event loop: each read
callback costs one ``feed``; plaintext comes out in chunks as large as the records allow.

Certificates: a tor relay's TLS certificate is self-signed with a random host name, and a tor
client does not verify it at the TLS layer either. Authentication happens one layer up, in the
link handshake (the CERTS cell binds this certificate to the relay's identity, see
``relay.torcerts``), for which :meth:`~TlsClientSession.peer_certificate_der` hands out the
certificate the server presented.

Errors: anything TLS refuses (a peer that does not speak TLS, a failed handshake, a corrupt
record) raises :class:`TlsError` with the reason; the session is then dead and the caller closes
the stream.

Threads: a session is not thread-safe. Loop thread only (in practice: whichever single thread
owns the stream it is fed from).
"""

from __future__ import annotations

import ssl

__all__ = ["TlsClientSession", "TlsError"]

_READ_CHUNK = 1 << 16


class TlsError(Exception):
    """TLS failed: handshake refused, peer not speaking TLS, corrupt record, closed session."""


def _client_context() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # tor relays' TLS certs are self-signed: see module doc
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


class TlsClientSession:
    """One TLS client connection over memory buffers. Loop thread only."""

    __slots__ = ("_closed", "_handshake_done", "_incoming", "_obj", "_outgoing", "_peer_eof")

    def __init__(self, server_hostname: str | None = None) -> None:
        """``server_hostname`` only sets SNI (no verification); tor clients send none.
        Loop thread only."""
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._obj = _client_context().wrap_bio(
            self._incoming, self._outgoing, server_side=False, server_hostname=server_hostname
        )
        self._handshake_done = False
        self._closed = False
        self._peer_eof = False

    @property
    def handshake_done(self) -> bool:
        """True once the TLS handshake has completed. Loop thread only."""
        return self._handshake_done

    @property
    def peer_closed(self) -> bool:
        """True once the peer sent close_notify. Loop thread only."""
        return self._peer_eof

    def version(self) -> str | None:
        """The negotiated protocol (e.g. ``"TLSv1.3"``), None before the handshake.
        Loop thread only."""
        return self._obj.version()

    def cipher(self) -> str | None:
        """The negotiated cipher suite name, None before the handshake. Loop thread only."""
        info = self._obj.cipher()
        return info[0] if info else None

    def peer_certificate_der(self) -> bytes | None:
        """The DER certificate the server presented (unverified), None before the handshake.
        Loop thread only."""
        if not self._handshake_done:
            return None
        return self._obj.getpeercert(binary_form=True)

    def _drain_outgoing(self) -> bytes:
        return self._outgoing.read() if self._outgoing.pending else b""

    def _step_handshake(self) -> None:
        try:
            self._obj.do_handshake()
        except ssl.SSLWantReadError:
            return
        except ssl.SSLError as exc:
            self._closed = True
            raise TlsError(f"TLS handshake failed: {exc.reason or exc}") from exc
        self._handshake_done = True

    def start(self) -> bytes:
        """Begin the handshake: return the ClientHello bytes to write. Loop thread only."""
        if self._closed:
            raise TlsError("TLS session is closed")
        self._step_handshake()
        return self._drain_outgoing()

    def feed(self, data: bytes) -> tuple[bytes, bytes]:
        """Take ``data`` read from the transport; return ``(plaintext, to_write)``.

        ``plaintext`` is the application data that became available (possibly empty);
        ``to_write`` are TLS records to send back (handshake messages, key updates), possibly
        empty. Raises :class:`TlsError` when the peer's bytes are not acceptable TLS.
        Loop thread only.
        """
        if self._closed:
            raise TlsError("TLS session is closed")
        if data:
            self._incoming.write(data)
        if not self._handshake_done:
            self._step_handshake()
            if not self._handshake_done:
                return b"", self._drain_outgoing()
        chunks: list[bytes] = []
        obj = self._obj
        while True:
            try:
                chunk = obj.read(_READ_CHUNK)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                self._peer_eof = True
                break
            except ssl.SSLError as exc:
                self._closed = True
                raise TlsError(f"TLS record error: {exc.reason or exc}") from exc
            if not chunk:
                self._peer_eof = True
                break
            chunks.append(chunk)
        return b"".join(chunks), self._drain_outgoing()

    def encrypt(self, plaintext: bytes) -> bytes:
        """Return the TLS records carrying ``plaintext``. Handshake must be done.
        Loop thread only."""
        if self._closed:
            raise TlsError("TLS session is closed")
        if not self._handshake_done:
            raise TlsError("cannot send application data before the TLS handshake completes")
        view = memoryview(plaintext)
        try:
            while view:
                written = self._obj.write(view)
                view = view[written:]
        except ssl.SSLError as exc:
            self._closed = True
            raise TlsError(f"TLS write failed: {exc.reason or exc}") from exc
        return self._drain_outgoing()

    def close(self) -> bytes:
        """End the session: return a close_notify alert to write (best effort, may be empty).
        Idempotent. Loop thread only."""
        if self._closed:
            return b""
        self._closed = True
        if not self._handshake_done:
            return b""
        try:
            self._obj.unwrap()
        except ssl.SSLError:
            pass
        return self._drain_outgoing()
