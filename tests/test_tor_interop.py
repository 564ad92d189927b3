"""A real tor relay accepts our link, CREATE_FAST and ntor circuits, relay crypto and our
authenticated (v1) SENDMEs, and sends us v1 SENDMEs our client checks.

The test runs ``python -m examples.tor_interop --start-tor --json`` as a subprocess: the example
starts a private tor (``relay.torpeer``) on a free loopback port, talks to it through the
reactor, the TLS link and the worker pool, checks every step, stops tor by its pid, and prints
tor's log on stderr if anything failed (attached to the assertion message here).

When ``unshare -n`` works (root, or user namespaces) the subprocess runs in a fresh network
namespace whose only interface is loopback, with tor and the client inside it together: then
nothing can leave the machine whatever tor's configuration says.

Skipped only when tor is not installed and the ``CI`` environment variable is unset; in CI a
missing tor is a failure (``tools/install_tor.sh`` installs it).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from relay.torpeer import find_tor

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.timeout(180)


def _namespace_prefix() -> list[str]:
    """``unshare -n sh -c 'ip link set lo up; exec "$@"' sh`` when that works here, else []."""
    unshare, ip = shutil.which("unshare"), shutil.which("ip")
    if unshare is None or ip is None:
        return []
    script = f'{ip} link set lo up && exec "$@"'
    prefix = [unshare, "-n", "sh", "-c", script, "sh"]
    try:
        probe = subprocess.run([*prefix, "true"], capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return prefix if probe.returncode == 0 else []


@pytest.fixture(scope="module")
def tor_available() -> str:
    tor = find_tor()
    if tor is None:
        if os.environ.get("CI"):
            pytest.fail("tor is not installed, and CI must run this test: run "
                        "tools/install_tor.sh (as root) before the suite")
        pytest.skip("tor is not installed (tools/install_tor.sh installs it); "
                    "set CI=1 to make this a failure")
    return tor


def test_example_talks_to_a_real_tor(tor_available: str) -> None:
    prefix = _namespace_prefix()
    command = [*prefix, sys.executable, "-m", "examples.tor_interop", "--start-tor", "--json",
               "--timeout", "90"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=150)
    context = (f"\ncommand: {command}\nexit status: {result.returncode}\n"
               f"--- stdout ---\n{result.stdout}\n--- stderr (tor's log on failure) ---\n"
               f"{result.stderr}")
    assert result.returncode == 0, "tor interop failed" + context
    report = json.loads(result.stdout)

    assert report["ok"] is True, context
    assert report["error"] is None, context
    assert report["link_protocol"] == 5, context
    assert report["tls_version"] in ("TLSv1.2", "TLSv1.3"), context
    fingerprint = report["fingerprint"]
    assert len(fingerprint) == 40 and int(fingerprint, 16) >= 0, context
    assert report["fingerprint_matches_descriptor"] is True, context
    assert report["cert_bindings"] == ["rsa-link", "ed25519-link"], context
    assert report["ed25519_identity_matches"] is True, context
    assert report["create_fast"] is True and report["ntor"] is True, context
    assert report["descriptor_bytes"] > 500, context
    assert report["ntor_descriptor_bytes"] == report["descriptor_bytes"], context
    # BEGIN_DIR + DATA on each circuit at least; every relay cell went through the pool.
    assert report["relay_cells_sent"] >= 4, context
    assert report["relay_cells_received"] >= 4, context
    assert report["pool_cells"] == report["relay_cells_sent"] + report["relay_cells_received"], (
        context)
    # Flow control v1 with tor (step 6): more than a window from tor, so tor accepted our v1
    # SENDMEs (one per 100 of its DATA cells); tor's own, one per 100 of our request cells,
    # were version 1 and their tags checked out.
    flow = report["flow_control_v1"]
    assert flow["dir_fetches"] == 300, context
    assert flow["data_cells_from_tor"] > 1000, context
    assert flow["sendmes_to_tor"] == flow["data_cells_from_tor"] // 100, context
    assert flow["data_cells_to_tor"] == 300, context
    assert flow["sendmes_from_tor_checked"] == 3, context
    # Step 7: tor checks the tags; a made-up one gets the circuit destroyed, and the warning
    # tor logs for it is the only one.
    assert report["tor_refused_forged_sendme"] is True, context
    assert report["tor_logged_forged_sendme"] is True, context
    assert report["closed_cleanly"] is True, context
    assert report["tor_warnings"] == [], context
    assert report["tor_pid"] > 0, context


def test_example_fails_loudly_without_a_relay() -> None:
    """Nothing listens on the port: the example says so and exits non-zero (no tor needed)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = subprocess.run(
        [sys.executable, "-m", "examples.tor_interop", "--orport", f"127.0.0.1:{port}",
         "--json", "--timeout", "20"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["ok"] is False
    assert "connect-failed" in report["error"] and "REFUSED" in report["error"]
    assert report["create_fast"] is False and report["ntor"] is False


def test_torpeer_reports_a_tor_that_exits(tmp_path: Path) -> None:
    """A 'tor' that exits at once: TorStartError says so and the private directory is gone."""
    from relay.torpeer import TorStartError, start_tor

    fake = tmp_path / "fake-tor"
    fake.write_text("#!/bin/sh\necho 'fake tor: refusing to start' >&2\nexit 3\n")
    fake.chmod(0o755)
    directory = tmp_path / "tor-dir"
    with pytest.raises(TorStartError, match="exited with status 3") as info:
        start_tor(tor_binary=str(fake), directory=directory, timeout=10)
    assert "fake tor: refusing to start" in info.value.log
    assert not directory.exists()
