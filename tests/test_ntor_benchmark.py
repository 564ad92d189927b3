"""``python -m benchmarks.ntor_handshakes --quick --json`` runs and reports every figure.

Never speed (a shared machine): the run exits 0 after its byte check of the kernel against
``ntor_server``, and the JSON holds each section with positive rates.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_ntor_benchmark_quick_run() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.ntor_handshakes", "--quick", "--json"],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    single = result["single_thread_handshakes_per_s"]
    assert set(single) == {"python", "kernel_batch_1", "kernel_batch_8", "kernel_batch_64",
                           "kernel_vs_python"}
    assert all(value > 0 for value in single.values())
    for name in ("kernel", "python"):
        figures = result["two_threads"][name]
        assert figures["one_thread"] > 0 and figures["two_threads"] > 0
    assert set(result["bystander_sleep_lateness"]) == {"idle", "python_worker", "kernel_worker"}
    assert all(v["samples"] > 0 for v in result["bystander_sleep_lateness"].values())
    assert result["create_fast_per_s"]["kernel"] > 0
