"""relay.identity against Debian's tor 0.4.9: tor reads our key files, we read tor's, and a real
directory authority accepts our server descriptor.

* ``tor --list-fingerprint`` on a data directory written by :class:`RelayIdentity` reports our
  RSA and Ed25519 fingerprints and leaves every key file as it was (tor replaces files it
  cannot use); ``tor --key-expiration sign`` reads our signing certificate's expiry.
* :class:`RelayIdentity` loads a data directory tor created, agrees on both fingerprints and
  rewrites none of tor's files.
* ``examples.publish_descriptor --start-authority`` (inside ``unshare -n`` when it works, as
  tests/test_tor_interop.py does) starts a private authority that runs on keys written here,
  re-makes every signature of the authority's own descriptor byte for byte, uploads our
  descriptor, sees it served back and a tampered one refused (see that module).

Skipped only when tor is not installed and the ``CI`` environment variable is unset.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from relay.identity.descparse import parse_server_descriptor
from relay.identity.descriptor import RouterInfo
from relay.identity.keys import RelayIdentity
from relay.torpeer import find_tor

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def tor() -> str:
    found = find_tor()
    if found is None or shutil.which("tor-gencert") is None:
        if os.environ.get("CI"):
            pytest.fail("tor is not installed, and CI must run this test: run "
                        "tools/install_tor.sh (as root) before the suite")
        pytest.skip("tor is not installed (tools/install_tor.sh installs it)")
    return found


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


def _torrc(datadir: Path, nickname: str) -> Path:
    torrc = datadir / "torrc"
    torrc.write_text(f"DataDirectory {datadir}\nNickname {nickname}\nORPort 127.0.0.1:9\n"
                     "SocksPort 0\nLog notice stdout\n")
    return torrc


def _tor_fingerprints(tor: str, torrc: Path) -> tuple[str, str]:
    """(RSA fingerprint, Ed25519 identity in base64) as tor reports them for a data dir."""
    result = subprocess.run([tor, "-f", str(torrc), "--list-fingerprint"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    rsa = re.search(r"identity key fingerprint is '\S+ ([0-9A-F]{40})'", result.stdout)
    ed = re.search(r"ed25519 fingerprint is '\S+ ([A-Za-z0-9+/]{43})'", result.stdout)
    assert rsa and ed, result.stdout
    return rsa.group(1), ed.group(1)


def _file_digests(keys: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in keys.iterdir()}


def test_tor_reads_our_key_files(tor: str, tmp_path: Path) -> None:
    datadir = tmp_path / "ours"
    identity = RelayIdentity.load_or_create(datadir, "OurKeys")
    before = _file_digests(datadir / "keys")
    fingerprint, ed = _tor_fingerprints(tor, _torrc(datadir, "OurKeys"))
    assert fingerprint == identity.fingerprint
    assert ed == base64.b64encode(identity.ed25519_identity).decode().rstrip("=")
    assert _file_digests(datadir / "keys") == before  # tor kept every file we wrote
    expiry = subprocess.run([tor, "-f", str(datadir / "torrc"), "--quiet", "--key-expiration",
                             "sign", "--format", "timestamp"],
                            capture_output=True, text=True, timeout=60)
    assert f"signing-cert-expiry: {identity.signing_cert.expires_at}" in expiry.stderr, (
        expiry.stdout + expiry.stderr)


def test_we_read_tors_key_files(tor: str, tmp_path: Path) -> None:
    datadir = tmp_path / "tors"
    datadir.mkdir(mode=0o700)
    fingerprint, ed = _tor_fingerprints(tor, _torrc(datadir, "TorKeys"))
    keys = datadir / "keys"
    assert (keys / "ed25519_signing_cert").exists() and (keys / "secret_onion_key_ntor").exists()
    before = _file_digests(keys)
    identity = RelayIdentity.load_or_create(datadir, "TorKeys")
    assert identity.fingerprint == fingerprint
    assert base64.b64encode(identity.ed25519_identity).decode().rstrip("=") == ed
    assert _file_digests(keys) == before  # nothing of tor's was replaced
    identity.check_consistency(time.time())
    descriptor = identity.server_descriptor(RouterInfo("TorKeys", "127.0.0.1", 9), time.time())
    assert parse_server_descriptor(descriptor, now=time.time()).fingerprint == fingerprint


def test_a_tor_authority_accepts_our_descriptor(tor: str) -> None:
    command = [*_namespace_prefix(), sys.executable, "-m", "examples.publish_descriptor",
               "--start-authority", "--json"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=150)
    context = (f"\ncommand: {command}\nexit status: {result.returncode}\n--- stdout ---\n"
               f"{result.stdout}\n--- stderr (the authority's log on failure) ---\n"
               f"{result.stderr}")
    assert result.returncode == 0, "publishing failed" + context
    report = json.loads(result.stdout)
    assert report["ok"] is True and report["error"] is None, context
    assert report["authority_uses_our_keys"] is True, context
    assert report["authority_platform"].startswith("Tor 0.4."), context
    assert report["same_signatures_as_tor"] == {
        "identity-ed25519": True, "onion-key-crosscert": True,
        "ntor-onion-key-crosscert": True, "router-sig-ed25519": True,
        "router-signature": True}, context
    assert report["upload_status"] == 200 and report["upload_not_new"] is False, context
    assert report["served_back_identical"] is True, context
    assert report["authority_log"] and "Descriptor accepted" in report["authority_log"][0], context
    assert report["tampered_refused"] is True, context
    assert report["tampered_log"] == ["Incorrect ed25519 signature(s)"], context


def test_a_tor_relay_accepts_our_authenticate(tor: str) -> None:
    """tests/support_tor_authenticate.py: tor keeps a link authenticated with our CERTS and
    AUTHENTICATE (CREATE_FAST answered) and drops one whose TLSSECRETS used tor-spec's
    exporter context instead of tor's (CID)."""
    pytest.importorskip("OpenSSL")
    command = [*_namespace_prefix(), sys.executable, str(ROOT / "tests" /
                                                         "support_tor_authenticate.py")]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=150)
    context = (f"\ncommand: {command}\nexit status: {result.returncode}\n--- stdout ---\n"
               f"{result.stdout}\n--- stderr (tor's log on failure) ---\n{result.stderr}")
    assert result.returncode == 0, "authenticating failed" + context
    report = json.loads(result.stdout)
    good, bad = report["cid_context"], report["ed25519_context"]
    assert good["responder_bindings"] == ["rsa-link", "ed25519-link"], context
    assert good["created_fast"] is True, context
    assert report["warnings_after_cid_context"] == [], context
    assert bad["created_fast"] is False, context
    assert len(report["warnings"]) == 1, context
    assert "bad AUTHENTICATE cell" in report["warnings"][0], context
    assert "Some field in the AUTHENTICATE cell body was not as expected" in (
        report["warnings"][0]), context


