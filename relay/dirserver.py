"""Answer one directory request (a BEGIN_DIR stream, or a DirPort connection) from a DirStore.

:class:`DirServer` is the tiny interface the exit edge drives: it is built with two callbacks,
``send(bytes)`` and ``end(reason)``, and fed the stream's bytes as they arrive (``feed``). Once
a whole request is in, it answers with exactly one ``send`` (the complete response) followed
by ``end(END_DONE)``; a request over tor's bounds, or with a method tor does not know, gets no
answer and ``end(END_REFUSED)`` (tor closes such connections silently). Bytes after the request
are ignored. Work per request is bounded: the head is at most
:data:`relay.dirhttp.MAX_HEADERS_SIZE` bytes, so at most about a thousand documents can be
named, each a dictionary lookup, and the answer is a join of bytes compressed beforehand.

:func:`respond` is the answer itself, following tor 0.4.9's ``dircache.c`` as a bridge or a
non-authority relay runs it (status codes, reason phrases, headers and their order):

=========================================================== ===================================
URL (``.z`` appended asks for ``deflate``)                   answer
=========================================================== ===================================
``/tor/status-vote/current/consensus[-FLAVOR][/FP+FP...]``   the cached consensus of that flavor
                                                             (unknown flavors mean ``ns``, as in
                                                             tor); 304 when ``If-Modified-Since``
                                                             is past its valid-after or
                                                             ``X-Or-Diff-From-Consensus`` names it;
                                                             404 "Consensus not signed by
                                                             sufficient number of requested
                                                             authorities", "Consensus is too
                                                             new/old", "No such diff available"
                                                             (no diffs are kept), "Not found"
``/tor/micro/d/D1-D2...``                                    the microdescriptors held, by
                                                             digest order
``/tor/server/authority``, ``fp/FP+...``, ``d/D+...``,       this relay's own descriptor (a
``all``                                                      bridge leaves it out of ``all``, as
                                                             tor does); "Servers unavailable"
``/tor/keys/all``, ``fp/FP+...``, ``sk/SK+...``,             authority key certificates; other
``fp-sk/FP-SK+...``                                          ``/tor/keys/`` names: 400
``/tor/robots.txt``                                          tor's robots.txt
anything else (``/tor/``, votes, ``/tor/extra/``,            404 "Not found"
hidden-service descriptors)
=========================================================== ===================================

Headers on a 200: ``Date``, ``Content-Type: text/plain``, ``X-Your-Address-Is`` (only for a
caller-given non-private client address), ``Content-Encoding`` (``identity`` when
uncompressed), ``Content-Length`` only where tor sends one (uncompressed certificates,
robots.txt), ``Expires`` (tor's cache lifetimes) or ``Pragma: no-cache``, and ``Vary:
X-Or-Diff-From-Consensus`` on a consensus. Other answers are tor's short form: status line
and ``Date``. ``POST`` gets 503 "Not acting as a public relay" from a bridge and 400
"Nonauthoritative directory does not accept posted server descriptors" from a relay.

Differences from tor, all toward answering: tor 0.4.9 sends nothing at all for
``/tor/extra/`` on a bridge and for ``/tor/networkstatus-bridges`` on a non-authority (the
connection then only times out), and 503 for hidden-service fetches on one-hop circuits;
here each is a 404.

Threads: :func:`respond` reads the store, so it and :class:`DirServer` are loop thread only.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from relay.dirhttp import (
    IDENTITY,
    MAX_HEADERS_SIZE,
    PREFER_PRECOMPRESSED,
    PREFER_STREAMING,
    HttpError,
    HttpTooLarge,
    Request,
    RequestParser,
    build_response,
    choose_encoding,
    http_date,
    parse_accept_encoding,
    parse_http_date,
    short_response,
)
from relay.dirstore import DirStore, Stored

__all__ = [
    "END_DONE",
    "END_ERROR",
    "END_REFUSED",
    "DirServer",
    "Reply",
    "respond",
]

logger = logging.getLogger("relay.dirserver")

#: ``end`` reasons: the answer was sent; the request was refused unanswered (too large, or an
#: unknown method); an internal error (logged) ended the stream without an answer.
END_DONE = "done"
END_REFUSED = "refused"
END_ERROR = "error"

#: tor's cache lifetimes, seconds (``dircache.c``).
_FULL_DIR_LIFETIME = 60 * 60
_ROUTERDESC_BY_DIGEST_LIFETIME = 48 * 60 * 60
_MICRODESC_LIFETIME = 48 * 60 * 60
_KEYS_LIFETIME = 60 * 60
_ROBOTS_LIFETIME = 24 * 60 * 60
#: tor serves a consensus from up to a day before valid-after to a day after valid-until.
_REASONABLY_LIVE = 24 * 60 * 60
#: tor's fingerprint requests (``ROUTER_MAX_AGE_TO_PUBLISH``): older descriptors are not served.
_MAX_AGE_TO_PUBLISH = 24 * 60 * 60
#: The largest request body read before answering a POST (which is always refused here):
#: tor reads up to 16 MiB (``MAX_DIR_UL_SIZE``) because it may store what comes; a server
#: descriptor with its extra-info is a few KiB. A larger body ends the stream unanswered.
_MAX_REQUEST_BODY = 64 * 1024
_ROBOTS = b"User-agent: *\r\nDisallow: /\r\n"


@dataclass(frozen=True)
class Reply:
    """An answer: its status and the bytes to send (head and body)."""

    status: int
    data: bytes


def _short(status: int, reason: str, now: float) -> Reply:
    return Reply(status, short_response(status, reason, now))


def _ok(now: float, encoding: str, body: bytes, *, lifetime: int, length: bool = False,
        client_address: str | None = None, extra: Iterable[tuple[str, str]] = ()) -> Reply:
    """tor's ``write_http_response_header_impl``: lifetime > 0 gives ``Expires``, 0 gives
    ``Pragma: no-cache``."""
    headers = [("Date", http_date(now)), ("Content-Type", "text/plain")]
    if client_address is not None and _reportable(client_address):
        headers.append(("X-Your-Address-Is", client_address))
    headers.append(("Content-Encoding", encoding))
    if length:
        headers.append(("Content-Length", str(len(body))))
    if lifetime > 0:
        headers.append(("Expires", http_date(now + lifetime)))
    else:
        headers.append(("Pragma", "no-cache"))
    headers.extend(extra)
    return Reply(200, build_response(200, "OK", headers) + body)


def _reportable(address: str) -> bool:
    """tor does not tell a client on a local or private network its address."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return not (ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_unspecified)


