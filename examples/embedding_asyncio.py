"""An asyncio TCP service that offloads relay crypto to the worker pool.

``python -m examples.embedding_asyncio [--uvloop] [--circuits N] [--cells M] [--json]`` starts
the service of :mod:`examples.crypt_service` on a free loopback port inside
``workers.on_asyncio.open_pool`` and runs N clients against it on the same loop; each client's
bytes come back crypted and are compared with the pure-Python reference. Exit status 1 if any
byte differs.

Per connection: ``pool.open_circuit(state)`` gives the circuit and its results; a reader task
submits every whole cell it reads (``results.submit``) and a writer task writes each batch back
as ``async for`` yields it, in order. Everything runs on the loop's thread except the pool's
workers; ``--uvloop`` runs the same code on uvloop.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Sequence

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
from workers.on_asyncio import AsyncioPool, open_pool


async def serve_connection(
    pool: AsyncioPool, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """One client: its circuit's cells through the pool and back, in order. Loop thread."""
    try:
        seed = await reader.readexactly(SEED_LEN)
    except asyncio.IncompleteReadError:
        writer.close()
        return
    results = pool.open_circuit(new_circuit_state(seed))
    counts = {"submitted": 0, "written": 0, "eof": False}
    window = asyncio.Event()
    window.set()

    async def write_back() -> None:
        async for _lane, (out, _recognized) in results:
            writer.write(out)
            counts["written"] += len(out) // CELL
            if counts["submitted"] - counts["written"] < WINDOW_CELLS:
                window.set()
            await writer.drain()
            if counts["eof"] and counts["written"] == counts["submitted"]:
                results.close()  # ends the iteration

    writing = asyncio.create_task(write_back())
    rest = b""
    try:
        while True:
            await window.wait()
            data = await reader.read(READ_SIZE)
            if not data:
                break
            data = rest + data
            whole = len(data) - len(data) % CELL
            rest = data[whole:]
            if whole:
                results.submit(0, data[:whole])
                counts["submitted"] += whole // CELL
                if counts["submitted"] - counts["written"] >= WINDOW_CELLS:
                    window.clear()
        counts["eof"] = True
        if counts["written"] == counts["submitted"]:
            results.close()
        await writing
    finally:
        writing.cancel()
        results.close()
        writer.close()


async def client(port: int, seed: bytes, data: bytes, expected: bytes) -> bool:
    """Send one circuit's cells, read everything back, compare with the reference's bytes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)

    async def send() -> None:
        writer.write(seed)
        for offset in range(0, len(data), CLIENT_CHUNK):
            writer.write(data[offset:offset + CLIENT_CHUNK])
            await writer.drain()
        writer.write_eof()

    sending = asyncio.create_task(send())
    got = await reader.read()  # until the service closes
    await sending
    writer.close()
    await writer.wait_closed()
    return got == expected


async def run(circuits: int, cells: int, threads: int, loop_name: str) -> dict:
    """Start the service, run the clients, close everything. Loop thread."""
    work = [(seed_for(i), cells_for(i, cells)) for i in range(circuits)]
    expected = [reference_output(seed, data) for seed, data in work]  # before the clock runs
    async with open_pool(**pool_options(threads)) as pool:
        server = await asyncio.start_server(
            lambda r, w: serve_connection(pool, r, w), "127.0.0.1", 0
        )
        port = server.sockets[0].getsockname()[1]
        started = time.perf_counter()
        async with server:
            intact = await asyncio.gather(*(client(port, seed, data, want)
                                            for (seed, data), want in zip(work, expected,
                                                                          strict=True)))
        elapsed = time.perf_counter() - started
        stats = pool.stats()
    return summary(loop_name, intact, circuits * cells, elapsed, stats)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point. Main thread (it runs the loop)."""
    arguments = parser(__doc__.splitlines()[0])
    arguments.add_argument("--uvloop", action="store_true", help="run on uvloop")
    args = arguments.parse_args(argv)
    coroutine = run(args.circuits, args.cells, args.threads,
                    "uvloop" if args.uvloop else "asyncio")
    if args.uvloop:
        import uvloop

        result = uvloop.run(coroutine)
    else:
        result = asyncio.run(coroutine)
    return report(result, args.json)


if __name__ == "__main__":
    sys.exit(main())
