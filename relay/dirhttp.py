"""HTTP/1.0 as tor speaks it on directory connections: parsing, building, compression.

tor's directory protocol (dir-spec section 6, tor's ``directory.c``, ``dircache.c``,
``dirclient.c`` and ``proto_http.c``) is a small, fixed subset of HTTP/1.0: one request per
connection, ``GET`` or ``POST``, the server answers and closes. This module is that subset,
sans I/O, and strict:

* **Requests** (what a directory server reads): the request line ``METHOD SP URL SP HTTP/1.x``
  and headers up to the first ``CRLF CRLF``, then, only when ``Content-Length`` is present,
  exactly that many body bytes. The head may not exceed :data:`MAX_HEADERS_SIZE` (tor's own
  bound, ``or.h``: 50000 bytes); tor clients that tunnel over BEGIN_DIR ask for up to 500
  microdescriptors in one URL (``max_dl_per_request``), about 22 KB, so a bound of "a few KiB"
  would refuse real tor clients. The body is bounded by the caller.
* **Responses** (what a directory client reads): ``HTTP/1.x CODE REASON`` and headers, then the
  body up to ``Content-Length`` or, without one, to the end of the stream (tor's caches send
  most documents without a length and close). Head bounded as above, body by the caller.
* **Errors** are :class:`HttpError` with a message saying which rule broke; nothing is guessed.
  The parsers take bytes in pieces of any size and keep O(piece) work per ``feed``.

Compression (``compress.c``): ``deflate`` is the zlib format (RFC 1950; a ``.z`` URL suffix asks
for it), ``gzip`` is RFC 1952, ``x-tor-lzma`` is the *legacy* ``.lzma`` ("alone") format that
``lzma_alone_encoder`` writes (not ``.xz``), with a 16 MiB decoder memory limit; ``x-zstd``
needs a library the standard library does not have, so it is never offered nor chosen here.
``identity`` means none. As tor does, a decoder accepts several compressed members back to back
(tor restarts its decoder on leftover input), which lets a server answer a multi-document
request with documents compressed once, ahead of time, and simply concatenated. Decompression
enforces tor's compression-bomb rule (past 64 KiB of output, at most 25 output bytes per input
byte) and the caller's size cap. :func:`choose_encoding` picks a method from a client's
``Accept-Encoding`` exactly as tor's ``find_best_compression_method`` does, with tor's two
preference orders (documents kept compressed vs. compressed on the fly).

Threads: everything here is pure (parsers are plain objects owned by their caller). Any thread.
"""

from __future__ import annotations

import calendar
import email.utils
import lzma
import re
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = [
    "ENCODINGS",
    "IDENTITY",
    "MAX_HEADERS_SIZE",
    "PREFER_PRECOMPRESSED",
    "PREFER_STREAMING",
    "SUPPORTED_ENCODINGS",
    "Headers",
    "HttpError",
    "HttpTooLarge",
    "Request",
    "RequestParser",
    "Response",
    "ResponseParser",
    "accept_encoding_header",
    "build_request",
    "build_response",
    "choose_encoding",
    "compress",
    "decompress",
    "http_date",
    "is_compression_bomb",
    "parse_accept_encoding",
    "parse_http_date",
    "short_response",
]

#: tor's bound on an HTTP head, request or response (``MAX_HEADERS_SIZE`` in ``or.h``).
MAX_HEADERS_SIZE = 50000

IDENTITY = "identity"
#: Every encoding name tor knows (``compression_method_names``), canonical ones only.
ENCODINGS = ("gzip", "deflate", "x-tor-lzma", "x-zstd", IDENTITY)
#: The ones this module can produce and read (the standard library has no zstd).
SUPPORTED_ENCODINGS = frozenset({"gzip", "deflate", "x-tor-lzma", IDENTITY})
#: tor's server preference for documents it keeps compressed (``srv_meth_pref_precompressed``).
PREFER_PRECOMPRESSED = ("x-tor-lzma", "x-zstd", "deflate", "gzip", IDENTITY)
#: tor's server preference when it compresses while sending
#: (``srv_meth_pref_streaming_compression``): no lzma, it is too slow for that.
PREFER_STREAMING = ("x-zstd", "deflate", "gzip", IDENTITY)
#: tor's client preference, for ``Accept-Encoding`` (``client_meth_pref``).
_CLIENT_PREFERENCE = ("x-tor-lzma", "x-zstd", "deflate", "gzip", IDENTITY)

#: tor's compression-bomb rule (``tor_compress_is_compression_bomb``).
_BOMB_CHECK_AFTER = 64 * 1024
_BOMB_MAX_FACTOR = 25
#: tor's lzma decoder memory limit (``compress_lzma.c``) and encoder preset for stored documents.
_LZMA_MEMLIMIT = 16 * 1024 * 1024
_LZMA_PRESET = 6
_ZLIB_WBITS = {"deflate": 15, "gzip": 16 + 15}

