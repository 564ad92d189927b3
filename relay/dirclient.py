"""Talk HTTP to a directory authority's DirPort on the event loop: fetch documents, upload a
descriptor, and keep a relay's descriptor published.

:func:`fetch` and :func:`upload_descriptor` open one TCP connection each (``reactor.net``),
send one request shaped as tor's ``directory_send_command`` shapes it (``Host``,
``Accept-Encoding`` with the methods :mod:`relay.dirhttp` reads, ``X-Desc-Gen-Reason`` and
``Content-Length`` on an upload), read the answer to the end of the stream (or to its
``Content-Length``) with :class:`relay.dirhttp.ResponseParser`, decode its
``Content-Encoding``, and call ``on_done(result)`` exactly once with a :class:`DirResult`:
on success, on an HTTP error status (the authority's reason phrase is in ``reason``, e.g.
"Fingerprint and/or ed25519 identity is marked rejected ..."), on a refused or reset
connection, on a malformed or oversized answer, or on the timeout. ``on_done`` runs on the loop
thread; nothing raises into the loop (an exception from ``on_done`` is logged).

An upload succeeds when the authority answers 200; tor's authorities also answer 200 with
``X-Descriptor-Not-New: Yes`` when they already have that descriptor, or one as new, and --
tor 0.4.9 -- when a POST held nothing they could parse (:attr:`DirResult.not_new` tells).

:class:`DescriptorPublisher` keeps a descriptor uploaded to every configured authority, on
tor's schedule (``router.c``, ``relay_periodic.c``): an upload to all authorities at start and
whenever the descriptor changes (tor uploads as soon as it rebuilds), a new upload every
:data:`REUPLOAD_INTERVAL` (18 h: tor's ``FORCE_REGENERATE_DESCRIPTOR_INTERVAL``; tor builds a
new descriptor then, so the publisher asks its ``refresh`` callback for one when it has it),
and after a failure a retry after :data:`RETRY_INITIAL` seconds (tor's 60 s descriptor check),
doubling up to :data:`RETRY_MAX` (tor's 90 min ``FAST_RETRY_DESCRIPTOR_INTERVAL``). A testing
network does not change these in tor (``TestingTorNetwork`` only lifts the bandwidth-change
limit), but each is a parameter. Every outcome is logged (``relay.dirclient``: info on
success, warning with the reason on failure) and reported to ``on_outcome`` with the delay chosen.

Threads: everything here is loop thread only.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from reactor.loop import Reactor, TimerHandle
from reactor.net import CloseReason, Stream, connect
from relay.dirdocs import MAX_DOCUMENT_SIZE
from relay.dirhttp import (
    IDENTITY,
    Headers,
    HttpError,
    ResponseParser,
    accept_encoding_header,
    build_request,
    decompress,
    http_date,
)

__all__ = [
    "DEFAULT_TIMEOUT",
    "RETRY_INITIAL",
    "RETRY_MAX",
    "REUPLOAD_INTERVAL",
    "DescriptorPublisher",
    "DirRequest",
    "DirResult",
    "fetch",
    "upload_descriptor",
]

logger = logging.getLogger("relay.dirclient")

DEFAULT_TIMEOUT = 60.0
REUPLOAD_INTERVAL = 18 * 60 * 60
RETRY_INITIAL = 60.0
RETRY_MAX = 90 * 60.0
#: An answer to an upload is a status line and a few headers.
_UPLOAD_ANSWER_LIMIT = 64 * 1024


@dataclass(frozen=True)
class DirResult:
    """What one request got. ``status`` is None when no HTTP answer was read (then ``error``
    says why); ``body`` is decoded."""

    target: str
    status: int | None
    reason: str
    headers: Headers = ()
    body: bytes = b""
    encoding: str | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        """True for a 200 answer read and decoded whole. Any thread."""
        return self.status == 200 and self.error is None

    @property
    def not_new(self) -> bool:
        """True when an authority said ``X-Descriptor-Not-New: Yes``. Any thread."""
        return self.header("X-Descriptor-Not-New") == "Yes"

    def header(self, name: str) -> str | None:
        """The first header called ``name`` (any case), or None. Any thread."""
        lowered = name.lower()
        return next((v for k, v in self.headers if k.lower() == lowered), None)

    def describe(self) -> str:
        """One line for a log. Any thread."""
        if self.status is None:
            return f"{self.target}: {self.error}"
        text = f"{self.target}: {self.status} {self.reason}"
        return text + (f" ({self.error})" if self.error else "")


class DirRequest:
    """One request in flight: connect, send, read to the end, decode, call ``on_done`` once.
    Loop thread only; made by :func:`fetch` and :func:`upload_descriptor`."""

    def __init__(self, reactor: Reactor, host: str, port: int, request: bytes, target: str,
                 on_done: Callable[[DirResult], object], *, timeout: float,
                 max_body: int) -> None:
        """Start connecting. Raises ``ValueError`` if ``host`` is not an IP literal.
        Loop thread only."""
        self._reactor = reactor
        self._request = request
        self._target = target
        self._on_done: Callable[[DirResult], object] | None = on_done
        self._max_body = max_body
        self._parser = ResponseParser(body_limit=max_body)
        self._stream: Stream = connect(reactor, host, port, self._connected, self._failed)
        self._timer: TimerHandle | None = reactor.call_later(timeout, self._timed_out, timeout)

    @property
    def done(self) -> bool:
        """True once ``on_done`` ran or ``cancel()`` was called. Loop thread only."""
        return self._on_done is None

    def cancel(self) -> None:
        """Abandon the request; ``on_done`` will not run. Loop thread only. Idempotent."""
        self._on_done = None
        self._stop_timer()
        self._stream.close("cancelled", flush=False)

    def _connected(self, stream: Stream) -> None:
        stream.on_close = self._closed
        stream.on_data = self._data
        stream.write(self._request)

    def _data(self, data: bytes) -> None:
        if self._on_done is None:
            return
        try:
            self._parser.feed(data)
        except HttpError as exc:
            self._finish(DirResult(self._target, None, "", error=f"bad answer: {exc}"))
            return
        if self._parser.complete:
            self._finish(self._result())

    def _closed(self, reason: CloseReason, detail: str) -> None:
        if self._on_done is None:
            return
        if reason is CloseReason.EOF:
            self._finish(self._result())
        else:
            self._finish(DirResult(self._target, None, "",
                                   error=f"connection closed: {reason.name}: {detail}"))

    def _failed(self, reason: CloseReason, detail: str) -> None:
        self._finish(DirResult(self._target, None, "",
                               error=f"connect failed: {reason.name}: {detail}"))

    def _timed_out(self, seconds: float) -> None:
        self._timer = None
        self._finish(DirResult(self._target, None, "", error=f"no answer in {seconds:g} s"))

    def _result(self) -> DirResult:
        try:
            response = self._parser.finish()
        except HttpError as exc:
            return DirResult(self._target, None, "", error=f"bad answer: {exc}")
        encoding = response.header("Content-Encoding") or IDENTITY
        try:
            body = decompress(response.body, encoding, self._max_body)
        except HttpError as exc:
            return DirResult(self._target, response.status, response.reason, response.headers,
                             response.body, encoding, error=str(exc))
        return DirResult(self._target, response.status, response.reason, response.headers,
                         body, encoding)

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _finish(self, result: DirResult) -> None:
        on_done, self._on_done = self._on_done, None
        if on_done is None:
            return
        self._stop_timer()
        if not self._stream.closed:
            self._stream.close("answer read", flush=False)
        try:
            on_done(result)
        except Exception:
            logger.exception("on_done for %s raised", self._target)


def fetch(reactor: Reactor, host: str, port: int, path: str,
          on_done: Callable[[DirResult], object], *, timeout: float = DEFAULT_TIMEOUT,
          max_body: int = MAX_DOCUMENT_SIZE, if_modified_since: float | None = None,
          headers: Sequence[tuple[str, str]] = ()) -> DirRequest:
    """GET ``path`` from the DirPort at ``host:port`` (an IP literal); ``on_done(DirResult)``
    follows once. ``max_body`` bounds the answer both as received and decoded (tor's 16 MiB
    by default). Loop thread only."""
    fields: list[tuple[str, str]] = []
    if if_modified_since is not None:
        fields.append(("If-Modified-Since", http_date(if_modified_since)))
    fields.append(("Accept-Encoding", accept_encoding_header()))
    fields.extend(headers)
    request = build_request("GET", path, host, port, fields)
    return DirRequest(reactor, host, port, request, f"{host}:{port}{path}", on_done,
                      timeout=timeout, max_body=max_body)


def upload_descriptor(reactor: Reactor, host: str, port: int, descriptor: str,
                      on_done: Callable[[DirResult], object], *, reason: str | None = None,
                      timeout: float = DEFAULT_TIMEOUT) -> DirRequest:
    """POST ``descriptor`` (UTF-8) to ``/tor/`` at ``host:port``; ``on_done(DirResult)``
    follows once: ``ok`` on 200, else the authority's status and reason phrase, or the
    error. ``reason`` becomes ``X-Desc-Gen-Reason`` (why the descriptor was made; authorities
    log it). Loop thread only."""
    fields = [("Accept-Encoding", accept_encoding_header())]
    if reason is not None:
        fields.append(("X-Desc-Gen-Reason", reason))
    request = build_request("POST", "/tor/", host, port, fields, descriptor.encode("utf-8"))
    return DirRequest(reactor, host, port, request, f"{host}:{port}/tor/", on_done,
                      timeout=timeout, max_body=_UPLOAD_ANSWER_LIMIT)


@dataclass
class _Target:
    host: str
    port: int
    failures: int = 0
    request: DirRequest | None = None
    timer: TimerHandle | None = None
    last: DirResult | None = None
    uploads: int = 0


class DescriptorPublisher:
    """Keeps one relay's descriptor uploaded to every authority (see the module docstring).
    Loop thread only."""

    def __init__(self, reactor: Reactor, authorities: Sequence[tuple[str, int]],
                 descriptor: str, *, refresh: Callable[[], str] | None = None,
                 interval: float = REUPLOAD_INTERVAL, retry_initial: float = RETRY_INITIAL,
                 retry_max: float = RETRY_MAX, timeout: float = DEFAULT_TIMEOUT,
                 on_outcome: Callable[[tuple[str, int], DirResult, float], object] | None = None
                 ) -> None:
        """``authorities``: (IP, DirPort) pairs. ``refresh()``, if given, returns a newly
        built descriptor for each periodic upload. ``on_outcome(authority, result, delay)``
        follows every answer (``delay``: seconds until that authority's next upload).
        Nothing is sent before ``start()``. Loop thread only."""
        if not authorities:
            raise ValueError("no authority to publish to")
        if not 0 < retry_initial <= retry_max or interval <= 0:
            raise ValueError("need 0 < retry_initial <= retry_max and interval > 0")
        reactor.check_loop_thread("DescriptorPublisher()")
        self._reactor = reactor
        self._targets = [_Target(host, port) for host, port in authorities]
        self._descriptor = descriptor
        self._reason = "relay started"
        self._refresh = refresh
        self._interval = interval
        self._retry_initial = retry_initial
        self._retry_max = retry_max
        self._timeout = timeout
        self._on_outcome = on_outcome
        self._running = False

    @property
    def descriptor(self) -> str:
        """The descriptor being published. Loop thread only."""
        return self._descriptor

    @property
    def accepted(self) -> bool:
        """True when every authority's last answer to this descriptor was 200. Loop thread
        only."""
        return all(t.last is not None and t.last.ok for t in self._targets)

    def last_results(self) -> dict[tuple[str, int], DirResult | None]:
        """Each authority's last result (None before its first). Loop thread only."""
        return {(t.host, t.port): t.last for t in self._targets}

    def start(self) -> None:
        """Upload to every authority now. Loop thread only."""
        self._running = True
        for target in self._targets:
            self._upload(target)

    def update(self, descriptor: str, reason: str = "descriptor changed") -> None:
        """Publish ``descriptor`` instead; when it differs, upload it to every authority now
        (what tor does after rebuilding). Loop thread only."""
        if descriptor == self._descriptor:
            return
        self._descriptor = descriptor
        self._reason = reason
        for target in self._targets:
            target.last = None
            target.failures = 0
            if self._running:
                self._upload(target)

    def stop(self) -> None:
        """Cancel uploads in flight and every timer. Loop thread only. Idempotent."""
        self._running = False
        for target in self._targets:
            self._cancel(target)

    def _cancel(self, target: _Target) -> None:
        if target.timer is not None:
            target.timer.cancel()
            target.timer = None
        if target.request is not None:
            target.request.cancel()
            target.request = None

    def _upload(self, target: _Target) -> None:
        self._cancel(target)
        target.uploads += 1
        try:
            target.request = upload_descriptor(
                self._reactor, target.host, target.port, self._descriptor,
                lambda result: self._answered(target, result), reason=self._reason,
                timeout=self._timeout)
        except ValueError as exc:  # not an IP literal: report it like any failure
            self._reactor.call_soon(self._answered, target,
                                    DirResult(f"{target.host}:{target.port}/tor/", None, "",
                                              error=str(exc)))

    def _retry(self, target: _Target) -> None:
        target.timer = None
        self._upload(target)

    def _periodic(self, target: _Target) -> None:
        target.timer = None
        if self._refresh is not None:
            try:
                descriptor = self._refresh()
            except Exception:
                logger.exception("building a new descriptor failed; uploading the old one")
            else:
                if descriptor != self._descriptor:
                    self.update(descriptor, "time for new descriptor")
                    return
        self._upload(target)

    def _answered(self, target: _Target, result: DirResult) -> None:
        target.request = None
        target.last = result
        if not self._running:
            return
        if result.ok:
            target.failures = 0
            delay = self._interval
            logger.info("descriptor upload %s%s", result.describe(),
                        " (authority already had it)" if result.not_new else "")
            target.timer = self._reactor.call_later(delay, self._periodic, target)
        else:
            target.failures += 1
            delay = min(self._retry_max,
                        self._retry_initial * 2 ** min(target.failures - 1, 30))
            logger.warning("descriptor upload failed: %s; retrying in %g s",
                           result.describe(), delay)
            target.timer = self._reactor.call_later(delay, self._retry, target)
        if self._on_outcome is not None:
            try:
                self._on_outcome((target.host, target.port), result, delay)
            except Exception:
                logger.exception("on_outcome raised")
