"""A relay's keys as tor keeps them: created or loaded from ``DATADIR/keys/``, and rotated.

Keys and what they are for
--------------------------
==============================  ===============================================  ===========
key                             role                                             kept
==============================  ===============================================  ===========
RSA-1024 identity               the fingerprint; signs descriptors, X.509 certs  on disk
Ed25519 master identity         signs the signing key's certificate (type 4)     on disk
Ed25519 signing key + cert 4    signs descriptors, link certs 5 and 6            on disk
TAP onion key (RSA-1024)        ``onion-key`` + crosscert (authorities want it)  on disk
ntor onion key (curve25519)     the ntor handshake                               on disk
RSA->Ed25519 crosscert (7)      binds the two identities on links                in memory
link auth key + cert 6          signs AUTHENTICATE when this relay initiates     in memory
TLS context + Ed25519 cert 5    the TLS link key and certificates                in memory
==============================  ===============================================  ===========

File names and formats are tor's (:mod:`relay.identity.keyfiles`), so tor reads a data
directory written here and :meth:`RelayIdentity.load_or_create` reads one tor wrote.
``DATADIR/fingerprint`` holds ``"Nickname FINGERPRINT\\n"`` and ``DATADIR/fingerprint-ed25519``
``"Nickname BASE64-ED25519-ID\\n"``; directories are mode 0700, files 0600.

Rotation (tor's defaults, :class:`relay.identity.periods.KeyPeriods`)
----------------------------------------------
* signing key: a new key and type 4 certificate valid ``signing_key_lifetime`` (30 days) once
  the current one expires within ``signing_key_slop`` (1 day); a new signing key also renews
  the link authentication key and re-signs the TLS certificate (type 5);
* link authentication key (type 6): valid 2 days, renewed 3 hours before it expires;
* type 5 certificate: valid 2 days, renewed 3 hours before expiry and for every new TLS context;
* TLS context: replaced every ``tls_rotation_interval`` (2 hours);
* RSA->Ed25519 crosscert: valid 6 x 30 days, renewed 30 days before it expires;
* onion keys: replaced every ``onion_key_lifetime`` (28 days, the consensus parameter
  ``onion-key-rotation-days``); the previous pair moves to ``secret_onion_key.old`` and
  ``secret_onion_key_ntor.old`` and still answers CREATEs for ``onion_key_grace_period``
  (7 days, ``onion-key-grace-period-days``) after the rotation, then is deleted.

tor records when the onion keys were made in its ``state`` file; here it is the modification
time of ``secret_onion_key_ntor`` (set when the file is written).

:meth:`RelayIdentity.needs_rotation` says what is due at a given time (pure);
:meth:`RelayIdentity.rotate` does it. Whoever owns the relay calls ``rotate`` from a timer
(tor checks every 30 s) and, when it reports a change, rebuilds the descriptor and TLS context.

Threads: :meth:`RelayIdentity.load_or_create` and :meth:`RelayIdentity.rotate` do blocking
file I/O: call them at start-up and from a timer on the loop thread. A ``RelayIdentity`` is
mutable (rotation replaces keys one attribute at a time), so it belongs to that thread: what
reads keys that rotate replaces (onion keys, certificates, the TLS context, the descriptor) is
loop thread only; the identity fingerprint, its digest and the master key never change and may
be read from any thread.
"""

from __future__ import annotations

import base64
import os
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from relay.identity import keyfiles
from relay.identity.curve_ed import (
    CURVE25519_KEY_LEN,
    ED25519_EXPANDED_KEY_LEN,
    ED25519_KEY_LEN,
    ExpandedEd25519Key,
    clamp_curve25519,
)
from relay.identity.descriptor import RouterInfo, build_server_descriptor
from relay.identity.edcert import (
    CERT_TYPE_ID_SIGNING,
    CERT_TYPE_SIGNING_AUTH,
    CERT_TYPE_SIGNING_LINK,
    KEY_TYPE_SHA256_OF_X509,
    CertError,
    Ed25519Cert,
    make_ed_cert,
    make_rsa_crosscert,
    parse_ed_cert,
)
from relay.identity.linkcerts import (
    initiator_certs_body,
    make_tls_link_certs,
    responder_certs_body,
)
from relay.identity.periods import (
    ROTATE_AUTH_KEY,
    ROTATE_LINK_CERT,
    ROTATE_OLD_ONION_KEYS,
    ROTATE_ONION_KEYS,
    ROTATE_RSA_CROSSCERT,
    ROTATE_SIGNING_KEY,
    ROTATE_TLS,
    KeyPeriods,
)
from relay.identity.rsaraw import RSA_KEY_BITS, rsa_digest, rsa_digest256

