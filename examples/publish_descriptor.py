"""Publish a relay's server descriptor to a real tor directory authority and check it was taken.

    python -m examples.publish_descriptor --start-authority [--datadir DIR] [--json]
    python -m examples.publish_descriptor --dirport 7001 --datadir DIR [--json]

What it does, in order, every step checked:

1. loads (or creates) the relay's keys in ``--datadir`` (``relay.identity.keys``; by default a
   temporary directory, removed at the end) with tor's file names and formats;
2. with ``--start-authority``, starts a private tor 0.4.9 directory authority on loopback
   (``relay.torauthority``; its relay keys are also made by ``relay.identity``), fetches the
   authority's own descriptor and checks, with this project's parser, that tor signed it with
   the keys written here (fingerprint, Ed25519 identity, ntor key); then, since every
   signature in a descriptor is deterministic, re-makes each of tor's signatures and
   certificates with this project's code and those keys and requires the same bytes: the
   type 4 certificate, the TAP and ntor cross-certificates (the latter proves the
   curve25519 -> Ed25519 derivation, nonce half included, is tor's), router-sig-ed25519 and
   router-signature;
3. builds and signs the relay's descriptor, parses it back, and uploads it (``POST /tor/``);
   the authority must answer ``200`` without ``X-Descriptor-Not-New``;
4. fetches ``/tor/server/fp/FINGERPRINT`` and requires the very bytes it uploaded (tor 0.4.9
   answers ``200`` even to a POST it could not parse, so the status alone proves nothing);
5. with ``--start-authority``: reads the authority's log line for the accepted descriptor, then
   uploads a newer descriptor whose ntor cross-certificate claims the other sign bit: the
   authority must log it as badly signed and keep serving the first one, which shows it checks
   what step 3 passed.

Exit status 0 when every step held, 1 otherwise; ``--json`` prints one JSON object (the test
``tests/test_identity_tor.py`` runs this inside ``unshare -n``). On failure with
``--start-authority`` the authority's log goes to stderr.

Threads: a blocking program on the main thread (no event loop).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from hashlib import sha1, sha256
from typing import Any

from relay.identity.curve_ed import ed25519_from_curve25519
from relay.identity.descparse import (
    DescriptorError,
    ServerDescriptor,
    parse_server_descriptor,
    signed_portions,
)
from relay.identity.descriptor import ED_SIGNATURE_PREFIX, RouterInfo, tap_crosscert
from relay.identity.edcert import CERT_TYPE_NTOR_ONION_ID, make_ed_cert
from relay.identity.keys import RelayIdentity
from relay.identity.rsaraw import rsa_sign_raw
from relay.torauthority import Authority, http_get, http_post, start_authority
from relay.torpeer import TorStartError


def _fetch_until_ok(port: int, path: str, wait: float) -> tuple[int, bytes]:
    deadline = time.monotonic() + wait
    while True:
        status, _reason, body = http_get(port, path)
        if status == 200 or time.monotonic() > deadline:
            return status, body
        time.sleep(0.2)


def _flip_ntor_sign_bit(descriptor: str) -> str:
    for bit, other in (("0", "1"), ("1", "0")):
        line = f"\nntor-onion-key-crosscert {bit}\n"
        if line in descriptor:
            return descriptor.replace(line, f"\nntor-onion-key-crosscert {other}\n")
    raise ValueError("no ntor-onion-key-crosscert line")


def same_signatures_as_tor(theirs: ServerDescriptor, keys: RelayIdentity) -> dict[str, bool]:
    """For a descriptor tor signed with ``keys``: whether this project's code, given the same
    keys and data, makes byte-identical certificates and signatures. Main thread."""
    ed_part, rsa_part = signed_portions(theirs.text.encode("ascii"))
    derived, sign_bit = ed25519_from_curve25519(keys.onion.ntor_secret)
    ntor_cc = make_ed_cert(derived, CERT_TYPE_NTOR_ONION_ID, keys.ed25519_identity,
                           theirs.ntor_crosscert.expires_at)
    return {
        "identity-ed25519": theirs.signing_cert.encoded == keys.signing_cert.encoded,
        "onion-key-crosscert": theirs.tap_crosscert == tap_crosscert(
            keys.onion.tap, keys.identity_digest, keys.ed25519_identity),
        "ntor-onion-key-crosscert": (ntor_cc.encoded == theirs.ntor_crosscert.encoded
                                     and sign_bit == theirs.ntor_sign_bit),
        "router-sig-ed25519": theirs.ed_signature == keys.signing_key.sign(
            sha256(ED_SIGNATURE_PREFIX + ed_part).digest()),
        "router-signature": theirs.rsa_signature == rsa_sign_raw(
            keys.identity_key, sha1(rsa_part).digest()),
    }


def run(args: argparse.Namespace, report: dict[str, Any]) -> Authority | None:
    """The steps of the module docstring, filling ``report``. Main thread."""
    datadir = args.datadir or report["temporary_datadir"]
    identity = RelayIdentity.load_or_create(datadir, args.nickname)
    report.update(fingerprint=identity.fingerprint, datadir=str(datadir))
    authority = None
    dirport = args.dirport
    if args.start_authority:
        authority = start_authority()
        dirport = authority.dirport
        status, body = _fetch_until_ok(dirport, "/tor/server/authority", args.timeout)
        report["authority_descriptor_status"] = status
        theirs = parse_server_descriptor(body.decode("ascii"), now=time.time())
        report["authority_uses_our_keys"] = (
            theirs.fingerprint == authority.fingerprint
            and theirs.ed25519_identity == authority.identity.ed25519_identity
            and theirs.ntor_onion_key == authority.identity.ntor_onion_key)
        report["authority_platform"] = theirs.platform
        report["same_signatures_as_tor"] = same_signatures_as_tor(theirs, authority.identity)
    info = RouterInfo(args.nickname, "127.0.0.1", args.orport, contact="relaycrypt test relay")
    descriptor = identity.server_descriptor(info, time.time())
    mine = parse_server_descriptor(descriptor, now=time.time())
    report["parsed_back"] = mine.fingerprint == identity.fingerprint
    status, headers = http_post(dirport, "/tor/", descriptor.encode("ascii"))
    report.update(upload_status=status, upload_not_new="X-Descriptor-Not-New" in headers)
    fp_path = f"/tor/server/fp/{identity.fingerprint}"
    status, body = _fetch_until_ok(dirport, fp_path, 5.0)
    report["served_back_identical"] = status == 200 and body == descriptor.encode("ascii")
    if authority is not None:
        report["authority_log"] = _log_lines(authority, f"Added descriptor from '{args.nickname}'")
        newer = identity.server_descriptor(info, time.time() + 2)
        status, _headers = http_post(dirport, "/tor/", _flip_ntor_sign_bit(newer).encode("ascii"))
        report["tampered_status"] = status
        status, body = _fetch_until_ok(dirport, fp_path, 5.0)
        report["tampered_refused"] = status == 200 and body == descriptor.encode("ascii")
        report["tampered_log"] = _log_lines(authority, "Incorrect ed25519 signature")
    return authority


def _log_lines(authority: Authority, text: str) -> list[str]:
    return [line.split("] ", 1)[-1] for line in authority.info_log().splitlines()
            if text in line][:1]


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run the steps, print the report. Main thread."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--start-authority", action="store_true",
                        help="start a private loopback tor authority")
    target.add_argument("--dirport", type=int, help="an authority's DirPort on 127.0.0.1")
    parser.add_argument("--datadir", help="the relay's data directory (default: a new one)")
    parser.add_argument("--nickname", default="relaycrypt", help="the relay's nickname")
    parser.add_argument("--orport", type=int, default=9001, help="the ORPort to advertise")
    parser.add_argument("--timeout", type=float, default=60.0, help="wait for the authority")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    report: dict[str, Any] = {"ok": False, "error": None}
    if args.datadir is None:
        report["temporary_datadir"] = tempfile.mkdtemp(prefix="relaycrypt-relay-")
    authority = None
    try:
        authority = run(args, report)
        report["ok"] = (report.get("upload_status") == 200
                        and report["upload_not_new"] is False
                        and report["served_back_identical"] is True
                        and report["parsed_back"] is True
                        and (authority is None
                             or (report["authority_uses_our_keys"] is True
                                 and all(report["same_signatures_as_tor"].values())
                                 and report["tampered_refused"] is True
                                 and bool(report["tampered_log"])
                                 and bool(report["authority_log"]))))
    except (OSError, TorStartError, DescriptorError, ValueError) as exc:
        report["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        if authority is not None:
            if not report["ok"]:
                print(authority.peer.log_text(), file=sys.stderr)
            authority.stop()
        if args.datadir is None:
            shutil.rmtree(report.pop("temporary_datadir"), ignore_errors=True)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for key, value in report.items():
            print(f"{key}: {value}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
