"""Ask a real tor which exit policy it builds for a series of option sets.

Run as ``python tests/support_exitpolicy_tor.py CASES_JSON``, inside ``unshare -n`` (the test
does that): for each case it starts a tor on loopback with the case's options and a control
port (``Address 198.51.100.7`` advertised but never dialed: ``AssumeReachable 1``, no
directory authority reachable, nothing published), reads ``GETINFO exit-policy/full``,
``exit-policy/ipv4`` and the defaults once tor has built its descriptor, and stops that tor by
its pid. It prints one JSON object: the answers, or an error with tor's log.

Threads: a script; blocking.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ADVERTISED = "198.51.100.7"
TORRC = """\
DataDirectory {dir}/data
Log notice file {dir}/notice.log
Nickname limitspeer
TestingTorNetwork 1
DirAuthority fakeauth orport=9113 no-v2 127.0.0.1:9112 0000000000000000000000000000000000000000
UseDefaultFallbackDirs 0
Address {advertised}
ORPort 127.0.0.1:{orport} NoAdvertise
ORPort {advertised}:{orport} NoListen
AssumeReachable 1
PublishServerDescriptor 0
SocksPort 0
ControlPort 127.0.0.1:{control}
ServerDNSResolvConfFile {dir}/resolv.conf
ServerDNSDetectHijacking 0
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Control:
    """A minimal tor control-port client (one command at a time)."""

    def __init__(self, port: int, deadline: float) -> None:
        while True:
            try:
                self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        self.file = self.sock.makefile("rwb")

    def command(self, line: str) -> tuple[str, list[str]]:
        self.file.write(line.encode() + b"\r\n")
        self.file.flush()
        body: list[str] = []
        while True:
            reply = self.file.readline().decode().rstrip("\r\n")
            if not reply:
                raise ConnectionError("control connection closed")
            if reply[3:4] == " ":
                return reply[:3], body
            if reply[3:4] == "-" and reply[:3] == "250" and "=" in reply:
                body.append(reply.split("=", 1)[1])
            if reply[3:4] == "+":
                while True:
                    data = self.file.readline().decode().rstrip("\r\n")
                    if data == ".":
                        break
                    body.append(data)

    def getinfo(self, key: str, deadline: float) -> list[str]:
        while True:
            status, body = self.command(f"GETINFO {key}")
            if status == "250":
                return body
            if time.monotonic() > deadline:
                raise RuntimeError(f"GETINFO {key} kept failing ({status})")
            time.sleep(0.2)


def ask_tor(options: dict[str, str], tor: str) -> dict[str, list[str]]:
    """Start tor with ``options`` added to its torrc, read its answers, stop it."""
    directory = Path(tempfile.mkdtemp(prefix="exitpolicy-tor-"))
    os.chmod(directory, 0o700)
    (directory / "resolv.conf").write_text("nameserver 127.0.0.1\n")
    control_port = _free_port()
    torrc = TORRC.format(dir=directory, advertised=ADVERTISED, orport=_free_port(),
                         control=control_port)
    torrc += "".join(f"{key} {value}\n" for key, value in options.items())
    (directory / "torrc").write_text(torrc)
    process = subprocess.Popen([tor, "-f", str(directory / "torrc"), "--defaults-torrc",
                                os.devnull], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        control = Control(control_port, deadline)
        status, _ = control.command('AUTHENTICATE ""')
        if status != "250":
            raise RuntimeError(f"AUTHENTICATE failed: {status}")
        return {key: control.getinfo(f"exit-policy/{key}", deadline)
                for key in ("full", "ipv4", "default", "reject-private/default")}
    except Exception as exc:
        log = directory / "notice.log"
        raise RuntimeError(f"{exc!r} with {options}\n--- tor's log ---\n"
                           f"{log.read_text() if log.exists() else ''}") from exc
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        shutil.rmtree(directory, ignore_errors=True)


def main() -> int:
    cases = json.loads(sys.argv[1])
    tor = shutil.which("tor") or "/usr/bin/tor"
    try:
        result: dict[str, object] = {"answers": [ask_tor(options, tor) for options in cases]}
    except Exception as exc:  # reported as JSON: the test prints it
        result = {"error": str(exc)}
    print(json.dumps(result))
    return 0 if "error" not in result else 1


if __name__ == "__main__":
    sys.exit(main())