def _form(document: Stored, encoding: str) -> tuple[str, bytes]:
    """``document`` in ``encoding`` when kept in it, else as it is."""
    data = document.forms.get(encoding)
    return (encoding, data) if data is not None else (IDENTITY, document.text)


def _items_body(documents: list[Stored], encoding: str) -> tuple[str, bytes]:
    """Several documents in one encoding (members back to back), or all uncompressed if any
    one lacks that encoding."""
    if all(encoding in d.forms for d in documents):
        return encoding, b"".join(d.forms[encoding] for d in documents)
    return IDENTITY, b"".join(d.text for d in documents)


def _url_of(target: str) -> str:
    """tor's ``parse_http_url``: skip an ``http[s]://host`` prefix, put ``/tor`` in front of a
    path that lacks it."""
    url = target
    for scheme in ("http://", "https://"):
        if url.startswith(scheme):
            slash = url.find("/", len(scheme))
            if slash >= 0:
                url = url[slash:]
    if not url.startswith("/tor/"):
        url = "/tor" + ("" if url.startswith("/") else "/") + url
    return url


def _split(resource: str, separator: str) -> list[str]:
    """tor's ``dir_split_resource_into_fingerprints`` before decoding: split, and drop a
    trailing ``.z`` from the last part."""
    parts = resource.split(separator)
    if parts and len(parts[-1]) > 2 and parts[-1].endswith(".z"):
        parts[-1] = parts[-1][:-2]
    return parts


