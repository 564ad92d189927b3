"""relay.dirserver answers as tor 0.4.9's dircache.c does, byte for byte, from real documents.

The store holds the real documents of tests/data/dirserv; the clock is fixed, so every
response head is compared whole. Served bodies are decoded and compared with the documents
(and the documents parse back). Requests carry tor's own header shapes.
"""

from __future__ import annotations

import hashlib

import pytest

from relay.dirdocs import b64_digest, parse_consensus, parse_key_certificates
from relay.dirhttp import (
    MAX_HEADERS_SIZE,
    RequestParser,
    ResponseParser,
    compress,
    decompress,
    http_date,
)
from relay.dirserver import END_DONE, END_ERROR, END_REFUSED, DirServer, respond
from relay.dirstore import DirStore
from tests.support_dirdata import (
    DESCRIPTOR,
    KEYS,
    MICRO,
    MICRO_INFO,
    NOW,
    NS,
    V3IDENT,
    load_store,
)

TOR_ACCEPT = "x-tor-lzma, x-zstd, deflate, gzip, identity"
SIGNING_KEY = parse_key_certificates(KEYS)[0].signing_key_digest


def ask(path: str, headers: dict[str, str] | None = None, *, store: DirStore | None = None,
        now: float = NOW, bridge: bool = True, client_address: str | None = None,
        method: str = "GET") -> tuple[int, str, dict[str, str], bytes, bytes]:
    """(status, reason, headers, decoded body, raw response) of one GET."""
    lines = [f"{method} {path} HTTP/1.0", "Host: 127.0.0.1:9001"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    request = RequestParser().feed(("\r\n".join(lines) + "\r\n\r\n").encode())
    assert request is not None
    reply = respond(request, store if store is not None else load_store(), now, bridge=bridge,
                    client_address=client_address)
    assert reply is not None
    parser = ResponseParser(body_limit=1 << 24)
    parser.feed(reply.data)
    response = parser.finish()
    assert response.status == reply.status
    fields = dict(response.headers)
    body = decompress(response.body, fields.get("Content-Encoding", "identity"), 1 << 24)
    return response.status, response.reason, fields, body, reply.data


def short(status: int, reason: str, now: float = NOW) -> bytes:
    return f"HTTP/1.0 {status} {reason}\r\nDate: {http_date(now)}\r\n\r\n".encode()


def test_consensus_as_a_tor_client_asks_for_it() -> None:
    status, _, _, body, raw = ask("/tor/status-vote/current/consensus-microdesc/6BC484.z",
                                  {"Accept-Encoding": TOR_ACCEPT})
    head = (f"HTTP/1.0 200 OK\r\nDate: {http_date(NOW)}\r\nContent-Type: text/plain\r\n"
            f"Content-Encoding: x-tor-lzma\r\nExpires: {http_date(MICRO_INFO.fresh_until)}\r\n"
            "Vary: X-Or-Diff-From-Consensus\r\n\r\n").encode()
    assert status == 200 and raw.startswith(head)
    assert raw[len(head):] == load_store().consensus("microdesc").document.forms["x-tor-lzma"]
    assert body == MICRO and parse_consensus(body).flavor == "microdesc"


@pytest.mark.parametrize("path, headers, encoding, document", [
    ("/tor/status-vote/current/consensus-microdesc.z", {}, "deflate", MICRO),
    ("/tor/status-vote/current/consensus-microdesc", {}, "identity", MICRO),
    ("/tor/status-vote/current/consensus-microdesc", {"Accept-Encoding": "gzip"}, "gzip",
     MICRO),
    ("/tor/status-vote/current/consensus/6BC484.z", {}, "deflate", NS),
    ("/tor/status-vote/current/consensus", {"Accept-Encoding": TOR_ACCEPT}, "x-tor-lzma", NS),
    ("/tor/status-vote/current/consensus-nosuchflavor", {}, "identity", NS),  # tor: ns
    ("/tor/status-vote/current/consensus-microdesc/6bc484+6BC4", {}, "identity", MICRO),
    ("/tor/status-vote/current/consensus-microdesc/", {}, "identity", MICRO),
])
def test_consensus_flavors_and_encodings(path: str, headers: dict[str, str], encoding: str,
                                         document: bytes) -> None:
    status, _, fields, body, _ = ask(path, headers)
    assert (status, fields["Content-Encoding"], body) == (200, encoding, document)
    assert "Content-Length" not in fields and fields["Vary"] == "X-Or-Diff-From-Consensus"


def test_consensus_refusals_have_tors_reasons() -> None:
    base = "/tor/status-vote/current/consensus-microdesc"
    current = MICRO_INFO.sha3_as_signed.hex()
    other = hashlib.sha3_256(b"another consensus").hexdigest()
    cases = [
        (ask(base + "/ABCDEF.z"), 404, "Consensus not signed by sufficient number of "
                                       "requested authorities"),
        (ask(base + "/6BC484+ABCDEF"), 404, "Consensus not signed by sufficient number of "
                                            "requested authorities"),
        (ask(base + "/diff/" + other), 404, "No such diff available"),
        (ask(base + "/diff/" + current), 304, "Not modified"),
        (ask(base + "/diff/xyz"), 404, "Couldn't parse request"),
        (ask(base, {"X-Or-Diff-From-Consensus": f"{other} {current}"}), 304, "Not modified"),
        (ask(base, {"If-Modified-Since": http_date(MICRO_INFO.valid_after + 1)}), 304,
         "Not modified"),
        (ask(base, now=MICRO_INFO.valid_until + 86401), 404, "Consensus is too old"),
        (ask(base, now=MICRO_INFO.valid_after - 86401), 404, "Consensus is too new"),
        (ask(base, store=load_store(consensus=False)), 404, "Not found"),
    ]
    for (status, reason, _fields, body, raw), want_status, want_reason in cases:
        assert (status, reason, body) == (want_status, want_reason, b"")
        assert raw == short(want_status, want_reason, NOW if "too" not in reason
                            else MICRO_INFO.valid_until + 86401 if "old" in reason
                            else MICRO_INFO.valid_after - 86401)
    # Only what the client names matters: another digest or an older date gets the consensus.
    assert ask(base, {"X-Or-Diff-From-Consensus": other})[0] == 200
    assert ask(base, {"If-Modified-Since": http_date(MICRO_INFO.valid_after - 1)})[0] == 200
    # Past fresh-until the answer may not be cached.
    assert ask(base, now=MICRO_INFO.fresh_until + 1)[2]["Pragma"] == "no-cache"


def test_microdescs_by_digest_in_digest_order() -> None:
    store = load_store()
    digests = sorted(MICRO_INFO.microdesc_digests)
    names = [b64_digest(d) for d in reversed(digests)] + [b64_digest(digests[0]), "junk"]
    status, _, fields, body, raw = ask("/tor/micro/d/" + "-".join(names) + ".z", store=store)
    head = (f"HTTP/1.0 200 OK\r\nDate: {http_date(NOW)}\r\nContent-Type: text/plain\r\n"
            f"Content-Encoding: deflate\r\nExpires: {http_date(NOW + 48 * 3600)}\r\n\r\n")
    assert status == 200 and raw.startswith(head.encode())
    members = [store.microdesc(d).forms["deflate"] for d in digests]
    assert raw[len(head):] == b"".join(members)  # compressed once, concatenated
    assert body == b"".join(store.microdesc(d).text for d in digests)
    status, _, fields, body, _ = ask("/tor/micro/d/" + b64_digest(digests[1]),
                                     {"Accept-Encoding": TOR_ACCEPT})
    assert (status, fields["Content-Encoding"]) == (200, "deflate")  # never lzma when streaming
    assert hashlib.sha256(body).digest() == digests[1]
    missing = b64_digest(hashlib.sha256(b"none").digest())
    assert ask("/tor/micro/d/" + missing)[4] == short(404, "Not found")


def test_key_certificates() -> None:
    status, _, fields, body, raw = ask(f"/tor/keys/fp/{V3IDENT}")
    assert raw == (f"HTTP/1.0 200 OK\r\nDate: {http_date(NOW)}\r\nContent-Type: text/plain\r\n"
                   f"Content-Encoding: identity\r\nContent-Length: {len(KEYS)}\r\n"
                   f"Expires: {http_date(NOW + 3600)}\r\n\r\n").encode() + KEYS
    for path in ("/tor/keys/all.z", f"/tor/keys/fp-sk/{V3IDENT}-{SIGNING_KEY}",
                 f"/tor/keys/sk/{SIGNING_KEY.lower()}.z", f"/tor/keys/fp/{V3IDENT}+{'0' * 40}"):
        status, _, fields, body, _ = ask(path)
        assert (status, body) == (200, KEYS), path
        assert ("Content-Length" in fields) == (fields["Content-Encoding"] == "identity")
    assert ask("/tor/keys/authority")[4] == short(404, "Not found")
    assert ask("/tor/keys/fp/" + "0" * 40)[4] == short(404, "Not found")
    assert ask("/tor/keys/nonsense")[4] == short(400, "Bad request")
    published = parse_key_certificates(KEYS)[0].published
    assert ask("/tor/keys/all", {"If-Modified-Since": http_date(published + 1)})[4] == short(
        304, "Not modified")


def test_own_server_descriptor() -> None:
    store = load_store()
    own = store.own_descriptor()
    assert own is not None
    _status, _, _fields, body, raw = ask("/tor/server/authority.z", store=store)
    assert raw == (f"HTTP/1.0 200 OK\r\nDate: {http_date(NOW)}\r\nContent-Type: text/plain\r\n"
                   f"Content-Encoding: deflate\r\nExpires: {http_date(NOW + 48 * 3600)}\r\n"
                   "\r\n").encode() + compress(DESCRIPTOR, "deflate")
    assert body == DESCRIPTOR
    for path in (f"/tor/server/fp/{own.info.fingerprint}", f"/tor/server/d/{own.info.digest}.z",
                 f"/tor/server/fp/{own.info.fingerprint.lower()}+{'0' * 40}"):
        assert ask(path, store=store)[3] == DESCRIPTOR, path
    assert ask(f"/tor/server/fp/{own.info.fingerprint}+{'0' * 40}",
               store=store)[2]["Pragma"] == "no-cache"  # two asked: tor sets no lifetime
    assert ask("/tor/server/fp/" + "0" * 40, store=store)[4] == short(404, "Not found")
    assert ask("/tor/server/fp/nothex", store=store)[4] == short(404, "Servers unavailable")
    assert ask("/tor/server/all", store=store)[4] == short(404, "Servers unavailable")
    relay = ask("/tor/server/all", store=store, bridge=False)
    assert relay[3] == DESCRIPTOR and relay[2]["Expires"] == http_date(NOW + 3600)
    assert ask("/tor/server/other", store=store)[4] == short(404, "Not found")
    nothing = load_store(own=False)
    assert ask("/tor/server/authority", store=nothing)[4] == short(404, "Servers unavailable")
    later = own.info.published + 86400 + 1  # tor serves by fingerprint for a day only
    assert ask(f"/tor/server/fp/{own.info.fingerprint}", store=store, now=later)[0] == 404
    assert ask(f"/tor/server/d/{own.info.digest}", store=store, now=later)[3] == DESCRIPTOR


def test_everything_else() -> None:
    robots = ask("/tor/robots.txt")[4]
    assert robots == (f"HTTP/1.0 200 OK\r\nDate: {http_date(NOW)}\r\nContent-Type: text/plain"
                      f"\r\nContent-Encoding: identity\r\nContent-Length: 28\r\n"
                      f"Expires: {http_date(NOW + 86400)}\r\n\r\n"
                      "User-agent: *\r\nDisallow: /\r\n").encode()
    assert ask("robots.txt")[4] == robots  # tor puts /tor/ in front
    assert ask("http://example.invalid/tor/robots.txt")[4] == robots  # and skips a host
    for path in ("/tor/", "/", "/tor/extra/authority", "/tor/status-vote/current/authority",
                 "/tor/status-vote/next/consensus", "/tor/hs/3/abc", "/tor/micro/d/",
                 "/tor/networkstatus-bridges"):
        assert ask(path)[4] == short(404, "Not found"), path
    assert ask("/tor/", method="POST")[4] == short(503, "Not acting as a public relay")
    assert ask("/tor/", method="POST", bridge=False)[4] == short(
        400, "Nonauthoritative directory does not accept posted server descriptors")
    reported = ask("/tor/robots.txt", client_address="5.6.7.8")[2]
    assert reported["X-Your-Address-Is"] == "5.6.7.8"
    assert "X-Your-Address-Is" not in ask("/tor/robots.txt", client_address="127.0.0.1")[2]
    assert "X-Your-Address-Is" not in ask("/tor/robots.txt", client_address="10.1.2.3")[2]


class _Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, object]] = []

    def send(self, data: bytes) -> None:
        self.events.append(("send", data))

    def end(self, reason: str) -> None:
        self.events.append(("end", reason))


