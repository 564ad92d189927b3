"""The relay's grouped crypto path: ``relay.orcircuit`` on the pool's ``crypt_group`` calls.

What is checked:

* byte for byte, the node's group function (``relay.orcircuit.new_relay_group``, directions
  FORWARD / BACKWARD / ORIGINATE) returns what ``crypt_batch`` returns -- on the kernel state and
  on the pure-Python reference -- for random keys, random sequences of batches in every
  direction, several circuits per call, pieces split anywhere, damaged and plausible cells;
* which circuits are grouped: kernel crypto gets the node's shared group function, the
  reference backend (``RELAYCRYPT_PURE=1``) none;
* end to end, the demo's relays crypt through group calls (``groups`` > 0) and every byte comes
  back intact; with ``--pure`` no relay groups.

No timing assertions.
"""

from __future__ import annotations

import itertools
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from relay.orcircuit import (
    BACKWARD,
    FORWARD,
    ORIGINATE,
    crypt_batch,
    new_relay_group,
    relay_group_for,
)
from tor1 import CELL_PAYLOAD_LEN
from tor1.backend import ReferenceRelayCrypto, kernel_available
from tor1.reference import HopKeys

pytestmark = pytest.mark.skipif(not kernel_available(), reason="the C kernel is not built")

ROOT = Path(__file__).resolve().parent.parent


def _cell(rng: random.Random) -> bytes:
    """A random payload, or one with recognized=0 and digest=0 (a plausible relay cell)."""
    if rng.random() < 0.5:
        return rng.randbytes(CELL_PAYLOAD_LEN)
    body = rng.randbytes(CELL_PAYLOAD_LEN)
    return body[:1] + b"\0\0" + body[3:5] + b"\0\0\0\0" + body[9:]


def _pieces(rng: random.Random, joined: bytes) -> list[bytes]:
    """``joined`` cut at random points (the pool hands the kernel pieces, not one buffer)."""
    cuts = sorted(rng.sample(range(1, len(joined)), k=min(3, len(joined) - 1)))
    bounds = [0, *cuts, len(joined)]
    return [joined[a:b] for a, b in itertools.pairwise(bounds)]


@pytest.mark.parametrize("seed", range(12))
def test_group_gives_crypt_batch_bytes_for_every_direction(seed: int) -> None:
    from tor1.fast import FastRelayCrypto

    rng = random.Random(seed)
    circuits = rng.randint(1, 5)
    material = [rng.randbytes(72) for _ in range(circuits)]
    grouped = [FastRelayCrypto(HopKeys.from_material(m)) for m in material]
    single = [FastRelayCrypto(HopKeys.from_material(m)) for m in material]
    reference = [ReferenceRelayCrypto(HopKeys.from_material(m)) for m in material]
    group = new_relay_group()
    assert group is not None
    for _ in range(8):
        jobs = []
        expected = []
        for index in sorted(rng.choices(range(circuits), k=rng.randint(1, 2 * circuits))):
            direction = rng.choice((FORWARD, BACKWARD, ORIGINATE))
            joined = b"".join(_cell(rng) for _ in range(rng.randint(1, 40)))
            jobs.append((grouped[index], direction, _pieces(rng, joined)))
            result = crypt_batch(single[index], direction, joined)
            assert crypt_batch(reference[index], direction, joined) == result
            expected.append(result)
        assert group(jobs) == expected


def test_kernel_circuits_share_the_node_group_and_reference_circuits_get_none() -> None:
    from tor1.fast import FastRelayCrypto

    keys = HopKeys.from_material(bytes(range(72)))
    shared = new_relay_group()
    assert relay_group_for(FastRelayCrypto(keys), shared) is shared
    assert relay_group_for(ReferenceRelayCrypto(keys), shared) is None
    assert relay_group_for(FastRelayCrypto(keys), None) is None


def _demo(*args: str) -> dict:
    proc = subprocess.run([sys.executable, "-m", "examples.network", "--json", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_demo_relays_crypt_through_group_calls() -> None:
    summary = _demo("--circuits", "8", "--total-bytes", "2MiB")
    assert summary["ok"] is True
    assert summary["bytes_echoed_intact"] == summary["bytes_sent"] == 2 << 20
    for stats in summary["per_relay"].values():
        assert stats["backend"] == "kernel"
        assert stats["groups"] > 0
        assert stats["batches_per_group"] >= 1.0
    assert summary["batches_per_group"] >= 1.0


def test_demo_pure_relays_do_not_group() -> None:
    # plain links: over TLS the links' record crypto is grouped on the pool whatever the
    # relay crypto backend
    summary = _demo("--circuits", "2", "--total-bytes", "100k", "--pure", "--plain-links")
    assert summary["ok"] is True
    for stats in summary["per_relay"].values():
        assert stats["backend"] == "reference"
        assert stats["groups"] == 0
    assert summary["batches_per_group"] == 0.0
