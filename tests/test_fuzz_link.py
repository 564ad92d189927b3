"""Fuzzing ``relay.link`` over real loopback TCP: hostile byte streams, cut at arbitrary points.

What is checked, and why
------------------------
A relay's links read bytes from anyone. A :class:`relay.link.Link` (responder, as a relay
accepts; and initiator, as a relay or client connects) on a real reactor is fed a byte stream
from a peer on a plain blocking socket in a thread: valid handshakes followed by cells for known
and unknown circuits, unknown commands, bad VERSIONS/NETINFO/CERTS, CREATE_FAST for ids from the
wrong half, a handler that raises, all mutated (bytes flipped, inserted, deleted, truncated), or
plain random bytes. Each stream is sent twice, once in one ``sendall`` and once cut at
arbitrary points (one ``send`` per piece, ``TCP_NODELAY``). For every input:

* **no unexpected exception in the loop**: the reactor counts no callback error, and the only
  tracebacks logged are for the exception types the link documents as a protocol failure
  (``CellFormatError``, ``CertsError``, ``LinkError`` from registering a bad circuit id) and the
  fault the test's own handler injects;
* **a malformed input closes that link, with a logged reason**: the link ends in ``closed``;
  if it was not the peer hanging up, its ``close_reason`` was logged by ``relay.link``;
* **framing does not depend on how the bytes were cut**: both deliveries give the same events
  (cells to circuit handlers and to ``on_cell``, in order, the open, the close kind);
* **other links on the same reactor keep working**: after every input, a healthy pair of links
  on the same reactor exchanges a burst of cells both ways, every one in order.

The number of examples is bounded in the suite; ``make fuzz`` raises it with
``RELAYCRYPT_FUZZ_EXAMPLES``.
"""

from __future__ import annotations

import itertools
import logging
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import event, given
from hypothesis import strategies as st
from reliability_support import LogRecorder, fuzz_settings, mutated_bytes, recording
from support_loop import run_until

from reactor import Reactor, Stream, listen
from relay.cells import CellCommand, CellFormatError, encode_versions
from relay.link import CloseKind, Link, LinkError, NetInfo, encode_netinfo
from relay.torcerts import CertsError
from tor1 import CELL_PAYLOAD_LEN

pytestmark = pytest.mark.timeout(300)

INITIATOR_ID = 0x80000001  # a circuit id from the initiator's half, registered at open
MARK_RAISE = 0xEE  # a payload starting with this byte makes the test's handler raise


class InjectedFault(Exception):
    """Raised by the test's own circuit handler: the link must close with a reason."""


EXPECTED_TRACEBACKS = (CellFormatError, CertsError, LinkError, InjectedFault)


# --------------------------------------------------------------------------- inputs


def fixed(circ_id: int, command: int, payload: bytes = b"") -> bytes:
    return struct.pack(">IB", circ_id, command) + payload[:CELL_PAYLOAD_LEN].ljust(
        CELL_PAYLOAD_LEN, b"\0")


def var(circ_id: int, command: int, payload: bytes) -> bytes:
    return struct.pack(">IBH", circ_id, command, len(payload)) + payload


circ_ids = st.sampled_from([0, INITIATOR_ID, 0x80000002, 0x80000003, 5, 0x7FFFFFFF, 0xFFFFFFFF])
commands = st.one_of(st.sampled_from([int(c) for c in CellCommand]), st.integers(0, 255))


@st.composite
def open_cells(draw: st.DrawFn) -> bytes:
    """One cell after the handshake (link v4 framing): anything a peer could send."""
    circ_id = draw(circ_ids)
    command = draw(commands)
    if command == CellCommand.VERSIONS or command >= 128:
        return var(circ_id, command, draw(st.binary(max_size=700)))
    payload = draw(st.one_of(
        st.binary(max_size=40),
        st.binary(max_size=8).map(lambda b: bytes((MARK_RAISE,)) + b),
        st.binary(min_size=CELL_PAYLOAD_LEN, max_size=CELL_PAYLOAD_LEN),
    ))
    return fixed(circ_id, command, payload)


def mutated(base: bytes) -> st.SearchStrategy[bytes]:
    """``base`` with a few random edits (none most of the time: valid streams go deepest)."""
    return mutated_bytes(base, st.sampled_from([0, 0, 0, 1, 2, 4]),
                         [0x00, 0x07, 0x80, 0xFF, MARK_RAISE])


