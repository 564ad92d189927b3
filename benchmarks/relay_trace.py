"""Timestamps at each stage of a cell's way through a process, without changing its code.

:func:`install` wraps methods of the project's classes (at class level, before any object is
made, so the bound methods a relay stores -- read callbacks, cell handlers, the pool's process
and reply functions -- are the wrapped ones) to append ``(perf_counter_ns, event, thread)`` to
an in-memory list; :func:`dump` writes the list as JSON. The wrappers only record and call the
original: a relay run this way takes the same code paths (each event costs well under a
microsecond, against round trips of milliseconds). ``time.perf_counter_ns`` is
CLOCK_MONOTONIC on Linux, the same clock in every process, so events of several processes
merge into one timeline.

Events (``thread`` is ``L`` for the main -- loop -- thread, ``W`` for any other; each event also
carries the thread's CPU time, so a stretch between two events of one thread splits into time
on the CPU and time waiting):

=================  ==========================================================================
``read``           a TCP read reached the Stream (``reactor.stream.Stream._on_read``)
``tls_in``         TLS records decrypted (``feed`` of a TLS session returned)
``cell``           a relay circuit's link handler got cells (``OrCircuit._from_prev/_next``,
                   ``_relay_from_prev/_next``)
``client_cells``   the client's circuit handles its cells (``OriginCircuit.flush_in``)
``after_io``       the loop runs its end-of-iteration callbacks (``Reactor._run_after_io``)
``flush``          the relay's end-of-iteration flush (``RelayNode._flush``)
``submitted``      ``WorkerPool.submit_many`` returned (the worker was notified)
``worker``         a worker's ``Scheduler.turn`` returned circuits (it woke and took them)
``crypt``/``crypted``  the kernel's group call started / returned (worker, GIL released inside)
``put``            a worker put replies (``ReplyQueue.put``/``put_many``)
``woke``           the loop's reply-queue wake-up callback ran (``ReplyQueue._on_wakeup``)
``result``         a circuit got its crypted batch, from the pool or its own small batch
                   (``OrCircuit._forward_done``, ``_send_toward_client``, or the loop thread's
                   ``crypt_frame`` when it framed the batch)
``link_write``     cells handed to a link (``Link.write_cells``, ``Link.send_cells``)
``tls_out``        TLS records made (``encrypt`` returned)
``write``          bytes handed to libuv (``Stream.write``/``writelines``; libuv writes at once
                   when it can)
=================  ==========================================================================

Run as a program, it is a traced child: ``python -m benchmarks.relay_trace OUT.json relay
ARGS...`` runs ``examples.relay`` (``echo``: ``examples.echo``) with the probes installed and
writes the events to ``OUT.json`` when it exits (``-`` instead of a file: no probes, only the
switches). Switches for experiments, from the environment (:func:`apply_switches`):
``RELAYTRACE_IDLE_WORKERS`` (how many workers run at SCHED_IDLE instead of the pool's default)
and ``RELAYTRACE_SWITCH_INTERVAL`` (``sys.setswitchinterval``, seconds). A small batch of an idle
circuit is crypted on the loop thread (``relay.orcircuit``, "Small batches"): its cell shows
``cell``, ``flush``, ``result`` and no pool stage; ``--inline-cells 0`` on the relay sends every
batch to the pool.

Threads: :func:`install` and :func:`dump` on the main thread; the probes record from any
thread (a list append is atomic under the GIL).
"""

from __future__ import annotations

import functools
import json
import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from time import perf_counter_ns, thread_time_ns
from typing import Any

__all__ = ["EVENTS", "apply_switches", "dump", "install", "main", "uninstall"]

EVENTS: list[tuple[int, str, str, int, int]] = []
"""The recorded events of this process: ``(ns, event, thread, thread CPU ns, native thread
id)``."""
_MAIN = threading.main_thread().ident
_MISSING = object()
_INSTALLED: list[tuple[Any, str, Any]] = []
"""What :func:`install` replaced, as ``(owner, name, what owner.__dict__ held)``, for
:func:`uninstall`."""


def _thread() -> str:
    """``L`` on the main thread, ``W`` elsewhere. Any thread."""
    return "L" if threading.get_ident() == _MAIN else "W"


def _record(event: str) -> None:
    """Append one event of the calling thread. Any thread."""
    EVENTS.append((perf_counter_ns(), event, _thread(), thread_time_ns(),
                   threading.get_native_id()))


def _replace(owner: Any, name: str, value: Any) -> None:
    """Set ``owner.name`` to ``value``, remembering what was there. Main thread (set-up)."""
    _INSTALLED.append((owner, name, vars(owner).get(name, _MISSING)))
    setattr(owner, name, value)


def _before(owner: Any, name: str, event: str) -> None:
    """Wrap ``owner.name`` to record ``event`` before each call. Main thread (set-up)."""
    original = getattr(owner, name)

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        _record(event)
        return original(*args, **kwargs)

    _replace(owner, name, wrapper)


