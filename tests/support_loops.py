"""Running one test scenario on every loop kind: pyuv, asyncio, uvloop, trio; no tests here.

A scenario is a generator function ``body(h)`` that runs on the loop thread, inside the running
loop for asyncio, uvloop and trio (trio code can only run there) and between runs for pyuv.
``h.loop`` is what a ``ReplyQueue`` or ``WorkerPool.attach`` takes on that kind (a Reactor, an
asyncio loop, a TrioToken). Each ``yield done`` runs the loop until ``done()`` holds, polling
it every 2 ms on the loop thread, and sends back ``done()``; a 20 s deadline only keeps a broken
test from hanging (no test asserts on time). ``h.call_later(s, fn)`` runs ``fn()`` on the loop
thread after ``s`` seconds; callbacks still pending when the scenario ends are dropped.

:func:`run_scenario` runs a body on one kind; :data:`every_loop` parametrizes a test's
``loop_kind`` over :data:`LOOP_KINDS`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any

import pytest
import trio
import uvloop
from support_loop import run_until

from reactor import Reactor

LOOP_KINDS = ("pyuv", "asyncio", "uvloop", "trio")
DEADLINE_S = 20.0
POLL_S = 0.002

Done = Callable[[], bool]
Body = Callable[["Harness"], Generator[Done, bool, None]]


@dataclass
class Harness:
    """What a scenario gets: the loop kind, the loop object, a timer."""

    kind: str
    loop: Any
    call_later: Callable[[float, Callable[[], object]], object]


#: Parametrizes a test's ``loop_kind`` argument over every loop kind.
every_loop = pytest.mark.parametrize("loop_kind", LOOP_KINDS)


def run_scenario(kind: str, body: Body) -> None:
    """Run ``body`` on a fresh loop of ``kind`` (see the module doc). Test (main) thread."""
    if kind == "pyuv":
        _run_pyuv(body)
    elif kind in ("asyncio", "uvloop"):
        factory = uvloop.new_event_loop if kind == "uvloop" else asyncio.new_event_loop
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(_run_asyncio(kind, body))
    elif kind == "trio":
        trio.run(_run_trio, body)
    else:
        raise ValueError(f"unknown loop kind {kind!r}")


def _run_pyuv(body: Body) -> None:
    with Reactor() as reactor:
        h = Harness("pyuv", reactor, lambda s, fn: reactor.call_later(s, fn))
        generator = body(h)
        try:
            done = next(generator)
            while True:
                done = generator.send(run_until(reactor, done, DEADLINE_S, poll=POLL_S))
        except StopIteration:
            pass


async def _run_asyncio(kind: str, body: Body) -> None:
    loop = asyncio.get_running_loop()
    h = Harness(kind, loop, lambda s, fn: loop.call_later(s, fn))
    generator = body(h)
    try:
        done = next(generator)
        while True:
            deadline = loop.time() + DEADLINE_S
            while not done() and loop.time() < deadline:
                await asyncio.sleep(POLL_S)
            done = generator.send(done())
    except StopIteration:
        pass


async def _run_trio(body: Body) -> None:
    async def later(seconds: float, fn: Callable[[], object]) -> None:
        await trio.sleep(seconds)
        fn()

    async with trio.open_nursery() as nursery:
        h = Harness("trio", trio.lowlevel.current_trio_token(),
                    lambda s, fn: nursery.start_soon(later, s, fn))
        generator = body(h)
        try:
            done = next(generator)
            while True:
                deadline = trio.current_time() + DEADLINE_S
                while not done() and trio.current_time() < deadline:
                    await trio.sleep(POLL_S)
                done = generator.send(done())
        except StopIteration:
            pass
        nursery.cancel_scope.cancel()