def _hex_digests(resource: str) -> list[str]:
    """Valid 40-hex-digit names, upper case, sorted and unique (``DSR_HEX|DSR_SORT_UNIQ``)."""
    found = set()
    for part in _split(resource, "+"):
        if len(part) == 40:
            try:
                found.add(bytes.fromhex(part).hex().upper())
            except ValueError:
                continue
    return sorted(found)


def _b64_digests(resource: str) -> list[bytes]:
    """Valid unpadded base64 SHA-256 names, decoded, sorted and unique
    (``DSR_BASE64|DSR_DIGEST256|DSR_SORT_UNIQ``)."""
    found = set()
    for part in _split(resource, "-"):
        if len(part) == 43:
            try:
                found.add(base64.b64decode(part + "=", validate=True))
            except (binascii.Error, ValueError):
                continue
    return sorted(found)


def respond(request: Request, store: DirStore, now: float, *, bridge: bool = True,
            client_address: str | None = None) -> Reply | None:
    """The answer tor would give to ``request`` from what ``store`` holds at ``now``, or None
    for a method tor does not answer. Loop thread only (reads the store)."""
    method = request.method.upper()
    if method == "POST":
        if bridge:
            return _short(503, "Not acting as a public relay", now)
        return _short(400, "Nonauthoritative directory does not accept posted server "
                           "descriptors", now)
    if method != "GET":
        return None
    url = _url_of(request.target)
    allowed = parse_accept_encoding(request.header("Accept-Encoding"),
                                    url_asks_deflate=len(url) > 2 and url.endswith(".z"))
    if len(url) > 2 and url.endswith(".z"):
        url = url[:-2]
    ims = request.header("If-Modified-Since")
    since = parse_http_date(ims) if ims is not None else None
    args = _Args(request, store, now, allowed, since or 0, client_address, bridge)
    if url.startswith("/tor/status-vote/current/consensus"):
        return _consensus(args, url)
    if url.startswith("/tor/micro/d/"):
        return _microdescs(args, url[len("/tor/micro/d/"):])
    if url.startswith("/tor/server/"):
        return _server(args, url[len("/tor/server/"):])
    if url.startswith("/tor/keys/"):
        return _keys(args, url)
    if url == "/tor/robots.txt":
        return _ok(now, IDENTITY, _ROBOTS, lifetime=_ROBOTS_LIFETIME, length=True,
                   client_address=client_address)
    return _short(404, "Not found", now)


@dataclass(frozen=True)
class _Args:
    request: Request
    store: DirStore
    now: float
    allowed: frozenset[str]
    if_modified_since: int
    client_address: str | None
    bridge: bool


def _flavor(url: str) -> tuple[str, str | None]:
    """(flavor, what follows it) of a consensus URL, as tor's ``parse_consensus_request``."""
    flavored = "/tor/status-vote/current/consensus-"
    plain = "/tor/status-vote/current/consensus/"
    if url.startswith(flavored):
        name, slash, after = url[len(flavored):].partition("/")
        return ("microdesc" if name == "microdesc" else "ns"), (after if slash else None)
    if url.startswith(plain):
        return "ns", url[len(plain):]
    return "ns", None


