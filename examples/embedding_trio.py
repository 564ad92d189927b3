"""A trio TCP service that offloads relay crypto to the worker pool.

``python -m examples.embedding_trio [--circuits N] [--cells M] [--json]`` is
``examples.embedding_asyncio`` in trio: the service of :mod:`examples.crypt_service` on a free
loopback port inside ``workers.on_trio.open_pool``, N clients against it in the same run, each
client's bytes compared with the pure-Python reference. Exit status 1 if any byte differs.

Per connection: ``pool.open_circuit(state)`` gives the circuit and its results; the handler
submits every whole cell it receives and a second task sends each batch back as ``async for``
yields it, in order. Everything runs in the trio run's thread except the pool's workers.
"""

from __future__ import annotations

import functools
import sys
import time
from collections.abc import Sequence

import trio

from examples.crypt_service import (
    CELL,
    CLIENT_CHUNK,
    READ_SIZE,
    SEED_LEN,
    WINDOW_CELLS,
    cells_for,
    new_circuit_state,
    parser,
    pool_options,
    reference_output,
    report,
    seed_for,
    summary,
)
from workers.on_trio import TrioPool, open_pool


async def receive_exactly(stream: trio.SocketStream, count: int) -> bytes | None:
    """``count`` bytes, or None if the peer closed first. Loop thread."""
    data = b""
    while len(data) < count:
        more = await stream.receive_some(count - len(data))
        if not more:
            return None
        data += more
    return data


async def serve_connection(pool: TrioPool, stream: trio.SocketStream) -> None:
    """One client: its circuit's cells through the pool and back, in order. Loop thread."""
    seed = await receive_exactly(stream, SEED_LEN)
    if seed is None:
        await stream.aclose()
        return
    results = pool.open_circuit(new_circuit_state(seed))
    counts = {"submitted": 0, "written": 0, "eof": False}
    window = trio.lowlevel.ParkingLot()

    async def send_back() -> None:
        async for _lane, (out, _recognized) in results:
            await stream.send_all(out)
            counts["written"] += len(out) // CELL
            if counts["submitted"] - counts["written"] < WINDOW_CELLS:
                window.unpark_all()
            if counts["eof"] and counts["written"] == counts["submitted"]:
                results.close()  # ends the iteration

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send_back)
            rest = b""
            while True:
                while counts["submitted"] - counts["written"] >= WINDOW_CELLS:
                    await window.park()
                data = await stream.receive_some(READ_SIZE)
                if not data:
                    break
                data = rest + data
                whole = len(data) - len(data) % CELL
                rest = data[whole:]
                if whole:
                    results.submit(0, data[:whole])
                    counts["submitted"] += whole // CELL
            counts["eof"] = True
            if counts["written"] == counts["submitted"]:
                results.close()
    finally:
        results.close()
        await stream.aclose()


async def client(port: int, seed: bytes, data: bytes, expected: bytes) -> bool:
    """Send one circuit's cells, read everything back, compare with the reference's bytes."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    received: list[bytes] = []

    async def send() -> None:
        await stream.send_all(seed)
        for offset in range(0, len(data), CLIENT_CHUNK):
            await stream.send_all(data[offset:offset + CLIENT_CHUNK])
        await stream.send_eof()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send)
        while chunk := await stream.receive_some(READ_SIZE):
            received.append(chunk)
    await stream.aclose()
    return b"".join(received) == expected


async def run(circuits: int, cells: int, threads: int) -> dict:
    """Start the service, run the clients, close everything. Loop thread."""
    work = [(seed_for(i), cells_for(i, cells)) for i in range(circuits)]
    expected = [reference_output(seed, data) for seed, data in work]  # before the clock runs
    intact = [False] * circuits
    async with open_pool(**pool_options(threads)) as pool, trio.open_nursery() as service:
        listeners = await service.start(
            functools.partial(trio.serve_tcp, host="127.0.0.1"),  # loopback only
            lambda stream: serve_connection(pool, stream),
            0,
        )
        port = listeners[0].socket.getsockname()[1]
        started = time.perf_counter()

        async def one(index: int) -> None:
            seed, data = work[index]
            intact[index] = await client(port, seed, data, expected[index])

        async with trio.open_nursery() as clients:
            for index in range(circuits):
                clients.start_soon(one, index)
        elapsed = time.perf_counter() - started
        stats = pool.stats()
        service.cancel_scope.cancel()
    return summary("trio", intact, circuits * cells, elapsed, stats)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point. Main thread (it runs trio)."""
    args = parser(__doc__.splitlines()[0]).parse_args(argv)
    return report(trio.run(run, args.circuits, args.cells, args.threads), args.json)


if __name__ == "__main__":
    sys.exit(main())
