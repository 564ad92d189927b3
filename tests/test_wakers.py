"""reactor.aio's wakers: the descriptor's life, the fallback without add_reader, which waker
each loop gets."""

from __future__ import annotations

import asyncio
import gc
import os
import threading

import trio
import uvloop

from reactor import Reactor, ReplyQueue
from reactor.aio import AsyncioWaker, CallSoonThreadsafeWaker
from reactor.triowaker import TrioWaker
from reactor.wakers import PyuvWaker


def eventfds() -> int:
    """How many eventfds this process has open."""
    count = 0
    for name in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{name}") == "anon_inode:[eventfd]"
        except OSError:
            pass  # the listing's own descriptor, closed meanwhile
    return count


def test_each_loop_kind_gets_its_waker() -> None:
    with Reactor() as reactor:
        queue: ReplyQueue[int] = ReplyQueue(reactor, print)
        assert isinstance(queue._waker, PyuvWaker)
        queue.close()
    for factory in (asyncio.new_event_loop, uvloop.new_event_loop):
        loop = factory()
        queue = ReplyQueue(loop, print)
        assert isinstance(queue._waker, AsyncioWaker)
        queue.close()
        loop.close()

    async def in_trio() -> None:
        queue: ReplyQueue[int] = ReplyQueue(trio.lowlevel.current_trio_token(), print)
        assert isinstance(queue._waker, TrioWaker)
        queue.close()

    trio.run(in_trio)


def test_the_descriptor_is_closed_with_the_queue_and_sends_after_do_nothing() -> None:
    gc.collect()  # loops of earlier tests close their own eventfds when collected
    loop = asyncio.new_event_loop()
    before = eventfds()
    queues = [ReplyQueue(loop, print) for _ in range(50)]
    assert eventfds() == before + 50  # one eventfd each
    wakers = [q._waker for q in queues]
    for queue in queues:
        queue.close()
    assert eventfds() == before
    # A producer that saw the queue open and wakes after close(): nothing is written anywhere.
    replacement = os.open(os.devnull, os.O_RDONLY)  # likely reuses a freed descriptor number
    try:
        errors: list[BaseException] = []

        def late_send() -> None:
            try:
                for waker in wakers:
                    waker.send()
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=late_send)
        thread.start()
        thread.join()
        assert errors == []
    finally:
        os.close(replacement)
    loop.close()


class NoReaderLoop(asyncio.SelectorEventLoop):
    """A loop without add_reader, as Windows' proactor loop."""

    def add_reader(self, fd: object, callback: object, *args: object) -> None:
        raise NotImplementedError


def test_a_loop_without_add_reader_gets_call_soon_threadsafe_and_works() -> None:
    gc.collect()
    loop = NoReaderLoop()
    before = eventfds()
    handled: list[int] = []
    queue: ReplyQueue[int] = ReplyQueue(loop, handled.append)
    assert isinstance(queue._waker, CallSoonThreadsafeWaker)
    assert eventfds() == before  # the eventfd it tried first was closed again
    producer = threading.Thread(target=lambda: [queue.put(i) for i in range(1000)])

    async def run() -> None:
        producer.start()
        while len(handled) < 1000:
            await asyncio.sleep(0.002)

    loop.run_until_complete(asyncio.wait_for(run(), 20))
    producer.join()
    assert handled == list(range(1000))
    assert 1 <= queue.stats()["wakeups_sent"] <= 1000
    queue.close()
    loop.close()


def test_workers_import_no_loop_library_and_no_tor() -> None:
    """workers/ (and its loop-free embedding base) import neither a loop library nor Tor code:
    the asyncio and trio adapters are separate modules, reactor/ is imported lazily."""
    import subprocess
    import sys

    code = ("import sys, workers.pool, workers.embedded, workers.worker; "
            "print(sorted(m for m in ('asyncio', 'trio', 'uvloop', 'pyuv', 'tor1', 'relay', "
            "'reactor') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, timeout=60)
    assert done.stdout.strip() == "[]"
