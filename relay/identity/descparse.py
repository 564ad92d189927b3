"""Parse a server descriptor (dir-spec 2.1.1) and check every signature in it, as tor does.

:func:`parse_server_descriptor` splits the text into items (keyword line plus optional
``-----BEGIN X----- ... -----END X-----`` object), checks the layout rules tor's
``router_parse_entry_from_string`` enforces, and verifies:

* ``router-signature``: the RSA identity key (``signing-key``, RSA-1024) signed the bare SHA-1 of
  the text through ``"router-signature\\n"``; ``fingerprint`` (if present) names that key;
* ``identity-ed25519`` (second item): a type 4 certificate with the master key included, signed
  by it; ``master-key-ed25519`` (if present) equals that key;
* ``router-sig-ed25519`` (next to last): the certificate's signing key signed
  ``SHA-256("Tor router descriptor signature v1" | text through "router-sig-ed25519 ")``;
* ``ntor-onion-key-crosscert``: a type 0x0A certificate of the master key, signed by the Ed25519
  form of ``ntor-onion-key`` with the line's sign bit;
* ``onion-key-crosscert``: the TAP ``onion-key`` signed ``SHA-1(identity key) | master key``
  (both or neither of ``onion-key`` / ``onion-key-crosscert``, as tor 0.4.9 parses).

With ``now`` given, an expired type 4 or ntor cross-certificate is refused too. Everything that
fails raises :class:`DescriptorError` with a message naming the item.

Threads: pure; any thread.
"""

from __future__ import annotations

import base64
import binascii
import calendar
import hmac
import ipaddress
import time
from dataclasses import dataclass
from hashlib import sha1, sha256

from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import load_der_public_key

from relay.identity.curve_ed import (
    CURVE25519_KEY_LEN,
    ed25519_public_from_curve25519,
    ed25519_verify,
)
from relay.identity.descriptor import ED_SIGNATURE_PREFIX
from relay.identity.edcert import (
    CERT_TYPE_ID_SIGNING,
    CERT_TYPE_NTOR_ONION_ID,
    CertError,
    Ed25519Cert,
    parse_ed_cert,
)
from relay.identity.rsaraw import RSA_KEY_BITS, rsa_digest, rsa_recover_raw

__all__ = ["DescriptorError", "ServerDescriptor", "parse_server_descriptor", "signed_portions"]

_ONCE = ("router", "identity-ed25519", "master-key-ed25519", "platform", "proto", "published",
         "fingerprint", "uptime", "bandwidth", "onion-key", "signing-key",
         "onion-key-crosscert", "ntor-onion-key-crosscert", "family", "hidden-service-dir",
         "contact", "ntor-onion-key", "tunnelled-dir-server", "router-sig-ed25519",
         "router-signature", "ipv6-policy", "hibernating", "extra-info-digest",
         "caches-extra-info", "bridge-distribution-request")
_REQUIRED = ("router", "identity-ed25519", "proto", "published", "bandwidth", "signing-key",
             "ntor-onion-key", "ntor-onion-key-crosscert", "router-sig-ed25519",
             "router-signature")


class DescriptorError(ValueError):
    """A server descriptor is malformed or one of its signatures does not hold."""


@dataclass(frozen=True)
class _Item:
    keyword: str
    args: tuple[str, ...]
    object_type: str | None
    object_data: bytes | None


@dataclass(frozen=True)
class ServerDescriptor:
    """A verified server descriptor's facts (``text`` is the descriptor as given)."""

    nickname: str
    address: str
    or_port: int
    dir_port: int
    identity_key: rsa.RSAPublicKey
    identity_digest: bytes
    ed25519_identity: bytes
    signing_key: bytes
    ntor_onion_key: bytes
    onion_key: rsa.RSAPublicKey | None
    platform: str | None
    protocols: str
    published: int
    bandwidth: tuple[int, int, int]
    contact: str | None
    exit_policy: tuple[str, ...]
    family: tuple[str, ...]
    hidden_service_dir: bool
    tunnelled_dir_server: bool
    certs_expire_at: int
    signing_cert: Ed25519Cert
    ntor_crosscert: Ed25519Cert
    ntor_sign_bit: int
    tap_crosscert: bytes | None
    ed_signature: bytes
    rsa_signature: bytes
    text: str

    @property
    def fingerprint(self) -> str:
        """40 upper-case hex digits of the identity digest. Any thread."""
        return self.identity_digest.hex().upper()