__all__ = [
    "ROTATE_AUTH_KEY",
    "ROTATE_LINK_CERT",
    "ROTATE_OLD_ONION_KEYS",
    "ROTATE_ONION_KEYS",
    "ROTATE_RSA_CROSSCERT",
    "ROTATE_SIGNING_KEY",
    "ROTATE_TLS",
    "KeyPeriods",
    "OnionKeys",
    "RelayIdentity",
]

_MASTER_TAG = "type0"
_SIGNING_TAG = f"type{CERT_TYPE_ID_SIGNING}"


@dataclass(frozen=True)
class OnionKeys:
    """One generation of onion keys: TAP (RSA-1024) and ntor (clamped curve25519 secret), and
    when it became current (0 for a previous generation loaded from ``*.old`` files, whose
    validity is counted from the current generation's ``set_at``)."""

    tap: rsa.RSAPrivateKey
    ntor_secret: bytes
    set_at: float

    @property
    def ntor(self) -> X25519PrivateKey:
        """The ntor key as a ``cryptography`` object. Any thread."""
        return X25519PrivateKey.from_private_bytes(self.ntor_secret)


def _new_onion_keys(now: float) -> OnionKeys:
    return OnionKeys(rsa.generate_private_key(65537, RSA_KEY_BITS),
                     clamp_curve25519(os.urandom(CURVE25519_KEY_LEN)), now)


