"""workers.on_asyncio and workers.on_trio: the pool in asyncio, uvloop and trio applications.

The same scenarios run on each: per-circuit results awaited in order and byte-identical to the
tor1 reference; a worker's exception after the results before it; leaving ``async with``
drains every queued cell; an exception inside it cancels the queued cells and still joins every
worker; ``async for`` ends when the circuit is closed; the thread rules are enforced. Counts and
bytes only, never time.
"""

from __future__ import annotations

import asyncio
import random
import threading
from collections.abc import Awaitable, Callable
from types import ModuleType
from typing import Any

import pytest
import trio
import uvloop

from tor1 import CELL_PAYLOAD_LEN
from tor1.backend import relay_crypto_for
from tor1.reference import HopKeys, RelayCrypto, kdf_tor
from workers import on_asyncio, on_trio
from workers.circuit import CircuitClosedError

KINDS = ("asyncio", "uvloop", "trio")
CELL = CELL_PAYLOAD_LEN


def run(kind: str, main: Callable[[ModuleType, Callable[[float], Awaitable[None]]],
                                  Awaitable[None]]) -> None:
    """Run ``main(adapter module, sleep)`` on a fresh loop of ``kind``. Test (main) thread."""
    if kind == "trio":
        trio.run(main, on_trio, trio.sleep)
        return
    factory = uvloop.new_event_loop if kind == "uvloop" else asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(main(on_asyncio, asyncio.sleep))


def worker_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("relaycrypt-worker")]


def keys(index: int) -> HopKeys:
    return HopKeys.from_material(kdf_tor(b"embedded-async-%d" % index, 72))


def forward(state: Any, lane: int, batch: bytes) -> bytes:
    """The process function: a middle relay's forward crypto, cells out only. Worker thread."""
    return state.forward_buf(batch)[0]


def reference_forward(index: int, data: bytes) -> bytes:
    reference = RelayCrypto(keys(index))
    return b"".join(reference.forward(data[o:o + CELL])[1] for o in range(0, len(data), CELL))


@pytest.mark.parametrize("kind", KINDS)
def test_results_are_awaited_in_order_and_match_the_reference(kind: str) -> None:
    circuits, chunks, chunk_cells = 6, 20, 7
    inputs = [random.Random(k).randbytes(chunks * chunk_cells * CELL) for k in range(circuits)]
    outputs: list[bytes] = [b""] * circuits
    seen: dict[str, Any] = {}

    async def main(adapter: ModuleType, sleep: Callable[[float], Awaitable[None]]) -> None:
        async with adapter.open_pool(threads=2, process=forward, joined=True, lanes=1,
                                     cell_size=CELL) as pool:
            results = [pool.open_circuit(relay_crypto_for(keys(k))) for k in range(circuits)]
            for c in range(chunks):
                for k, r in enumerate(results):
                    size = chunk_cells * CELL
                    assert r.submit(0, inputs[k][c * size:(c + 1) * size]) is True
                if c % 5 == 4:
                    await sleep(0)  # let some replies in between submits
            for k, r in enumerate(results):
                got = []
                while sum(map(len, got)) < len(inputs[k]):
                    lane, out = await r.get()
                    assert lane == 0
                    got.append(out)
                outputs[k] = b"".join(got)
                assert r.buffered == 0
            seen.update(pool.stats())

    run(kind, main)
    for k in range(circuits):
        assert outputs[k] == reference_forward(k, inputs[k]), k
    total = circuits * chunks * chunk_cells
    assert seen["delivered"] == seen["submitted"] == total
    replies = seen["replies"]
    assert replies["items_handled"] == replies["puts"] == seen["batches"]
    assert 1 <= replies["wakeups_sent"] <= replies["puts"]
    assert not worker_threads()


def failing(state: Any, lane: int, batch: list[bytes]) -> list[bytes]:
    """Fails on a batch holding b"boom"; otherwise echoes. Worker thread."""
    if b"boom" in batch:
        raise ValueError("bad cell")
    return batch


@pytest.mark.parametrize("kind", KINDS)
def test_a_worker_error_follows_the_results_before_it(kind: str) -> None:
    async def main(adapter: ModuleType, sleep: Callable[[float], Awaitable[None]]) -> None:
        async with adapter.open_pool(threads=1, process=failing, batch_cells=1) as pool:
            bad = pool.open_circuit(None)
            good = pool.open_circuit(None)
            for item in ([b"ok1"], [b"boom"], [b"ok2"]):
                bad.submit(0, item)
            good.submit(0, [b"g1"])
            assert await bad.get() == (0, [b"ok1"])
            with pytest.raises(ValueError, match="bad cell"):
                await bad.get()
            with pytest.raises(CircuitClosedError):
                await bad.get()  # closed: ok2 was cancelled, never delivered
            assert bad.closed
            assert await good.get() == (0, [b"g1"])  # the worker lives on for others
            good.submit(0, [b"g2"])
            assert await good.get() == (0, [b"g2"])
            stats = pool.stats()
            assert stats["errors_delivered"] == 1 and stats["cancelled"] == 1

    run(kind, main)
    assert not worker_threads()