versions_lists = st.one_of(st.just([4, 5]), st.just([4, 5]), st.just([4, 5]), st.just([4]),
                           st.just([3]), st.lists(st.integers(0, 10), max_size=5))
netinfo_payloads = st.one_of(
    st.just(encode_netinfo(NetInfo(0, "127.0.0.1"))),
    st.just(encode_netinfo(NetInfo(0, "127.0.0.1"))),
    st.binary(max_size=30),
)


@st.composite
def initiator_streams(draw: st.DrawFn) -> bytes:
    """What an initiator sends a responder: VERSIONS, maybe padding / CERTS / AUTH_CHALLENGE,
    NETINFO, then cells; mutated. Or random bytes."""
    if draw(st.integers(0, 5)) == 0:
        return draw(st.binary(max_size=1500))
    parts = [encode_versions(draw(versions_lists))]
    for _ in range(draw(st.integers(0, 2))):
        parts.append(draw(st.sampled_from([
            fixed(0, CellCommand.PADDING),
            var(0, CellCommand.VPADDING, b"\0" * 7),
            var(0, CellCommand.CERTS, b"\x01\x02\x00\x03abc"),
            var(0, CellCommand.AUTH_CHALLENGE, b"\0" * 36),
        ])))
    parts.append(fixed(0, CellCommand.NETINFO, draw(netinfo_payloads)))
    parts.extend(draw(st.lists(open_cells(), max_size=8)))
    return draw(mutated(b"".join(parts)))


@st.composite
def responder_streams(draw: st.DrawFn) -> bytes:
    """What a responder sends an initiator: VERSIONS, CERTS / AUTH_CHALLENGE, NETINFO, then
    cells; mutated. Or random bytes, or something that is not Tor at all."""
    choice = draw(st.integers(0, 6))
    if choice == 0:
        return draw(st.binary(max_size=1500))
    if choice == 1:
        return b"HTTP/1.0 400 Bad Request\r\n\r\n"
    parts = [encode_versions(draw(versions_lists))]
    if draw(st.integers(0, 3)) == 0:
        parts.append(var(0, CellCommand.CERTS, draw(st.binary(max_size=60))))
    if draw(st.booleans()):
        parts.append(var(0, CellCommand.AUTH_CHALLENGE, b"\0" * 36))
    parts.append(fixed(0, CellCommand.NETINFO, draw(netinfo_payloads)))
    parts.extend(draw(st.lists(open_cells(), max_size=8)))
    return draw(mutated(b"".join(parts)))


def chunked(blob: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(blob) + 1) for c in cuts} | {0, len(blob)})
    return [blob[a:b] for a, b in itertools.pairwise(points) if b > a]


# --------------------------------------------------------------------------- peers


