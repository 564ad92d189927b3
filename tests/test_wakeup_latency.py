"""examples.wakeup_latency runs as a program: JSON shape, sane values, a plot. No timing limits.

Every loop kind is measured (uvloop and trio are in the test extra): the reply queue on pyuv,
asyncio, uvloop and trio beside each loop's own per-item wake-up.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
OURS = {"replyqueue", "replyqueue_asyncio", "replyqueue_uvloop", "replyqueue_trio",
        "replyqueue_asyncio_threadsafe", "replyqueue_uvloop_threadsafe"}
PER_ITEM = {"raw_async", "socketpair", "asyncio", "uvloop", "trio"}
MECHANISMS = OURS | PER_ITEM


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    plot_path = tmp_path_factory.mktemp("plot") / "latency.png"
    completed = subprocess.run(
        [sys.executable, "-m", "examples.wakeup_latency", "--quick", "--json",
         "--plot", str(plot_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=240, check=False,
    )
    assert completed.returncode == 0, completed.stderr
    return json.loads(completed.stdout), plot_path


def test_json_has_exactly_the_documented_keys(quick_run: tuple[dict, Path]) -> None:
    results, _ = quick_run
    assert set(results) == MECHANISMS
    for name in MECHANISMS:
        assert set(results[name]) == {"isolated", "burst"}
        assert set(results[name]["isolated"]) == {"p50_us", "p90_us", "p99_us", "max_us", "n"}
        assert set(results[name]["burst"]) == {"items_per_s", "wakeups_per_item"}


def test_values_are_sane(quick_run: tuple[dict, Path]) -> None:
    results, _ = quick_run
    for name in MECHANISMS:
        isolated = results[name]["isolated"]
        assert isolated["n"] == 2000
        assert 0 < isolated["p50_us"] <= isolated["p90_us"] <= isolated["p99_us"]
        assert isolated["p99_us"] <= isolated["max_us"]
        assert results[name]["burst"]["items_per_s"] > 0
    # Counts, not timings, each counted where the signal is issued (Async.send calls, bytes
    # written to the socketpair, call_soon_threadsafe / run_sync_soon calls, the reply queue's
    # own counter): the per-item mechanisms signal once per item, ours only on empty ->
    # non-empty transitions, so it must coalesce at least some of a burst, on every loop kind.
    for name in PER_ITEM:
        assert results[name]["burst"]["wakeups_per_item"] == 1.0, name
    for name in OURS:
        assert 0 < results[name]["burst"]["wakeups_per_item"] < 1.0


def test_plot_is_a_png(quick_run: tuple[dict, Path]) -> None:
    _, plot_path = quick_run
    assert plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_table_output_names_every_mechanism_and_the_targets() -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "examples.wakeup_latency", "-n", "300", "--rounds", "1",
         "--burst", "3000", "--repeats", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=240, check=False,
    )
    assert completed.returncode == 0, completed.stderr
    for name in MECHANISMS:
        assert f"\n{name} " in completed.stdout
    assert completed.stdout.count("raw_async:") == 2  # two of the target lines
    assert "replyqueue_asyncio isolated p50 <= 1.1x asyncio" in completed.stdout
    for name in ("replyqueue", "replyqueue_asyncio", "replyqueue_uvloop", "replyqueue_trio"):
        assert f"{name} wake-ups per item <= 0.01" in completed.stdout
    assert "replyqueue_trio / trio: isolated p50" in completed.stdout
