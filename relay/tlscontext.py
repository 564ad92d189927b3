"""TLS settings for Tor links: the contexts that client and server sessions start from.

What tor expects of TLS (tor 0.4.9, ``src/lib/tls/tortls_openssl.c`` and ``tortls.c``), and what
these contexts do about it (the settings themselves are made in C, ``relay/_tls/tlskernel.c``,
on the system's libssl):

* TLS 1.2 at least, TLS 1.3 when both ends have it (tor sets only a minimum version): both
  contexts set minimum TLS 1.2 and leave the maximum at the library's (TLS 1.3); a test may
  lower it (``max_version``) to play a peer without TLS 1.3.
* No certificate checking at the TLS layer: a relay's TLS certificate is a short-lived "link"
  certificate with a random host name, signed by the relay's RSA identity key; a tor client
  accepts any certificate and authenticates the relay one layer up (CERTS, ``relay.torcerts``).
  Neither context verifies anything.
* No client certificate: an initiating relay proves its identity in-protocol with AUTHENTICATE,
  which binds the TLS session through the RFC 5705 exporter. The server context asks for none
  (no CertificateRequest; a tor 0.4.9 server sends none either, in TLS 1.2 or 1.3: seen with
  ``openssl s_client -msg``), the client context has none.
* The server: forward-secret ECDHE suites for TLS 1.2 in the server's order of preference
  (``relay._tls.SERVER_TLS12_CIPHERS``; tor's list starts with the same suites, its DHE
  fallbacks are for tors older than 0.2.4), OpenSSL's TLS 1.3 suites; no session tickets in
  TLS 1.2 or 1.3, no session cache, no compression. tor sets the same options, but sets only
  ``SSL_OP_NO_TICKET``, which in TLS 1.3 makes OpenSSL send a stateful ticket instead of none:
  a tor 0.4.9 server sends one NewSessionTicket after a TLS 1.3 handshake (useless to the
  client: the server caches no session); ours sends none. A client offers tickets, as tor's
  client does, and caches nothing.
* No renegotiation in either direction (``SSL_OP_NO_RENEGOTIATION``; TLS 1.3 has none): tor's
  v3 link handshake never renegotiates, and a session's certificates and keys therefore stay
  what the handshake fixed.
* ``SSL_MODE_RELEASE_BUFFERS``, as tor: an idle session holds no record buffers.
* SNI: tor's *client* sends a random ``www.<random>.com`` host name (a disguise, never checked);
  a tor server ignores whatever arrives. Our server accepts any or none; our client sends one
  only when asked to.

What tor sets and these contexts do not: ``SSL_OP_ALLOW_UNSAFE_LEGACY_RENEGOTIATION`` and
the server's renegotiation watch (the v2 link handshake, gone since tor 0.2.3), DH parameters
(no DHE suites here), and ``SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER`` (a session's writes never
stop half-way: its transport takes everything at once).

A tor client's ClientHello (tor 0.4.9 on OpenSSL 3) offers TLS 1.3 with the usual suites and
key shares, and ECDHE suites for TLS 1.2: the server context's settings accept it.

:class:`TlsServerContext` holds the certificate and key a relay's server sessions present and
the C context (``relay._tls.TlsContext``) built from them. :meth:`TlsServerContext.rotate`
builds a new one (tor makes a new link key and certificate every two hours): sessions created
afterwards use the new certificate, sessions already running keep the one they started with
(each holds a reference to the context it was made from). A C context is never changed after
creation, which is what lets OpenSSL share it between threads.

Threads: a context holds no per-connection state. Any thread may create sessions from it;
``rotate`` replaces one reference in one assignment, so a session being created concurrently
gets either the old or the new credentials, both complete.
"""

from __future__ import annotations

from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa

from relay import _tls

__all__ = [
    "PrivateKey",
    "TlsClientContext",
    "TlsError",
    "TlsServerContext",
    "load_certificate",
    "load_private_key",
]

PrivateKey = (rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
              | ed448.Ed448PrivateKey | dsa.DSAPrivateKey)
"""The private key types OpenSSL can serve TLS with."""


