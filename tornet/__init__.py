"""tornet: a private Tor network of real tor processes on loopback, for relaycrypt's relays.

:class:`tornet.network.TorNet` starts a directory authority, tor relays, external relays (any
program speaking :mod:`tornet.external`'s command line and READY line: by default relaycrypt's
``python -m examples.relay``, or the stand-in :mod:`tornet.standin`), a client and an echo
service, in a fresh network namespace when permitted, and pushes bytes through circuits pinned
hop by hop. The modules, one job each: :mod:`~tornet.torrc` (torrc text), :mod:`~tornet.keys`
(authority keys), :mod:`~tornet.procs` (processes, watchdog, signals), :mod:`~tornet.netns`
(namespace), :mod:`~tornet.tornode` (one tor process), :mod:`~tornet.control` (control
protocol), :mod:`~tornet.socks` (SOCKS5), :mod:`~tornet.push` (pinned streams, verified
transfers), :mod:`~tornet.cpu` (CPU from /proc), :mod:`~tornet.external` (the external-relay
contract).
"""
