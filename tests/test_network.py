"""End to end: ``python -m examples.network`` as a user runs it, on a small network.

Real processes (the demo, its echo service and relays), real sockets on loopback. The checks are
on bytes and counts from the demo's ``--json`` output and on the processes it leaves behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_demo(*args: str, timeout: float = 120.0) -> tuple[int, dict, str]:
    proc = subprocess.run(
        [sys.executable, "-m", "examples.network", "--json", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout,
    )
    try:
        summary = json.loads(proc.stdout)
    except json.JSONDecodeError:
        raise AssertionError(f"no JSON on stdout:\n{proc.stdout}\n{proc.stderr}") from None
    return proc.returncode, summary, proc.stderr


def assert_gone(pids: dict[str, int]) -> None:
    deadline = time.monotonic() + 10
    for name, pid in pids.items():
        while True:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            assert time.monotonic() < deadline, f"{name} (pid {pid}) still running"
            time.sleep(0.05)


def test_network_echoes_every_byte_through_three_hop_circuits() -> None:
    code, summary, stderr = run_demo("--relays", "4", "--circuits", "6",
                                     "--total-bytes", "3MiB")
    assert code == 0, stderr
    per_circuit = (3 << 20) // 6
    assert summary["ok"] is True
    assert summary["relays"] == 4 and summary["circuits"] == 6 and summary["hops"] == 3
    assert summary["bytes_sent"] == 6 * per_circuit
    assert summary["bytes_echoed_intact"] == 6 * per_circuit
    assert summary["circuits_ok"] == 6 and summary["failures"] == []
    assert summary["mbytes_per_s"] > 0
    assert summary["rtt_samples"] == 6 * 5  # five single-cell probes per circuit
    assert summary["rtt_p99_ms"] >= summary["rtt_p50_ms"] > 0
    assert summary["rtt_load_samples"] > 0
    assert summary["rtt_load_p99_ms"] >= summary["rtt_load_p50_ms"] > 0
    # Every relay crypted cells on the pool (each is a guard, a middle and an exit of some
    # circuit: 6 circuits over 4 relays), with batches and few wake-ups.
    cells_each_way = -(-per_circuit // 498) * 6
    assert set(summary["per_relay"]) == {"relay0", "relay1", "relay2", "relay3"}
    for stats in summary["per_relay"].values():
        assert stats["cells_crypted"] > 0
        assert stats["backend"] == "kernel"
        assert stats["batch_mean"] > 1.0
        assert stats["wakeups_per_cell"] < 1.0
    # Each data cell is crypted once per hop in each direction (3 hops, there and back).
    assert summary["cells_crypted"] >= 2 * 3 * cells_each_way
    assert_gone(summary["pids"])


def test_network_pure_backend_also_verifies() -> None:
    code, summary, stderr = run_demo("--circuits", "3", "--total-bytes", "300k", "--pure")
    assert code == 0, stderr
    assert summary["bytes_echoed_intact"] == 3 * (300 * 1024 // 3)
    assert {s["backend"] for s in summary["per_relay"].values()} == {"reference"}
    assert_gone(summary["pids"])


def test_ctrl_c_stops_every_process_and_reports_failure() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "examples.network", "--json", "--pure", "--circuits", "4",
         "--total-bytes", "64MiB"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stderr is not None
        for line in proc.stderr:  # wait until the network is up and the transfer started
            if line.startswith("network up"):
                break
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 1, err
    summary = json.loads(out)
    assert summary["ok"] is False
    assert summary["circuits_failed"] == 4
    assert all("interrupted" in f["reason"] for f in summary["failures"])
    assert summary["bytes_echoed_intact"] < 64 << 20
    assert len(summary["pids"]) == 4  # the echo service and three relays
    assert_gone(summary["pids"])


def test_client_program_against_a_running_network() -> None:
    from examples.network import LocalNetwork

    with LocalNetwork(3) as net:
        host, port = net.echo_address
        base = [sys.executable, "-m", "examples.client", "--directory",
                str(net.directory_path), "--json"]
        good = subprocess.run([*base, "--target", f"{host}:{port}", "--circuits", "3",
                               "--bytes", "200k"], cwd=ROOT, capture_output=True, text=True,
                              timeout=60)
        assert good.returncode == 0, good.stderr
        summary = json.loads(good.stdout)
        assert summary["bytes_echoed_intact"] == 3 * 200 * 1024 and summary["ok"]
        # A target nobody listens on: every stream ends with CONNECTREFUSED (3), exit 1.
        refused = subprocess.run([*base, "--target", f"{host}:1", "--circuits", "2",
                                  "--bytes", "1k"], cwd=ROOT, capture_output=True, text=True,
                                 timeout=60)
        assert refused.returncode == 1, refused.stderr
        summary = json.loads(refused.stdout)
        assert summary["bytes_echoed_intact"] == 0 and summary["circuits_failed"] == 2
        assert all("END from the exit (reason 3)" in f["reason"] for f in summary["failures"])
        # The relays survived both and still serve.
        assert all(child.alive for child in net.children())


def test_compare_pure_runs_both_backends_and_reports_relay_cpu() -> None:
    """What make demo runs: the network with the kernel, then again with the reference."""
    code, summary, stderr = run_demo("--circuits", "3", "--total-bytes", "600k",
                                     "--compare-pure")
    assert code == 0, stderr
    assert summary["ok"] is True
    assert {s["backend"] for s in summary["per_relay"].values()} == {"kernel"}
    comparison = summary["compare_pure"]
    assert comparison["reference_ok"] is True
    assert comparison["kernel_cpu_us_per_cell"] > 0
    assert comparison["reference_cpu_us_per_cell"] > 0
    assert comparison["cpu_ratio"] == (
        comparison["reference_cpu_us_per_cell"] / comparison["kernel_cpu_us_per_cell"])
    assert "relays on the pure-Python crypto" in stderr  # the second network really ran
    assert_gone(summary["pids"])


def test_compare_plain_runs_tls_then_plain_links_and_reports_both() -> None:
    """What make demo also runs: the same network over plain links, throughput side by side."""
    code, summary, stderr = run_demo("--circuits", "2", "--total-bytes", "400k",
                                     "--compare-plain")
    assert code == 0, stderr
    assert summary["ok"] is True and summary["bytes_echoed_intact"] == 400 * 1024
    comparison = summary["compare_plain"]
    assert comparison["plain_ok"] is True
    assert comparison["tls_mbytes_per_s"] == summary["mbytes_per_s"]
    assert comparison["plain_mbytes_per_s"] > 0
    assert comparison["throughput_ratio"] == (
        comparison["tls_mbytes_per_s"] / comparison["plain_mbytes_per_s"])
    # process CPU comes in 10 ms ticks: a run this small may show none
    assert comparison["tls_cpu_us_per_cell"] >= 0 and comparison["plain_cpu_us_per_cell"] >= 0
    assert_gone(summary["pids"])
