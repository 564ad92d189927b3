"""examples.embedding: relaycrypt's core inside an application that drives its own pyuv loop."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("pure", ["0", "1"])
def test_embedding_example_crypts_every_cell_like_the_reference(pure: str) -> None:
    env = dict(os.environ, RELAYCRYPT_PURE=pure)
    proc = subprocess.run(
        [sys.executable, "-m", "examples.embedding", "--circuits", "12", "--cells", "300",
         "--json"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["backend"] == ("reference" if pure == "1" else "kernel")
    assert result["ok"] is True
    assert result["circuits_intact"] == 12
    assert result["cells"] == 12 * 300
    # The application's own timer kept running while the workers crypted.
    assert result["app_timer_ticks"] >= 2
    assert 0 < result["wakeups_per_cell"] <= 1


def test_embedding_detects_a_wrong_byte() -> None:
    """The example's check can fail: a circuit whose output is damaged is reported."""
    from examples.embedding import EmbeddingDemo

    demo = EmbeddingDemo(circuits=3, cells=40, threads=2)
    result = demo.run()
    assert result["ok"] is True
    damaged = bytearray(demo.outputs[1][0])
    damaged[100] ^= 1
    demo.outputs[1][0] = bytes(damaged)
    assert [demo.check(i) for i in range(3)] == [True, False, True]