_HEAD_END = b"\r\n\r\n"
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z")
_HEAD_CHARS = re.compile(rb"[\t\r\n\x20-\x7e]*\Z")
_VERSION = re.compile(r"HTTP/1\.[0-9]\Z")
_STATUS_LINE = re.compile(r"HTTP/1\.[01] ([1-5][0-9][0-9])(?: (.*))?\Z")

Headers = tuple[tuple[str, str], ...]


class HttpError(ValueError):
    """Malformed HTTP, or over a size bound. The message says which."""


class HttpTooLarge(HttpError):
    """A head or body over its bound (tor closes such a connection without an answer)."""


def _header(headers: Headers, name: str) -> str | None:
    lowered = name.lower()
    for key, value in headers:
        if key.lower() == lowered:
            return value
    return None


@dataclass(frozen=True)
class Request:
    """One parsed request. ``target`` is the URL exactly as sent."""

    method: str
    target: str
    version: str
    headers: Headers
    body: bytes

    def header(self, name: str) -> str | None:
        """The first header called ``name`` (any case), or None. Any thread (pure)."""
        return _header(self.headers, name)


@dataclass(frozen=True)
class Response:
    """One parsed response. ``body`` is as received (still compressed)."""

    status: int
    reason: str
    headers: Headers
    body: bytes

    def header(self, name: str) -> str | None:
        """The first header called ``name`` (any case), or None. Any thread (pure)."""
        return _header(self.headers, name)


def _split_head(head: bytes) -> tuple[str, Headers]:
    """The first line and the header fields of a head without its final CRLF CRLF."""
    if not _HEAD_CHARS.match(head):
        raise HttpError("the HTTP head has bytes other than printable ASCII, tab and CRLF")
    lines = head.decode("ascii").split("\r\n")
    if any("\r" in line or "\n" in line for line in lines):
        raise HttpError("the HTTP head has a bare CR or LF")
    fields: list[tuple[str, str]] = []
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon or not _TOKEN.match(name):
            raise HttpError(f"malformed header line {line[:80]!r}")
        fields.append((name, value.strip(" \t")))
    return lines[0], tuple(fields)


def _content_length(headers: Headers) -> int | None:
    value = _header(headers, "Content-Length")
    if value is None:
        return None
    if not value.isdigit() or len(value) > 10:
        raise HttpError(f"bogus Content-Length {value[:20]!r}")
    return int(value)


class _HeadReader:
    """Collects bytes up to CRLF CRLF, bounded; the part of both parsers that finds the head."""

    def __init__(self, head_limit: int) -> None:
        self._limit = head_limit
        self._buffer = bytearray()
        self._searched = 0
        self.head: bytes | None = None

    def feed(self, data: bytes) -> bytes:
        """Add ``data``; once the head is complete, returns the bytes after it (else b'')."""
        self._buffer += data
        # Look again only where the terminator could newly start: O(len(data)) per call.
        end = self._buffer.find(_HEAD_END, max(0, self._searched - 3))
        if end < 0:
            self._searched = len(self._buffer)
            if len(self._buffer) > self._limit:
                raise HttpTooLarge(f"HTTP head longer than {self._limit} bytes")
            return b""
        if end + len(_HEAD_END) > self._limit:
            raise HttpTooLarge(f"HTTP head longer than {self._limit} bytes")
        self.head = bytes(self._buffer[:end])
        rest = bytes(self._buffer[end + len(_HEAD_END):])
        self._buffer = bytearray()
        return rest


class RequestParser:
    """Incremental request parser: ``feed`` pieces until it returns the :class:`Request`.

    The request is complete at the end of the head, or, with ``Content-Length``, when that many
    body bytes have arrived (tor's ``fetch_from_buf_http``); bytes after that are ignored, as
    tor ignores anything a client sends after its one request. A ``Content-Length`` above
    ``body_limit`` fails at once.
    """

    def __init__(self, *, head_limit: int = MAX_HEADERS_SIZE, body_limit: int = 0) -> None:
        """Bounds in bytes. Any thread (the object belongs to its caller)."""
        self._head = _HeadReader(head_limit)
        self._body_limit = body_limit
        self._line: tuple[str, str, str] | None = None
        self._headers: Headers = ()
        self._length: int | None = None
        self._body = bytearray()
        self.request: Request | None = None

    def feed(self, data: bytes) -> Request | None:
        """Add bytes; returns the request once complete (and on every later call).
        Raises :class:`HttpError`. Any thread (pure)."""
        if self.request is not None:
            return self.request
        if self._line is None:
            rest = self._head.feed(data)
            if self._head.head is None:
                return None
            first, self._headers = _split_head(self._head.head)
            self._line = _request_line(first)
            self._length = _content_length(self._headers)
            if self._length is not None and self._length > self._body_limit:
                raise HttpTooLarge(f"request body of {self._length} bytes is over the limit of "
                                f"{self._body_limit}")
            data = rest
        if self._length is not None:
            self._body += data[:self._length - len(self._body)]
            if len(self._body) < self._length:
                return None
        method, target, version = self._line
        self.request = Request(method, target, version, self._headers, bytes(self._body))
        return self.request