def _server(store: DirStore | None = None) -> tuple[DirServer, _Recorder, list]:
    recorder, seen = _Recorder(), []
    server = DirServer(store if store is not None else load_store(), recorder.send,
                       recorder.end, clock=lambda: NOW,
                       on_request=lambda r, s: seen.append((r.target, s)))
    return server, recorder, seen


def test_stream_gets_one_send_then_end_whatever_the_pieces() -> None:
    raw = (b"GET /tor/keys/all HTTP/1.0\r\nHost: 127.0.0.1:9001\r\n"
           b"Accept-Encoding: " + TOR_ACCEPT.encode() + b"\r\n\r\n")
    request = RequestParser().feed(raw)
    assert request is not None
    expected = respond(request, load_store(), NOW)
    assert expected is not None
    server, recorder, seen = _server()
    for byte in raw:
        server.feed(bytes([byte]))
    server.feed(b"GET /tor/robots.txt HTTP/1.0\r\n\r\n")  # after the request: ignored
    assert recorder.events == [("send", expected.data), ("end", END_DONE)]
    assert seen == [("/tor/keys/all", 200)] and server.status == 200 and server.finished


def test_stream_refusals() -> None:
    server, recorder, seen = _server()
    server.feed(b"PUT /tor/ HTTP/1.0\r\n\r\n")
    assert recorder.events == [("end", END_REFUSED)] and seen == [("/tor/", None)]

    server, recorder, _ = _server()
    server.feed(b"GET /" + b"a" * MAX_HEADERS_SIZE)
    assert recorder.events == [("end", END_REFUSED)]

    server, recorder, _ = _server()
    server.feed(b"POST /tor/ HTTP/1.0\r\nContent-Length: 100000\r\n\r\n")
    assert recorder.events == [("end", END_REFUSED)]

    server, recorder, _ = _server()
    server.feed(b"GET /tor/ HTTP/1.0\r\nbroken\r\n\r\n")
    assert recorder.events == [("send", short(400, "Bad request")), ("end", END_DONE)]

    server, recorder, _ = _server()
    server.feed(b"POST /tor/ HTTP/1.0\r\nContent-Length: 4\r\n\r\nrou")
    assert recorder.events == []
    server.feed(b"t")
    assert recorder.events == [("send", short(503, "Not acting as a public relay")),
                               ("end", END_DONE)]


def test_a_failing_store_ends_the_stream_without_an_answer() -> None:
    class Broken(DirStore):
        def consensus(self, flavor: str):  # type: ignore[no-untyped-def]
            raise RuntimeError("injected fault")

    server, recorder, seen = _server(Broken())
    server.feed(b"GET /tor/status-vote/current/consensus HTTP/1.0\r\n\r\n")
    assert recorder.events == [("end", END_ERROR)] and seen == [
        ("/tor/status-vote/current/consensus", None)]
