"""What a tor knows about the network, asked over its control port, and waiting for it.

A relay is usable on a client's circuit once the client's consensus lists it Running and Valid
(``GETINFO ns/id/HEX40``: the ``s`` line holds the flags) and the client holds its descriptor
(``GETINFO md/id/HEX40`` for a microdescriptor, ``desc/id/HEX40`` for a full descriptor, as a
bridge client keeps for its bridge). :func:`complete_bootstrap` then builds one circuit through
a chosen path: tor reports bootstrap "done" (100 %) when a first circuit completes, and with
predicted circuits off (:mod:`tornet.torrc`) that circuit must be the controller's.

Every wait polls every 0.2 s, runs ``check()`` each round (it raises to give up early, e.g.
when a process of the network died), and raises :class:`tornet.procs.NetworkFailed` with what
it saw when ``deadline`` (a ``time.monotonic()`` value) passes.

Threads: any thread (one control connection at a time, as :mod:`tornet.control` says).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence

from tornet.control import ControlConnection, ControlError
from tornet.procs import NetworkFailed
from tornet.push import build_circuit

__all__ = ["complete_bootstrap", "relay_flags", "wait_descriptor", "wait_listed"]

_POLL = 0.2


def relay_flags(control: ControlConnection, fingerprint: str) -> list[str]:
    """The flags ``control``'s tor's consensus gives the relay ([] when it is not listed).
    Any thread."""
    try:
        entry = control.getinfo(f"ns/id/{fingerprint}")
    except ControlError:
        return []
    return next((line.split()[1:] for line in entry.splitlines() if line.startswith("s ")), [])


def wait_listed(control: ControlConnection, name: str, fingerprint: str, deadline: float,
                check: Callable[[], None], explain: Callable[[], str] = lambda: "") -> None:
    """Until ``control``'s tor lists the relay Running and Valid. ``explain()`` adds context
    (e.g. the authority's log) to the error. Any thread."""
    while True:
        check()
        flags = relay_flags(control, fingerprint)
        if "Running" in flags and "Valid" in flags:
            return
        if time.monotonic() > deadline:
            raise NetworkFailed(f"{name} ({fingerprint}) is not in {control.name}'s consensus "
                                f"as a running relay (flags: {flags or 'not listed'})\n"
                                + explain())
        time.sleep(_POLL)


def wait_descriptor(control: ControlConnection, name: str, fingerprint: str, deadline: float,
                    check: Callable[[], None]) -> None:
    """Until ``control``'s tor holds a (micro)descriptor of the relay. Any thread."""
    while True:
        check()
        for key in (f"md/id/{fingerprint}", f"desc/id/{fingerprint}"):
            with contextlib.suppress(ControlError):
                if control.getinfo(key).strip():
                    return
        if time.monotonic() > deadline:
            raise NetworkFailed(f"{control.name} has no descriptor of {name} ({fingerprint})")
        time.sleep(_POLL)


def complete_bootstrap(control: ControlConnection, path: Sequence[str], deadline: float,
                       check: Callable[[], None]) -> None:
    """Wait until the client has enough directory information (75 %), build (and close) one
    circuit through ``path`` (HEX40s), and wait for bootstrap 100 %. Any thread."""
    control.wait_bootstrap(max(0.0, deadline - time.monotonic()), check, progress=75)
    control.setevents("CIRC")
    try:
        circuit = build_circuit(control, path, max(1.0, deadline - time.monotonic()), check)
        with contextlib.suppress(ControlError):
            control.command(f"CLOSECIRCUIT {circuit.id}")
    finally:
        control.setevents()
    control.wait_bootstrap(max(0.0, deadline - time.monotonic()), check)