def feed(sock: socket.socket, pieces: list[bytes]) -> None:
    """Send the pieces one ``send`` each, half-close, then read until the link closes (so our
    close never resets the connection before the link read everything). Peer thread."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.settimeout(30)
    try:
        for piece in pieces:
            sock.sendall(piece)
        sock.shutdown(socket.SHUT_WR)
        while sock.recv(65536):
            pass
    except OSError:
        pass  # the link closed on us first: that is one of the outcomes under test
    finally:
        sock.close()


class Recorder:
    """The events one fuzzed link produced, in order."""

    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []
        self.link: Link | None = None

    def handler(self, circ_id: int) -> Any:
        def on_cell(command: int, payload: bytes) -> None:
            self.events.append(("cell", circ_id, command, bytes(payload)))
            if payload[:1] == bytes((MARK_RAISE,)):
                raise InjectedFault(f"injected fault on circuit {circ_id:#x}")
        return on_cell

    def on_open(self, link: Link) -> None:
        self.events.append(("open", link.link_version))
        if not link.initiator:
            link.add_circuit(self.handler(INITIATOR_ID), INITIATOR_ID)

    def on_cell(self, link: Link, circ_id: int, command: int, payload: bytes) -> None:
        self.events.append(("unrouted", circ_id, command, bytes(payload)))
        if command == CellCommand.CREATE_FAST:
            link.add_circuit(self.handler(circ_id), circ_id)  # LinkError for our half
        elif command == MARK_RAISE:
            raise InjectedFault("injected fault in on_cell")

    def on_close(self, link: Link, reason: str) -> None:
        self.events.append(("close", link.close_kind))


class Harness:
    """One reactor for a whole fuzz run: a listener for fuzzed responders, and a healthy link
    pair that must keep working whatever the fuzzed links do."""

    def __init__(self, reactor: Reactor, recorder: LogRecorder) -> None:
        self.reactor = reactor
        self.log = recorder
        self.current: Recorder | None = None
        self.listener = listen(reactor, "127.0.0.1", 0, self._accept_fuzzed)
        self.healthy_server: Link | None = None
        self.healthy_got: list[bytes] = []
        self.healthy_sent = 0
        healthy_listener = listen(reactor, "127.0.0.1", 0, self._accept_healthy)
        host, port = healthy_listener.address
        self.healthy_client = Link.connect(reactor, host, port, name="healthy client")
        assert run_until(reactor, lambda: self.healthy_client.is_open
                         and self.healthy_server is not None and self.healthy_server.is_open)
        got = self.healthy_got
        assert self.healthy_server is not None
        self.healthy_server.add_circuit(lambda c, p: got.append(bytes(p)), INITIATOR_ID)
        self.healthy_back: list[bytes] = []
        back = self.healthy_back
        allocated = self.healthy_client.add_circuit(lambda c, p: back.append(bytes(p)))
        assert allocated == INITIATOR_ID  # the initiator's first id from its own half

    def _accept_healthy(self, stream: Stream) -> None:
        self.healthy_server = Link.accept(self.reactor, stream, name="healthy server")

    def _accept_fuzzed(self, stream: Stream) -> None:
        assert self.current is not None
        recorder = self.current
        recorder.link = Link.accept(
            self.reactor, stream, name=f"fuzzed responder {id(recorder):x}",
            on_open=recorder.on_open, on_cell=recorder.on_cell, on_close=recorder.on_close,
            handshake_timeout=60.0,
        )

    # ------------------------------------------------------------------ one delivery

    def against_responder(self, pieces: list[bytes]) -> Recorder:
        """Connect a peer thread to the fuzzed responder and feed it ``pieces``."""
        recorder = Recorder()
        self.current = recorder
        host, port = self.listener.address
        sock = socket.create_connection((host, port))
        peer = threading.Thread(target=feed, args=(sock, pieces), name="fuzz peer")
        peer.start()
        assert run_until(self.reactor, lambda: recorder.link is not None and recorder.link.closed
                         and not peer.is_alive(), 30.0), recorder.events
        peer.join()
        return recorder

    def against_initiator(self, pieces: list[bytes]) -> Recorder:
        """Listen on a plain socket, let a fuzzed initiator Link connect, feed it ``pieces``."""
        recorder = Recorder()
        server = socket.create_server(("127.0.0.1", 0))
        port = server.getsockname()[1]
        done = threading.Event()

        def serve() -> None:
            try:
                server.settimeout(30)
                conn, _ = server.accept()
            except OSError:
                return
            finally:
                server.close()
                done.set()
            feed(conn, pieces)

        peer = threading.Thread(target=serve, name="fuzz server")
        peer.start()
        recorder.link = Link.connect(
            self.reactor, "127.0.0.1", port, name=f"fuzzed initiator {id(recorder):x}",
            on_open=recorder.on_open, on_cell=recorder.on_cell, on_close=recorder.on_close,
            handshake_timeout=60.0,
        )
        link = recorder.link
        assert run_until(self.reactor, lambda: link.closed and not peer.is_alive(), 30.0), (
            recorder.events)
        peer.join()
        return recorder

    # ------------------------------------------------------------------ checks

    def check_closed_cleanly(self, recorder: Recorder) -> None:
        link = recorder.link
        assert link is not None and link.closed
        assert recorder.events[-1] == ("close", link.close_kind)
        assert link.close_reason
        if link.close_kind not in (CloseKind.PEER_CLOSED, CloseKind.LOCAL):
            logged = [m for m in self.log.messages(logging.WARNING) if link.name in m]
            assert any(link.close_reason in m for m in logged), (link.close_reason, logged)
        unexpected = [
            r for r in list(self.log.records)
            if r.exc_info and not isinstance(r.exc_info[1], EXPECTED_TRACEBACKS)
        ]
        assert not unexpected, [r.getMessage() for r in unexpected]
        assert self.reactor.stats()["callback_errors"] == 0

    def check_healthy_pair(self, burst: int = 20) -> None:
        """The healthy pair still carries cells both ways, all of them, in order."""
        assert self.healthy_client.is_open
        assert self.healthy_server is not None and self.healthy_server.is_open
        start = self.healthy_sent
        for i in range(start, start + burst):
            payload = i.to_bytes(4, "big")
            self.healthy_client.send_cell(INITIATOR_ID, CellCommand.RELAY, payload)
            self.healthy_server.send_cell(INITIATOR_ID, CellCommand.RELAY, payload)
        self.healthy_sent += burst
        total = self.healthy_sent
        assert run_until(self.reactor, lambda: len(self.healthy_got) == total
                         and len(self.healthy_back) == total)
        for got in (self.healthy_got, self.healthy_back):
            assert [int.from_bytes(p[:4], "big") for p in got[start:]] == list(
                range(start, total))


@pytest.fixture(scope="module")
def harness() -> Iterator[Harness]:
    with recording("relay.link", "reactor", "reactor.net", level=logging.INFO) as recorder:
        reactor = Reactor()
        try:
            yield Harness(reactor, recorder)
        finally:
            reactor.close()


# --------------------------------------------------------------------------- tests


def describe(recorder: Recorder) -> None:
    """Label the example for ``--hypothesis-show-statistics`` (how deep the fuzz got)."""
    opened = any(e[0] == "open" for e in recorder.events)
    cells = sum(1 for e in recorder.events if e[0] in ("cell", "unrouted"))
    kind = recorder.link.close_kind.value if recorder.link and recorder.link.close_kind else "?"
    event(f"{'opened' if opened else 'handshake only'}, closed as {kind}")
    event(f"cells routed: {min(cells, 5)}{'+' if cells >= 5 else ''}")


def check_whole_and_in_pieces(harness: Harness, against: Callable[[list[bytes]], Recorder],
                              blob: bytes, cuts: list[int]) -> None:
    """``blob`` into a fresh link (``against``: one side's harness), whole and cut at ``cuts``:
    each closes cleanly, both see the same events, and the healthy pair still works."""
    harness.log.clear()
    whole = against([blob] if blob else [])
    harness.check_closed_cleanly(whole)
    pieces = against(chunked(blob, cuts))
    harness.check_closed_cleanly(pieces)
    assert pieces.events == whole.events
    describe(whole)
    harness.check_healthy_pair()


@fuzz_settings(300)
@given(blob=initiator_streams(), cuts=st.lists(st.integers(0, 5000), max_size=10))
def test_fuzzed_bytes_into_a_responder_link(harness: Harness, blob: bytes, cuts: list[int]) -> None:
    check_whole_and_in_pieces(harness, harness.against_responder, blob, cuts)


@fuzz_settings(200)
@given(blob=responder_streams(), cuts=st.lists(st.integers(0, 5000), max_size=10))
def test_fuzzed_bytes_into_an_initiator_link(
    harness: Harness, blob: bytes, cuts: list[int]
) -> None:
    check_whole_and_in_pieces(harness, harness.against_initiator, blob, cuts)


def test_a_valid_stream_reaches_the_handlers(harness: Harness) -> None:
    """The generator's valid case really opens the link and routes cells (so the fuzz tests
    above exercise the open state, not only handshake failures)."""
    harness.log.clear()
    blob = (encode_versions([4, 5]) + fixed(0, CellCommand.NETINFO,
                                             encode_netinfo(NetInfo(0, "127.0.0.1")))
            + fixed(INITIATOR_ID, CellCommand.RELAY, b"hello")
            + fixed(0x80000002, CellCommand.CREATE_FAST, b"x" * 20)
            + fixed(0x80000002, CellCommand.RELAY, b"second")
            + fixed(5, CellCommand.CREATE_FAST, b"y" * 20))
    recorder = harness.against_responder(chunked(blob, [1, 7, 600, 1100, 1500]))
    harness.check_closed_cleanly(recorder)
    kinds = [e[0] for e in recorder.events]
    assert kinds == ["open", "cell", "unrouted", "cell", "unrouted", "cell", "cell", "close"]
    assert recorder.events[1][3].startswith(b"hello")
    assert recorder.events[3][3].startswith(b"second")
    # the circuits still registered at the close each get a synthesized DESTROY first
    destroyed = {(e[1], e[2]) for e in recorder.events[5:7]}
    assert destroyed == {(INITIATOR_ID, CellCommand.DESTROY), (0x80000002, CellCommand.DESTROY)}
    # CREATE_FAST for an id from the responder's own half: the link closes as a protocol error
    assert recorder.events[-1] == ("close", CloseKind.PROTOCOL)
    assert recorder.link is not None and "circuit id 0x5" in (recorder.link.close_reason or "")
