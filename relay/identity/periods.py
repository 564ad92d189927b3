"""How long a relay's keys and certificates live, and when they are renewed: tor's defaults.

Each constant names the tor option or source constant it comes from. :class:`KeyPeriods`
bundles them; a testing network may shorten them, as tor's ``Testing*`` options do (each
lifetime must exceed twice its renewal margin, as tor requires). The ``ROTATE_*`` names are
what :meth:`relay.identity.keys.RelayIdentity.needs_rotation` reports.

Threads: constants and an immutable value; any thread.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "AUTH_KEY_LIFETIME",
    "AUTH_KEY_SLOP",
    "DAY",
    "HOUR",
    "LINK_CERT_LIFETIME",
    "LINK_KEY_SLOP",
    "ONION_KEY_GRACE_PERIOD",
    "ONION_KEY_LIFETIME",
    "ROTATE_AUTH_KEY",
    "ROTATE_LINK_CERT",
    "ROTATE_OLD_ONION_KEYS",
    "ROTATE_ONION_KEYS",
    "ROTATE_RSA_CROSSCERT",
    "ROTATE_SIGNING_KEY",
    "ROTATE_TLS",
    "RSA_CROSSCERT_LIFETIME",
    "RSA_CROSSCERT_SLOP",
    "SIGNING_KEY_LIFETIME",
    "SIGNING_KEY_SLOP",
    "TLS_ROTATION_INTERVAL",
    "KeyPeriods",
]

HOUR = 3600
DAY = 24 * HOUR
SIGNING_KEY_LIFETIME = 30 * DAY  # SigningKeyLifetime
SIGNING_KEY_SLOP = 1 * DAY  # TestingSigningKeySlop
LINK_CERT_LIFETIME = 2 * DAY  # TestingLinkCertLifetime
LINK_KEY_SLOP = 3 * HOUR  # TestingLinkKeySlop
AUTH_KEY_LIFETIME = 2 * DAY  # TestingAuthKeyLifetime
AUTH_KEY_SLOP = 3 * HOUR  # TestingAuthKeySlop
RSA_CROSSCERT_LIFETIME = 6 * 30 * DAY
RSA_CROSSCERT_SLOP = 30 * DAY
ONION_KEY_LIFETIME = 28 * DAY  # DEFAULT_ONION_KEY_LIFETIME_DAYS
ONION_KEY_GRACE_PERIOD = 7 * DAY  # DEFAULT_ONION_KEY_GRACE_PERIOD_DAYS
TLS_ROTATION_INTERVAL = 2 * HOUR  # MAX_SSL_KEY_LIFETIME_INTERNAL

ROTATE_SIGNING_KEY = "signing-key"
ROTATE_AUTH_KEY = "auth-key"
ROTATE_LINK_CERT = "link-cert"
ROTATE_TLS = "tls"
ROTATE_RSA_CROSSCERT = "rsa-crosscert"
ROTATE_ONION_KEYS = "onion-keys"
ROTATE_OLD_ONION_KEYS = "old-onion-keys"



@dataclass(frozen=True)
class KeyPeriods:
    """Lifetimes and renewal margins, in seconds; the defaults are tor's. A testing network
    may shorten them (tor's ``Testing*`` options); each lifetime must exceed twice its slop,
    as tor requires."""

    signing_key_lifetime: int = SIGNING_KEY_LIFETIME
    signing_key_slop: int = SIGNING_KEY_SLOP
    link_cert_lifetime: int = LINK_CERT_LIFETIME
    link_key_slop: int = LINK_KEY_SLOP
    auth_key_lifetime: int = AUTH_KEY_LIFETIME
    auth_key_slop: int = AUTH_KEY_SLOP
    rsa_crosscert_lifetime: int = RSA_CROSSCERT_LIFETIME
    rsa_crosscert_slop: int = RSA_CROSSCERT_SLOP
    onion_key_lifetime: int = ONION_KEY_LIFETIME
    onion_key_grace_period: int = ONION_KEY_GRACE_PERIOD
    tls_rotation_interval: int = TLS_ROTATION_INTERVAL
    tls_cert_lifetime: int | None = None  # None: random 5-365 days, as tor

    def __post_init__(self) -> None:
        for lifetime, slop in ((self.signing_key_lifetime, self.signing_key_slop),
                               (self.link_cert_lifetime, self.link_key_slop),
                               (self.auth_key_lifetime, self.auth_key_slop),
                               (self.rsa_crosscert_lifetime, self.rsa_crosscert_slop)):
            if slop <= 0 or lifetime < 2 * slop:
                raise ValueError(f"a lifetime of {lifetime} s needs a positive slop of at "
                                 f"most half of it, got {slop} s")
        if not 0 < self.onion_key_grace_period <= self.onion_key_lifetime:
            raise ValueError("the onion key grace period must be positive and at most the "
                             "onion key lifetime")
        if self.tls_rotation_interval <= 0:
            raise ValueError("the TLS rotation interval must be positive")
