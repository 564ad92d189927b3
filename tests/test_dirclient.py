"""relay.dirclient over the real event loop and real loopback sockets.

Fetches go to a DirPort of this project serving the real documents of tests/data/dirserv;
uploads go to small scripted servers on loopback that read the request like a DirPort and
answer the way tor's authorities do (status line with a reason phrase; 200 with
``X-Descriptor-Not-New``), or misbehave (never answer, answer garbage, send too much). The
real authority is examples.dirserv_interop's (tests/test_dirserv_tor.py).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from reactor import Reactor
from reactor.net import Stream, listen
from relay.dirclient import DescriptorPublisher, DirResult, fetch, upload_descriptor
from relay.dirhttp import RequestParser, accept_encoding_header
from relay.dirport import serve_dirport
from tests.support_dirdata import DESCRIPTOR, KEYS, MICRO, NOW, NS, V3IDENT, load_store
from tests.support_loop import run_until_met


@pytest.fixture
def reactor():  # type: ignore[no-untyped-def]
    loop = Reactor()
    yield loop
    loop.close()


def _wait_result(reactor: Reactor, start: Callable[[Callable[[DirResult], None]], object]
                 ) -> DirResult:
    results: list[DirResult] = []
    start(results.append)
    run_until_met(reactor, lambda: bool(results), 20)
    return results[0]


class Scripted:
    """A loopback server: reads one request per connection (as a DirPort does) and answers
    with the next scripted bytes (None: say nothing and keep the connection open)."""

    def __init__(self, reactor: Reactor, answers: list[bytes | None], *,
                 close_after: bool = True) -> None:
        self.requests: list[bytes] = []
        self.parsed: list = []
        self.answers = answers
        self.close_after = close_after
        self.closed = 0
        self.listener = listen(reactor, "127.0.0.1", 0, self._accepted)
        self.port = self.listener.address[1]

    def _accepted(self, stream: Stream) -> None:
        parser = RequestParser(body_limit=1 << 20)
        raw = bytearray()

        def data(chunk: bytes) -> None:
            raw.extend(chunk)
            if parser.request is None and parser.feed(chunk) is not None:
                self.requests.append(bytes(raw))
                self.parsed.append(parser.request)
                answer = self.answers.pop(0) if self.answers else None
                if answer is not None:
                    stream.write(answer)
                    if self.close_after:
                        stream.close()

        def closed(reason, detail) -> None:  # type: ignore[no-untyped-def]
            self.closed += 1

        stream.on_close = closed
        stream.on_data = data


def test_fetch_decodes_what_a_dirport_serves(reactor: Reactor) -> None:
    listener = serve_dirport(reactor, "127.0.0.1", 0, load_store(), clock=lambda: NOW)
    port = listener.address[1]
    cases = [("/tor/status-vote/current/consensus-microdesc", MICRO, "x-tor-lzma"),
             ("/tor/status-vote/current/consensus.z", NS, "x-tor-lzma"),
             (f"/tor/keys/fp/{V3IDENT}", KEYS, "deflate"),
             ("/tor/server/authority", DESCRIPTOR, "deflate")]
    for path, document, encoding in cases:
        result = _wait_result(reactor, lambda done, p=path: fetch(
            reactor, "127.0.0.1", port, p, done))
        assert result.ok and result.body == document and result.encoding == encoding, path
        assert result.target == f"127.0.0.1:{port}{path}"
    missing = _wait_result(reactor, lambda done: fetch(reactor, "127.0.0.1", port,
                                                       "/tor/keys/fp/" + "0" * 40, done))
    assert (missing.ok, missing.status, missing.reason, missing.error) == (
        False, 404, "Not found", None)


def test_requests_are_tor_shaped(reactor: Reactor) -> None:
    server = Scripted(reactor, [b"HTTP/1.0 200 OK\r\n\r\n"] * 2)
    _wait_result(reactor, lambda done: fetch(reactor, "127.0.0.1", server.port, "/tor/keys/all",
                                             done, if_modified_since=0))
    assert server.requests[0] == (
        f"GET /tor/keys/all HTTP/1.0\r\nHost: 127.0.0.1:{server.port}\r\n"
        "If-Modified-Since: Thu, 01 Jan 1970 00:00:00 GMT\r\n"
        f"Accept-Encoding: {accept_encoding_header()}\r\n\r\n").encode()
    _wait_result(reactor, lambda done: upload_descriptor(
        reactor, "127.0.0.1", server.port, "router x\n", done, reason="test"))
    assert server.requests[1] == (
        f"POST /tor/ HTTP/1.0\r\nHost: 127.0.0.1:{server.port}\r\n"
        f"Accept-Encoding: {accept_encoding_header()}\r\nX-Desc-Gen-Reason: test\r\n"
        "Content-Length: 9\r\n\r\nrouter x\n").encode()


def test_upload_reports_the_authoritys_answer(reactor: Reactor) -> None:
    server = Scripted(reactor, [
        b"HTTP/1.0 400 Unrecognized key\r\nDate: Thu, 01 Jan 1970 00:00:00 GMT\r\n\r\n",
        b"HTTP/1.0 200 OK\r\nDate: Thu, 01 Jan 1970 00:00:00 GMT\r\n"
        b"X-Descriptor-Not-New: Yes\r\n\r\n",
        b"HTTP/1.0 200 OK\r\n\r\n"])
    results = [_wait_result(reactor, lambda done: upload_descriptor(
        reactor, "127.0.0.1", server.port, "router \u00e9\n", done)) for _ in range(3)]
    assert [(r.ok, r.status, r.reason, r.not_new) for r in results] == [
        (False, 400, "Unrecognized key", False), (True, 200, "OK", True),
        (True, 200, "OK", False)]
    assert server.parsed[0].body == "router \u00e9\n".encode()


def test_failures_are_results_never_exceptions(reactor: Reactor) -> None:
    closed = listen(reactor, "127.0.0.1", 0, lambda stream: None)
    closed_port = closed.address[1]
    closed.close()
    refused = _wait_result(reactor, lambda done: fetch(reactor, "127.0.0.1", closed_port, "/x",
                                                       done))
    assert refused.status is None and "connect failed: REFUSED" in (refused.error or "")

    silent = Scripted(reactor, [None])
    late = _wait_result(reactor, lambda done: fetch(reactor, "127.0.0.1", silent.port, "/x",
                                                    done, timeout=0.2))
    assert late.status is None and late.error == "no answer in 0.2 s"
    run_until_met(reactor, lambda: silent.closed == 1, 10)  # and the connection is closed

    garbage = Scripted(reactor, [b"SSH-2.0-OpenSSH\r\n\r\n"])
    bad = _wait_result(reactor, lambda done: fetch(reactor, "127.0.0.1", garbage.port, "/x",
                                                   done))
    assert bad.status is None and "malformed status line" in (bad.error or "")

    big = Scripted(reactor, [b"HTTP/1.0 200 OK\r\n\r\n" + b"x" * 5000])
    over = _wait_result(reactor, lambda done: fetch(reactor, "127.0.0.1", big.port, "/x", done,
                                                    max_body=1000))
    assert over.status is None and "over the limit of 1000" in (over.error or "")

    lying = Scripted(reactor, [b"HTTP/1.0 200 OK\r\nContent-Encoding: deflate\r\n\r\nplain"])
    wrong = _wait_result(reactor, lambda done: fetch(reactor, "127.0.0.1", lying.port, "/x",
                                                     done))
    assert (wrong.status, wrong.ok) == (200, False) and "bad deflate data" in (wrong.error or "")

    with pytest.raises(ValueError):
        fetch(reactor, "localhost", 80, "/x", lambda result: None)


def test_a_content_length_answer_completes_without_waiting_for_close(reactor: Reactor) -> None:
    server = Scripted(reactor, [b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok"],
                      close_after=False)
    result = _wait_result(reactor, lambda done: fetch(reactor, "127.0.0.1", server.port, "/x",
                                                      done, timeout=30))
    assert result.ok and result.body == b"ok"
    run_until_met(reactor, lambda: server.closed == 1, 10)  # the client hung up


def test_cancel_means_no_callback(reactor: Reactor) -> None:
    server = Scripted(reactor, [None])
    results: list[DirResult] = []
    request = fetch(reactor, "127.0.0.1", server.port, "/x", results.append, timeout=0.1)
    run_until_met(reactor, lambda: len(server.requests) == 1, 10)
    request.cancel()
    assert request.done
    run_until_met(reactor, lambda: server.closed == 1, 10)
    later: list[bool] = []
    reactor.call_later(0.3, later.append, True)  # after the cancelled 0.1 s timeout
    run_until_met(reactor, lambda: bool(later), 10)
    assert results == []


def test_publisher_retries_with_doubling_delays_then_keeps_the_interval(
        reactor: Reactor) -> None:
    busy = b"HTTP/1.0 503 Directory busy, try again later\r\n\r\n"
    server = Scripted(reactor, [busy, busy, busy, b"HTTP/1.0 200 OK\r\n\r\n",
                                b"HTTP/1.0 200 OK\r\n\r\n", b"HTTP/1.0 200 OK\r\n\r\n"])
    outcomes: list[tuple[int | None, str, float]] = []
    made = iter(["router two\n", "router three\n"])
    publisher = DescriptorPublisher(
        reactor, [("127.0.0.1", server.port)], "router one\n", refresh=lambda: next(made),
        interval=0.2, retry_initial=0.01, retry_max=0.025,
        on_outcome=lambda a, r, delay: outcomes.append((r.status, r.reason, delay)))
    publisher.start()
    run_until_met(reactor, lambda: len(outcomes) == 6, 20)
    publisher.stop()
    assert outcomes == [(503, "Directory busy, try again later", 0.01),
                        (503, "Directory busy, try again later", 0.02),
                        (503, "Directory busy, try again later", 0.025),
                        (200, "OK", 0.2), (200, "OK", 0.2), (200, "OK", 0.2)]
    assert [p.body for p in server.parsed] == [b"router one\n"] * 4 + [
        b"router two\n", b"router three\n"]
    assert [p.header("X-Desc-Gen-Reason") for p in server.parsed] == (
        ["relay started"] * 4 + ["time for new descriptor"] * 2)
    assert publisher.accepted and publisher.descriptor == "router three\n"


def test_publisher_uploads_a_changed_descriptor_to_every_authority_at_once(
        reactor: Reactor) -> None:
    first = Scripted(reactor, [b"HTTP/1.0 200 OK\r\n\r\n"] * 2)
    second = Scripted(reactor, [b"HTTP/1.0 400 Fingerprint is marked rejected\r\n\r\n",
                                b"HTTP/1.0 200 OK\r\n\r\n"])
    outcomes: list[tuple[int, int | None]] = []
    publisher = DescriptorPublisher(
        reactor, [("127.0.0.1", first.port), ("127.0.0.1", second.port)], "router a\n",
        retry_initial=600.0, retry_max=600.0,
        on_outcome=lambda a, r, delay: outcomes.append((a[1], r.status)))
    publisher.start()
    run_until_met(reactor, lambda: len(outcomes) == 2, 20)
    assert not publisher.accepted
    assert publisher.last_results()[("127.0.0.1", second.port)].reason == (
        "Fingerprint is marked rejected")
    publisher.update("router a\n")  # the same bytes: nothing to do
    publisher.update("router b\n")
    run_until_met(reactor, lambda: len(outcomes) == 4, 20)
    publisher.stop()
    assert sorted(outcomes[2:]) == sorted([(first.port, 200), (second.port, 200)])
    assert publisher.accepted
    assert [p.body for p in first.parsed] == [b"router a\n", b"router b\n"]
    assert [p.body for p in second.parsed] == [b"router a\n", b"router b\n"]
    assert second.parsed[1].header("X-Desc-Gen-Reason") == "descriptor changed"