def test_a_descriptor_refused_for_its_tap_key_form_is_published_in_the_other(
        tor: str, tmp_path: Path) -> None:
    """Authorities of tor 0.4.9.11 (Debian's) require the TAP onion key in a descriptor and
    later ones refuse it (proposal 350). A relay in the default mode, started here without the
    key (as after a later authority refused it), gets this authority's refusal (400) and
    publishes with the key: accepted, after exactly one switch. With the form fixed by the
    option, it never switches."""
    from reactor import Reactor
    from relay.config import DirAuthority, RelayConfig
    from relay.publication import RelayDirectory
    from relay.torauthority import start_authority
    from tests.support_loop import run_until_met

    authority = start_authority()
    try:
        line = DirAuthority("relaycryptauth", "127.0.0.1", authority.dirport,
                            authority.fingerprint)
        identity = RelayIdentity.load_or_create(tmp_path / "relay", "tapswitch")
        with Reactor() as reactor:
            for fixed, started_with_tap in ((None, False), (False, False)):
                config = RelayConfig(nickname="tapswitch", dir_authorities=(line,),
                                     testing_network=True, publish_tap_key=fixed)
                directory = RelayDirectory(reactor, identity, config)
                directory.with_tap = started_with_tap
                directory.start(9001, ("reject *:*",))
                try:
                    if fixed is None:
                        run_until_met(reactor, lambda d=directory: d.uploads_ok > 0, 60)
                        assert directory.tap_switches == 1 and directory.with_tap
                        assert directory.uploads_failed >= 1
                        assert directory.descriptor is not None
                        assert "\nonion-key\n" in directory.descriptor
                    else:
                        run_until_met(reactor, lambda d=directory: d.uploads_failed > 0, 60)
                        assert directory.tap_switches == 0 and not directory.with_tap
                        assert directory.uploads_ok == 0
                        assert directory.descriptor is not None
                        assert "\nonion-key\n" not in directory.descriptor
                finally:
                    directory.close()
    finally:
        authority.stop()
