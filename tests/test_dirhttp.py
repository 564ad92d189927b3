"""relay.dirhttp: tor's HTTP/1.0 subset, its bounds, and its compression methods.

The request shapes are tor 0.4.9's (``directory_send_command``): a real bridge client's
``GET /tor/server/authority.z`` is 125 bytes (tests/data/dirserv/bridge_client_requests.json,
captured by tools/capture_dir_data.py), and :func:`build_request` must make exactly that many.
"""

from __future__ import annotations

import json
import lzma
import os
import zlib
from pathlib import Path

import pytest

from relay.dirhttp import (
    MAX_HEADERS_SIZE,
    PREFER_PRECOMPRESSED,
    PREFER_STREAMING,
    HttpError,
    HttpTooLarge,
    RequestParser,
    ResponseParser,
    accept_encoding_header,
    build_request,
    build_response,
    choose_encoding,
    compress,
    decompress,
    http_date,
    is_compression_bomb,
    parse_accept_encoding,
    parse_http_date,
    short_response,
)

DATA = Path(__file__).parent / "data" / "dirserv"
TOR_ACCEPT = "x-tor-lzma, x-zstd, deflate, gzip, identity"


def test_a_request_in_every_split_parses_the_same() -> None:
    raw = (b"GET /tor/micro/d/abc.z HTTP/1.0\r\nHost: 127.0.0.1:9001\r\n"
           b"Accept-Encoding: " + TOR_ACCEPT.encode() + b"\r\n\r\n")
    whole = RequestParser().feed(raw)
    assert whole is not None
    assert (whole.method, whole.target, whole.version) == ("GET", "/tor/micro/d/abc.z",
                                                           "HTTP/1.0")
    assert whole.header("accept-encoding") == TOR_ACCEPT and whole.body == b""
    for cut in range(1, len(raw)):
        parser = RequestParser()
        assert parser.feed(raw[:cut]) is None
        assert parser.feed(raw[cut:]) == whole
    parser = RequestParser()
    results = [parser.feed(raw[i:i + 1]) for i in range(len(raw))]
    assert results[-1] == whole and all(r is None for r in results[:-1])
    assert parser.feed(b"GET /more HTTP/1.0\r\n\r\n") == whole  # later bytes are ignored


def test_a_post_waits_for_its_content_length_body() -> None:
    parser = RequestParser(body_limit=10)
    assert parser.feed(b"POST /tor/ HTTP/1.0\r\nContent-Length: 5\r\n\r\nab") is None
    request = parser.feed(b"cdefgh")
    assert request is not None and request.body == b"abcde"
    with pytest.raises(HttpTooLarge, match="over the limit of 10"):
        RequestParser(body_limit=10).feed(b"POST /tor/ HTTP/1.0\r\nContent-Length: 11\r\n\r\n")


