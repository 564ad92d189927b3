"""Shared fixtures: ONE private Tor network (tornet) per test session.

``tornet_network`` starts a :class:`tornet.network.TorNet` the first time a test asks for it:
an authority, tor relays t1-t3, a client, an echo service and two relaycrypt relays
(``python -m examples.relay``: ``xrelay``, an exit; ``xbridge``, a bridge with its own bridge
client), in a fresh network namespace when permitted. Every later test reuses it; it is
stopped at the end of the session, and the teardown then checks that every process it
started, and every descendant of those seen just before the stop, is gone (a leftover fails
the session's last test with the pids).

Skipped when tor or tor-gencert is missing, unless the ``CI`` environment variable is set: then
missing tor is a failure (``tools/install_tor.sh`` installs it), as in test_tor_interop.py.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tornet.cpu import descendants
from tornet.network import TorNet
from tornet.procs import alive_of, process_identity
from tornet.tornode import find_program


@pytest.fixture(scope="session")
def tor_programs() -> None:
    """Skip (or, with CI set, fail) when tor or tor-gencert is not installed."""
    missing = [name for name in ("tor", "tor-gencert") if find_program(name) is None]
    if not missing:
        return
    if os.environ.get("CI"):
        pytest.fail(f"{' and '.join(missing)} missing, and CI must run the tornet tests: run "
                    "tools/install_tor.sh (as root) before the suite")
    pytest.skip(f"{' and '.join(missing)} not installed (tools/install_tor.sh installs "
                "them); set CI=1 to make this a failure")


@pytest.fixture(scope="session")
def tornet_network(tor_programs: None) -> Iterator[TorNet]:
    """The session's private Tor network, started and bootstrapped."""
    net = TorNet()
    net.add_external_relay("xrelay", exit=True)
    net.add_external_relay("xbridge", exit=False, bridge=True)
    net.start(timeout=150)
    try:
        yield net
    finally:
        pids = net.pids()
        tree = {identity for pid in pids for member in [pid, *descendants(pid)]
                if (identity := process_identity(member)) is not None}
        net.stop()
        left = alive_of(tree)
        assert not left, f"tornet left processes running after stop: {left}"