def _request_line(line: str) -> tuple[str, str, str]:
    parts = line.split(" ")
    if len(parts) != 3 or not all(parts):
        raise HttpError(f"malformed request line {line[:80]!r}")
    method, target, version = parts
    if not _TOKEN.match(method) or not _VERSION.match(version):
        raise HttpError(f"malformed request line {line[:80]!r}")
    return method, target, version


class ResponseParser:
    """Incremental response parser: ``feed`` pieces, then ``finish()`` at the end of stream.

    ``complete`` turns true when a ``Content-Length`` body has fully arrived; bytes past it are
    an error. Without ``Content-Length`` the body is everything until ``finish()``.
    """

    def __init__(self, *, head_limit: int = MAX_HEADERS_SIZE, body_limit: int) -> None:
        """Bounds in bytes. Any thread (the object belongs to its caller)."""
        self._head = _HeadReader(head_limit)
        self._body_limit = body_limit
        self._status: tuple[int, str] | None = None
        self._headers: Headers = ()
        self._length: int | None = None
        self._body = bytearray()

    @property
    def complete(self) -> bool:
        """True once a response with ``Content-Length`` has all its body. Any thread."""
        return self._length is not None and len(self._body) == self._length

    @property
    def head_received(self) -> bool:
        """True once the status line and headers are in. Any thread."""
        return self._status is not None

    def feed(self, data: bytes) -> None:
        """Add bytes. Raises :class:`HttpError`. Any thread (pure)."""
        if self._status is None:
            data = self._head.feed(data)
            if self._head.head is None:
                return
            first, self._headers = _split_head(self._head.head)
            self._status = _status_line(first)
            self._length = _content_length(self._headers)
            if self._length is not None and self._length > self._body_limit:
                raise HttpTooLarge(f"response body of {self._length} bytes is over the limit of "
                                f"{self._body_limit}")
        if self._length is not None and len(self._body) + len(data) > self._length:
            raise HttpError("bytes after the Content-Length body")
        if len(self._body) + len(data) > self._body_limit:
            raise HttpTooLarge(f"response body over the limit of {self._body_limit} bytes")
        self._body += data

    def finish(self) -> Response:
        """The response, at the end of the stream. Raises :class:`HttpError` if the head or a
        ``Content-Length`` body is incomplete. Any thread (pure)."""
        if self._status is None:
            raise HttpError("the stream ended before the end of the HTTP head")
        if self._length is not None and len(self._body) != self._length:
            raise HttpError(f"the stream ended after {len(self._body)} of {self._length} "
                            "body bytes")
        status, reason = self._status
        return Response(status, reason, self._headers, bytes(self._body))


def _status_line(line: str) -> tuple[int, str]:
    match = _STATUS_LINE.match(line)
    if match is None:
        raise HttpError(f"malformed status line {line[:80]!r}")
    return int(match.group(1)), match.group(2) or ""


# --------------------------------------------------------------------------- building


def build_request(method: str, path: str, host: str, port: int,
                  headers: Sequence[tuple[str, str]] = (), body: bytes | None = None) -> bytes:
    """A request as tor's ``directory_send_command`` writes it: the request line, ``Host``
    (without the port when it is 80; IPv6 in brackets), the given headers in order, then
    ``Content-Length`` for a body. Any thread (pure)."""
    for part in (method, path):
        if not part or any(c in part for c in " \r\n"):
            raise ValueError(f"bad request part {part!r}")
    address = f"[{host}]" if ":" in host and not host.startswith("[") else host
    lines = [f"{method} {path} HTTP/1.0", f"Host: {address}" if port == 80
             else f"Host: {address}:{port}"]
    lines += [f"{name}: {value}" for name, value in headers]
    if body is not None:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii") + (body or b"")