class TlsError(Exception):
    """TLS failed: handshake refused, peer not speaking TLS, corrupt record, closed session,
    unusable certificate or key. The message says why (OpenSSL's reasons, for what OpenSSL
    refused). Raised by the C sessions of ``relay._tls`` too."""


def load_certificate(certificate: x509.Certificate | bytes) -> x509.Certificate:
    """A certificate given as a ``cryptography`` object, or DER or PEM bytes. Raises
    :class:`TlsError` when the bytes are not a certificate. Any thread (pure)."""
    if isinstance(certificate, x509.Certificate):
        return certificate
    data = bytes(certificate)
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_certificate(data)
        return x509.load_der_x509_certificate(data)
    except ValueError as exc:
        raise TlsError(f"cannot load the TLS certificate: {exc}") from exc


def load_private_key(private_key: PrivateKey | bytes) -> PrivateKey:
    """A private key given as a ``cryptography`` object, or unencrypted DER or PEM bytes. Raises
    :class:`TlsError` when the bytes are not a usable private key. Any thread (pure)."""
    if not isinstance(private_key, bytes | bytearray | memoryview):
        key = private_key
    else:
        data = bytes(private_key)
        try:
            if data.lstrip().startswith(b"-----BEGIN"):
                key = serialization.load_pem_private_key(data, password=None)
            else:
                key = serialization.load_der_private_key(data, password=None)
        except (ValueError, TypeError) as exc:
            raise TlsError(f"cannot load the TLS private key: {exc}") from exc
    if not isinstance(key, PrivateKey):
        raise TlsError(f"a {type(key).__name__} cannot serve TLS")
    return key


class TlsClientContext:
    """Settings for outgoing links (see the module doc); one C context shared by every session
    made from it. Any thread."""

    __slots__ = ("_kernel",)

    def __init__(self, *, max_version: int | None = None) -> None:
        """Build the client context; ``max_version`` (``relay._tls.TLS1_2_VERSION``) stops at
        TLS 1.2, for tests that need a peer without TLS 1.3. Any thread."""
        self._kernel = _tls.TlsContext(False, max_version=max_version or 0)

    @property
    def kernel(self) -> Any:
        """The ``relay._tls.TlsContext`` new client sessions use; never changed. Any thread."""
        return self._kernel


class TlsServerContext:
    """The certificate and key a relay's TLS server presents, and the C context built from them,
    replaced as a whole by :meth:`rotate`. Any thread."""

    __slots__ = ("_current", "_max_version")

    def __init__(self, certificate: x509.Certificate | bytes,
                 private_key: PrivateKey | bytes, *, max_version: int | None = None) -> None:
        """``certificate`` and ``private_key`` as ``cryptography`` objects or DER/PEM bytes; they
        must belong together. Raises :class:`TlsError` otherwise. ``max_version`` as for
        :class:`TlsClientContext`. Any thread."""
        self._max_version = max_version or 0
        # One attribute, replaced in one assignment: readers see the old context or the new one.
        self._current = self._build(certificate, private_key)

    def _build(self, certificate: x509.Certificate | bytes,
               private_key: PrivateKey | bytes) -> Any:
        cert = load_certificate(certificate)
        key = load_private_key(private_key)
        key_der = key.private_bytes(serialization.Encoding.DER,
                                    serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        return _tls.TlsContext(True, cert.public_bytes(serialization.Encoding.DER), key_der,
                               max_version=self._max_version)

    def rotate(self, certificate: x509.Certificate | bytes,
               private_key: PrivateKey | bytes) -> None:
        """Present ``certificate`` (with ``private_key``) on sessions created from now on;
        running sessions keep theirs. On :class:`TlsError` nothing changes. Any thread."""
        self._current = self._build(certificate, private_key)

    @property
    def kernel(self) -> Any:
        """The ``relay._tls.TlsContext`` new server sessions use. Any thread."""
        return self._current

    @property
    def certificate_der(self) -> bytes:
        """The DER certificate new sessions present (a session's own is
        ``TlsServerSession.own_certificate_der``). Any thread."""
        return self._current.certificate_der