class RelayIdentity:
    """Every key of one relay, loaded from or saved to its data directory (see the module
    docstring). Owned by the loop thread; only the identity's fingerprint, digest and master key
    may be read from other threads."""

    def __init__(self, data_dir: Path, nickname: str, periods: KeyPeriods,
                 identity_key: rsa.RSAPrivateKey, master: ExpandedEd25519Key,
                 onion: OnionKeys, previous_onion: OnionKeys | None, now: float) -> None:
        """Assemble an identity from loaded keys and make the in-memory certificates (use
        :meth:`load_or_create`). Loop thread (start-up)."""
        self.data_dir = data_dir
        self.keys_dir = data_dir / "keys"
        self.nickname = nickname
        self.periods = periods
        self.identity_key = identity_key
        self.identity_digest = rsa_digest(identity_key.public_key())
        self.master = master
        self.onion = onion
        self.previous_onion = previous_onion
        self.signing_key, self.signing_cert = self._load_signing(now)
        self.rsa_crosscert = make_rsa_crosscert(
            master.public, identity_key, now + periods.rsa_crosscert_lifetime)
        self.rsa_crosscert_expires = now + periods.rsa_crosscert_lifetime
        self.auth_key, self.auth_cert = self._new_auth(now)
        self.tls = make_tls_link_certs(identity_key, now, periods.tls_cert_lifetime)
        self.link_cert = self._new_link_cert(now)

    # -- loading -------------------------------------------------------------------------

    @classmethod
    def load_or_create(cls, data_dir: str | os.PathLike[str], nickname: str,
                       now: float | None = None,
                       periods: KeyPeriods | None = None) -> RelayIdentity:
        """Load every key from ``data_dir/keys`` (creating what is missing, as tor does),
        renew an expiring signing key, and write the fingerprint files. Raises
        :class:`relay.identity.keyfiles.KeyFileError` for a file tor would refuse.
        Start-up on the loop thread (blocking file I/O)."""
        when = time.time() if now is None else now
        data = keyfiles.ensure_private_dir(data_dir)
        keys = keyfiles.ensure_private_dir(data / "keys")
        identity = cls._load_rsa(keys / "secret_id_key")
        master = cls._load_master(keys)
        onion, previous = cls._load_onion(keys, when)
        self = cls(data, nickname, periods or KeyPeriods(), identity, master, onion, previous,
                   when)
        self._write_fingerprints()
        return self

    @staticmethod
    def _load_rsa(path: Path) -> rsa.RSAPrivateKey:
        if path.exists():
            key = keyfiles.read_rsa_private(path)
            if key.key_size != RSA_KEY_BITS:
                raise keyfiles.KeyFileError(f"{path}: {key.key_size}-bit key, tor's are "
                                            f"{RSA_KEY_BITS}-bit")
            return key
        key = rsa.generate_private_key(65537, RSA_KEY_BITS)
        keyfiles.write_rsa_private(path, key)
        return key

    @staticmethod
    def _load_master(keys: Path) -> ExpandedEd25519Key:
        secret_path = keys / "ed25519_master_id_secret_key"
        public_path = keys / "ed25519_master_id_public_key"
        if not secret_path.exists():
            if public_path.exists():
                raise keyfiles.KeyFileError(f"{secret_path} is missing (an offline master key "
                                            "is not supported)")
            master = ExpandedEd25519Key.generate()
            keyfiles.write_tagged(secret_path, keyfiles.ED_SECRET_TYPE, _MASTER_TAG,
                                  master.expanded)
            keyfiles.write_tagged(public_path, keyfiles.ED_PUBLIC_TYPE, _MASTER_TAG,
                                  master.public)
            return master
        tag, expanded = keyfiles.read_tagged(secret_path, keyfiles.ED_SECRET_TYPE,
                                             ED25519_EXPANDED_KEY_LEN)
        if tag != _MASTER_TAG:
            raise keyfiles.KeyFileError(f"{secret_path}: tag {tag!r}, expected {_MASTER_TAG!r}")
        master = ExpandedEd25519Key(expanded)
        if public_path.exists():
            _tag, public = keyfiles.read_tagged(public_path, keyfiles.ED_PUBLIC_TYPE,
                                                ED25519_KEY_LEN)
            if public != master.public:
                raise keyfiles.KeyFileError(f"{public_path} does not match {secret_path}")
        else:
            keyfiles.write_tagged(public_path, keyfiles.ED_PUBLIC_TYPE, _MASTER_TAG,
                                  master.public)
        return master

    @staticmethod
    def _load_onion(keys: Path, now: float) -> tuple[OnionKeys, OnionKeys | None]:
        tap_path, ntor_path = keys / "secret_onion_key", keys / "secret_onion_key_ntor"
        tap = RelayIdentity._load_rsa(tap_path)
        if ntor_path.exists():
            ntor = keyfiles.read_curve25519(ntor_path)
            set_at = min(ntor_path.stat().st_mtime, now)
        else:
            ntor = clamp_curve25519(os.urandom(CURVE25519_KEY_LEN))
            keyfiles.write_curve25519(ntor_path, ntor)
            os.utime(ntor_path, (now, now))
            set_at = now
        previous = None
        old_tap, old_ntor = keys / "secret_onion_key.old", keys / "secret_onion_key_ntor.old"
        if old_ntor.exists() and old_tap.exists():
            previous = OnionKeys(keyfiles.read_rsa_private(old_tap),
                                 keyfiles.read_curve25519(old_ntor), 0.0)
        return OnionKeys(tap, clamp_curve25519(ntor), set_at), previous

    def _load_signing(self, now: float) -> tuple[ExpandedEd25519Key, Ed25519Cert]:
        secret_path = self.keys_dir / "ed25519_signing_secret_key"
        cert_path = self.keys_dir / "ed25519_signing_cert"
        try:
            tag, expanded = keyfiles.read_tagged(secret_path, keyfiles.ED_SECRET_TYPE,
                                                 ED25519_EXPANDED_KEY_LEN)
            key = ExpandedEd25519Key(expanded)
            cert_tag, raw = keyfiles.read_tagged(
                cert_path, keyfiles.ED_CERT_TYPE, cert_path.stat().st_size - 32)
            cert = parse_ed_cert(raw, str(cert_path))
            cert.check(self.master.public, now=now)
            usable = (tag == cert_tag == _SIGNING_TAG and cert.certified_key == key.public
                      and cert.cert_type == CERT_TYPE_ID_SIGNING)
        except (OSError, ValueError):  # absent, unreadable, malformed, expired, badly signed
            usable = False
        if usable and cert.expires_at - now > self.periods.signing_key_slop:
            return key, cert
        return self._new_signing(now)

    # -- making keys and certificates ----------------------------------------------------

    def _new_signing(self, now: float) -> tuple[ExpandedEd25519Key, Ed25519Cert]:
        key = ExpandedEd25519Key.generate()
        cert = make_ed_cert(self.master, CERT_TYPE_ID_SIGNING, key.public,
                            now + self.periods.signing_key_lifetime, include_signing_key=True)
        keyfiles.write_tagged(self.keys_dir / "ed25519_signing_secret_key",
                              keyfiles.ED_SECRET_TYPE, _SIGNING_TAG, key.expanded)
        keyfiles.write_tagged(self.keys_dir / "ed25519_signing_cert", keyfiles.ED_CERT_TYPE,
                              _SIGNING_TAG, cert.encoded)
        return key, cert

    def _new_auth(self, now: float) -> tuple[ExpandedEd25519Key, Ed25519Cert]:
        key = ExpandedEd25519Key.generate()
        return key, make_ed_cert(self.signing_key, CERT_TYPE_SIGNING_AUTH, key.public,
                                 now + self.periods.auth_key_lifetime)

    def _new_link_cert(self, now: float) -> Ed25519Cert:
        return make_ed_cert(self.signing_key, CERT_TYPE_SIGNING_LINK, self.tls.link_cert_sha256,
                            now + self.periods.link_cert_lifetime,
                            key_type=KEY_TYPE_SHA256_OF_X509)

    def _write_fingerprints(self) -> None:
        ed = base64.b64encode(self.master.public).decode("ascii").rstrip("=")
        for name, value in (("fingerprint", self.fingerprint), ("fingerprint-ed25519", ed)):
            line = f"{self.nickname} {value}\n".encode("ascii")
            path = self.data_dir / name
            if not path.exists() or path.read_bytes() != line:
                keyfiles.write_private_file(path, line)

    # -- what the relay uses -------------------------------------------------------------

    @property
    def fingerprint(self) -> str:
        """The RSA identity fingerprint, 40 upper-case hex digits. Any thread (pure)."""
        return self.identity_digest.hex().upper()

    @property
    def identity_digest256(self) -> bytes:
        """SHA-256 of the RSA identity key (AUTHENTICATE's CID/SID). Any thread (pure)."""
        return rsa_digest256(self.identity_key.public_key())

    @property
    def ed25519_identity(self) -> bytes:
        """The Ed25519 master identity key (32 bytes). Any thread (pure)."""
        return self.master.public

    @property
    def ntor_onion_key(self) -> bytes:
        """The current ntor onion key ``B`` (32 bytes, what descriptors publish).
        Loop thread only (reads keys rotate replaces)."""
        return self.onion.ntor.public_key().public_bytes_raw()

    def _previous_valid(self, now: float) -> bool:
        return (self.previous_onion is not None
                and now < self.onion.set_at + self.periods.onion_key_grace_period)

    def ntor_onion_keys(self, now: float) -> tuple[X25519PrivateKey, ...]:
        """The ntor keys a server handshake may use at ``now``: the current key, then the
        previous one during its grace period. Wrap one as
        ``NtorServerKey(identity.identity_digest, key)``. Loop thread only (reads keys rotate
        replaces)."""
        keys = [self.onion.ntor]
        if self._previous_valid(now):
            assert self.previous_onion is not None
            keys.append(self.previous_onion.ntor)
        return tuple(keys)

    def ntor_key_for(self, public: bytes, now: float) -> X25519PrivateKey | None:
        """The valid ntor key whose public key is ``public`` (the KEYID a CREATE2 names), or
        None. Loop thread only (reads keys rotate replaces)."""
        for key in self.ntor_onion_keys(now):
            if key.public_key().public_bytes_raw() == public:
                return key
        return None

    def tap_onion_keys(self, now: float) -> tuple[rsa.RSAPrivateKey, ...]:
        """The TAP onion keys valid at ``now``, current first. Loop thread only (reads keys
        rotate replaces)."""
        if self._previous_valid(now):
            assert self.previous_onion is not None
            return (self.onion.tap, self.previous_onion.tap)
        return (self.onion.tap,)

    def responder_certs_body(self) -> bytes:
        """The CERTS body to send as a link's responder (types 1, 2, 4, 5, 7) for the current
        TLS context. Loop thread only (reads keys rotate replaces)."""
        return responder_certs_body(self.tls, self.signing_cert, self.link_cert,
                                    self.rsa_crosscert)

    def initiator_certs_body(self) -> bytes:
        """The CERTS body to send as a link's initiator (types 2, 4, 6, 7).
        Loop thread only (reads keys rotate replaces)."""
        return initiator_certs_body(self.tls.identity_cert_der, self.signing_cert,
                                    self.auth_cert, self.rsa_crosscert)

    # -- rotation ------------------------------------------------------------------------

    def needs_rotation(self, now: float) -> frozenset[str]:
        """What :meth:`rotate` would replace at ``now`` (``ROTATE_*`` names).
        Loop thread only (reads keys rotate replaces)."""
        p = self.periods
        due = set()
        if self.signing_cert.expires_at - now <= p.signing_key_slop:
            due.add(ROTATE_SIGNING_KEY)
        if self.auth_cert.expires_at - now <= p.auth_key_slop:
            due.add(ROTATE_AUTH_KEY)
        if now >= self.tls.created_at + p.tls_rotation_interval:
            due.add(ROTATE_TLS)
        if self.link_cert.expires_at - now <= p.link_key_slop:
            due.add(ROTATE_LINK_CERT)
        if self.rsa_crosscert_expires - now <= p.rsa_crosscert_slop:
            due.add(ROTATE_RSA_CROSSCERT)
        if now >= self.onion.set_at + p.onion_key_lifetime:
            due.add(ROTATE_ONION_KEYS)
        elif self.previous_onion is not None and not self._previous_valid(now):
            due.add(ROTATE_OLD_ONION_KEYS)
        return frozenset(due)

    def rotate(self, now: float) -> frozenset[str]:
        """Replace whatever :meth:`needs_rotation` reports (and what depends on it: a new
        signing key brings a new auth key and type 5 certificate, a new TLS context a new type
        5 certificate), saving on-disk keys first. Returns what changed; when it is not empty
        the descriptor (onion or signing keys) or the TLS context (``ROTATE_TLS``) must be
        rebuilt. Loop thread (timer; blocking file I/O)."""
        due = set(self.needs_rotation(now))
        if ROTATE_SIGNING_KEY in due:
            self.signing_key, self.signing_cert = self._new_signing(now)
            due |= {ROTATE_AUTH_KEY, ROTATE_LINK_CERT}
        if ROTATE_RSA_CROSSCERT in due:
            self.rsa_crosscert_expires = now + self.periods.rsa_crosscert_lifetime
            self.rsa_crosscert = make_rsa_crosscert(self.master.public, self.identity_key,
                                                    self.rsa_crosscert_expires)
        if ROTATE_AUTH_KEY in due:
            self.auth_key, self.auth_cert = self._new_auth(now)
        if ROTATE_TLS in due:
            self.tls = make_tls_link_certs(self.identity_key, now,
                                           self.periods.tls_cert_lifetime)
            due.add(ROTATE_LINK_CERT)
        if ROTATE_LINK_CERT in due:
            self.link_cert = self._new_link_cert(now)
        if ROTATE_ONION_KEYS in due:
            self._rotate_onion(now)
        elif ROTATE_OLD_ONION_KEYS in due:
            self._expire_old_onion()
        return frozenset(due)

    def _rotate_onion(self, now: float) -> None:
        fresh = _new_onion_keys(now)
        keys = self.keys_dir
        os.replace(keys / "secret_onion_key", keys / "secret_onion_key.old")
        os.replace(keys / "secret_onion_key_ntor", keys / "secret_onion_key_ntor.old")
        keyfiles.write_rsa_private(keys / "secret_onion_key", fresh.tap)
        keyfiles.write_curve25519(keys / "secret_onion_key_ntor", fresh.ntor_secret)
        os.utime(keys / "secret_onion_key_ntor", (now, now))
        self.previous_onion, self.onion = self.onion, fresh

    def _expire_old_onion(self) -> None:
        for name in ("secret_onion_key.old", "secret_onion_key_ntor.old"):
            (self.keys_dir / name).unlink(missing_ok=True)
        self.previous_onion = None

    def server_descriptor(self, info: RouterInfo, now: float, *, with_tap: bool = True) -> str:
        """This relay's signed server descriptor, published at ``now``, with the current
        keys (see :mod:`relay.identity.descriptor`); ``with_tap`` False leaves the TAP onion
        key out. Loop thread only (reads keys rotate replaces)."""
        return build_server_descriptor(
            info, identity_key=self.identity_key, signing_key=self.signing_key,
            signing_cert=self.signing_cert, tap_onion_key=self.onion.tap if with_tap else None,
            ntor_onion_secret=self.onion.ntor_secret, published=now,
            ntor_crosscert_lifetime=self.periods.onion_key_lifetime)

    def check_consistency(self, now: float) -> None:
        """Re-check every certificate this identity hands out against its keys at ``now``;
        raises :class:`relay.identity.edcert.CertError` on the first that fails (a guard for
        tests and start-up). Loop thread only (reads keys rotate replaces)."""
        self.signing_cert.check(self.master.public, now=now, what="signing certificate")
        if self.signing_cert.certified_key != self.signing_key.public:
            raise CertError("signing certificate certifies another key")
        self.auth_cert.check(self.signing_key.public, now=now, what="auth certificate")
        self.link_cert.check(self.signing_key.public, now=now, what="link certificate")
        if self.link_cert.certified_key != self.tls.link_cert_sha256:
            raise CertError("link certificate (type 5) certifies another TLS certificate")