def build_response(status: int, reason: str, headers: Sequence[tuple[str, str]]) -> bytes:
    """A response head: ``HTTP/1.0 STATUS REASON``, the headers in order, the blank line.
    Any thread (pure)."""
    lines = [f"HTTP/1.0 {status} {reason}"] + [f"{name}: {value}" for name, value in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")


def short_response(status: int, reason: str, now: float) -> bytes:
    """tor's ``write_short_http_response`` as a relay writes it: status line and ``Date`` only.
    Any thread (pure)."""
    return build_response(status, reason, [("Date", http_date(now))])


def http_date(seconds: float) -> str:
    """RFC 1123 time, as tor's ``format_rfc1123_time``. Any thread (pure)."""
    return email.utils.formatdate(int(seconds), usegmt=True)


def parse_http_date(text: str) -> int | None:
    """Seconds since the epoch from an RFC 1123 date, or None if it is not one (tor then acts
    as if the header were absent). Any thread (pure)."""
    try:
        parsed = email.utils.parsedate_tz(text)
    except (TypeError, ValueError):
        return None
    if parsed is None:
        return None
    return calendar.timegm((*parsed[:6], 0, 0, 0)) - (parsed[9] or 0)


# --------------------------------------------------------------------------- compression


def accept_encoding_header() -> str:
    """``Accept-Encoding`` as tor's client writes it, for the methods supported here.
    Any thread (pure)."""
    return ", ".join(m for m in _CLIENT_PREFERENCE if m in SUPPORTED_ENCODINGS)


def parse_accept_encoding(value: str | None, *, url_asks_deflate: bool = False) -> frozenset[str]:
    """The encodings a request allows and this module supports: ``identity`` always, every
    known name in the comma-separated ``value`` (tor's ``parse_accept_encoding_header``: no
    q-values, unknown names ignored), and ``deflate`` when the URL ended in ``.z``.
    Any thread (pure)."""
    allowed = {IDENTITY}
    if value:
        allowed.update(m.strip() for m in value.split(","))
    if url_asks_deflate:
        allowed.add("deflate")
    return frozenset(allowed & SUPPORTED_ENCODINGS)


def choose_encoding(allowed: Iterable[str], preference: Sequence[str]) -> str:
    """The first of ``preference`` (:data:`PREFER_PRECOMPRESSED` or :data:`PREFER_STREAMING`)
    in ``allowed``, else ``identity``. Any thread (pure)."""
    allowed = frozenset(allowed)
    return next((m for m in preference if m in allowed), IDENTITY)


def compress(data: bytes, encoding: str) -> bytes:
    """``data`` in ``encoding`` (one member). Raises ``ValueError`` for an encoding not
    supported here. Any thread (pure; CPU-bound for large documents)."""
    if encoding == IDENTITY:
        return data
    if encoding in _ZLIB_WBITS:
        # tor always deflates at its best level (tor_zlib_compress_new).
        compressor = zlib.compressobj(9, zlib.DEFLATED, _ZLIB_WBITS[encoding])
        return compressor.compress(data) + compressor.flush()
    if encoding == "x-tor-lzma":
        return lzma.compress(data, format=lzma.FORMAT_ALONE, preset=_LZMA_PRESET)
    raise ValueError(f"unsupported encoding {encoding!r}")


def is_compression_bomb(size_in: int, size_out: int) -> bool:
    """tor's rule: past 64 KiB of output, more than 25 output bytes per input byte is an
    attack. Any thread (pure)."""
    if size_in == 0 or size_out < _BOMB_CHECK_AFTER:
        return False
    return size_out // size_in > _BOMB_MAX_FACTOR


def _decoder(encoding: str) -> zlib._Decompress | lzma.LZMADecompressor:
    if encoding in _ZLIB_WBITS:
        return zlib.decompressobj(_ZLIB_WBITS[encoding])
    return lzma.LZMADecompressor(format=lzma.FORMAT_ALONE, memlimit=_LZMA_MEMLIMIT)


def decompress(data: bytes, encoding: str, limit: int) -> bytes:
    """Decode ``data`` (one or more members back to back, as tor accepts) into at most
    ``limit`` bytes. Raises :class:`HttpError` for bad data, an unsupported encoding, output
    over ``limit`` or a compression bomb. Any thread (pure)."""
    if encoding == IDENTITY:
        if len(data) > limit:
            raise HttpError(f"document of {len(data)} bytes is over the limit of {limit}")
        return data
    if encoding not in SUPPORTED_ENCODINGS:
        raise HttpError(f"unsupported Content-Encoding {encoding!r}")
    out = bytearray()
    pending = data
    while pending:
        decoder = _decoder(encoding)
        feed = pending
        try:
            while True:
                chunk = decoder.decompress(feed, limit + 1 - len(out))
                feed = getattr(decoder, "unconsumed_tail", b"")
                out += chunk
                if len(out) > limit:
                    raise HttpError(f"{encoding} body decodes to more than {limit} bytes")
                if is_compression_bomb(len(data), len(out)):
                    raise HttpError(f"{encoding} body looks like a compression bomb")
                if decoder.eof or (not chunk and not feed):
                    break
        except (zlib.error, lzma.LZMAError, EOFError) as exc:
            raise HttpError(f"bad {encoding} data: {exc}") from None
        if not decoder.eof:
            raise HttpError(f"truncated {encoding} data")
        pending = decoder.unused_data
    return bytes(out)

