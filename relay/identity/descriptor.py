"""A relay's server descriptor (dir-spec 2.1.1), built and signed the way tor 0.4.9 does.

Lines, in tor's order (``router_dump_router_to_string``; optional ones in brackets)::

    router NICK ADDRESS ORPORT 0 DIRPORT
    identity-ed25519 + ED25519 CERT (type 4, master -> signing key, signing key included)
    master-key-ed25519 BASE64            platform TEXT          proto PROTOCOLS
    published YYYY-MM-DD HH:MM:SS        fingerprint XXXX XXXX ... (10 groups)
    uptime N                             bandwidth RATE BURST OBSERVED
    [onion-key + RSA PUBLIC KEY (TAP)]   signing-key + RSA PUBLIC KEY (identity)
    [onion-key-crosscert + CROSSCERT]    ntor-onion-key-crosscert SIGNBIT + ED25519 CERT
    [family ...]  [hidden-service-dir]  [contact TEXT]  [bridge-distribution-request METHOD]
    ntor-onion-key BASE64                accept/reject lines (the exit policy)
    [tunnelled-dir-server]
    router-sig-ed25519 BASE64            router-signature + SIGNATURE

The four signatures and what they prove:

* ``onion-key-crosscert``: the TAP onion key signs the raw 52 bytes ``SHA-1(identity key) |
  Ed25519 master key`` with PKCS#1 v1.5 padding and no hash or DigestInfo
  (``make_tap_onion_key_crosscert``; dir-spec says the same);
* ``ntor-onion-key-crosscert``: an Ed25519 certificate of type 0x0A certifying the master key,
  signed with the Ed25519 key derived from the ntor onion key
  (:func:`relay.identity.curve_ed.ed25519_from_curve25519`), valid from ``published`` for the
  onion key lifetime; the line carries the derived key's sign bit;
* ``router-sig-ed25519``: the signing key signs
  ``SHA-256("Tor router descriptor signature v1" | text from "router " through
  "router-sig-ed25519 ")`` (base64, no padding);
* ``router-signature``: the RSA identity key signs the bare SHA-1 of the text through
  ``"router-signature\\n"`` (PKCS#1 v1.5 without DigestInfo).

No extra-info document is made: a descriptor without ``extra-info-digest`` is complete, and
tor 0.4.9 authorities accept it (``tests/test_identity_tor.py`` uploads one).
``hidden-service-dir`` and ``tunnelled-dir-server`` claim services (HSDir, BEGIN_DIR); tor
always sends both, here they are off unless the caller says the relay provides them, and the
``proto`` line is whatever the caller says it implements (default
:data:`RELAYCRYPT_PROTOCOLS`).

Threads: pure functions; any thread.
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
import platform
import re
from dataclasses import dataclass, field
from hashlib import sha1, sha256

from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from relay.identity.curve_ed import ExpandedEd25519Key, ed25519_from_curve25519
from relay.identity.edcert import CERT_TYPE_NTOR_ONION_ID, Ed25519Cert, make_ed_cert
from relay.identity.rsaraw import rsa_digest, rsa_sign_raw

__all__ = [
    "DEFAULT_BANDWIDTH",
    "ED_SIGNATURE_PREFIX",
    "NICKNAME_RE",
    "RELAYCRYPT_PROTOCOLS",
    "RouterInfo",
    "b64_multiline",
    "b64_nopad",
    "build_server_descriptor",
    "check_policy_line",
    "default_platform",
    "format_time",
    "tap_crosscert",
]

ED_SIGNATURE_PREFIX = b"Tor router descriptor signature v1"

#: A tor nickname: 1-19 ASCII letters or digits.
NICKNAME_RE = re.compile(r"^[A-Za-z0-9]{1,19}$")
#: tor's BandwidthRate and BandwidthBurst default, bytes/s (1 GByte).
DEFAULT_BANDWIDTH = 1 << 30

#: The ``proto`` line of a relaycrypt relay: only what it implements. Link protocols 4-5 with
#: Ed25519 link authentication (LinkAuth=3); ntor and EXTEND2 (Relay=2; no TAP, no ntor v3);
#: authenticated SENDMEs (FlowCtrl=1; no congestion control); directory documents served over
#: BEGIN_DIR (DirCache=2; consensus-diff requests get the full consensus) in the formats of
#: Cons/Desc/Microdesc 1-2.
RELAYCRYPT_PROTOCOLS = ("Cons=1-2 Desc=1-2 DirCache=2 FlowCtrl=1 Link=4-5 LinkAuth=3 "
                        "Microdesc=1-2 Relay=2")

_PORT_SPEC = re.compile(r"^(\*|\d{1,5}(-\d{1,5})?)$")
_POLICY_KEYWORDS = ("accept", "reject")


def default_platform() -> str:
    """``"relaycrypt VERSION on SYSTEM"``: an honest platform line (tor treats a platform not
    starting with ``"Tor "`` as a nonstandard implementation and accepts it). Any thread."""
    try:
        from importlib.metadata import version
        ours = version("relaycrypt")
    except Exception:  # not installed as a distribution
        ours = "unknown"
    return f"relaycrypt {ours} on {platform.system() or 'unknown'}"


def format_time(seconds: float) -> str:
    """``YYYY-MM-DD HH:MM:SS`` in UTC, as descriptors spell times. Any thread (pure)."""
    return datetime.datetime.fromtimestamp(int(seconds), datetime.UTC).strftime(
        "%Y-%m-%d %H:%M:%S")


def b64_nopad(data: bytes) -> str:
    """Base64 without ``=`` padding (Ed25519 keys and signatures, ntor keys). Any thread."""
    return base64.b64encode(data).decode("ascii").rstrip("=")


def b64_multiline(data: bytes) -> str:
    """Base64 in lines of 64 characters, each ending in a newline (tor's
    ``BASE64_ENCODE_MULTILINE``). Any thread (pure)."""
    text = base64.b64encode(data).decode("ascii")
    return "".join(text[i : i + 64] + "\n" for i in range(0, len(text), 64))


def _object(kind: str, data: bytes) -> str:
    return f"-----BEGIN {kind}-----\n{b64_multiline(data)}-----END {kind}-----\n"


def _rsa_public_pem(key: rsa.RSAPublicKey) -> str:
    return key.public_bytes(Encoding.PEM, PublicFormat.PKCS1).decode("ascii")


def check_policy_line(line: str) -> str:
    """Validate one exit policy line (``accept|reject ADDR:PORTS``) and return it; raises
    ``ValueError`` on anything tor would not parse (ports 1-65535, as tor 0.4.9.11 insists).
    Any thread (pure)."""
    parts = line.split()
    if len(parts) != 2 or parts[0] not in _POLICY_KEYWORDS or ":" not in parts[1]:
        raise ValueError(f"exit policy line {line!r}: expected 'accept|reject ADDRESS:PORTS'")
    address, _, ports = parts[1].rpartition(":")
    if address != "*":
        try:
            ipaddress.ip_network(address.strip("[]"), strict=False)
        except ValueError as exc:
            raise ValueError(f"exit policy line {line!r}: bad address {address!r}") from exc
    if not _PORT_SPEC.match(ports):
        raise ValueError(f"exit policy line {line!r}: bad ports {ports!r}")
    if ports != "*":
        low, _, high = ports.partition("-")
        numbers = (int(low), int(high or low))
        if not (1 <= numbers[0] <= numbers[1] <= 65535):
            raise ValueError(f"exit policy line {line!r}: ports must be within 1-65535")
    return " ".join(parts)


@dataclass(frozen=True)
class RouterInfo:
    """What a descriptor says about a relay besides its keys (the operator's choices)."""

    nickname: str
    address: str
    or_port: int
    dir_port: int = 0
    bandwidth_rate: int = DEFAULT_BANDWIDTH
    bandwidth_burst: int = DEFAULT_BANDWIDTH
    bandwidth_observed: int = 0
    platform: str = field(default_factory=default_platform)
    protocols: str = RELAYCRYPT_PROTOCOLS
    uptime: int = 0
    contact: str | None = None
    exit_policy: tuple[str, ...] = ("reject *:*",)
    family: tuple[str, ...] = ()
    hidden_service_dir: bool = False
    tunnelled_dir_server: bool = False
    bridge_distribution: str | None = None

    def __post_init__(self) -> None:
        if not NICKNAME_RE.match(self.nickname):
            raise ValueError(f"nickname {self.nickname!r}: 1-19 letters or digits")
        if ipaddress.ip_address(self.address).version != 4:
            raise ValueError(f"router address {self.address!r} must be IPv4")
        for port in (self.or_port, self.dir_port):
            if not 0 <= port <= 65535:
                raise ValueError(f"port {port} out of range")
        for text in (self.platform, self.protocols, self.contact or "",
                     self.bridge_distribution or "", *self.family):
            if not text.isascii() or not text.isprintable():
                raise ValueError(f"descriptor value {text!r}: printable ASCII on one line only")
        for line in self.exit_policy:
            check_policy_line(line)


def tap_crosscert(tap_onion_key: rsa.RSAPrivateKey, identity_digest: bytes,
                  ed25519_identity: bytes) -> bytes:
    """The ``onion-key-crosscert`` signature: the TAP key's raw PKCS#1 v1.5 signature of
    ``identity_digest | ed25519_identity`` (52 bytes). Any thread (pure)."""
    return rsa_sign_raw(tap_onion_key, identity_digest + ed25519_identity)


def _ntor_crosscert(ntor_secret: bytes, ed25519_identity: bytes,
                    expires_at: float) -> tuple[Ed25519Cert, int]:
    derived, sign_bit = ed25519_from_curve25519(ntor_secret)
    return make_ed_cert(derived, CERT_TYPE_NTOR_ONION_ID, ed25519_identity, expires_at), sign_bit


def build_server_descriptor(info: RouterInfo, *, identity_key: rsa.RSAPrivateKey,
                            signing_key: ExpandedEd25519Key, signing_cert: Ed25519Cert,
                            tap_onion_key: rsa.RSAPrivateKey | None, ntor_onion_secret: bytes,
                            published: float, ntor_crosscert_lifetime: int) -> str:
    """The signed descriptor text. ``signing_cert`` must be the type 4 certificate of
    ``signing_key`` with the master key included; the ntor cross-certificate is valid from
    ``published`` for ``ntor_crosscert_lifetime`` (tor: the onion key lifetime).
    ``tap_onion_key`` None leaves out ``onion-key`` and ``onion-key-crosscert`` (optional since
    tor 0.4.9, proposal 350: authorities of 0.4.9.11 still require them, later ones refuse
    them). Any thread (pure)."""
    master = signing_cert.signing_key
    if master is None or signing_cert.certified_key != signing_key.public:
        raise ValueError("signing_cert must certify signing_key and include the master key")
    identity_public = identity_key.public_key()
    digest = rsa_digest(identity_public)
    fingerprint = " ".join(digest.hex().upper()[i : i + 4] for i in range(0, 40, 4))
    ntor_cert, sign_bit = _ntor_crosscert(ntor_onion_secret, master,
                                          published + ntor_crosscert_lifetime)
    ntor_b = X25519PrivateKey.from_private_bytes(ntor_onion_secret).public_key()
    text = [
        f"router {info.nickname} {info.address} {info.or_port} 0 {info.dir_port}\n",
        "identity-ed25519\n", _object("ED25519 CERT", signing_cert.encoded),
        f"master-key-ed25519 {b64_nopad(master)}\n",
        f"platform {info.platform}\n",
        f"proto {info.protocols}\n",
        f"published {format_time(published)}\n",
        f"fingerprint {fingerprint}\n",
        f"uptime {info.uptime}\n",
        f"bandwidth {info.bandwidth_rate} {info.bandwidth_burst} {info.bandwidth_observed}\n",
    ]
    if tap_onion_key is not None:
        text += ["onion-key\n", _rsa_public_pem(tap_onion_key.public_key())]
    text += ["signing-key\n", _rsa_public_pem(identity_public)]
    if tap_onion_key is not None:
        text += ["onion-key-crosscert\n",
                 _object("CROSSCERT", tap_crosscert(tap_onion_key, digest, master))]
    text += [f"ntor-onion-key-crosscert {sign_bit}\n",
             _object("ED25519 CERT", ntor_cert.encoded)]
    if info.family:
        text.append(f"family {' '.join(info.family)}\n")
    if info.hidden_service_dir:
        text.append("hidden-service-dir\n")
    if info.contact:
        text.append(f"contact {info.contact}\n")
    if info.bridge_distribution:
        text.append(f"bridge-distribution-request {info.bridge_distribution.lower()}\n")
    text.append(f"ntor-onion-key {b64_nopad(ntor_b.public_bytes_raw())}\n")
    text.extend(f"{check_policy_line(line)}\n" for line in info.exit_policy or ("reject *:*",))
    if info.tunnelled_dir_server:
        text.append("tunnelled-dir-server\n")
    text.append("router-sig-ed25519 ")
    body = "".join(text).encode("ascii")
    ed_signature = signing_key.sign(sha256(ED_SIGNATURE_PREFIX + body).digest())
    body += f"{b64_nopad(ed_signature)}\nrouter-signature\n".encode("ascii")
    rsa_signature = rsa_sign_raw(identity_key, sha1(body).digest())
    return body.decode("ascii") + _object("SIGNATURE", rsa_signature)
