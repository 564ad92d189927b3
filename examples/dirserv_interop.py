"""The directory side of a relay against real tor 0.4.9: upload, cache, serve.

    python -m examples.dirserv_interop [--json] [--timeout SECONDS]

Every step below runs on loopback with real tor processes and this project's event loop, and
is checked:

1. makes two relay identities (``relay.identity``) and starts a private tor directory
   authority (``relay.torauthority``) with 10-second voting intervals, whose
   ``approved-routers`` rejects the second identity; starts one ordinary tor relay that
   publishes itself, so the consensus lists two relays;
2. uploads the first identity's descriptor with :func:`relay.dirclient.upload_descriptor`:
   200; again: 200 with ``X-Descriptor-Not-New``; with a byte-order mark: 400 and tor's
   reason; the rejected identity's: 400 and tor's reason; to a closed port: a connect error;
   then fetches ``/tor/server/fp/FP`` back with :func:`relay.dirclient.fetch` (same bytes);
3. runs a :class:`relay.dirclient.DescriptorPublisher` for that descriptor to the authority
   and to a closed port: one 200, and failures retried with a doubling delay;
4. runs a :class:`relay.dircache.DirCache` on the authority until it has installed two
   successive consensuses of each flavor (signatures checked), the key certificate and every
   microdescriptor the consensus lists;
5. serves that cache on a DirPort (:func:`relay.dirport.serve_dirport`) and starts a real tor
   relay whose only directory is that port (tor relays may fetch over a DirPort; clients
   must tunnel): it must reach "enough directory info" from what the cache served, its
   cached microdesc consensus must be one the cache served, byte for byte, and the request
   heads it sent are reported as captured.

Exit status 0 when every check held; ``--json`` prints one JSON object (the test
``tests/test_dirserv_tor.py`` runs this inside ``unshare -n``). On failure the tor logs go to
stderr.

Threads: the main thread runs the event loop in phases and, between them, starts and stops the
tor processes (blocking).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from reactor.loop import Reactor
from relay.dircache import Authority as CacheAuthority
from relay.dircache import DirCache
from relay.dirclient import (
    REUPLOAD_INTERVAL,
    DescriptorPublisher,
    DirResult,
    fetch,
    upload_descriptor,
)
from relay.dirdocs import parse_consensus
from relay.dirhttp import Request
from relay.dirport import serve_dirport
from relay.identity.descriptor import RouterInfo
from relay.identity.keys import RelayIdentity
from relay.torauthority import Authority, start_authority
from relay.torpeer import TorPeer, TorStartError, _free_port, find_tor

VOTING = ("V3AuthVotingInterval 10\nV3AuthVoteDelay 2\nV3AuthDistDelay 2\n"
          "TestingDirAuthVoteGuard *\nTestingDirAuthVoteExit *\n")
ENOUGH_DIRINFO = "Bootstrapped 75%"
_MICRODESC_CONSENSUS = "/tor/status-vote/current/consensus-microdesc"
BOM_REASON = "descriptor(s) or extrainfo(s) not valid UTF-8 or had BOM."
REJECT_REASON = "Fingerprint and/or ed25519 identity is marked rejected"


def run_until(reactor: Reactor, done: Callable[[], bool], timeout: float) -> bool:
    """Run the loop until ``done()`` or ``timeout`` seconds. Main (loop) thread."""
    deadline = time.monotonic() + timeout

    def check() -> None:
        if done() or time.monotonic() > deadline:
            reactor.stop()
        else:
            reactor.call_later(0.05, check)

    reactor.call_soon(check)
    reactor.run()
    return done()


def start_tor_relay(base: Path, name: str, directory_line: str, extra: str) -> TorPeer:
    """A tor relay on loopback with ``directory_line`` as its only directory. Main thread."""
    tor = find_tor()
    if tor is None:
        raise TorStartError("tor is not installed")
    home = base / name
    (home / "data").mkdir(parents=True, mode=0o700)
    orport = _free_port("127.0.0.1")
    (home / "torrc").write_text(
        f"DataDirectory {home}/data\nLog notice file {home}/notice.log\n"
        f"Log info file {home}/info.log\nNickname {name}\nTestingTorNetwork 1\n"
        f"{directory_line}\nUseDefaultFallbackDirs 0\nAddress 127.0.0.1\n"
        f"ORPort 127.0.0.1:{orport} IPv4Only\nSocksPort 0\nAssumeReachable 1\nExitRelay 0\n"
        f"ExitPolicy reject *:*\nClientUseIPv6 0\nServerDNSResolvConfFile {home}/resolv.conf\n"
        f"ServerDNSDetectHijacking 0\nShutdownWaitLength 0\nSandbox 0\nSafeLogging 0\n{extra}")
    (home / "resolv.conf").write_text("nameserver 127.0.0.1\n")
    with open(home / "stderr.log", "wb") as stderr_file:
        process = subprocess.Popen([tor, "-f", str(home / "torrc"), "--defaults-torrc",
                                    "/dev/null"], stdin=subprocess.DEVNULL,
                                   stdout=subprocess.DEVNULL, stderr=stderr_file, cwd=home)
    return TorPeer(process, orport, home, keep_directory=True)


def _closed_port() -> int:
    return _free_port("127.0.0.1")


class Interop:
    """The steps of the module docstring; fills ``report``. Main (loop) thread."""

    def __init__(self, base: Path, timeout: float, report: dict[str, Any]) -> None:
        self.base = base
        self.timeout = timeout
        self.report = report
        self.reactor = Reactor()
        self.peers: list[TorPeer] = []
        self.authority: Authority | None = None

    def wait(self, done: Callable[[], bool], timeout: float | None = None) -> bool:
        return run_until(self.reactor, done, timeout or self.timeout)

    def request(self, start: Callable[[Callable[[DirResult], None]], object]) -> DirResult:
        results: list[DirResult] = []
        start(results.append)
        if not self.wait(lambda: bool(results)):
            raise TimeoutError("no result from a directory request")
        return results[0]

    def run(self) -> None:
        report = self.report
        good = RelayIdentity.load_or_create(self.base / "good", "relaycryptdir")
        bad = RelayIdentity.load_or_create(self.base / "bad", "relaycryptbad")
        self.authority = authority = start_authority(
            extra_torrc=VOTING, data_files={"approved-routers": f"!reject {bad.fingerprint}\n"},
            dir_address_in_cert=False)
        self.peers.append(authority.peer)
        report["authority"] = {"v3ident": authority.v3ident, "dirport": authority.dirport}
        auth_line = (f"DirAuthority {authority.identity.nickname} orport={authority.peer.orport}"
                     f" no-v2 v3ident={authority.v3ident} 127.0.0.1:{authority.dirport} "
                     f"{authority.fingerprint}")
        self.peers.append(start_tor_relay(self.base, "relaycryptpeer", auth_line, ""))
        self.uploads(good, bad)
        self.publisher(good)
        cache = self.cache()
        self.serve(cache, authority)

    def uploads(self, good: RelayIdentity, bad: RelayIdentity) -> None:
        assert self.authority is not None
        port = self.authority.dirport
        now = time.time()
        info = RouterInfo("relaycryptdir", "127.0.0.1", _closed_port(), contact="relaycrypt")
        self.descriptor = descriptor = good.server_descriptor(info, now)
        rejected = bad.server_descriptor(
            RouterInfo("relaycryptbad", "127.0.0.1", _closed_port()), now)

        def upload(text: str, to: int = port) -> DirResult:
            return self.request(lambda done: upload_descriptor(
                self.reactor, "127.0.0.1", to, text, done, reason="relaycrypt interop test"))

        def summary(result: DirResult) -> dict[str, Any]:
            return {"status": result.status, "reason": result.reason,
                    "not_new": result.not_new, "error": result.error}

        self.report["upload"] = summary(upload(descriptor))
        self.report["upload_again"] = summary(upload(descriptor))
        self.report["upload_bom"] = summary(upload("\ufeff" + descriptor))
        self.report["upload_rejected"] = summary(upload(rejected))
        self.report["upload_closed_port"] = summary(upload(descriptor, _closed_port()))
        back = self.request(lambda done: fetch(self.reactor, "127.0.0.1", port,
                                               f"/tor/server/fp/{good.fingerprint}", done))
        self.report["served_back"] = {"status": back.status, "encoding": back.encoding,
                                      "identical": back.body == descriptor.encode("ascii")}

    def publisher(self, good: RelayIdentity) -> None:
        assert self.authority is not None
        closed = _closed_port()
        outcomes: list[dict[str, Any]] = []

        def outcome(authority: tuple[str, int], result: DirResult, delay: float) -> None:
            outcomes.append({"authority": "real" if authority[1] != closed else "closed",
                             "status": result.status, "not_new": result.not_new,
                             "error": result.error, "next_in": delay})

        publisher = DescriptorPublisher(
            self.reactor, [("127.0.0.1", self.authority.dirport), ("127.0.0.1", closed)],
            self.descriptor, retry_initial=0.5, retry_max=2.0, on_outcome=outcome)
        publisher.start()
        self.wait(lambda: sum(o["authority"] == "closed" for o in outcomes) >= 3
                  and any(o["authority"] == "real" for o in outcomes))
        publisher.stop()
        self.report["publisher"] = outcomes

    def cache(self) -> DirCache:
        assert self.authority is not None
        installs: list[dict[str, Any]] = []

        def updated(cache: DirCache) -> None:
            md, ns = cache.store.consensus("microdesc"), cache.store.consensus("ns")
            installs.append({
                "microdesc_valid_after": md.info.valid_after if md else None,
                "ns_valid_after": ns.info.valid_after if ns else None,
                "relays": len(md.info.microdesc_digests) if md else 0,
                "microdescs_held": cache.store.microdesc_count})

        cache = DirCache(self.reactor, [CacheAuthority("127.0.0.1", self.authority.dirport,
                                                       self.authority.v3ident)],
                         retry_initial=1.0, retry_max=4.0, on_update=updated)
        cache.start()

        def two_full_consensuses() -> bool:
            full = [i for i in installs if i["relays"] >= 2 and i["microdescs_held"] >= 2]
            return len({i["microdesc_valid_after"] for i in full}) >= 2

        self.wait(two_full_consensuses, self.timeout * 2)
        store = cache.store
        md = store.consensus("microdesc")
        self.report["cache"] = {
            "installs": installs,
            "last_error": cache.last_error,
            "certificates": [c.info.fingerprint for c in store.certificates()],
            "consensus_flavors": [f for f in ("microdesc", "ns") if store.consensus(f)],
            "all_microdescs_held": md is not None and all(
                store.has_microdesc(d) for d in md.info.microdesc_digests),
        }
        return cache

    def serve(self, cache: DirCache, authority: Authority) -> None:
        cache.set_own_descriptor(self.descriptor)
        served: set[bytes] = set()
        requests: list[dict[str, Any]] = []

        def seen(request: Request, status: int | None) -> None:
            requests.append({"target": request.target, "status": status,
                             "headers": [list(h) for h in request.headers]})
            if request.target.startswith(_MICRODESC_CONSENSUS):
                held = cache.store.consensus("microdesc")
                if held is not None and status == 200:
                    served.add(held.info.text)

        listener = serve_dirport(self.reactor, "127.0.0.1", 0, cache.store, on_request=seen)
        port = listener.address[1]
        # The relay fingerprint of this "authority" must not be in the consensus: tor would
        # then use the addresses the consensus gives for it (the real authority's).
        nobody = hashlib.sha1(b"relaycrypt directory cache").hexdigest().upper()
        line = (f"DirAuthority relaycryptcache no-v2 v3ident={authority.v3ident} "
                f"127.0.0.1:{port} {nobody}")
        fetcher = start_tor_relay(self.base, "relaycryptfetcher", line,
                                  "PublishServerDescriptor 0\nDirCache 0\nFetchDirInfoEarly 1\n")
        self.peers.append(fetcher)
        def fetched_all() -> bool:
            micro = any(r["target"].startswith("/tor/micro/d/") and r["status"] == 200
                        for r in requests)
            consensuses = sum(r["target"].startswith(_MICRODESC_CONSENSUS)
                              and r["status"] in (200, 304) for r in requests)
            return micro and consensuses >= 2 and ENOUGH_DIRINFO in fetcher.log_text()

        self.wait(fetched_all, self.timeout * 2)
        enough = ENOUGH_DIRINFO in fetcher.log_text()
        cached = fetcher.directory / "data" / "cached-microdesc-consensus"
        held = cached.read_bytes() if cached.exists() else b""
        listener.close()
        cache.stop()
        self.report["tor_fetcher"] = {
            "enough_dirinfo": enough,
            "requests": requests,
            "cached_consensus_is_one_we_served": held in served,
            "cached_consensus_parses": bool(held) and parse_consensus(held).flavor == "microdesc",
            "warnings": [line for line in fetcher.log_errors()
                         if not any(k in line for k in _KNOWN_WARNINGS)],
        }

    def close(self, failed: bool) -> None:
        for peer in reversed(self.peers):
            if failed:
                print(f"--- {peer.directory.name} ---\n{peer.log_text()}", file=sys.stderr)
            peer.stop()
        self.reactor.close()


#: Warnings every relay in this private network logs whatever the directory does.
_KNOWN_WARNINGS = ("TestingTorNetwork is set", "running Tor as root", "ContactInfo config",
                   "DirAuthority or AlternateDirAuthority", "DirCache is disabled",
                   "GeoIP", "Your server has not managed to confirm",
                   "you disabled SafeLogging",
                   # Circuits in a two-relay network: path selection, not directory traffic.
                   "No available nodes when trying to choose node",
                   "_HSLayer2Nodes")


def check(report: dict[str, Any]) -> bool:
    """Whether every step held. Any thread (pure)."""
    publisher = report.get("publisher", [])
    closed = [o for o in publisher if o["authority"] == "closed"]
    cache = report.get("cache", {})
    fetcher = report.get("tor_fetcher", {})
    return bool(
        report["upload"]["status"] == 200 and not report["upload"]["not_new"]
        and report["upload_again"]["status"] == 200 and report["upload_again"]["not_new"]
        and report["upload_bom"] == {"status": 400, "reason": BOM_REASON, "not_new": False,
                                     "error": None}
        and report["upload_rejected"]["status"] == 400
        and report["upload_rejected"]["reason"].startswith(REJECT_REASON)
        and "REFUSED" in (report["upload_closed_port"]["error"] or "")
        and report["served_back"]["identical"]
        and any(o["authority"] == "real" and o["status"] == 200
                and o["next_in"] == REUPLOAD_INTERVAL for o in publisher)
        and len(closed) >= 3 and all(o["status"] is None for o in closed)
        and [o["next_in"] for o in closed[:3]] == [0.5, 1.0, 2.0]
        and cache.get("consensus_flavors") == ["microdesc", "ns"]
        and cache.get("all_microdescs_held")
        and cache.get("certificates") == [report["authority"]["v3ident"]]
        and fetcher.get("enough_dirinfo") and fetcher.get("cached_consensus_is_one_we_served")
        and fetcher.get("cached_consensus_parses") and fetcher.get("warnings") == [])


def main(argv: list[str] | None = None) -> int:
    """Run the steps and print the report. Main thread."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per phase")
    args = parser.parse_args(argv)
    report: dict[str, Any] = {"ok": False, "error": None}
    base = Path(tempfile.mkdtemp(prefix="relaycrypt-dirserv-"))
    interop = Interop(base, args.timeout, report)
    try:
        interop.run()
        report["ok"] = check(report)
    except (OSError, TorStartError, TimeoutError, ValueError, KeyError) as exc:
        report["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        interop.close(failed=not report["ok"])
        if report["ok"]:
            shutil.rmtree(base, ignore_errors=True)
    print(json.dumps(report, indent=2) if args.json else report)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
