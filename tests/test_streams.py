"""reactor.net: echo with back-pressure, connection errors, resets, closes, writelines."""

from __future__ import annotations

import hashlib
import os
import socket
import struct
import threading

import pytest

from reactor import (
    CloseReason,
    Reactor,
    Stream,
    StreamClosedError,
    connect,
    listen,
)

WATCHDOG_S = 60.0
READ_CHUNK_MAX = 65536  # pyuv reads into one 64 KiB buffer per loop


def free_port() -> int:
    """A port nobody listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_fifty_megabytes_echo_through_a_slow_reader_with_back_pressure() -> None:
    total = 50 * 1024 * 1024
    payload = memoryview(os.urandom(1024 * 1024) * 50)
    expected_hash = hashlib.sha256(payload).hexdigest()
    high, low, chunk = 256 * 1024, 64 * 1024, 64 * 1024
    with Reactor() as reactor:
        server_side: dict[str, object] = {"max_buffered": 0, "pauses": 0, "resumes": 0}
        closes: dict[str, tuple[CloseReason, str]] = {}

        def on_connection(stream: Stream) -> None:
            def echo(data: bytes) -> None:
                stream.write(data)
                buffered = stream.write_buffer_size
                if buffered > server_side["max_buffered"]:  # type: ignore[operator]
                    server_side["max_buffered"] = buffered

            def pause() -> None:
                server_side["pauses"] += 1  # type: ignore[operator]
                stream.pause_reading()

            def resume() -> None:
                server_side["resumes"] += 1  # type: ignore[operator]
                stream.resume_reading()

            stream.on_write_high = pause
            stream.on_write_low = resume
            stream.on_close = lambda reason, detail: closes.__setitem__("server", (reason, detail))
            stream.on_data = echo

        listener = listen(reactor, "127.0.0.1", 0, on_connection,
                          high_water=high, low_water=low)

        client_side = {"sent": 0, "received": 0, "max_buffered": 0, "highs": 0, "reads": 0}
        digest = hashlib.sha256()

        def pump(stream: Stream) -> None:
            # Write while below the high watermark; on_write_low calls us again.
            while client_side["sent"] < total and not client_side.get("blocked"):
                start = client_side["sent"]
                stream.write(payload[start : start + chunk])
                client_side["sent"] = start + chunk
                client_side["max_buffered"] = max(client_side["max_buffered"],
                                                  stream.write_buffer_size)

        def on_connect(stream: Stream) -> None:
            def blocked() -> None:
                client_side["blocked"] = 1
                client_side["highs"] += 1

            def unblocked() -> None:
                client_side["blocked"] = 0
                pump(stream)

            def slow_read(data: bytes) -> None:
                digest.update(data)
                client_side["received"] += len(data)
                client_side["reads"] += 1
                if client_side["received"] == total:
                    stream.close("all echoed")
                    return
                # Deliberately slow: take a break after every read.
                stream.pause_reading()
                reactor.call_later(0.001, stream.resume_reading)

            stream.on_write_high = blocked
            stream.on_write_low = unblocked
            stream.on_close = lambda reason, detail: closes.__setitem__("client", (reason, detail))
            stream.on_data = slow_read
            pump(stream)

        def on_error(reason: CloseReason, detail: str) -> None:
            closes["connect"] = (reason, detail)
            reactor.stop()

        def stop_when_both_closed() -> None:
            if "client" in closes and "server" in closes:
                reactor.stop()
            else:
                reactor.call_later(0.01, stop_when_both_closed)

        connect(reactor, "127.0.0.1", listener.address[1], on_connect, on_error,
                high_water=high, low_water=low)
        reactor.call_later(0.01, stop_when_both_closed)
        watchdog = reactor.call_later(WATCHDOG_S, reactor.stop)
        reactor.run()
        watchdog.cancel()

        assert "connect" not in closes
        assert client_side["received"] == total
        assert digest.hexdigest() == expected_hash
        # Back-pressure engaged on both ends, and the buffers stayed within the watermarks:
        # a write may cross `high` by at most what one write adds.
        assert server_side["pauses"] >= 1
        assert server_side["resumes"] >= 1
        assert client_side["highs"] >= 1
        assert server_side["max_buffered"] <= high + READ_CHUNK_MAX  # type: ignore[operator]
        assert client_side["max_buffered"] <= high + chunk
        assert closes["client"] == (CloseReason.LOCAL, "all echoed")
        assert closes["server"][0] is CloseReason.EOF


def test_connect_to_a_closed_port_calls_on_error_with_refused() -> None:
    port = free_port()
    with Reactor() as reactor:
        outcomes: list[object] = []

        def on_error(reason: CloseReason, detail: str) -> None:
            outcomes.append((reason, detail))
            reactor.stop()

        stream = connect(reactor, "127.0.0.1", port, outcomes.append, on_error)
        assert not stream.connected
        watchdog = reactor.call_later(WATCHDOG_S, reactor.stop)
        reactor.run()
        watchdog.cancel()
        assert len(outcomes) == 1
        reason, detail = outcomes[0]  # type: ignore[misc]
        assert reason is CloseReason.REFUSED
        assert "ECONNREFUSED" in detail
        assert reactor.stats()["callback_errors"] == 0
        assert stream.closed


def test_peer_reset_mid_stream_calls_on_close_with_reset() -> None:
    with Reactor() as reactor:
        closes: list[tuple[CloseReason, str]] = []
        written = [0]
        server_streams: list[Stream] = []
        block = b"x" * 65536

        def on_connection(stream: Stream) -> None:
            server_streams.append(stream)

            def fill() -> None:  # keep the write buffer above the high watermark
                while not stream.closed and stream.write_buffer_size <= 256 * 1024:
                    stream.write(block)
                    written[0] += len(block)

            def on_close(reason: CloseReason, detail: str) -> None:
                closes.append((reason, detail))
                reactor.stop()

            stream.on_close = on_close
            stream.on_write_low = fill
            stream.on_data = lambda data: None
            fill()

        listener = listen(reactor, "127.0.0.1", 0, on_connection)
        port = listener.address[1]
        received = [0]

        def rude_peer() -> None:
            sock = socket.create_connection(("127.0.0.1", port))
            while received[0] < 200_000:  # read a little of the stream, then reset it
                received[0] += len(sock.recv(65536))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()

        peer = threading.Thread(target=rude_peer)
        peer.start()
        watchdog = reactor.call_later(WATCHDOG_S, reactor.stop)
        reactor.run()
        watchdog.cancel()
        peer.join()
        assert len(closes) == 1
        assert closes[0][0] is CloseReason.RESET
        assert written[0] > received[0]  # it really was mid-stream
        stream = server_streams[0]
        assert stream.close_reason is CloseReason.RESET
        with pytest.raises(StreamClosedError):
            stream.write(b"after the reset")
        assert reactor.stats()["callback_errors"] == 0


def test_writelines_sends_many_buffers_in_order_and_close_flushes() -> None:
    buffers = [bytes([i % 251]) * (509 + i % 7) for i in range(3000)]
    expected = b"".join(buffers)
    with Reactor() as reactor:
        received = bytearray()
        closes: dict[str, tuple[CloseReason, str]] = {}

        def on_connection(stream: Stream) -> None:
            stream.on_data = received.extend
            stream.on_close = lambda reason, detail: (
                closes.__setitem__("server", (reason, detail)),
                reactor.stop(),
            )

        listener = listen(reactor, "127.0.0.1", 0, on_connection)

        def on_connect(stream: Stream) -> None:
            stream.writelines(buffers[:1000])  # one libuv write for 1000 buffers
            stream.writelines(tuple(buffers[1000:2000]))
            stream.writelines(iter(buffers[2000:]))  # other iterables are accepted too
            stream.writelines([])
            stream.close("sent everything")  # flushes before closing
            with pytest.raises(StreamClosedError):
                stream.write(b"too late")
            stream.on_close = lambda reason, detail: closes.__setitem__(
                "client", (reason, detail))

        connect(reactor, "127.0.0.1", listener.address[1], on_connect)
        watchdog = reactor.call_later(WATCHDOG_S, reactor.stop)
        reactor.run()
        watchdog.cancel()
        assert bytes(received) == expected
        assert closes["server"][0] is CloseReason.EOF
        assert closes["client"] == (CloseReason.LOCAL, "sent everything")


def test_on_data_that_raises_closes_that_stream_only() -> None:
    with Reactor() as reactor:
        closes: list[tuple[str, CloseReason]] = []
        streams: list[Stream] = []

        def on_connection(stream: Stream) -> None:
            name = f"server{len(streams)}"
            streams.append(stream)

            def on_data(data: bytes) -> None:
                if b"poison" in data:
                    raise ValueError("bad frame")

            stream.on_data = on_data
            stream.on_close = lambda reason, detail: closes.append((name, reason))

        listener = listen(reactor, "127.0.0.1", 0, on_connection)
        clients: list[Stream] = []

        def on_connect(stream: Stream) -> None:
            clients.append(stream)
            stream.on_data = lambda data: None
            stream.on_close = lambda reason, detail: closes.append(("client", reason))
            if len(clients) == 1:
                stream.write(b"poison")
            else:
                stream.write(b"fine")

        for _ in range(2):
            connect(reactor, "127.0.0.1", listener.address[1], on_connect)

        def check() -> None:
            if len(closes) >= 2:
                reactor.stop()
            else:
                reactor.call_later(0.01, check)

        reactor.call_later(0.01, check)
        watchdog = reactor.call_later(WATCHDOG_S, reactor.stop)
        reactor.run()
        watchdog.cancel()
        server_closes = [reason for name, reason in closes if name.startswith("server")]
        assert server_closes == [CloseReason.ERROR]
        assert ("client", CloseReason.EOF) in closes
        assert sum(1 for s in streams if not s.closed) == 1  # the other one is still open


def test_closing_a_pending_connect_reports_local_through_on_error() -> None:
    with Reactor() as reactor:
        outcomes: list[object] = []
        accepted: list[Stream] = []
        listener = listen(reactor, "127.0.0.1", 0, accepted.append)
        stream = connect(reactor, "127.0.0.1", listener.address[1], outcomes.append,
                         lambda reason, detail: outcomes.append((reason, detail)))
        stream.close("gave up")  # before the loop could report the connection
        reactor.call_later(0.05, reactor.stop)
        reactor.run()
        assert outcomes == [(CloseReason.LOCAL, "gave up")]  # on_error only, exactly once
        assert not stream.connected


def test_listen_on_a_busy_port_raises_oserror_and_bad_hosts_valueerror() -> None:
    with Reactor() as reactor:
        listener = listen(reactor, "127.0.0.1", 0, lambda stream: None)
        with pytest.raises(OSError):
            listen(reactor, "127.0.0.1", listener.address[1], lambda stream: None)
        with pytest.raises(ValueError):
            listen(reactor, "localhost", 0, lambda stream: None)
        with pytest.raises(ValueError):
            connect(reactor, "not an address", 1, print)
        listener.close()
        assert listener.closed


def test_watermarks_are_validated_and_reported() -> None:
    with Reactor() as reactor:
        outcomes: list[Stream] = []
        listener = listen(reactor, "127.0.0.1", 0, outcomes.append)
        with pytest.raises(ValueError):
            listen(reactor, "127.0.0.1", 0, print, high_water=10, low_water=20)
        stream = connect(reactor, "127.0.0.1", listener.address[1], outcomes.append,
                         high_water=1000, low_water=10)
        assert stream.write_watermarks == (1000, 10)
        stream.set_write_watermarks(2000, 500)
        assert stream.write_watermarks == (2000, 500)
        with pytest.raises(ValueError):
            stream.set_write_watermarks(1, 2)


def test_write_before_the_connection_completes_is_sent_and_other_threads_are_refused() -> None:
    with Reactor() as reactor:
        received = bytearray()
        errors: list[str] = []

        def on_connection(stream: Stream) -> None:
            def on_data(data: bytes) -> None:
                received.extend(data)
                if received.endswith(b"end"):
                    reactor.stop()

            stream.on_data = on_data

        listener = listen(reactor, "127.0.0.1", 0, on_connection)
        stream = connect(reactor, "127.0.0.1", listener.address[1], lambda s: None)
        stream.write(b"queued while connecting, ")

        def off_thread() -> None:
            for call in (lambda: stream.write(b"x"), lambda: stream.writelines([b"x"]),
                         stream.pause_reading, lambda: stream.close("x")):
                try:
                    call()
                except RuntimeError as exc:
                    errors.append(str(exc))
            reactor.call_soon_threadsafe(stream.write, b"end")

        thread = threading.Thread(target=off_thread)
        reactor.call_soon(thread.start)
        watchdog = reactor.call_later(WATCHDOG_S, reactor.stop)
        reactor.run()
        watchdog.cancel()
        thread.join()
        assert bytes(received) == b"queued while connecting, end"
        assert len(errors) == 4 and all("loop thread" in e for e in errors)


def test_reactor_close_closes_open_streams_and_reports_local() -> None:
    reactor = Reactor()
    closes: list[tuple[str, CloseReason, str]] = []

    def on_connection(stream: Stream) -> None:
        stream.on_data = lambda data: reactor.stop()
        stream.on_close = lambda reason, detail: closes.append(("server", reason, detail))

    listener = listen(reactor, "127.0.0.1", 0, on_connection)

    def on_connect(stream: Stream) -> None:
        stream.on_data = lambda data: None
        stream.on_close = lambda reason, detail: closes.append(("client", reason, detail))
        stream.write(b"hello")

    connect(reactor, "127.0.0.1", listener.address[1], on_connect)
    watchdog = reactor.call_later(WATCHDOG_S, reactor.stop)
    reactor.run()
    watchdog.cancel()
    assert closes == []
    reactor.close()
    assert reactor.loop.handles == []
    assert sorted(closes) == [("client", CloseReason.LOCAL, "reactor closed"),
                              ("server", CloseReason.LOCAL, "reactor closed")]