def test_head_bound_is_tors_and_checked_before_the_terminator() -> None:
    line = b"GET /" + b"a" * (MAX_HEADERS_SIZE - 20) + b" HTTP/1.0\r\n\r\n"
    assert len(line) <= MAX_HEADERS_SIZE
    assert RequestParser().feed(line) is not None
    parser = RequestParser()
    with pytest.raises(HttpTooLarge):
        for _ in range(MAX_HEADERS_SIZE // 1000 + 2):
            parser.feed(b"x" * 1000)  # never a CRLF CRLF: fails once past the bound
    with pytest.raises(HttpTooLarge):
        RequestParser(head_limit=100).feed(b"GET /" + b"b" * 100 + b" HTTP/1.0\r\n\r\n")


@pytest.mark.parametrize("raw, message", [
    (b"GET /tor/\r\n\r\n", "malformed request line"),
    (b"GET  /tor/ HTTP/1.0\r\n\r\n", "malformed request line"),
    (b"GET /tor/ HTTP/2.0\r\n\r\n", "malformed request line"),
    (b"GET /tor/ HTTP/1.0\r\nNo colon here\r\n\r\n", "malformed header line"),
    (b"GET /tor/ HTTP/1.0\r\nBad Name: x\r\n\r\n", "malformed header line"),
    (b"GET /t\xffr/ HTTP/1.0\r\n\r\n", "printable ASCII"),
    (b"GET /tor/ HTTP/1.0\nHost: x\r\n\r\n", "bare CR or LF"),
    (b"POST /tor/ HTTP/1.0\r\nContent-Length: -1\r\n\r\n", "bogus Content-Length"),
])
def test_malformed_requests_say_what_is_wrong(raw: bytes, message: str) -> None:
    with pytest.raises(HttpError, match=message):
        RequestParser(body_limit=100).feed(raw)


def test_response_without_length_ends_at_eof_and_with_length_at_its_end() -> None:
    parser = ResponseParser(body_limit=100)
    parser.feed(b"HTTP/1.0 200 OK\r\nContent-Encoding: identity\r\n\r\nhello ")
    parser.feed(b"world")
    assert not parser.complete
    response = parser.finish()
    assert (response.status, response.reason, response.body) == (200, "OK", b"hello world")

    parser = ResponseParser(body_limit=100)
    parser.feed(b"HTTP/1.0 400 Unrecognized key\r\nContent-Length: 3\r\n\r\nab")
    assert parser.head_received and not parser.complete
    with pytest.raises(HttpError, match="ended after 2 of 3"):
        parser.finish()
    parser.feed(b"c")
    assert parser.complete and parser.finish().reason == "Unrecognized key"
    with pytest.raises(HttpError, match="after the Content-Length"):
        parser.feed(b"d")


def test_response_bounds_and_errors() -> None:
    with pytest.raises(HttpTooLarge):
        ResponseParser(body_limit=4).feed(b"HTTP/1.0 200 OK\r\n\r\n12345")
    with pytest.raises(HttpTooLarge):
        ResponseParser(body_limit=4).feed(b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\n\r\n")
    with pytest.raises(HttpError, match="malformed status line"):
        ResponseParser(body_limit=4).feed(b"HTTP/1.0 OK\r\n\r\n")
    with pytest.raises(HttpError, match="before the end of the HTTP head"):
        parser = ResponseParser(body_limit=4)
        parser.feed(b"HTTP/1.0 200 OK\r\n")
        parser.finish()
    parser = ResponseParser(body_limit=0)
    parser.feed(b"HTTP/1.0 304\r\n\r\n")  # tor's parser also takes a status line without
    assert (parser.finish().status, parser.finish().reason) == (304, "")  # a reason phrase


def test_requests_are_shaped_like_tors() -> None:
    captured = json.loads((DATA / "bridge_client_requests.json").read_text())
    host, port = captured["bridge_address"].rsplit(":", 1)
    first = captured["requests"][0]
    assert first["url"] == "/tor/server/authority.z"
    raw = build_request("GET", first["url"], host, int(port),
                        [("Accept-Encoding", TOR_ACCEPT)])
    assert len(raw) == first["request_size"]
    assert raw == (f"GET /tor/server/authority.z HTTP/1.0\r\nHost: {host}:{port}\r\n"
                   f"Accept-Encoding: {TOR_ACCEPT}\r\n\r\n").encode()
    assert build_request("GET", "/x", "::1", 80).startswith(b"GET /x HTTP/1.0\r\nHost: [::1]\r\n")
    post = build_request("POST", "/tor/", "127.0.0.1", 7000, [("X-Desc-Gen-Reason", "why")],
                         b"router x\n")
    assert post.endswith(b"X-Desc-Gen-Reason: why\r\nContent-Length: 9\r\n\r\nrouter x\n")
    with pytest.raises(ValueError):
        build_request("GET", "/a b", "127.0.0.1", 1)


def test_short_responses_and_dates() -> None:
    assert short_response(404, "Not found", 0) == (
        b"HTTP/1.0 404 Not found\r\nDate: Thu, 01 Jan 1970 00:00:00 GMT\r\n\r\n")
    assert build_response(200, "OK", [("A", "b")]) == b"HTTP/1.0 200 OK\r\nA: b\r\n\r\n"
    moment = 1796240915
    assert parse_http_date(http_date(moment)) == moment
    assert parse_http_date("not a date") is None


def test_accept_encoding_and_choice_follow_tor() -> None:
    assert accept_encoding_header() == "x-tor-lzma, deflate, gzip, identity"
    allowed = parse_accept_encoding(TOR_ACCEPT)
    assert allowed == {"x-tor-lzma", "deflate", "gzip", "identity"}  # no zstd here
    assert choose_encoding(allowed, PREFER_PRECOMPRESSED) == "x-tor-lzma"
    assert choose_encoding(allowed, PREFER_STREAMING) == "deflate"
    assert parse_accept_encoding(None) == {"identity"}
    assert parse_accept_encoding(None, url_asks_deflate=True) == {"identity", "deflate"}
    assert parse_accept_encoding("br, gzip;q=1, x-gzip") == {"identity"}  # tor: no q-values
    assert choose_encoding({"identity", "gzip"}, PREFER_STREAMING) == "gzip"
    assert choose_encoding(set(), PREFER_PRECOMPRESSED) == "identity"


@pytest.mark.parametrize("encoding", ["deflate", "gzip", "x-tor-lzma", "identity"])
def test_compression_round_trips_with_concatenated_members(encoding: str) -> None:
    parts = [os.urandom(300) * 20, b"onion-key\n", b""]
    joined = b"".join(compress(p, encoding) for p in parts)
    assert decompress(joined, encoding, 10**6) == b"".join(parts)
    with pytest.raises(HttpError):
        decompress(joined, encoding, 100)


def test_formats_are_the_ones_tor_detects() -> None:
    """tor's detect_compression_method: zlib header, gzip magic, lzma-alone 5d 00 00."""
    deflated = compress(b"x" * 100, "deflate")
    assert deflated[0] & 0x0F == 8 and int.from_bytes(deflated[:2], "big") % 31 == 0
    assert zlib.decompress(deflated) == b"x" * 100
    assert compress(b"x", "gzip")[:2] == b"\x1f\x8b"
    packed = compress(b"x" * 100, "x-tor-lzma")
    assert packed[:3] == b"\x5d\x00\x00"
    assert lzma.decompress(packed, format=lzma.FORMAT_ALONE) == b"x" * 100
    with pytest.raises(ValueError):
        compress(b"x", "x-zstd")


def test_bad_data_and_bombs_are_refused() -> None:
    good = compress(os.urandom(2000), "deflate")
    with pytest.raises(HttpError, match="truncated"):
        decompress(good[:-5], "deflate", 10**6)
    with pytest.raises(HttpError, match="bad deflate data"):
        decompress(b"\x78\x9c\xff\xff\xff", "deflate", 10**6)
    with pytest.raises(HttpError, match="unsupported"):
        decompress(b"abc", "x-zstd", 10**6)
    bomb = compress(b"\0" * (1 << 20), "gzip")
    assert is_compression_bomb(len(bomb), 1 << 20)
    with pytest.raises(HttpError, match="compression bomb"):
        decompress(bomb, "gzip", 10**7)
    assert not is_compression_bomb(10, 64 * 1024 - 1) and not is_compression_bomb(0, 10**9)
