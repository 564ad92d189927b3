"""Replay what a real tor 0.4.9 bridge client asked a real tor bridge, against relay.dirserver.

tests/data/dirserv/bridge_client_requests.json (tools/capture_dir_data.py) lists, in order,
the URLs the client sent over BEGIN_DIR, with the request sizes the client logged. Each
request is rebuilt as tor's ``directory_send_command`` writes it (``Host``, then
``If-Modified-Since`` when the client held a consensus, ``Accept-Encoding``, then
``X-Or-Diff-From-Consensus``; the same order a real tor relay used on our DirPort in
examples.dirserv_interop), and exactly one choice of optional headers must give the logged
size, so the bytes replayed are the bytes tor sent (dates and digests aside, whose lengths
are fixed). The documents served are the real ones captured in the same run, so every URL
names documents the store holds.
"""

from __future__ import annotations

import hashlib
import itertools
import json

from relay.dirhttp import ResponseParser, decompress, http_date
from relay.dirserver import END_DONE, DirServer
from tests.support_dirdata import DATA, DESCRIPTOR, KEYS, MICRO, MICRO_INFO, NOW, load_store

TOR_ACCEPT = "x-tor-lzma, x-zstd, deflate, gzip, identity"
CAPTURE = json.loads((DATA / "bridge_client_requests.json").read_text())


def rebuild(url: str, size: int, *, since: float, diff_from: bytes) -> bytes:
    """The one request of ``size`` bytes tor's header order allows."""
    found = []
    for with_since, with_diff in itertools.product((False, True), repeat=2):
        lines = [f"GET {url} HTTP/1.0", f"Host: {CAPTURE['bridge_address']}"]
        if with_since:
            lines.append(f"If-Modified-Since: {http_date(since)}")
        lines.append(f"Accept-Encoding: {TOR_ACCEPT}")
        if with_diff:
            lines.append(f"X-Or-Diff-From-Consensus: {diff_from.hex().upper()}")
        raw = ("\r\n".join(lines) + "\r\n\r\n").encode()
        if len(raw) == size:
            found.append(raw)
    assert len(found) == 1, (url, size, [len(f) for f in found])
    return found[0]


def serve(raw: bytes) -> tuple[int, str, dict[str, str], bytes]:
    sent: list[bytes] = []
    ended: list[str] = []
    server = DirServer(load_store(), sent.append, ended.append, clock=lambda: NOW)
    server.feed(raw)
    assert ended == [END_DONE] and len(sent) == 1
    parser = ResponseParser(body_limit=1 << 24)
    parser.feed(sent[0])
    response = parser.finish()
    fields = dict(response.headers)
    return (response.status, response.reason, fields,
            decompress(response.body, fields.get("Content-Encoding", "identity"), 1 << 24))


def test_the_capture_is_a_bridge_bootstrap_in_tors_order() -> None:
    urls = [r["url"] for r in CAPTURE["requests"]]
    assert CAPTURE["tor_version"].startswith("Tor version 0.4.9")
    assert urls[:3] == ["/tor/server/authority.z",
                        f"/tor/status-vote/current/consensus-microdesc/{MICRO_INFO.signatories[0][:6]}.z",
                        f"/tor/keys/fp/{MICRO_INFO.signatories[0]}"]
    assert any(u.startswith("/tor/micro/d/") for u in urls)
    assert all(r["status"] in (200, 304) for r in CAPTURE["requests"])


def test_every_captured_request_is_answered_like_the_bridge_did() -> None:
    held_before = hashlib.sha3_256(b"the consensus the client held before").digest()
    for entry in CAPTURE["requests"]:
        url, size = entry["url"], entry["request_size"]
        raw = rebuild(url, size, since=MICRO_INFO.valid_after - 5, diff_from=held_before)
        status, reason, fields, body = serve(raw)
        assert (status, reason) == (200, "OK"), url
        if url.startswith("/tor/server/"):
            assert body == DESCRIPTOR and fields["Content-Encoding"] == "deflate"
        elif url.startswith("/tor/status-vote/"):
            # The same method the real bridge chose for the consensus.
            assert body == MICRO and fields["Content-Encoding"] == entry["compression"]
        elif url.startswith("/tor/keys/"):
            assert body == KEYS
        else:
            store = load_store()
            wanted = sorted(MICRO_INFO.microdesc_digests)
            assert body == b"".join(store.microdesc(d).text for d in wanted)
            assert fields["Content-Encoding"] == "deflate"  # tor's choice without zstd


def test_a_refetch_naming_the_current_consensus_gets_304() -> None:
    refetch = next(r for r in CAPTURE["requests"] if r["request_size"] > 250)
    raw = rebuild(refetch["url"], refetch["request_size"],
                  since=MICRO_INFO.valid_after + 5, diff_from=MICRO_INFO.sha3_as_signed)
    assert b"If-Modified-Since" in raw and b"X-Or-Diff-From-Consensus" in raw
    status, reason, fields, body = serve(raw)
    assert (status, reason, body) == (304, "Not modified", b"")
    assert list(fields) == ["Date"]
