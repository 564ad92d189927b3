"""The directory side against real tor 0.4.9: examples.dirserv_interop, inside ``unshare -n``.

The example (see its docstring) starts a private tor authority with 10-second voting and a
tor relay; uploads descriptors made by relay.identity (accepted, not new, refused for a
byte-order mark and for a rejected fingerprint, with tor's reason phrases); publishes with
retries; runs a DirCache until it has installed two successive consensuses; then serves that
cache on a DirPort to a real tor relay whose only directory it is, and which must reach
"enough directory info" with the very consensus the cache served. This test checks the
report field by field. When ``unshare -n`` works, everything runs in a network namespace
whose only interface is loopback.

Skipped only when tor is not installed and the ``CI`` environment variable is unset.
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
BOM_REASON = "descriptor(s) or extrainfo(s) not valid UTF-8 or had BOM."

pytestmark = pytest.mark.timeout(400)


def _namespace_prefix() -> list[str]:
    """``unshare -n sh -c 'ip link set lo up; exec "$@"' sh`` when that works here, else []."""
    unshare, ip = shutil.which("unshare"), shutil.which("ip")
    if unshare is None or ip is None:
        return []
    prefix = [unshare, "-n", "sh", "-c", f'{ip} link set lo up && exec "$@"', "sh"]
    try:
        probe = subprocess.run([*prefix, "true"], capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return prefix if probe.returncode == 0 else []


@pytest.fixture(scope="module")
def report() -> dict:
    if find_tor() is None or shutil.which("tor-gencert") is None:
        if os.environ.get("CI"):
            pytest.fail("tor is not installed, and CI must run this test: run "
                        "tools/install_tor.sh (as root) before the suite")
        pytest.skip("tor is not installed (tools/install_tor.sh installs it)")
    command = [*_namespace_prefix(), sys.executable, "-m", "examples.dirserv_interop",
               "--json", "--timeout", "60"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=380)
    context = (f"\ncommand: {command}\nexit status: {result.returncode}\n--- stdout ---\n"
               f"{result.stdout}\n--- stderr (tor's logs on failure) ---\n{result.stderr}")
    assert result.returncode == 0, "dirserv interop failed" + context
    data = json.loads(result.stdout)
    data["_context"] = context
    return data


def test_the_example_holds(report: dict) -> None:
    assert report["ok"] is True and report["error"] is None, report["_context"]


def test_uploads_get_tors_answers(report: dict) -> None:
    assert report["upload"]["status"] == 200 and report["upload"]["not_new"] is False
    assert report["upload_again"]["status"] == 200 and report["upload_again"]["not_new"]
    assert (report["upload_bom"]["status"], report["upload_bom"]["reason"]) == (400, BOM_REASON)
    assert report["upload_rejected"]["status"] == 400
    assert report["upload_rejected"]["reason"].startswith(
        "Fingerprint and/or ed25519 identity is marked rejected")
    assert "connect failed: REFUSED" in report["upload_closed_port"]["error"]
    assert report["served_back"]["identical"] is True


def test_publisher_outcomes(report: dict) -> None:
    closed = [o for o in report["publisher"] if o["authority"] == "closed"]
    real = [o for o in report["publisher"] if o["authority"] == "real"]
    assert [o["next_in"] for o in closed[:3]] == [0.5, 1.0, 2.0]
    assert all(o["status"] is None and "REFUSED" in o["error"] for o in closed)
    assert real and real[0]["status"] == 200 and real[0]["next_in"] == 18 * 3600


def test_cache_installed_successive_consensuses(report: dict) -> None:
    cache = report["cache"]
    assert cache["consensus_flavors"] == ["microdesc", "ns"]
    assert cache["certificates"] == [report["authority"]["v3ident"]]
    assert cache["all_microdescs_held"] is True and cache["last_error"] is None
    after = [i["microdesc_valid_after"] for i in cache["installs"]]
    assert after == sorted(after) and len(set(after)) >= 2
    assert any(i["relays"] >= 2 and i["microdescs_held"] == i["relays"]
               for i in cache["installs"])


def test_a_real_tor_reads_the_cache(report: dict) -> None:
    fetcher = report["tor_fetcher"]
    assert fetcher["enough_dirinfo"] is True
    assert fetcher["cached_consensus_is_one_we_served"] is True
    assert fetcher["warnings"] == []
    targets = [r["target"] for r in fetcher["requests"]]
    v3ident = report["authority"]["v3ident"]
    assert targets[:2] == [f"/tor/status-vote/current/consensus-microdesc/{v3ident[:6]}.z",
                           f"/tor/keys/fp/{v3ident}"]
    assert any(t.startswith("/tor/micro/d/") and t.endswith(".z") for t in targets)
    assert all(r["status"] in (200, 304) for r in fetcher["requests"])
    first = dict(map(tuple, fetcher["requests"][0]["headers"]))
    assert first["Accept-Encoding"] == "x-tor-lzma, x-zstd, deflate, gzip, identity"
    refetch = [dict(map(tuple, r["headers"])) for r in fetcher["requests"][1:]
               if r["target"] == targets[0]]
    assert refetch and "X-Or-Diff-From-Consensus" in refetch[0]
    assert "If-Modified-Since" in refetch[0]
