"""Who is at each end of a link: our credentials for one link, and what the peer proved.

A relay authenticates on every link it takes part in (tor-spec 4.2-4.4):

* as the **responder** it sends CERTS (types 1, 2, 4, 5, 7) that bind the TLS certificate the
  link runs on to its RSA and Ed25519 identities, and AUTH_CHALLENGE inviting the initiator to
  authenticate;
* as the **initiator** it answers AUTH_CHALLENGE with CERTS (types 2, 4, 6, 7) and AUTHENTICATE
  (method 3, Ed25519-SHA256-RFC5705), signed with its link authentication key, so the
  responder knows the link comes from a relay and which one (an exit refuses streams on a link
  whose initiator did not authenticate: it looks like a client's first hop).

:class:`LinkCredentials` is the part of a :class:`relay.identity.keys.RelayIdentity` one link
uses, taken when the link starts: the TLS certificates rotate every few hours, and a link keeps
sending the CERTS that match the certificate its TLS session presented (as tor does). A client
link has no credentials. :class:`PeerIdentity` is what the other end proved.

Threads: plain values; any thread.
"""

from __future__ import annotations

from dataclasses import dataclass

from relay.identity.curve_ed import ExpandedEd25519Key
from relay.identity.keys import RelayIdentity
from relay.tlscontext import TlsServerContext

__all__ = ["LinkCredentials", "PeerIdentity", "ServerCredentials"]


@dataclass(frozen=True)
class LinkCredentials:
    """Our side of one link: the CERTS bodies for either role and what AUTHENTICATE needs."""

    identity_digest: bytes  # SHA-1 of our RSA identity key (the fingerprint)
    identity_digest256: bytes  # SHA-256 of it: AUTHENTICATE's CID / SID
    ed25519_identity: bytes
    responder_certs: bytes  # CERTS types 1, 2, 4, 5, 7 for the TLS certificate of this link
    initiator_certs: bytes  # CERTS types 2, 4, 6, 7
    auth_key: ExpandedEd25519Key  # signs AUTHENTICATE (certified by type 6)

    @classmethod
    def of(cls, identity: RelayIdentity) -> LinkCredentials:
        """The credentials ``identity`` holds now (its current TLS certificates). Any thread
        (pure; the identity must not rotate meanwhile: the loop thread owns it)."""
        return cls(
            identity_digest=identity.identity_digest,
            identity_digest256=identity.identity_digest256,
            ed25519_identity=identity.ed25519_identity,
            responder_certs=identity.responder_certs_body(),
            initiator_certs=identity.initiator_certs_body(),
            auth_key=identity.auth_key,
        )


@dataclass(frozen=True)
class ServerCredentials:
    """What a relay accepts links with: a TLS server context and the credentials that match
    its certificate. Replaced as a whole when the TLS certificates rotate."""

    tls: TlsServerContext
    link: LinkCredentials

    @classmethod
    def of(cls, identity: RelayIdentity) -> ServerCredentials:
        """A TLS context for ``identity``'s current link certificate, with its credentials.
        Loop thread (the identity's owner)."""
        tls = TlsServerContext(identity.tls.link_cert, identity.tls.link_key)
        return cls(tls, LinkCredentials.of(identity))


@dataclass(frozen=True)
class PeerIdentity:
    """Who the other end of a link proved to be.

    ``rsa_digest`` is its RSA identity digest (20 bytes; :attr:`fingerprint` in hex),
    ``ed25519`` its Ed25519 identity when its certificates bound one. ``authenticated`` is True
    when the peer proved it is that relay for this very link: always for a responder we
    connected to over TLS (its CERTS bind the TLS certificate), and for an initiator only after
    a valid AUTHENTICATE. A client (an initiator that does not authenticate) has no
    PeerIdentity at all.
    """

    rsa_digest: bytes
    ed25519: bytes | None
    authenticated: bool

    @property
    def fingerprint(self) -> str:
        """The RSA identity digest as 40 upper-case hex digits. Any thread."""
        return self.rsa_digest.hex().upper()