def _consensus(a: _Args, url: str) -> Reply:
    flavor, after = _flavor(url)
    want_fps = after
    diff_from: list[bytes] = []
    diff_only = False
    if after is not None and after.startswith("diff/"):
        name, slash, rest = after[len("diff/"):].partition("/")
        want_fps = rest if slash else None
        diff_only = True
        try:
            digest = bytes.fromhex(name)
        except ValueError:
            digest = b""
        if len(digest) != 32:
            return _short(404, "Couldn't parse request", a.now)
        diff_from.append(digest)
    else:
        for word in (a.request.header("X-Or-Diff-From-Consensus") or "").split():
            try:
                digest = bytes.fromhex(word)
            except ValueError:
                continue
            if len(digest) == 32:
                diff_from.append(digest)
    cached = a.store.consensus(flavor)
    if cached is not None and cached.info.sha3_as_signed in diff_from:
        return _short(304, "Not modified", a.now)
    if diff_only:
        return _short(404, "No such diff available", a.now)
    if cached is not None:
        info = cached.info
        if a.now < info.valid_after - _REASONABLY_LIVE:
            return _short(404, "Consensus is too new", a.now)
        if a.now > info.valid_until + _REASONABLY_LIVE:
            return _short(404, "Consensus is too old", a.now)
        if want_fps is not None and not _signed_by_enough(info.signatories, want_fps):
            return _short(404, "Consensus not signed by sufficient number of requested "
                               "authorities", a.now)
    if cached is None:
        return _short(404, "Not found", a.now)
    if cached.info.valid_after < a.if_modified_since:
        return _short(304, "Not modified", a.now)
    wanted = choose_encoding(a.allowed & set(cached.document.forms), PREFER_PRECOMPRESSED)
    encoding, body = _form(cached.document, wanted)
    lifetime = max(0, int(cached.info.fresh_until - a.now))
    return _ok(a.now, encoding, body, lifetime=lifetime, client_address=a.client_address,
               extra=[("Vary", "X-Or-Diff-From-Consensus")])


def _signed_by_enough(signatories: tuple[str, ...], want_fps: str) -> bool:
    """tor's ``client_likes_consensus``: more than half of the requested fingerprint prefixes
    (hex, any case) match a signer."""
    wanted = _split(want_fps, "+")
    need = len(wanted) // 2 + 1
    # Every prefix of every signer: one set lookup per requested name, however many.
    prefixes = {signer.upper()[:n] for signer in signatories for n in range(len(signer) + 1)}
    have = sum(1 for prefix in wanted if prefix.upper() in prefixes)
    return have >= need


def _microdescs(a: _Args, resource: str) -> Reply:
    documents = [d for d in (a.store.microdesc(x) for x in _b64_digests(resource)) if d]
    if not documents:
        return _short(404, "Not found", a.now)
    encoding, body = _items_body(documents, choose_encoding(a.allowed, PREFER_STREAMING))
    return _ok(a.now, encoding, body, lifetime=_MICRODESC_LIFETIME,
               client_address=a.client_address)


def _server(a: _Args, key: str) -> Reply:
    own = a.store.own_descriptor()
    by_digest = key.startswith("d/")
    if key == "all":
        # A bridge's own descriptor goes only over encrypted connections, and tor treats
        # "all" as unencrypted.
        wanted = [own.info.fingerprint] if own is not None and not a.bridge else []
    elif key == "authority":
        wanted = [own.info.fingerprint] if own is not None else []
    elif by_digest or key.startswith("fp/"):
        wanted = _hex_digests(key[len("d/") if by_digest else len("fp/"):])
    else:
        return _short(404, "Not found", a.now)
    if not wanted:
        return _short(404, "Servers unavailable", a.now)
    lifetime = (_FULL_DIR_LIFETIME if key.startswith("all")
                else _ROUTERDESC_BY_DIGEST_LIFETIME if len(wanted) == 1 else 0)
    documents = []
    if own is not None:
        name = own.info.digest if by_digest else own.info.fingerprint
        fresh = by_digest or own.info.published >= a.now - _MAX_AGE_TO_PUBLISH
        if name in wanted and fresh:
            documents.append(own.document)
    if not documents:
        return _short(404, "Not found", a.now)
    encoding, body = _items_body(documents, choose_encoding(a.allowed, PREFER_STREAMING))
    return _ok(a.now, encoding, body, lifetime=lifetime, client_address=a.client_address)