def _unb64(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise DescriptorError(f"{what}: bad base64") from exc


def _items(text: str) -> list[_Item]:
    lines = text.split("\n")
    while lines and lines[-1] == "":
        lines.pop()
    items: list[_Item] = []
    i = 0
    while i < len(lines):
        words = lines[i].split()
        if not words or lines[i] != lines[i].strip() or words[0].startswith("-----"):
            raise DescriptorError(f"line {i + 1} is not a keyword line: {lines[i]!r}")
        if words[0] == "opt":
            words = words[1:]
        keyword, args = words[0], tuple(words[1:])
        i += 1
        obj_type, obj = None, None
        if i < len(lines) and lines[i].startswith("-----BEGIN "):
            if not lines[i].endswith("-----"):
                raise DescriptorError(f"{keyword}: malformed object header {lines[i]!r}")
            obj_type = lines[i][len("-----BEGIN ") : -5]
            end = f"-----END {obj_type}-----"
            try:
                stop = lines.index(end, i + 1)
            except ValueError:
                raise DescriptorError(f"{keyword}: object {obj_type} never ends") from None
            obj = _unb64("".join(lines[i + 1 : stop]), f"{keyword} object")
            i = stop + 1
        items.append(_Item(keyword, args, obj_type, obj))
    return items


def _rsa_key(item: _Item) -> rsa.RSAPublicKey:
    if item.object_type != "RSA PUBLIC KEY" or item.object_data is None:
        raise DescriptorError(f"{item.keyword}: needs an RSA PUBLIC KEY object")
    try:
        key = load_der_public_key(item.object_data)
    except ValueError as exc:
        raise DescriptorError(f"{item.keyword}: not a PKCS#1 RSA public key") from exc
    if not isinstance(key, rsa.RSAPublicKey) or key.key_size != RSA_KEY_BITS:
        raise DescriptorError(f"{item.keyword}: not a {RSA_KEY_BITS}-bit RSA key")
    return key


def _object(item: _Item, kind: str) -> bytes:
    if item.object_type != kind or item.object_data is None:
        raise DescriptorError(f"{item.keyword}: needs a {kind} object")
    return item.object_data


def _published(args: tuple[str, ...]) -> int:
    try:
        return calendar.timegm(time.strptime(" ".join(args[:2]), "%Y-%m-%d %H:%M:%S"))
    except ValueError as exc:
        raise DescriptorError(f"published {' '.join(args)!r} is not a time") from exc


def _ints(item: _Item, count: int) -> tuple[int, ...]:
    if len(item.args) < count:
        raise DescriptorError(f"{item.keyword}: needs {count} numbers, got {item.args!r}")
    try:
        return tuple(int(a) for a in item.args[:count])
    except ValueError as exc:
        raise DescriptorError(f"{item.keyword}: {item.args!r} are not numbers") from exc


_ED_END = b"\nrouter-sig-ed25519 "
_RSA_END = b"\nrouter-signature\n"


def signed_portions(raw: bytes) -> tuple[bytes, bytes]:
    """The bytes ``router-sig-ed25519`` covers (through ``"router-sig-ed25519 "``, before the
    prefix is added) and those ``router-signature`` covers (through ``"router-signature\\n"``).
    Raises :class:`DescriptorError` if either keyword is missing. Any thread (pure)."""
    ed_at, rsa_at = raw.find(_ED_END), raw.find(_RSA_END)
    if ed_at < 0 or rsa_at < 0:
        raise DescriptorError("no router-sig-ed25519 or router-signature line")
    return raw[: ed_at + len(_ED_END)], raw[: rsa_at + len(_RSA_END)]


def parse_server_descriptor(text: str, now: float | None = None) -> ServerDescriptor:
    """Parse ``text`` and verify every signature and cross-certificate in it (see the module
    docstring); with ``now``, also refuse expired certificates. Raises
    :class:`DescriptorError`. Any thread (pure)."""
    items = _items(text)
    by_kw: dict[str, _Item] = {}
    for item in items:
        if item.keyword in _ONCE and item.keyword in by_kw:
            raise DescriptorError(f"{item.keyword} appears twice")
        by_kw.setdefault(item.keyword, item)
    missing = [k for k in _REQUIRED if k not in by_kw]
    if missing:
        raise DescriptorError(f"missing {', '.join(missing)}")
    if items[0].keyword != "router" or items[-1].keyword != "router-signature":
        raise DescriptorError("a descriptor starts with router and ends with router-signature")
    if items[1].keyword != "identity-ed25519" or items[-2].keyword != "router-sig-ed25519":
        raise DescriptorError("identity-ed25519 must come second and router-sig-ed25519 "
                              "next to last")
    router = items[0]
    if len(router.args) < 5:
        raise DescriptorError("router needs nickname, address and three ports")
    nickname, address = router.args[0], router.args[1]
    or_port, _socks, dir_port = _ints(_Item("router", router.args[2:], None, None), 3)
    try:
        ipaddress.IPv4Address(address)
    except ValueError as exc:
        raise DescriptorError(f"router address {address!r} is not IPv4") from exc
    try:
        raw = text.encode("ascii")
    except UnicodeEncodeError as exc:
        raise DescriptorError("a descriptor is ASCII text") from exc

    identity_key = _rsa_key(by_kw["signing-key"])
    identity_digest = rsa_digest(identity_key)
    ed_part, rsa_part = signed_portions(raw)
    rsa_signature = _object(by_kw["router-signature"], "SIGNATURE")
    try:
        signed = rsa_recover_raw(identity_key, rsa_signature)
    except ValueError as exc:
        raise DescriptorError("router-signature does not verify under signing-key") from exc
    if not hmac.compare_digest(signed[:20], sha1(rsa_part).digest()):
        raise DescriptorError("router-signature signs another text")
    if "fingerprint" in by_kw:
        claimed = "".join(by_kw["fingerprint"].args)
        if claimed.upper() != identity_digest.hex().upper():
            raise DescriptorError(f"fingerprint {claimed} does not match signing-key")

    try:
        cert = parse_ed_cert(_object(by_kw["identity-ed25519"], "ED25519 CERT"),
                             "identity-ed25519")
        if cert.cert_type != CERT_TYPE_ID_SIGNING or cert.signing_key is None:
            raise DescriptorError("identity-ed25519 is not a type 4 cert with its signer")
        master = cert.check(None, now=now, what="identity-ed25519")
    except CertError as exc:
        raise DescriptorError(str(exc)) from exc
    if "master-key-ed25519" in by_kw and _unb64(
            "".join(by_kw["master-key-ed25519"].args[:1]), "master-key-ed25519") != master:
        raise DescriptorError("master-key-ed25519 does not match identity-ed25519")
    ed_sig = _unb64("".join(by_kw["router-sig-ed25519"].args[:1]), "router-sig-ed25519")
    if not ed25519_verify(cert.certified_key, ed_sig,
                          sha256(ED_SIGNATURE_PREFIX + ed_part).digest()):
        raise DescriptorError("router-sig-ed25519 does not verify under the signing key")

    ntor_key = _unb64("".join(by_kw["ntor-onion-key"].args[:1]), "ntor-onion-key")
    if len(ntor_key) != CURVE25519_KEY_LEN:
        raise DescriptorError(f"ntor-onion-key is not {CURVE25519_KEY_LEN} bytes")
    ntor_item = by_kw["ntor-onion-key-crosscert"]
    if ntor_item.args[:1] not in (("0",), ("1",)):
        raise DescriptorError("ntor-onion-key-crosscert needs sign bit 0 or 1")
    try:
        ntor_cert = parse_ed_cert(_object(ntor_item, "ED25519 CERT"), "ntor-onion-key-crosscert")
        if ntor_cert.cert_type != CERT_TYPE_NTOR_ONION_ID or ntor_cert.certified_key != master:
            raise DescriptorError("ntor-onion-key-crosscert does not certify the master key")
        ntor_cert.check(ed25519_public_from_curve25519(ntor_key, int(ntor_item.args[0])),
                        now=now, what="ntor-onion-key-crosscert")
    except CertError as exc:
        raise DescriptorError(str(exc)) from exc

    onion_key, tap_cc = None, None
    if ("onion-key" in by_kw) != ("onion-key-crosscert" in by_kw):
        raise DescriptorError("descriptor has only one of onion-key, onion-key-crosscert")
    if "onion-key" in by_kw:
        onion_key = _rsa_key(by_kw["onion-key"])
        tap_cc = _object(by_kw["onion-key-crosscert"], "CROSSCERT")
        try:
            crossed = rsa_recover_raw(onion_key, tap_cc)
        except ValueError as exc:
            raise DescriptorError("onion-key-crosscert does not verify under onion-key") from exc
        if not hmac.compare_digest(crossed[:52], identity_digest + master):
            raise DescriptorError("onion-key-crosscert certifies other identities")

    def text_of(keyword: str) -> str | None:
        item = by_kw.get(keyword)
        return None if item is None else " ".join(item.args)

    bandwidth = _ints(by_kw["bandwidth"], 3)
    return ServerDescriptor(
        nickname=nickname, address=address, or_port=or_port, dir_port=dir_port,
        identity_key=identity_key, identity_digest=identity_digest, ed25519_identity=master,
        signing_key=cert.certified_key, ntor_onion_key=ntor_key, onion_key=onion_key,
        platform=text_of("platform"), protocols=text_of("proto") or "",
        published=_published(by_kw["published"].args),
        bandwidth=(bandwidth[0], bandwidth[1], bandwidth[2]), contact=text_of("contact"),
        exit_policy=tuple(f"{i.keyword} {' '.join(i.args)}" for i in items
                          if i.keyword in ("accept", "reject")),
        family=by_kw["family"].args if "family" in by_kw else (),
        hidden_service_dir="hidden-service-dir" in by_kw,
        tunnelled_dir_server="tunnelled-dir-server" in by_kw,
        certs_expire_at=min(cert.expires_at, ntor_cert.expires_at), signing_cert=cert,
        ntor_crosscert=ntor_cert, ntor_sign_bit=int(ntor_item.args[0]), tap_crosscert=tap_cc,
        ed_signature=ed_sig, rsa_signature=rsa_signature, text=text)
