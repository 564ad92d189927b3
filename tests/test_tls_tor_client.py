"""A real tor, as a TLS client, completes the handshake with our ``TlsServerSession``.

tests/support_tor_tls_client.py starts a private tor as a bridge client whose only bridge is
our TLS server on loopback (inside ``unshare -n`` when that works, like tests/test_tor_interop.py)
and reports what came over the link: tor's ClientHello was accepted, the handshake finished on
both sides (tor's info log says "SSL negotiation finished successfully"), and the first
plaintext is tor's VERSIONS cell offering link protocols 3, 4 and 5. Along the way it records
what tor's client sends at the TLS layer: a random SNI host name and no certificate.

Skipped only when tor is not installed and the ``CI`` environment variable is unset.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from test_tor_interop import _namespace_prefix

from relay.torpeer import find_tor

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.timeout(180)


def test_tor_client_handshakes_with_our_tls_server() -> None:
    if find_tor() is None:
        if os.environ.get("CI"):
            pytest.fail("tor is not installed, and CI must run this test")
        pytest.skip("tor is not installed (tools/install_tor.sh installs it)")
    command = [*_namespace_prefix(), sys.executable, "tests/support_tor_tls_client.py"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=150)
    context = (f"\ncommand: {command}\nexit status: {result.returncode}\n--- stdout ---\n"
               f"{result.stdout}\n--- stderr ---\n{result.stderr}")
    assert result.returncode == 0, "the probe failed" + context
    report = json.loads(result.stdout)
    assert report["error"] is None, context
    # VERSIONS: circ_id 0 (2 bytes), command 7, length 6, versions 3, 4, 5.
    assert report["first_cell"] == "0000070006000300040005", context
    assert report["tls_version"] == "TLSv1.3", context
    assert report["cipher"], context
    assert report["client_certificate"] is False, context
    assert report["own_certificate_matches"] is True, context
    assert report["exporter_bytes"] == 32, context
    # tor's client disguises itself with a random www.<letters and digits>.com SNI.
    assert re.fullmatch(r"www\.[a-z2-7]+\.com", report["server_name"] or ""), context
    assert report["tor_saw_tls_finish"] is True, context
