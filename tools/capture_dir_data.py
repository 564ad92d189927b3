"""Capture, once, what a real tor bridge client asks a real tor bridge, and real documents.

    unshare -n sh -c 'ip link set lo up && exec "$@"' sh \\
        .venv/bin/python -m tools.capture_dir_data tests/data/dirserv

Starts, on loopback: a tor 0.4.9 directory authority (10-second voting), one relay, a bridge
(``BridgeRelay 1``, debug log) and a bridge client (``UseBridges 1``, debug log); waits until
the client has enough directory information and has refetched the consensus twice. Writes into
the output directory:

* ``bridge_client_requests.json``: in order, each directory request the client sent over
  BEGIN_DIR to the bridge: the URL (the bridge's log: "rewritten url as"), the request size and
  purpose (the client's log: "Sent request to directory server"), the answer's status and
  compression (the client's log: "Received response"), plus the bridge's address (the
  client's ``Host`` header) and tor's version;
* the documents the authority served at the end: ``consensus-microdesc``, ``consensus`` (ns),
  ``keys-all``, ``microdescs`` (every one the microdesc consensus lists) and
  ``server-descriptor`` (the relay's).

The test suite (``tests/test_dirserv_requests.py``) replays the captured requests, rebuilt
byte for byte (their sizes must match the logged ones), against :mod:`relay.dirserver` serving
these documents. Run inside ``unshare -n``: nothing may leave loopback.

Threads: a blocking program on the main thread.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from examples.dirserv_interop import VOTING, start_tor_relay
from relay.dirdocs import b64_digest, parse_consensus
from relay.torauthority import http_get, start_authority
from relay.torpeer import _free_port

_URL = re.compile(r"rewritten url as '\"(.*)\"'")
_SENT = re.compile(r"Sent request to directory server .*\(purpose: (\d+), request size: "
                   r"(\d+), payload size: (\d+)\)")
_RECEIVED = re.compile(r"Received response on .*: (\d+) \"(.*)\" \(purpose: (\d+), "
                       r"response size: \d+, compression: (-?\d+)\)")
#: tor's compress_method_t numbers, as its log prints them.
_METHODS = {0: "identity", 1: "gzip", 2: "deflate", 3: "x-tor-lzma", 4: "x-zstd"}


def _wait(predicate, timeout: float) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)
    return True


def main(argv: list[str]) -> int:
    """Capture into ``argv[0]``. Main thread."""
    out = Path(argv[0])
    out.mkdir(parents=True, exist_ok=True)
    base = Path(tempfile.mkdtemp(prefix="relaycrypt-capture-"))
    authority = start_authority(extra_torrc=VOTING, dir_address_in_cert=False)
    peers = [authority.peer]
    try:
        auth_line = (f"DirAuthority {authority.identity.nickname} "
                     f"orport={authority.peer.orport} no-v2 v3ident={authority.v3ident} "
                     f"127.0.0.1:{authority.dirport} {authority.fingerprint}")
        peers.append(start_tor_relay(base, "capturerelay", auth_line, ""))
        bridge = start_tor_relay(base, "capturebridge", auth_line,
                                 "BridgeRelay 1\nPublishServerDescriptor 0\nLog debug file "
                                 f"{base}/capturebridge/debug.log\n")
        peers.append(bridge)
        fingerprint = base / "capturebridge" / "data" / "fingerprint"
        if not _wait(fingerprint.exists, 30):
            raise RuntimeError("the bridge made no fingerprint")
        bridge_fp = fingerprint.read_text().split()[1]
        if not _wait(lambda: http_get(authority.dirport, "/tor/status-vote/current/"
                                      "consensus-microdesc")[0] == 200, 60):
            raise RuntimeError("no consensus")
        time.sleep(12)  # the bridge fetches the consensus as a cache does
        client_home = base / "captureclient"
        (client_home / "data").mkdir(parents=True, mode=0o700)
        socks = _free_port("127.0.0.1")
        (client_home / "torrc").write_text(
            f"DataDirectory {client_home}/data\nLog notice file {client_home}/notice.log\n"
            f"Log debug file {client_home}/debug.log\nTestingTorNetwork 1\n{auth_line}\n"
            f"UseDefaultFallbackDirs 0\nClientUseIPv6 0\nSocksPort 127.0.0.1:{socks}\n"
            f"UseBridges 1\nBridge 127.0.0.1:{bridge.orport} {bridge_fp}\nSandbox 0\n"
            "SafeLogging 0\nShutdownWaitLength 0\n")
        client = subprocess.Popen(["tor", "-f", str(client_home / "torrc"),
                                   "--defaults-torrc", "/dev/null"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            debug = client_home / "debug.log"

            def refetched() -> bool:
                text = debug.read_text(errors="replace") if debug.exists() else ""
                return ("Bootstrapped 75%" in text
                        and text.count("Downloading consensus from") >= 3)

            if not _wait(refetched, 120):
                raise RuntimeError("the bridge client did not refetch the consensus")
        finally:
            client.terminate()
            client.wait(10)
        urls = _URL.findall((base / "capturebridge" / "debug.log").read_text(errors="replace"))
        client_log = debug.read_text(errors="replace")
        sent = _SENT.findall(client_log)
        received = _RECEIVED.findall(client_log)
        requests = [{"url": url, "purpose": int(s[0]), "request_size": int(s[1])}
                    for url, s in zip(urls, sent, strict=False)]
        for entry, r in zip(requests, received, strict=False):
            entry.update(status=int(r[0]), reason=r[1],
                         compression=_METHODS.get(int(r[3]), r[3]))
        version = subprocess.run(["tor", "--version"], capture_output=True, text=True)
        (out / "bridge_client_requests.json").write_text(json.dumps({
            "tor_version": version.stdout.splitlines()[0],
            "bridge_address": f"127.0.0.1:{bridge.orport}",
            "requests": requests}, indent=1) + "\n")
        _save_documents(authority.dirport, peers[1], out)
    finally:
        for peer in reversed(peers):
            peer.stop()
        shutil.rmtree(base, ignore_errors=True)
    return 0


def _save_documents(dirport: int, relay, out: Path) -> None:  # type: ignore[no-untyped-def]
    """The authority's current documents, consistent with one another. Main thread."""
    _, _, micro = http_get(dirport, "/tor/status-vote/current/consensus-microdesc")
    _, _, ns = http_get(dirport, "/tor/status-vote/current/consensus")
    _, _, keys = http_get(dirport, "/tor/keys/all")
    digests = parse_consensus(micro).microdesc_digests
    _, _, microdescs = http_get(dirport, "/tor/micro/d/" + "-".join(
        b64_digest(d) for d in digests))
    # The descriptor the ns consensus lists (a relay may have published a newer one since).
    fingerprint = bytes.fromhex((relay.directory / "data" / "fingerprint").read_text().split()[1])
    identity = base64.b64encode(fingerprint).rstrip(b"=")
    line = next(x for x in ns.split(b"\n") if x.startswith(b"r ") and x.split()[2] == identity)
    digest = base64.b64decode(line.split()[3] + b"=").hex().upper()
    _, _, descriptor = http_get(dirport, f"/tor/server/d/{digest}")
    for name, data in (("consensus-microdesc", micro), ("consensus", ns), ("keys-all", keys),
                       ("microdescs", microdescs), ("server-descriptor", descriptor)):
        (out / name).write_bytes(data)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
