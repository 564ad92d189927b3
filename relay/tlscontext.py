"""TLS settings for Tor links: the pyOpenSSL contexts that client and server sessions start from.

What tor expects of TLS (tor 0.4.9, ``src/lib/tls/tortls_openssl.c`` and ``tortls.c``), and what
these contexts do about it:

* TLS 1.2 at least, TLS 1.3 when both ends have it (tor sets only a minimum version): both
  contexts set minimum TLS 1.2 and leave the maximum at the library's (TLS 1.3).
* No certificate checking at the TLS layer: a relay's TLS certificate is a short-lived "link"
  certificate with a random host name, signed by the relay's RSA identity key; a tor client
  accepts any certificate and authenticates the relay one layer up (CERTS, ``relay.torcerts``).
  The client context therefore verifies nothing.
* No client certificate: a tor server never asks for one (tor sets ``SSL_VERIFY_NONE`` on its
  server context, so no CertificateRequest is sent); an initiating relay proves its identity
  in-protocol with AUTHENTICATE, which binds the TLS session through the RFC 5705 exporter. The
  server context asks for none, the client context has none.
* The server: forward-secret ECDHE suites for TLS 1.2 in the server's order of preference, no
  session tickets, no session cache, no compression (tor sets the same options). OpenSSL (3.0
  and later) also refuses client-initiated renegotiation by default; TLS 1.3 has none.
* SNI: tor's *client* sends a random ``www.<random>.com`` host name (a disguise, never checked);
  a tor server ignores whatever arrives. Our server accepts any or none; our client sends one
  only when asked to.

A tor client's ClientHello (tor 0.4.9 on OpenSSL 3) offers TLS 1.3 with the usual suites and
key shares for P-256, and ECDHE suites for TLS 1.2: the server context's settings accept it.

pyOpenSSL runs on the OpenSSL that the ``cryptography`` wheel carries inside it, not on the
system's libssl (which tor, Python's ``ssl`` and the C kernel use); the two need not be the same
version, and only standard TLS passes between them.

:class:`TlsServerContext` holds the certificate and key a relay's server sessions present and
caches the ``SSL.Context`` built from them. :meth:`TlsServerContext.rotate` builds a new one
(tor makes a new link key and certificate every two hours): sessions created afterwards
use the new certificate, sessions already running keep the one they started with, because each
pyOpenSSL ``Connection`` holds a reference to the ``Context`` it was made from. A context is never
changed after a session was made from it (pyOpenSSL warns about that, and OpenSSL's contexts are
shared between threads only while nobody changes them).

Threads: a context holds no per-connection state. Any thread may create sessions from it;
``rotate`` replaces one reference in one assignment, so a session being created concurrently
gets either the old or the new credentials, both complete.
"""

from __future__ import annotations

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from OpenSSL import SSL

__all__ = [
    "PrivateKey",
    "TlsClientContext",
    "TlsError",
    "TlsServerContext",
    "load_certificate",
    "load_private_key",
    "openssl_reason",
]

PrivateKey = (rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
              | ed448.Ed448PrivateKey | dsa.DSAPrivateKey)
"""The private key types OpenSSL can serve TLS with (what ``Context.use_privatekey`` takes)."""

_SERVER_TLS12_CIPHERS = b"ECDHE+AESGCM:ECDHE+CHACHA20:ECDHE+AES:!aNULL:!eNULL"
"""TLS 1.2 suites the server picks from, in its order: forward-secret ECDHE only (tor's server
list starts with the same ECDHE suites; its DHE fallbacks are for tors older than 0.2.4). TLS 1.3
suites are OpenSSL's defaults, which tor's client offers too."""


class TlsError(Exception):
    """TLS failed: handshake refused, peer not speaking TLS, corrupt record, closed session,
    unusable certificate or key. The message says why."""


def _base_context() -> SSL.Context:
    context = SSL.Context(SSL.TLS_METHOD)
    context.set_min_proto_version(SSL.TLS1_2_VERSION)
    context.set_options(SSL.OP_NO_COMPRESSION)
    context.set_verify(SSL.VERIFY_NONE)  # see module doc: authentication is in-protocol
    return context


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
    """Settings for outgoing links (see the module doc); one ``SSL.Context`` shared by every
    session made from it. Any thread."""

    __slots__ = ("_ssl_context",)

    def __init__(self) -> None:
        """Build the client context. Any thread."""
        self._ssl_context = _base_context()

    @property
    def ssl_context(self) -> SSL.Context:
        """The pyOpenSSL context new client sessions use; never changed. Any thread."""
        return self._ssl_context


class TlsServerContext:
    """The certificate and key a relay's TLS server presents, and the ``SSL.Context`` built from
    them, replaced as a whole by :meth:`rotate`. Any thread."""

    __slots__ = ("_current",)

    def __init__(self, certificate: x509.Certificate | bytes,
                 private_key: PrivateKey | bytes) -> None:
        """``certificate`` and ``private_key`` as ``cryptography`` objects or DER/PEM bytes; they
        must belong together. Raises :class:`TlsError` otherwise. Any thread."""
        # One attribute, replaced in one assignment: readers see the old pair or the new one.
        self._current = self._build(certificate, private_key)

    @staticmethod
    def _build(certificate: x509.Certificate | bytes,
               private_key: PrivateKey | bytes) -> tuple[SSL.Context, bytes]:
        cert = load_certificate(certificate)
        key = load_private_key(private_key)
        context = _base_context()
        context.set_options(SSL.OP_CIPHER_SERVER_PREFERENCE | SSL.OP_NO_TICKET
                            | SSL.OP_SINGLE_ECDH_USE)
        context.set_session_cache_mode(SSL.SESS_CACHE_OFF)
        context.set_cipher_list(_SERVER_TLS12_CIPHERS)
        try:
            context.use_certificate(cert)
            context.use_privatekey(key)
            context.check_privatekey()
        except SSL.Error as exc:
            raise TlsError(f"the TLS certificate and key are not usable together: "
                           f"{openssl_reason(exc)}") from exc
        return context, cert.public_bytes(serialization.Encoding.DER)

    def rotate(self, certificate: x509.Certificate | bytes,
               private_key: PrivateKey | bytes) -> None:
        """Present ``certificate`` (with ``private_key``) on sessions created from now on;
        running sessions keep theirs. On :class:`TlsError` nothing changes. Any thread."""
        self._current = self._build(certificate, private_key)

    @property
    def ssl_context(self) -> SSL.Context:
        """The pyOpenSSL context new server sessions use. Any thread."""
        return self._current[0]

    @property
    def certificate_der(self) -> bytes:
        """The DER certificate new sessions present (a session's own is
        ``TlsServerSession.own_certificate_der``). Any thread."""
        return self._current[1]


def openssl_reason(exc: SSL.Error) -> str:
    """OpenSSL's reasons from a pyOpenSSL error, e.g. ``"bad record mac"``. Any thread (pure)."""
    if isinstance(exc, SSL.ZeroReturnError):
        return "the peer closed the TLS session (close_notify)"
    if isinstance(exc, SSL.SysCallError):
        return str(exc.args[1]) if len(exc.args) > 1 else "unexpected end of the connection"
    entries = exc.args[0] if exc.args and isinstance(exc.args[0], list) else None
    if entries:
        return "; ".join(str(entry[-1]) for entry in entries if entry)
    return str(exc) or type(exc).__name__
