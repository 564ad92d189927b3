"""The client: builds origin circuits over one link per guard relay, batching per iteration.

:class:`Client` is what a program uses to reach the relay network: :meth:`Client.build_circuit`
takes a path of :class:`relay.directory.RelayDescriptor` (guard first) and returns an
:class:`relay.origin.OriginCircuit` (building it, and the streams through it, is described in
:mod:`relay.origin`). The client keeps one :class:`relay.link.Link` per guard address, shared by
every circuit through that guard, and opens it on first use.

Per iteration, not per cell: a circuit's link handler only appends a read's RELAY payloads
(the link's framer groups them per circuit in C) and marks the circuit dirty; the first mark of
a loop iteration schedules :meth:`Client._flush` with ``Reactor.call_after_io``
(``relay.circuits.IterationFlush``), which lets each dirty circuit decrypt and handle its cells
in one batch.

Back-pressure on the guard link: while its write buffer is above the high watermark, circuits
stop packaging DATA and wait on the link; the low watermark releases them.

Threads: loop thread only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from reactor import Reactor
from relay.circuits import IterationFlush
from relay.directory import RelayDescriptor
from relay.link import Link
from relay.origin import ClientStream, OriginCircuit

__all__ = ["Client", "ClientStream", "OriginCircuit"]


class _GuardLink:
    """The client's view of one link to a guard."""

    __slots__ = ("blocked", "congested", "identity", "link", "open_waiters")

    def __init__(self, link: Link, identity: bytes) -> None:
        """Wrap a link to the guard whose RSA identity digest is ``identity``. Loop thread
        only."""
        self.link = link
        self.identity = identity
        self.open_waiters: list[OriginCircuit] = []
        self.congested = False
        self.blocked: dict[OriginCircuit, None] = {}


class Client:
    """Builds circuits and keeps one link per guard. Loop thread only."""

    def __init__(self, reactor: Reactor, *, build_timeout: float = 30.0,
                 name: str = "client", tls: bool = True) -> None:
        """Nothing connects before :meth:`build_circuit`. ``tls=False`` speaks plain links
        (the local demo's ``--plain-links`` relays only). Loop thread only."""
        self.reactor = reactor
        self.build_timeout = build_timeout
        self.name = name
        self.tls = tls
        self._guards: dict[tuple[tuple[str, int], bytes], _GuardLink] = {}
        self._by_link: dict[Link, _GuardLink] = {}
        self._dirty: IterationFlush[OriginCircuit] = IterationFlush(reactor.call_after_io,
                                                                     self._flush)
        self.circuits: set[OriginCircuit] = set()
        self.circuits_built = 0
        self.circuits_failed = 0

    def build_circuit(
        self,
        path: Sequence[RelayDescriptor],
        *,
        on_open: Callable[[OriginCircuit], None] | None = None,
        on_close: Callable[[OriginCircuit, str], None] | None = None,
    ) -> OriginCircuit:
        """Start building a circuit through ``path`` (guard first). Loop thread only."""
        circuit = OriginCircuit(self, path, on_open, on_close)
        self.circuits.add(circuit)
        guard = self._guard_link(path[0])
        if guard.link.is_open:
            circuit.start(guard.link, self.build_timeout)
        else:
            guard.open_waiters.append(circuit)
        return circuit

    def close(self) -> None:
        """Close every circuit and link. Loop thread only."""
        for circuit in list(self.circuits):
            circuit.close("client closing")
        for guard in list(self._guards.values()):
            guard.link.close("client closing")

    def stats(self) -> dict[str, Any]:
        """Counters as a plain dict. Loop thread only."""
        return {"circuits_open": len(self.circuits), "circuits_built": self.circuits_built,
                "circuits_failed_to_build": self.circuits_failed, "links": len(self._guards)}

    # ------------------------------------------------------------------ links

    def _guard_link(self, relay: RelayDescriptor) -> _GuardLink:
        key = ((relay.address, relay.port), relay.identity_digest)
        guard = self._guards.get(key)
        if guard is not None and not guard.link.closed:
            return guard
        link = Link.connect(self.reactor, relay.address, relay.port, tls=self.tls,
                            name=f"{self.name}->{relay.address}:{relay.port}",
                            on_open=self._on_link_open, on_close=self._on_link_closed)
        guard = _GuardLink(link, relay.identity_digest)
        self._guards[key] = guard
        self._by_link[link] = guard
        link.on_write_high = lambda: self._on_write_high(guard)
        link.on_write_low = lambda: self._on_write_low(guard)
        return guard

    def _on_link_open(self, link: Link) -> None:
        guard = self._by_link.get(link)
        if guard is None:
            return
        proved = link.peer_identity
        if self.tls and (proved is None or proved.rsa_digest != guard.identity):
            link.close(f"the guard at {link.name} is not the relay we asked for: wanted "
                       f"{guard.identity.hex().upper()}, got "
                       f"{proved.fingerprint if proved else 'no identity'}")
            return
        open_waiters, guard.open_waiters = guard.open_waiters, []
        for circuit in open_waiters:
            if circuit.state == "connecting":
                circuit.start(link, self.build_timeout)

    def _on_link_closed(self, link: Link, reason: str) -> None:
        guard = self._by_link.pop(link, None)
        if guard is None:
            return
        for address, known in list(self._guards.items()):
            if known is guard:
                del self._guards[address]
        open_waiters, guard.open_waiters = guard.open_waiters, []
        for circuit in open_waiters:
            circuit.close(f"link to the guard failed: {reason}", send_destroy=False)

    def _on_write_high(self, guard: _GuardLink) -> None:
        guard.congested = True

    def _on_write_low(self, guard: _GuardLink) -> None:
        guard.congested = False
        blocked, guard.blocked = guard.blocked, {}
        for circuit in blocked:
            circuit.unblock()

    def link_congested(self, circuit: OriginCircuit) -> bool:
        """True while ``circuit``'s guard link is above its high watermark. Loop thread only."""
        guard = self._by_link.get(circuit.link) if circuit.link is not None else None
        return guard is not None and guard.congested

    def block_on_link(self, circuit: OriginCircuit) -> None:
        """Call ``circuit.unblock()`` when its guard link drains. Loop thread only."""
        guard = self._by_link.get(circuit.link) if circuit.link is not None else None
        if guard is not None:
            guard.blocked[circuit] = None

    # ------------------------------------------------------------------ batching

    def mark_dirty(self, circuit: OriginCircuit) -> None:
        """Flush ``circuit`` at the end of this loop iteration. Loop thread only."""
        self._dirty.mark(circuit)

    def _flush(self, dirty: list[OriginCircuit]) -> None:
        for circuit in dirty:
            circuit.flush_in()

    def circuit_closed(self, circuit: OriginCircuit) -> None:
        """Forget a closed circuit (counted as failed if it never opened). Loop thread only."""
        self.circuits.discard(circuit)
        if circuit.crypto is None or circuit.crypto.n_hops < len(circuit.path):
            self.circuits_failed += 1
