"""Start a private tor directory authority on loopback, and talk HTTP to its DirPort.

A real authority is the judge of a relay's descriptor: it parses it with tor's own parser,
checks every signature and cross-certificate, and answers an upload (``POST /tor/``) with
``200`` only if it accepted it. :func:`start_authority` makes one (the recipe of the project's
private-network notes):

* the authority's v3 keys with ``tor-gencert`` (a throw-away identity, passphrase on stdin);
* its relay keys with :class:`relay.identity.keys.RelayIdentity` (tor runs on keys written by
  this project, which is itself a check of their format);
* a torrc with ``TestingTorNetwork 1``, a ``DirAuthority`` line naming itself, an ORPort and a
  DirPort on 127.0.0.1 only, ``AssumeReachable 1`` and short voting intervals;

then waits for the DirPort to open. :func:`http_post` / :func:`http_get` are minimal HTTP/1.0
clients for the DirPort. Run inside ``unshare -n`` to make "loopback only" a guarantee.

Threads: blocking helpers for tests and program set-up; any thread, not from a loop callback.
"""

from __future__ import annotations

import http.client
import shutil
import subprocess
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from relay.identity.keys import RelayIdentity
from relay.torpeer import TorPeer, TorStartError, _free_port, find_tor

__all__ = ["Authority", "http_get", "http_post", "start_authority"]

_TORRC = """\
DataDirectory @DIR@/data
Log notice file @DIR@/notice.log
Log info file @DIR@/info.log
Nickname @NICK@
TestingTorNetwork 1
DirAuthority @NICK@ orport=@ORPORT@ no-v2 v3ident=@V3IDENT@ 127.0.0.1:@DIRPORT@ @FP@
UseDefaultFallbackDirs 0
Address 127.0.0.1
AddressDisableIPv6 1
ORPort 127.0.0.1:@ORPORT@ IPv4Only
DirPort 127.0.0.1:@DIRPORT@ IPv4Only
SocksPort 0
AuthoritativeDirectory 1
V3AuthoritativeDirectory 1
ContactInfo relaycrypt test authority
AssumeReachable 1
ExitRelay 0
ExitPolicy reject *:*
ClientUseIPv6 0
ServerDNSResolvConfFile @DIR@/resolv.conf
ServerDNSDetectHijacking 0
TestingV3AuthInitialVotingInterval 5
TestingV3AuthInitialVoteDelay 2
TestingV3AuthInitialDistDelay 2
V3AuthNIntervalsValid 2
ShutdownWaitLength 0
Sandbox 0
SafeLogging 0
"""
_READY = "Opened Directory listener"


@dataclass
class Authority:
    """A running private authority: its tor process (a :class:`TorPeer`), ports and keys."""

    peer: TorPeer
    dirport: int
    identity: RelayIdentity
    v3ident: str

    @property
    def fingerprint(self) -> str:
        """The authority's relay fingerprint. Any thread."""
        return self.identity.fingerprint

    def info_log(self) -> str:
        """tor's info-level log so far. Any thread."""
        try:
            return (self.peer.directory / "info.log").read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        """Stop tor by its pid and remove its directory (unless kept). Any thread."""
        self.peer.stop()


def start_authority(nickname: str = "relaycryptauth", timeout: float = 30.0,
                    keep_directory: bool = False, extra_torrc: str = "",
                    data_files: Mapping[str, str] | None = None,
                    dir_address_in_cert: bool = True) -> Authority:
    """Start a private loopback directory authority and wait for its DirPort. ``extra_torrc``
    is appended to the torrc (e.g. shorter voting intervals); ``data_files`` are written into
    its data directory first (e.g. ``approved-routers``). Without ``dir_address_in_cert`` the
    key certificate has no ``dir-address`` (tor moves a configured authority to the address its
    certificate names, which would defeat a test that points tor at another DirPort). Raises
    :class:`relay.torpeer.TorStartError` (with tor's log) when tor or tor-gencert is missing
    or tor does not come up. Any thread (blocks)."""
    tor = find_tor()
    gencert = shutil.which("tor-gencert")
    if tor is None or gencert is None:
        raise TorStartError("tor and tor-gencert must be installed (tools/install_tor.sh)")
    base = Path(tempfile.mkdtemp(prefix="relaycrypt-auth-"))
    base.chmod(0o700)
    orport, dirport = _free_port("127.0.0.1"), _free_port("127.0.0.1")
    identity = RelayIdentity.load_or_create(base / "data", nickname)
    keys = base / "data" / "keys"
    made = subprocess.run(
        [gencert, "--create-identity-key", "--passphrase-fd", "0", "-m", "12",
         *(["-a", f"127.0.0.1:{dirport}"] if dir_address_in_cert else []),
         "-i", str(keys / "authority_identity_key"),
         "-s", str(keys / "authority_signing_key"), "-c", str(keys / "authority_certificate")],
        input=b"relaycrypt test authority\n", capture_output=True, timeout=60, check=False)
    certificate = keys / "authority_certificate"
    if made.returncode != 0 or not certificate.exists():
        shutil.rmtree(base, ignore_errors=True)
        raise TorStartError("tor-gencert failed", made.stderr.decode(errors="replace"))
    v3ident = next(line.split()[1] for line in certificate.read_text().splitlines()
                   if line.startswith("fingerprint "))
    (base / "resolv.conf").write_text("nameserver 127.0.0.1\n")
    torrc = _TORRC
    for key, value in (("@DIR@", str(base)), ("@NICK@", nickname), ("@ORPORT@", str(orport)),
                       ("@DIRPORT@", str(dirport)), ("@V3IDENT@", v3ident),
                       ("@FP@", identity.fingerprint)):
        torrc = torrc.replace(key, value)
    (base / "torrc").write_text(torrc + extra_torrc)
    for name, text in (data_files or {}).items():
        (base / "data" / name).write_text(text)
    with open(base / "stderr.log", "wb") as stderr_file:
        process = subprocess.Popen(
            [tor, "-f", str(base / "torrc"), "--defaults-torrc", "/dev/null"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr_file, cwd=base)
    peer = TorPeer(process, orport, base, keep_directory=keep_directory)
    deadline = time.monotonic() + timeout
    while _READY not in peer.log_text():
        if process.poll() is not None or time.monotonic() > deadline:
            log = peer.log_text()
            peer.stop()
            raise TorStartError("the authority did not open its DirPort", log)
        time.sleep(0.05)
    return Authority(peer, dirport, identity, v3ident)


def http_post(port: int, path: str, body: bytes,
              timeout: float = 30.0) -> tuple[int, dict[str, str]]:
    """POST ``body`` to ``http://127.0.0.1:port/path``; returns (status, headers). tor's
    DirPort answers an upload with ``200`` when it added the descriptor, ``200`` with
    ``X-Descriptor-Not-New: Yes`` when it already had it (or one as new), and -- tor 0.4.9 --
    also ``200`` when it could not parse the POST at all: check that the descriptor is served
    back. Any thread (blocks)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("POST", path, body=body,
                           headers={"Content-Type": "application/octet-stream"})
        response = connection.getresponse()
        response.read()
        return response.status, dict(response.getheaders())
    finally:
        connection.close()


def http_get(port: int, path: str, timeout: float = 30.0) -> tuple[int, str, bytes]:
    """GET ``http://127.0.0.1:port/path``; returns (status, reason, body). Any thread."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.reason, response.read()
    finally:
        connection.close()