def _keys(a: _Args, url: str) -> Reply:
    store = a.store
    found: list = []
    if url == "/tor/keys/all":
        found = store.certificates()
    elif url == "/tor/keys/authority":
        found = []  # only an authority has a certificate of its own
    elif url.startswith("/tor/keys/fp/"):
        found = [store.newest_certificate(fp) for fp in _hex_digests(url[len("/tor/keys/fp/"):])]
    elif url.startswith("/tor/keys/sk/"):
        found = [store.certificate_by_signing_key(sk)
                 for sk in _hex_digests(url[len("/tor/keys/sk/"):])]
    elif url.startswith("/tor/keys/fp-sk/"):
        found = [store.certificate(fp, sk) for fp, sk in _pairs(url[len("/tor/keys/fp-sk/"):])]
    else:
        return _short(400, "Bad request", a.now)
    certs = [c for c in found if c is not None]
    if not certs:
        return _short(404, "Not found", a.now)
    certs = [c for c in certs if c.info.published >= a.if_modified_since]
    if not certs:
        return _short(304, "Not modified", a.now)
    encoding, body = _items_body([c.document for c in certs],
                                 choose_encoding(a.allowed, PREFER_STREAMING))
    return _ok(a.now, encoding, body, lifetime=_KEYS_LIFETIME, length=encoding == IDENTITY,
               client_address=a.client_address)


def _pairs(resource: str) -> list[tuple[str, str]]:
    """tor's ``dir_split_resource_into_fingerprint_pairs``: ``FP-SK`` items, sorted, unique."""
    found = set()
    for part in _split(resource, "+"):
        if len(part) == 81 and part[40] == "-":
            try:
                found.add((bytes.fromhex(part[:40]).hex().upper(),
                           bytes.fromhex(part[41:]).hex().upper()))
            except ValueError:
                continue
    return sorted(found)


class DirServer:
    """One directory request on one stream: ``feed`` it bytes; it calls ``send`` once with
    the answer and then ``end`` (see the module docstring). Loop thread only."""

    def __init__(self, store: DirStore, send: Callable[[bytes], object],
                 end: Callable[[str], object], *, bridge: bool = True,
                 client_address: str | None = None, clock: Callable[[], float] = time.time,
                 on_request: Callable[[Request, int | None], object] | None = None) -> None:
        """``bridge``: answer as a bridge (True) or a public relay. ``client_address``: the
        client's IP, reported back in ``X-Your-Address-Is`` when not private. ``on_request``
        (request, status or None when unanswered) runs before the answer is sent. Loop
        thread only."""
        self._store = store
        self._send = send
        self._end = end
        self._bridge = bridge
        self._client_address = client_address
        self._clock = clock
        self._on_request = on_request
        self._parser = RequestParser(head_limit=MAX_HEADERS_SIZE,
                                     body_limit=_MAX_REQUEST_BODY)
        self.finished = False
        self.request: Request | None = None
        self.status: int | None = None

    def feed(self, data: bytes) -> None:
        """Bytes from the stream, in order. Never raises (errors end the stream).
        Loop thread only."""
        if self.finished or not data:
            return
        try:
            request = self._parser.feed(data)
        except HttpTooLarge as exc:
            logger.info("directory request refused: %s", exc)
            self._finish(None, END_REFUSED)
            return
        except HttpError as exc:
            logger.info("malformed directory request: %s", exc)
            self._finish(_short(400, "Bad request", self._clock()), END_DONE)
            return
        if request is None:
            return
        self.request = request
        try:
            reply = respond(request, self._store, self._clock(), bridge=self._bridge,
                            client_address=self._client_address)
        except Exception:
            logger.exception("directory request %r failed", request.target[:200])
            self._finish(None, END_ERROR)
            return
        self._finish(reply, END_DONE if reply is not None else END_REFUSED)

    def _finish(self, reply: Reply | None, reason: str) -> None:
        self.finished = True
        self.status = reply.status if reply is not None else None
        if self._on_request is not None and self.request is not None:
            try:
                self._on_request(self.request, self.status)
            except Exception:
                logger.exception("on_request callback raised")
        if reply is not None:
            self._send(reply.data)
        self._end(reason)
