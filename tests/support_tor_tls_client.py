"""Tor as a TLS client of our ``TlsServerSession``: a script that prints what happened as JSON.

Run as ``python tests/support_tor_tls_client.py`` (tests/test_tls_tor_client.py runs it, inside
``unshare -n`` when it can). It listens on a free 127.0.0.1 port with a ``TlsServerSession``,
starts a private tor configured as a bridge client whose only bridge is that port (so tor dials
nothing else), accepts tor's connection, completes the TLS handshake over the blocking socket,
reads the first cell tor sends (its VERSIONS), closes with close_notify, then waits until tor's
info log says the TLS negotiation finished, stops tor by its pid and removes its directory.

The JSON holds the TLS version, cipher, the SNI tor sent, whether tor sent a certificate, the
first cell's bytes, tor's log lines about the connection, and ``error`` (None when every step
worked).
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

from support_tls import credentials

from relay.tls import TlsError, TlsServerContext, TlsServerSession
from relay.torpeer import find_tor

TORRC = """\
DataDirectory @DIR@/data
Log info file @DIR@/info.log
SocksPort 127.0.0.1:auto
ClientUseIPv6 0
UseBridges 1
Bridge 127.0.0.1:@PORT@
"""
TLS_DONE_MARK = "SSL negotiation finished successfully"


def read_first_cell(conn: socket.socket, session: TlsServerSession) -> bytes:
    """Complete the handshake and return the first variable-length cell (link protocol < 4
    framing: circ_id 2 bytes, command 1, length 2), as VERSIONS is."""
    plain = b""
    while len(plain) < 5 or len(plain) < 5 + int.from_bytes(plain[3:5], "big"):
        data = conn.recv(1 << 16)
        if not data:
            raise EOFError(f"tor closed after {len(plain)} plaintext bytes")
        got, to_write = session.feed(data)
        if to_write:
            conn.sendall(to_write)
        plain += got
    return plain[: 5 + int.from_bytes(plain[3:5], "big")]


def run(tor: str, directory: Path) -> dict[str, object]:
    report: dict[str, object] = {"error": None}
    context = TlsServerContext(*credentials("www.relaycrypt-bridge.net"))
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    listener.settimeout(60)
    port = listener.getsockname()[1]
    (directory / "data").mkdir(mode=0o700)
    (directory / "torrc").write_text(TORRC.replace("@DIR@", str(directory))
                                     .replace("@PORT@", str(port)))
    log = directory / "info.log"
    process = subprocess.Popen([tor, "-f", str(directory / "torrc"), "--defaults-torrc",
                                os.devnull], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    report["tor_pid"] = process.pid
    try:
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(30)
            session = TlsServerSession(context)
            try:
                cell = read_first_cell(conn, session)
            except (TlsError, EOFError, OSError) as exc:
                report["error"] = f"{type(exc).__name__}: {exc}"
                cell = b""
            report.update(
                first_cell=cell.hex(), tls_version=session.version(), cipher=session.cipher(),
                server_name=session.server_name(),
                client_certificate=session.peer_certificate_der() is not None,
                own_certificate_matches=session.own_certificate_der() == context.certificate_der,
                exporter_bytes=len(session.export_keying_material(b"EXPORTER-test", 32, b""))
                if session.handshake_done else 0)
            conn.sendall(session.close())
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and TLS_DONE_MARK not in _read(log):
            time.sleep(0.1)
    except OSError as exc:
        report["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        listener.close()
        if process.poll() is None:
            os.kill(process.pid, signal.SIGTERM)
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(process.pid, signal.SIGKILL)
                process.wait()
    text = _read(log)
    report["tor_saw_tls_finish"] = TLS_DONE_MARK in text
    report["tor_log"] = [line for line in text.splitlines()
                         if "TLS" in line or "SSL" in line or f":{port}" in line
                         or "[warn]" in line or "[err]" in line]
    return report


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def main() -> int:
    tor = find_tor()
    if tor is None:
        print(json.dumps({"error": "tor is not installed"}))
        return 2
    directory = Path(tempfile.mkdtemp(prefix="relaycrypt-tor-client-"))
    directory.chmod(0o700)
    try:
        report = run(tor, directory)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    print(json.dumps(report, indent=2))
    return 0 if report["error"] is None else 1


if __name__ == "__main__":
    sys.exit(main())
