"""Authenticate to a real tor relay as a relay: CERTS (2, 4, 6, 7) and AUTHENTICATE (method 3).

    python tests/support_tor_authenticate.py      # prints one JSON object; run in unshare -n

Starts a private loopback tor relay (``relay.torpeer``), opens a TLS link to it with pyOpenSSL
on a blocking socket, and plays a relay initiator's part of the v3 link handshake with
``relay.identity``: VERSIONS; reads VERSIONS, CERTS, AUTH_CHALLENGE (each recorded in a
``HandshakeDigests`` as on the wire) and NETINFO; verifies tor's CERTS; sends CERTS,
AUTHENTICATE (TLSSECRETS from ``export_keying_material(EXPORTER_LABEL, 32, CID)``) and NETINFO;
then CREATE_FAST. tor closes a link whose AUTHENTICATE it refuses, so CREATED_FAST coming back
shows it accepted it; the run is repeated with TLSSECRETS exported with the context tor-spec
names (the initiator's Ed25519 key), which tor must refuse. tor's warnings are reported
(``ProtocolWarnings 1``). Used by tests/test_identity_tor.py.

Threads: a blocking script on the main thread.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import struct
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cryptography.hazmat.primitives.serialization import Encoding
from OpenSSL import SSL

from relay.identity.authenticate import (
    EXPORTER_LABEL,
    EXPORTER_LENGTH,
    AuthInputs,
    HandshakeDigests,
    build_authenticate,
)
from relay.identity.certscell import parse_certs_cell
from relay.identity.keys import RelayIdentity
from relay.torpeer import TorPeer, start_tor

_CERTS, _AUTH_CHALLENGE, _AUTHENTICATE, _NETINFO = 129, 130, 131, 8
_CREATE_FAST, _CREATED_FAST = 5, 6
_PAYLOAD = 509


def _read(conn: SSL.Connection, count: int) -> bytes:
    data = b""
    while len(data) < count:
        try:
            chunk = conn.recv(count - len(data))
        except (SSL.ZeroReturnError, SSL.SysCallError):
            chunk = b""
        if not chunk:
            raise ConnectionError("tor closed the link")
        data += chunk
    return data


def _read_cell(conn: SSL.Connection) -> tuple[int, bytes, bytes]:
    """One cell with 4-byte circuit ids: (command, payload, the raw bytes)."""
    header = _read(conn, 5)
    command = header[4]
    if command == 7 or command >= 128:
        length = _read(conn, 2)
        payload = _read(conn, struct.unpack(">H", length)[0])
        return command, payload, header + length + payload
    payload = _read(conn, _PAYLOAD)
    return command, payload, header + payload


def _var_cell(command: int, body: bytes) -> bytes:
    return struct.pack(">IBH", 0, command, len(body)) + body


def _fixed_cell(circ_id: int, command: int, body: bytes) -> bytes:
    return struct.pack(">IB", circ_id, command) + body.ljust(_PAYLOAD, b"\x00")


def authenticate_once(peer: TorPeer, identity: RelayIdentity, spec_context: bool) -> dict[str, Any]:
    """One link: the handshake as a relay initiator, then CREATE_FAST. Main thread."""
    sock = socket.create_connection(("127.0.0.1", peer.orport), timeout=20)
    sock.settimeout(None)  # pyOpenSSL needs a blocking socket; the caller's timeout bounds us
    context = SSL.Context(SSL.TLS_CLIENT_METHOD)
    context.set_verify(SSL.VERIFY_NONE, lambda *args: True)
    conn = SSL.Connection(context, sock)
    conn.set_connect_state()
    conn.do_handshake()
    digests = HandshakeDigests(initiator=True)
    versions = struct.pack(">HBH", 0, 7, 4) + struct.pack(">HH", 4, 5)
    conn.sendall(versions)
    digests.sent(versions)
    header = _read(conn, 5)
    theirs = header + _read(conn, struct.unpack(">H", header[3:5])[0])
    digests.received(theirs)
    got: dict[int, bytes] = {}
    while _AUTH_CHALLENGE not in got:
        command, payload, raw = _read_cell(conn)
        digests.received(raw)
        got[command] = payload
    command, _payload, _raw = _read_cell(conn)  # NETINFO: after the SLOG
    peer_der = conn.get_peer_certificate().to_cryptography().public_bytes(Encoding.DER)
    responder = parse_certs_cell(got[_CERTS])
    bindings = responder.verify(peer_der)
    certs = _var_cell(_CERTS, identity.initiator_certs_body())
    conn.sendall(certs)
    digests.sent(certs)
    cid = identity.identity_digest256
    exporter_context = identity.ed25519_identity if spec_context else cid
    inputs = AuthInputs(
        cid=cid, sid=responder.identity_digest256, cid_ed=identity.ed25519_identity,
        sid_ed=responder.ed25519_identity or bytes(32), slog=digests.slog(),
        clog=digests.clog(), scert=hashlib.sha256(peer_der).digest(),
        tlssecrets=conn.export_keying_material(EXPORTER_LABEL, EXPORTER_LENGTH,
                                               exporter_context))
    netinfo = struct.pack(">I", 0) + b"\x04\x04" + bytes((127, 0, 0, 1)) + b"\x01\x04\x04" + (
        bytes((127, 0, 0, 1)))
    conn.sendall(_var_cell(_AUTHENTICATE, build_authenticate(inputs, identity.auth_key))
                 + _fixed_cell(0, _NETINFO, netinfo)
                 + _fixed_cell(0x80000001, _CREATE_FAST, os.urandom(20)))
    try:
        while True:
            command, _payload, raw = _read_cell(conn)
            if command == _CREATED_FAST:
                created = struct.unpack(">I", raw[:4])[0] == 0x80000001
                break
    except (ConnectionError, OSError):
        created = False
    sock.close()
    return {"responder_bindings": bindings, "last_cell_command": command, "created_fast": created}


def main() -> int:
    """Run both links against one tor; print the report. Main thread."""
    report: dict[str, Any] = {"ok": False, "error": None}
    peer = start_tor()
    datadir = tempfile.mkdtemp(prefix="relaycrypt-auth-id-")
    try:
        identity = RelayIdentity.load_or_create(datadir, "AuthTest")
        report["cid_context"] = authenticate_once(peer, identity, spec_context=False)
        time.sleep(0.5)
        report["warnings_after_cid_context"] = peer.unexpected_warnings()
        report["ed25519_context"] = authenticate_once(peer, identity, spec_context=True)
        time.sleep(0.5)
        report["warnings"] = peer.unexpected_warnings()
        report["ok"] = True
    except Exception as exc:  # reported to the test with tor's log
        report["error"] = f"{type(exc).__name__}: {exc}"
        print(peer.log_text(), file=sys.stderr)
    finally:
        peer.stop()
        shutil.rmtree(datadir, ignore_errors=True)
    print(json.dumps(report, indent=2))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
