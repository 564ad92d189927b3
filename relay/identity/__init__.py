"""A Tor relay's identity and documents, the way tor 0.4.9 makes and checks them.

=====================  ===========================================================================
module                 what it does
=====================  ===========================================================================
``keys``               :class:`~relay.identity.keys.RelayIdentity`: every key of a relay, loaded
                       from or created in ``DATADIR/keys`` with tor's file names, and rotated
``periods``            tor's key lifetimes and renewal margins (:class:`KeyPeriods`)
``keyfiles``           tor's key file formats (PEM, tagged ``== type: tag ==`` files), 0600 writes
``curve_ed``           Ed25519 signing from an expanded secret key; curve25519 -> Ed25519
``rsaraw``             tor's RSA signatures (PKCS#1 v1.5 without DigestInfo); identity digests
``edcert``             Ed25519 certificates (cert-spec 2.1) and the RSA->Ed25519 crosscert (2.3)
``linkcerts``          X.509 TLS link and identity certificates; CERTS cell bodies
``certscell``          CERTS cell parsing; verifying a responder's or an initiator's certificates
``authenticate``       AUTH_CHALLENGE and AUTHENTICATE (method 3, Ed25519-SHA256-RFC5705)
``descriptor``         building and signing a server descriptor (dir-spec 2.1.1)
``descparse``          parsing a server descriptor and checking all its signatures
=====================  ===========================================================================

Everything is pure computation over bytes and ``cryptography`` objects, except the file I/O of
``keys`` and ``keyfiles`` (start-up and the rotation timer on the loop thread). No sockets.
"""