@pytest.mark.parametrize("kind", KINDS)
def test_leaving_the_block_drains_every_queued_cell(kind: str) -> None:
    holder: dict[str, Any] = {}

    async def main(adapter: ModuleType, sleep: Callable[[float], Awaitable[None]]) -> None:
        async with adapter.open_pool(threads=2, process=lambda s, d, b: b,
                                     batch_cells=4) as pool:
            results = [pool.open_circuit(None) for _ in range(5)]
            for i in range(200):
                for k, r in enumerate(results):
                    r.submit(0, [b"%d:%d" % (k, i)])
            holder["pool"], holder["results"] = pool, results
        # After the block: every cell was crypted and delivered, the workers are joined.
        assert not worker_threads()
        for k, r in enumerate(results):
            got = []
            async for _lane, batch in r:
                got.extend(batch)
            assert got == [b"%d:%d" % (k, i) for i in range(200)]
        stats = pool.pool.stats()
        assert stats["delivered"] == stats["submitted"] == 1000
        assert stats["cancelled"] == 0
        assert pool.closed

    run(kind, main)


@pytest.mark.parametrize("kind", KINDS)
def test_an_exception_in_the_block_cancels_queued_cells_and_joins(kind: str) -> None:
    gate = threading.Event()
    entered = threading.Event()
    holder: dict[str, Any] = {}

    def blocking(state: Any, lane: int, batch: list[bytes]) -> list[bytes]:
        entered.set()
        assert gate.wait(30)
        return batch

    async def main(adapter: ModuleType, sleep: Callable[[float], Awaitable[None]]) -> None:
        with pytest.raises(KeyError, match="the application failed"):
            async with adapter.open_pool(threads=1, process=blocking, batch_cells=1) as pool:
                holder["pool"] = pool
                r = pool.open_circuit(None)
                for i in range(50):
                    r.submit(0, [b"%d" % i])
                while not entered.is_set():
                    await sleep(0.001)
                threading.Timer(0.05, gate.set).start()  # the running batch ends later
                raise KeyError("the application failed")
        stats = holder["pool"].pool.stats()
        assert stats["alive_threads"] == 0
        assert stats["cancelled"] > 0
        assert stats["submitted"] == 50 == stats["delivered"] + stats["cancelled"]
        assert holder["pool"].replies.stats()["closed"] is True

    run(kind, main)
    assert not worker_threads()


@pytest.mark.parametrize("kind", KINDS)
def test_one_waiter_at_a_time_and_closed_results_end(kind: str) -> None:
    async def main(adapter: ModuleType, sleep: Callable[[float], Awaitable[None]]) -> None:
        async with adapter.open_pool(threads=1, process=lambda s, d, b: b) as pool:
            r = pool.open_circuit(None)
            outcome: list[Any] = []

            async def wait_one() -> None:
                try:
                    outcome.append(await r.get())
                except CircuitClosedError as exc:
                    outcome.append(exc)

            if kind == "trio":
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(wait_one)
                    await trio.sleep(0.01)
                    with pytest.raises(RuntimeError, match="already waiting"):
                        await r.get()
                    r.close()
            else:
                task = asyncio.ensure_future(wait_one())
                await asyncio.sleep(0.01)
                with pytest.raises(RuntimeError, match="already waiting"):
                    await r.get()
                r.close()
                await task
            assert len(outcome) == 1 and isinstance(outcome[0], CircuitClosedError)
            with pytest.raises(CircuitClosedError):
                r.submit(0, [b"x"])

    run(kind, main)


@pytest.mark.parametrize("kind", KINDS)
def test_the_pool_is_made_on_the_loop_thread_only(kind: str) -> None:
    errors: list[str] = []

    async def main(adapter: ModuleType, sleep: Callable[[float], Awaitable[None]]) -> None:
        token_or_loop: Any = (trio.lowlevel.current_trio_token() if kind == "trio"
                              else asyncio.get_running_loop())

        def off_thread() -> None:
            try:
                if kind == "trio":
                    from reactor import ReplyQueue

                    ReplyQueue(token_or_loop, print)
                else:
                    on_asyncio.attach(token_or_loop, threads=1, process=lambda s, d, b: b)
            except RuntimeError as exc:
                errors.append(str(exc))

        thread = threading.Thread(target=off_thread)
        thread.start()
        thread.join()

    run(kind, main)
    assert len(errors) == 1 and "loop thread" in errors[0]
    assert not worker_threads()
