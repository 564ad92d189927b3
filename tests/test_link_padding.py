"""Channel padding: a client's PADDING_NEGOTIATE makes our responder pad the idle link.

Before, a PADDING_NEGOTIATE on circuit id 0 (what a tor 0.4.9 client may send its guard) closed
the whole link as a protocol violation.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import support_loop

from reactor import Reactor, Stream, listen
from relay.cells import CellCommand
from relay.link import CloseKind, Link
from relay.padding import (
    NF_ITO_LOW_MS,
    decode_padding_negotiate,
    encode_padding_negotiate,
)

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def reactor() -> Iterator[Reactor]:
    r = Reactor()
    yield r
    r.close()


def test_codec_round_trip_and_refusals() -> None:
    request = decode_padding_negotiate(encode_padding_negotiate(True, 2000, 4000) + bytes(500))
    assert (request.start, request.low_ms, request.high_ms) == (True, 2000, 4000)
    assert not decode_padding_negotiate(encode_padding_negotiate(False)).start
    for bad in (b"\x00\x02\x00", b"\x01\x02\x00\x00\x00\x00", b"\x00\x03\x00\x00\x00\x00"):
        with pytest.raises(ValueError):
            decode_padding_negotiate(bad)


def _pair(reactor: Reactor) -> tuple[Link, list[Link]]:
    accepted: list[Link] = []

    def on_stream(stream: Stream) -> None:
        accepted.append(Link.accept(reactor, stream))

    listener = listen(reactor, "127.0.0.1", 0, on_stream)
    client = Link.connect(reactor, *listener.address)
    support_loop.run_until_met(
        reactor, lambda: client.is_open and bool(accepted) and accepted[0].is_open, 10)
    return client, accepted


def test_start_pads_an_idle_link_and_stop_ends_it(reactor: Reactor) -> None:
    client, accepted = _pair(reactor)
    server = accepted[0]
    before = client.cells_in
    client.send_cell(0, CellCommand.PADDING_NEGOTIATE,
                     encode_padding_negotiate(True, NF_ITO_LOW_MS, NF_ITO_LOW_MS))
    support_loop.run_until_met(reactor, lambda: server.padding_sent >= 1, 10)
    assert server.padding_active
    assert server.is_open and client.is_open
    support_loop.run_until_met(reactor, lambda: client.cells_in > before, 5)
    client.send_cell(0, CellCommand.PADDING_NEGOTIATE, encode_padding_negotiate(False))
    support_loop.run_until_met(reactor, lambda: not server.padding_active, 5)
    assert server.is_open


def test_a_malformed_negotiation_closes_the_link(reactor: Reactor) -> None:
    client, accepted = _pair(reactor)
    server = accepted[0]
    client.send_cell(0, CellCommand.PADDING_NEGOTIATE, b"\x07\x02\x00\x00\x00\x00")
    support_loop.run_until_met(reactor, lambda: server.closed, 10)
    assert server.close_kind is CloseKind.PROTOCOL and "PADDING_NEGOTIATE" in (
        server.close_reason or "")
