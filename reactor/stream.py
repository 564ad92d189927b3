"""One TCP connection on the loop thread: a ``Stream`` with settable callbacks and back-pressure.

Design
------
A ``Stream`` wraps one ``pyuv.TCP`` handle and exposes settable callbacks rather than a
subclassing protocol, so that layers compose by re-pointing a callback: a TLS layer sets
``stream.on_data`` to its decrypting function and offers the same shape upward, the cell framing
sets ``on_data`` on whatever is below it. The callbacks (all run on the loop thread):

* ``on_data(data: bytes)`` - bytes arrived, in order. Reading starts as soon as ``on_data`` is
  set (and ``pause_reading()`` has not been called) and stops when it is set back to None.
* ``on_close(reason: CloseReason, detail: str)`` - the stream is finished: no more ``on_data``,
  and ``write()`` now raises ``StreamClosedError``. Called exactly once per connected stream.
  For a peer close or an error it is called as soon as the loop notices; after the local
  ``close()`` it is called once the buffered bytes are flushed and the socket is closed.
* ``on_write_high()`` / ``on_write_low()`` - the bytes accepted by ``write`` and not yet handed to
  the kernel (``write_buffer_size``) rose above the high watermark / fell back to or below the
  low one. They alternate, starting with high. A producer pauses on high and resumes on low
  (the relay: stop reading from the links feeding this one).

Streams are made by ``reactor.net``: ``listen()`` gives accepted ones, ``connect()`` returns
its Stream at once, and exactly one of ``on_connect(stream)`` or ``on_error(reason, detail)``
follows (also when ``close()`` cancels the attempt). Errors never escape as exceptions into the
loop: libuv error codes become ``CloseReason`` values and a human ``detail``
(:mod:`reactor.uverrors`); exceptions raised by callbacks are logged, and one raised by
``on_data`` closes that stream with ``CloseReason.ERROR`` (its protocol state can no longer be
trusted). Log records use the ``reactor.net`` logger.

Hot path: ``_on_read`` calls the user's ``on_data`` with one attribute load and no per-call
allocation of its own; ``writelines`` hands a whole list of buffers to one ``uv_write``, which
is how a relay should flush a batch of cells without copying them (the published pyuv 1.4.0
leaked every sequence passed to ``write``; ``tools/build_pyuv.py`` fixes that, and
``tests/test_setup.py`` checks the installed pyuv has the fix). Every write
carries the same pre-bound completion callback, which is where write errors and the low
watermark are noticed.
pyuv keeps a reference to each buffer until its write completes; do not mutate a bytearray
passed to ``write`` before then.

``reactor.net`` and ``reactor`` re-export :class:`Stream`; import it from there.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import pyuv

from reactor.uverrors import (
    CloseReason,
    StreamClosedError,
    check_watermarks,
    describe,
    error_code,
    reason_for,
)

if TYPE_CHECKING:
    from reactor.loop import Reactor

__all__ = ["DEFAULT_HIGH_WATER", "DEFAULT_LOW_WATER", "Buffer", "Stream"]

logger = logging.getLogger("reactor.net")

DEFAULT_HIGH_WATER = 256 * 1024
DEFAULT_LOW_WATER = 64 * 1024

Buffer = bytes | bytearray | memoryview


class Stream:
    """One TCP connection. See the module docstring for the callbacks and their order."""

    def __init__(
        self,
        reactor: Reactor,
        tcp: pyuv.TCP,
        *,
        connected: bool,
        high_water: int = DEFAULT_HIGH_WATER,
        low_water: int = DEFAULT_LOW_WATER,
    ) -> None:
        """Wrap ``tcp``. Loop thread only; use ``listen`` or ``connect`` rather than this."""
        reactor.check_loop_thread("Stream()")
        check_watermarks(high_water, low_water)
        self._reactor = reactor
        self._tcp = tcp
        self._on_data: Callable[[bytes], object] | None = None
        self.on_close: Callable[[CloseReason, str], object] | None = None
        self.on_write_high: Callable[[], object] | None = None
        self.on_write_low: Callable[[], object] | None = None
        self._on_connect: Callable[[Stream], object] | None = None
        self._on_error: Callable[[CloseReason, str], object] | None = None
        self._high = high_water
        self._low = low_water
        self._connected = connected
        self._want_reading = True
        self._reading = False
        self._above_high = False
        self._closing = False  # close started: no more reads, no more writes accepted
        self._user_closed = False
        self._notified = False  # on_close / on_error delivered
        self._close_reason: CloseReason | None = None
        self._close_detail = ""
        # Bound once: pyuv holds these while reading / while a write is queued.
        self._read_callback = self._on_read
        self._write_callback = self._on_write_done
        reactor._register_resource(self)

    # ------------------------------------------------------------------ callbacks

    @property
    def on_data(self) -> Callable[[bytes], object] | None:
        """The data callback; setting it starts reading unless paused. Loop thread only."""
        return self._on_data

    @on_data.setter
    def on_data(self, callback: Callable[[bytes], object] | None) -> None:
        self._check_thread("Stream.on_data")
        self._on_data = callback
        self._update_reading()

    # ------------------------------------------------------------------ state

    @property
    def connected(self) -> bool:
        """True once the connection is established (always for accepted streams). Any thread."""
        return self._connected

    @property
    def closed(self) -> bool:
        """True once closing has started, by either side. Any thread."""
        return self._closing

    @property
    def close_reason(self) -> CloseReason | None:
        """Why the stream ended, or None while it is open. Any thread."""
        return self._close_reason

    @property
    def close_detail(self) -> str:
        """A human description of the close (errno name and text, or the local reason).

        Any thread.
        """
        return self._close_detail

    @property
    def reading(self) -> bool:
        """True while libuv is reading from the socket. Any thread."""
        return self._reading

    @property
    def write_buffer_size(self) -> int:
        """Bytes accepted by ``write`` and not yet handed to the kernel. Loop thread only."""
        if self._tcp.closed:
            return 0
        return int(self._tcp.write_queue_size)

    def above_high(self, extra: int) -> bool:
        """Would ``extra`` more bytes put the write buffer above the high watermark? (One
        call where a data path would read ``write_buffer_size`` and ``write_watermarks``.)
        Loop thread only."""
        queued = 0 if self._tcp.closed else self._tcp.write_queue_size
        return queued + extra > self._high

    @property
    def write_watermarks(self) -> tuple[int, int]:
        """``(high, low)`` in bytes. Any thread."""
        return (self._high, self._low)

    def set_write_watermarks(self, high: int, low: int) -> None:
        """Change the watermarks; crossing callbacks fire now if needed. Loop thread only."""
        self._check_thread("Stream.set_write_watermarks()")
        check_watermarks(high, low)
        self._high = high
        self._low = low
        if not self._closing:
            self._check_high()
            self._check_low()

    @property
    def local_address(self) -> tuple[Any, ...] | None:
        """``(ip, port)`` of this end, or None if unknown. Loop thread only."""
        try:
            return tuple(self._tcp.getsockname())
        except pyuv.error.UVError:
            return None

    @property
    def peer_address(self) -> tuple[Any, ...] | None:
        """``(ip, port)`` of the peer, or None if unknown. Loop thread only."""
        try:
            return tuple(self._tcp.getpeername())
        except pyuv.error.UVError:
            return None

    # ------------------------------------------------------------------ writing

    def write(self, data: Buffer) -> None:
        """Queue ``data`` for sending. Loop thread only.

        Raises ``StreamClosedError`` after ``close()`` or after ``on_close``. An I/O error
        found during this call closes the stream and is reported through ``on_close`` on a
        later loop iteration, never raised here.
        """
        if threading.get_ident() != self._reactor._loop_thread_id:
            self._reactor.check_loop_thread("Stream.write()")
        if self._closing:
            self._refuse_write()
            return
        if not data:
            return
        self._queue_write(data)

    def writelines(self, buffers: Sequence[Buffer]) -> None:
        """Queue several buffers with one libuv write. Loop thread only.

        The buffers go to libuv as they are, without a copy: do not change a mutable one
        (``bytearray``) before the write completes. Same errors as ``write``.
        """
        if threading.get_ident() != self._reactor._loop_thread_id:
            self._reactor.check_loop_thread("Stream.writelines()")
        if self._closing:
            self._refuse_write()
            return
        if not isinstance(buffers, list | tuple):
            buffers = list(buffers)
        if not buffers:
            return
        # The sequence itself: pyuv as built by tools/build_pyuv.py releases it once the write
        # is queued (the published 1.4.0 leaked it, and every buffer in it).
        self._queue_write(buffers)

    def _queue_write(self, data: Buffer | Sequence[Buffer]) -> None:
        """One libuv write of ``data`` (a buffer or a list/tuple of them): an error closes the
        stream on a later iteration; then the high watermark is checked. Loop thread only."""
        try:
            self._tcp.write(data, self._write_callback)
        except pyuv.error.UVError as exc:
            self._fail_later(error_code(exc))
            return
        if not self._above_high and self._tcp.write_queue_size > self._high:
            self._check_high()

    def _refuse_write(self) -> None:
        if self._user_closed or self._notified:
            raise StreamClosedError(
                f"write on a closed stream ({self._close_reason}: {self._close_detail})"
            )
        # Else an error found inside an earlier write() is closing us and on_close is already
        # queued: the caller cannot know yet, and will be told; the bytes would be lost anyway.

    def _on_write_done(self, tcp: pyuv.TCP, error: int | None) -> None:
        if error is not None:
            if error != pyuv.errno.UV_ECANCELED:  # ECANCELED: we closed it; close says why
                self._fail(error)
            return
        if self._above_high and not self._closing and tcp.write_queue_size <= self._low:
            self._check_low()

    def _check_high(self) -> None:
        if not self._above_high and self._tcp.write_queue_size > self._high:
            self._above_high = True
            callback = self.on_write_high
            if callback is not None:
                self._call_user(callback)

    def _check_low(self) -> None:
        if self._above_high and self._tcp.write_queue_size <= self._low:
            self._above_high = False
            callback = self.on_write_low
            if callback is not None:
                self._call_user(callback)

    # ------------------------------------------------------------------ reading

    def pause_reading(self) -> None:
        """Stop delivering ``on_data`` until ``resume_reading()``. Loop thread only."""
        self._check_thread("Stream.pause_reading()")
        self._want_reading = False
        self._update_reading()

    def resume_reading(self) -> None:
        """Deliver ``on_data`` again (once ``on_data`` is set). Loop thread only."""
        self._check_thread("Stream.resume_reading()")
        self._want_reading = True
        self._update_reading()

    def _update_reading(self) -> None:
        should_read = (
            self._want_reading
            and self._on_data is not None
            and self._connected
            and not self._closing
        )
        if should_read == self._reading:
            return
        self._reading = should_read
        if should_read:
            self._tcp.start_read(self._read_callback)
        else:
            self._tcp.stop_read()

    def _on_read(self, tcp: pyuv.TCP, data: bytes | None, error: int | None) -> None:
        if error is None:
            if data:  # libuv reports EAGAIN as a zero-length read
                try:
                    self._on_data(data)  # type: ignore[misc]  # reading implies it is set
                except Exception as exc:
                    logger.exception("on_data of %r raised; closing the stream", self)
                    self._fail_with(CloseReason.ERROR, f"on_data raised {exc!r}", flush=False)
            return
        self._reading = False  # pyuv stopped reading before calling us with an error
        if error == pyuv.errno.UV_EOF:
            # Half-close from the peer: send what is still queued, then close.
            self._fail_with(CloseReason.EOF, "the peer closed the connection", flush=True)
        else:
            self._fail(error)

    # ------------------------------------------------------------------ closing

    def close(self, reason: str = "closed locally", *, flush: bool = True) -> None:
        """Close the stream; ``on_close(CloseReason.LOCAL, reason)`` follows. Loop thread only.

        With ``flush`` (the default) reading stops at once and bytes already written are sent
        before the socket closes (a peer that never reads can delay that; call again with
        ``flush=False`` to abort). Idempotent. On a stream still connecting, cancels the attempt
        and ``on_error(CloseReason.LOCAL, reason)`` follows instead.
        """
        self._check_thread("Stream.close()")
        if self._closing:
            if not flush and not self._tcp.closed:
                self._reactor._close_handle_with(self._tcp, self._on_handle_closed)
            return
        self._user_closed = True
        self._begin_close(CloseReason.LOCAL, reason, flush=flush and self._connected)

    def _begin_close(self, reason: CloseReason, detail: str, *, flush: bool) -> None:
        if self._closing:
            return
        self._closing = True
        self._close_reason = reason
        self._close_detail = detail
        self._update_reading()
        if flush and self._tcp.write_queue_size > 0:
            try:
                # uv_shutdown completes after every queued write: then close.
                self._tcp.shutdown(self._on_shutdown)
                return
            except pyuv.error.UVError:
                pass  # not writable any more: nothing can be flushed, close now
        self._reactor._close_handle_with(self._tcp, self._on_handle_closed)

    def _on_shutdown(self, tcp: pyuv.TCP, error: int | None) -> None:
        if not tcp.closed:
            self._reactor._close_handle_with(tcp, self._on_handle_closed)

    def _fail(self, code: int) -> None:
        self._fail_with(reason_for(code), describe(code), flush=False)

    def _fail_with(self, reason: CloseReason, detail: str, *, flush: bool) -> None:
        """The peer or an error ends the stream: tell the user now. Loop thread only."""
        if self._closing:
            if not flush and not self._tcp.closed:
                # An error while flushing (ours or after EOF): stop waiting for the flush.
                self._reactor._close_handle_with(self._tcp, self._on_handle_closed)
            return
        self._begin_close(reason, detail, flush=flush)
        self._notify()

    def _fail_later(self, code: int) -> None:
        """An error found inside the user's own call: close now, tell them next iteration."""
        if self._closing:
            return
        self._begin_close(reason_for(code), describe(code), flush=False)
        self._reactor.call_soon(self._notify)

    def _on_handle_closed(self, tcp: pyuv.TCP) -> None:
        self._reactor._unregister_resource(self)
        self._notify()

    def _notify(self) -> None:
        if self._notified:
            return
        self._notified = True
        reason = self._close_reason or CloseReason.ERROR
        if not self._connected:
            on_error = self._on_error
            if on_error is not None:
                self._call_user(on_error, reason, self._close_detail)
            else:
                logger.warning("connection failed (%s: %s) and no on_error is set",
                               reason.name, self._close_detail)
        elif self.on_close is not None:
            self._call_user(self.on_close, reason, self._close_detail)
        # Drop user callbacks: they often reference objects that reference this stream.
        self._on_data = self.on_close = self.on_write_high = self.on_write_low = None
        self._on_connect = self._on_error = None

    def _close_for_reactor(self) -> None:
        if not self._closing:
            self._user_closed = True
            self._begin_close(CloseReason.LOCAL, "reactor closed", flush=False)
        elif not self._tcp.closed:
            self._reactor._close_handle_with(self._tcp, self._on_handle_closed)

    # ------------------------------------------------------------------ connecting

    def _on_connected(self, tcp: pyuv.TCP, error: int | None) -> None:
        if self._closing:
            return  # cancelled by close(): its close callback reports on_error(LOCAL)
        if error is not None:
            self._fail(error)
            return
        self._connected = True
        try:
            tcp.nodelay(True)
        except pyuv.error.UVError:
            pass  # a socket that cannot take TCP_NODELAY still works
        on_connect = self._on_connect
        self._on_connect = None
        if on_connect is not None:
            try:
                on_connect(self)
            except Exception as exc:
                logger.exception("on_connect of %r raised; closing the stream", self)
                self._fail_with(CloseReason.ERROR, f"on_connect raised {exc!r}", flush=False)
                return
        self._update_reading()

    # ------------------------------------------------------------------ helpers

    def _check_thread(self, what: str) -> None:
        self._reactor.check_loop_thread(what)

    def _call_user(self, callback: Callable[..., object], *args: Any) -> None:
        try:
            callback(*args)
        except Exception:
            logger.exception("stream callback %r raised; the loop continues", callback)

    def __repr__(self) -> str:
        if self._closing:
            state = f"closed ({self._close_reason.name if self._close_reason else '?'})"
        else:
            state = "open" if self._connected else "connecting"
        return f"<Stream {state} buffered={self.write_buffer_size}>"