def _after(owner: Any, name: str, event: str,
           when: Callable[[Any], bool] = lambda result: True) -> None:
    """Wrap ``owner.name`` to record ``event`` after each call whose result passes ``when``.
    Main thread (set-up)."""
    original = getattr(owner, name)

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        result = original(*args, **kwargs)
        if when(result):
            _record(event)
        return result

    _replace(owner, name, wrapper)


def _traced_group(group: Any) -> Any:
    """``group`` (a kernel group function, called by workers) recording ``crypt`` and
    ``crypted`` around each call. Any thread."""
    if group is None:
        return None

    def traced(*args: Any, **kwargs: Any) -> Any:
        _record("crypt")
        try:
            return group(*args, **kwargs)
        finally:
            _record("crypted")

    return traced


def install() -> None:
    """Wrap the classes (see the module docstring) until :func:`uninstall`. Main thread,
    before any object is made."""
    from reactor.loop import Reactor
    from reactor.replyqueue import ReplyQueue
    from reactor.stream import Stream
    from relay import node as node_module
    from relay import orcircuit as orcircuit_module
    from relay.link import Link
    from relay.node import RelayNode
    from relay.orcircuit import OrCircuit
    from relay.origin import OriginCircuit
    from relay.tls import TlsClientSession, TlsServerSession
    from workers.pool import WorkerPool
    from workers.scheduler import Scheduler

    _before(Stream, "_on_read", "read")
    _before(Stream, "write", "write")
    _before(Stream, "writelines", "write")
    for session in (TlsClientSession, TlsServerSession):
        _after(session, "feed", "tls_in")
        _after(session, "encrypt", "tls_out")
    for handler in ("_from_prev", "_from_next", "_relay_from_prev", "_relay_from_next"):
        _before(OrCircuit, handler, "cell")
    for handler in ("_forward_done", "_send_toward_client"):
        _before(OrCircuit, handler, "result")
    # a small batch crypted and framed in one call on the loop thread (OrCircuit._crypt_small)
    # (only when it framed the batch: a tuple goes on to _forward_done, which records it)
    _after(orcircuit_module, "crypt_frame", "result", when=lambda out: out.__class__ is bytes)
    _before(OriginCircuit, "flush_in", "client_cells")
    _before(Reactor, "_run_after_io", "after_io")
    _before(RelayNode, "_flush", "flush")
    _after(WorkerPool, "submit_many", "submitted")
    _after(Scheduler, "turn", "worker", when=bool)
    _before(Link, "write_cells", "link_write")
    _before(Link, "send_cells", "link_write")
    original_put, original_put_many = ReplyQueue.put, ReplyQueue.put_many

    def put(self: Any, item: Any) -> bool:
        if threading.get_ident() != _MAIN:
            _record("put")
        return original_put(self, item)

    def put_many(self: Any, items: Any) -> bool:
        if threading.get_ident() != _MAIN:
            _record("put")
        return original_put_many(self, items)

    _replace(ReplyQueue, "put", put)
    _replace(ReplyQueue, "put_many", put_many)
    _before(ReplyQueue, "_on_wakeup", "woke")
    make_group = node_module.new_relay_group
    _replace(node_module, "new_relay_group", lambda: _traced_group(make_group()))


def uninstall() -> None:
    """Undo :func:`install`, so that objects made from now on are not traced (a process that
    traced a run and goes on, e.g. a test session). Main thread."""
    while _INSTALLED:
        owner, name, previous = _INSTALLED.pop()
        if previous is _MISSING:
            delattr(owner, name)
        else:
            setattr(owner, name, previous)


def apply_switches() -> None:
    """The experiment switches of the module docstring, from the environment. Main thread,
    before any object is made."""
    from workers import tuning

    idle_workers = os.environ.get("RELAYTRACE_IDLE_WORKERS")
    if idle_workers is not None:
        tuning.default_low_priority_workers = (  # type: ignore[assignment]
            lambda threads: min(int(idle_workers), threads))
    interval = os.environ.get("RELAYTRACE_SWITCH_INTERVAL")
    if interval:
        sys.setswitchinterval(float(interval))


def dump(path: Path, name: str) -> None:
    """Write this process's events to ``path`` as ``{"name", "pid", "events"}``. Main
    thread."""
    path.write_text(json.dumps({"name": name, "pid": os.getpid(), "events": EVENTS}))


def main(argv: list[str] | None = None) -> int:
    """``OUT.json relay|echo ARGS...``: run the program traced, dump at exit. Main thread."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) < 2 or args[1] not in ("relay", "echo"):
        print("usage: python -m benchmarks.relay_trace OUT.json relay|echo [ARGS...]",
              file=sys.stderr)
        return 2
    out, program, rest = Path(args[0]), args[1], args[2:]
    apply_switches()
    if str(out) != "-":
        install()
    if program == "relay":
        from examples.relay import main as run
    else:
        from examples.echo import main as run
    nickname = rest[rest.index("--nickname") + 1] if "--nickname" in rest else program
    try:
        return run(rest)
    finally:
        if str(out) != "-":
            dump(out, nickname)


if __name__ == "__main__":
    sys.exit(main())
