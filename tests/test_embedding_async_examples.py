"""examples.embedding_asyncio and examples.embedding_trio: TCP services on loopback that offload
relay crypto to the pool, every byte compared with the tor1 reference."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from examples import embedding_asyncio, embedding_trio
from examples.crypt_service import cells_for, pool_options, reference_output, seed_for

ROOT = Path(__file__).resolve().parent.parent
CASES = [("examples.embedding_asyncio", []), ("examples.embedding_asyncio", ["--uvloop"]),
         ("examples.embedding_trio", [])]


@pytest.mark.parametrize(("module", "extra"), CASES)
@pytest.mark.parametrize("pure", ["0", "1"])
def test_service_returns_the_reference_bytes(module: str, extra: list[str], pure: str) -> None:
    env = dict(os.environ, RELAYCRYPT_PURE=pure)
    proc = subprocess.run(
        [sys.executable, "-m", module, "--circuits", "6", "--cells", "300", "--json", *extra],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["loop"] == ("uvloop" if extra else module.rsplit("_", 1)[1])
    assert result["backend"] == ("reference" if pure == "1" else "kernel")
    assert result["ok"] is True
    assert result["circuits_intact"] == 6
    assert result["cells"] == result["pool_delivered"] == 6 * 300
    assert 0 < result["wakeups_per_cell"] <= 1


def wrong_by_one_byte(index: int, cells: int) -> tuple[bytes, bytes, bytes]:
    seed, data = seed_for(index), cells_for(index, cells)
    damaged = bytearray(reference_output(seed, data))
    damaged[1000] ^= 1
    return seed, data, bytes(damaged)


def test_the_asyncio_client_detects_a_wrong_byte() -> None:
    async def main() -> list[bool]:
        async with embedding_asyncio.open_pool(**pool_options(2)) as pool:
            server = await asyncio.start_server(
                lambda r, w: embedding_asyncio.serve_connection(pool, r, w), "127.0.0.1", 0)
            port = server.sockets[0].getsockname()[1]
            async with server:
                seed, data, damaged = wrong_by_one_byte(0, 40)
                good = await embedding_asyncio.client(port, seed, data,
                                                      reference_output(seed, data))
                bad = await embedding_asyncio.client(port, seed, data, damaged)
        return [good, bad]

    assert asyncio.run(main()) == [True, False]


def test_the_trio_client_detects_a_wrong_byte() -> None:
    import functools

    async def main() -> list[bool]:
        async with embedding_trio.open_pool(**pool_options(2)) as pool, \
                trio.open_nursery() as service:
            listeners = await service.start(
                functools.partial(trio.serve_tcp, host="127.0.0.1"),
                lambda stream: embedding_trio.serve_connection(pool, stream), 0)
            port = listeners[0].socket.getsockname()[1]
            seed, data, damaged = wrong_by_one_byte(1, 40)
            good = await embedding_trio.client(port, seed, data, reference_output(seed, data))
            bad = await embedding_trio.client(port, seed, data, damaged)
            service.cancel_scope.cancel()
        return [good, bad]

    assert trio.run(main) == [True, False]
