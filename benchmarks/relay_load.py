"""Outside load for one relay under test: circuits through it between two cheap endpoints.

The relay under test (``R``, an unmodified ``python -m examples.relay``) sits in the middle of
every circuit. Both of its neighbours live here, in a process of their own, so their CPU is
not the relay's:

* the **previous hop** (:class:`LoadCircuit`): ``links`` links to R -- over TLS, each
  authenticating as a relay with an identity of its own (CERTS + AUTHENTICATE), so R takes
  them for links from another relay, as a middle relay's are; plain TCP with
  ``--plain-links`` -- carrying ``circuits`` circuits between them. Each circuit is built as a
  relay's neighbour would build it: CREATE2 (ntor, with R's onion key) and then one EXTEND2 in
  a RELAY_EARLY cell to a fake next hop; EXTENDED2 completes the ntor handshake with that hop;
* the **next hop** (:class:`FakeHop`): ``links`` listeners with a relay identity each (TLS
  responder with CERTS and AUTH_CHALLENGE, checking R's AUTHENTICATE), answering R's CREATE2
  with a real ntor reply.

Once a circuit is open, both ends only move cells: the previous hop writes RELAY cells with
random payloads (R decrypts one layer; nothing is recognized, so it passes every cell on, as a
middle relay does), the next hop writes RELAY cells the other way (R adds its layer). Each end
counts the cells that reach it per circuit, and each direction of each circuit keeps at most
``window`` cells in flight (sent and not yet arrived at the other end): the end-to-end bound
tor's SENDME windows put on a circuit, enforced here with the counters both ends share instead
of SENDME cells, so the relay never queues more for a circuit than an honest one would (its
per-circuit caps close circuits past 1,000 cells). Writes leave in chunks of at least
``chunk`` cells from buffers built once, so the per-cell work here is the link's framing and
TLS, below the relay's. A *paced* load (``rate`` cells/s) instead writes every
:data:`PACE_TICK` seconds what the rate earned, spread over the circuits and directions, so
the relay sees a steady trickle of small batches, as on a network at modest load.

A RELAY cell here is a *relayed cell* of the benchmark: it entered R on one link and left on
the other after R's one layer of relay crypto. :attr:`RelayLoad.delivered` counts those that
arrived at either end.

Threads: loop thread only (one Reactor).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

from reactor import Reactor, Stream, listen
from reactor.net import Listener
from relay.cells import CellCommand, DestroyReason
from relay.cells import RelayCommand as RC
from relay.circuits import pack_relay, relay_body, wire_cells
from relay.directory import RelayDescriptor
from relay.framing import FIXED_CELL_LEN
from relay.handshakes import (
    HTYPE_NTOR,
    NTOR_ONIONSKIN_LEN,
    Extend2Body,
    HandshakeError,
    LinkSpecifier,
    NtorClient,
    NtorServerKey,
    decode_create2,
    decode_created2,
    decode_extended2,
    encode_create2,
    encode_created2,
    ntor_server,
)
from relay.identity.keys import RelayIdentity
from relay.link import Link
from relay.linkauth import LinkCredentials, ServerCredentials
from tor1 import CELL_PAYLOAD_LEN
from tor1.backend import OriginCryptoLike, UnrecognizedCell, origin_crypto_for
from tor1.reference import HopKeys

__all__ = ["DEFAULT_CHUNK", "DEFAULT_WINDOW", "PACE_TICK", "FakeHop", "LoadCircuit",
           "RelayLoad"]

DEFAULT_WINDOW = 500
"""Cells in flight per circuit and direction (tor's circuit window is 1,000)."""
DEFAULT_CHUNK = 64
"""A direction writes once it has room for at least this many cells (unpaced load)."""
PACE_TICK = 0.002
"""Seconds between the writes of a paced load."""
PACE_BURST = 0.05
"""Seconds of a paced load's rate it may save up while windows are full."""
_RELAY = int(CellCommand.RELAY)
_DESTROY = int(CellCommand.DESTROY)
_CREATE2 = int(CellCommand.CREATE2)
_CREATED2 = int(CellCommand.CREATED2)
_X_AT = NTOR_ONIONSKIN_LEN - 32  # the client's X ends an ntor onionskin (ID | B | X)


def _cells(circ_id: int, count: int) -> memoryview:
    """``count`` wire RELAY cells for ``circ_id`` with random payloads (written as slices,
    never changed). Any thread (pure)."""
    return memoryview(wire_cells(circ_id, _RELAY, os.urandom(count * CELL_PAYLOAD_LEN)))


class LoadCircuit:
    """One circuit through the relay: its previous-hop end (built here) and next-hop end
    (attached by a :class:`FakeHop`). Loop thread only."""

    __slots__ = ("_bwd_buf", "_crypto", "_fwd_buf", "_handshake", "bwd_received", "bwd_sent",
                 "client_id", "client_link", "closed_reason", "dirty", "fwd_received",
                 "fwd_sent", "hop", "hop_id", "hop_link", "index", "load", "state")

    def __init__(self, load: RelayLoad, index: int, link: Link, hop: FakeHop) -> None:
        """Circuit ``index`` on the previous hop's ``link``, to be extended to ``hop``. Loop
        thread only."""
        self.load = load
        self.index = index
        self.client_link = link
        self.hop = hop
        self.client_id = 0
        self.hop_link: Link | None = None
        self.hop_id = 0
        self.state = "new"
        self.closed_reason: str | None = None
        self.fwd_sent = self.fwd_received = self.bwd_sent = self.bwd_received = 0
        self.dirty = False
        self._handshake: NtorClient | None = None
        self._crypto: OriginCryptoLike | None = None
        self._fwd_buf = memoryview(b"")
        self._bwd_buf = memoryview(b"")

    def start(self, relay: RelayDescriptor) -> None:
        """Send CREATE2 (ntor) to the relay. Loop thread only."""
        self.client_id = self.client_link.add_circuit(self._on_client_cell)
        self._handshake = NtorClient(relay.identity_digest, relay.ntor_onion_key)
        self.state = "creating"
        self.client_link.send_cell(self.client_id, _CREATE2,
                                   encode_create2(HTYPE_NTOR, self._handshake.onionskin))

    def _on_client_cell(self, command: int, payload: bytes) -> None:
        if command == _RELAY and self.state == "open":
            self.bwd_received += 1
            if not self.dirty:
                self.load.mark(self)
            return
        if command == _DESTROY:
            self.closed(f"DESTROY from the relay (reason {payload[0] if payload else 0})",
                        tell_relay=False)
        elif command == _CREATED2 and self.state == "creating":
            self._created(payload)
        elif command == _RELAY and self.state == "extending":
            self._extended(payload)
        elif command != _RELAY:
            self.closed(f"unexpected cell command {command} from the relay")

    def _created(self, payload: bytes) -> None:
        assert self._handshake is not None
        try:
            material = self._handshake.complete(decode_created2(payload))
        except (HandshakeError, ValueError) as exc:
            self.closed(f"CREATE2 with the relay failed: {exc}")
            return
        self._crypto = origin_crypto_for([HopKeys.from_material(material)])
        hop = self.hop
        self._handshake = NtorClient(hop.identity.identity_digest, hop.identity.ntor_onion_key)
        onionskin = self._handshake.onionskin
        self.load.pending[onionskin[_X_AT:]] = self
        body = Extend2Body((LinkSpecifier.ipv4("127.0.0.1", hop.port),
                            LinkSpecifier.legacy_id(hop.identity.identity_digest)),
                           HTYPE_NTOR, onionskin).encode()
        self.state = "extending"
        self.client_link.send_cell(self.client_id, CellCommand.RELAY_EARLY,
                                   self._crypto.encrypt(pack_relay(RC.EXTEND2, 0, body), 0))

    def _extended(self, payload: bytes) -> None:
        assert self._crypto is not None and self._handshake is not None
        try:
            _, plain = self._crypto.decrypt(payload)
            command, _, data = relay_body(plain)
            if command != RC.EXTENDED2:
                raise ValueError(f"relay command {command} instead of EXTENDED2")
            self._handshake.complete(decode_extended2(data))
        except (UnrecognizedCell, HandshakeError, ValueError) as exc:
            self.closed(f"EXTEND2 through the relay failed: {exc}")
            return
        if self.hop_link is None:
            self.closed("EXTENDED2 without a CREATE2 at the next hop")
            return
        self._handshake = None
        self.state = "open"
        window = self.load.window
        self._fwd_buf = _cells(self.client_id, window)
        self._bwd_buf = _cells(self.hop_id, window)
        self.load.opened(self)
        self.load.mark(self)

    def attach_hop(self, link: Link, circ_id: int) -> None:
        """The fake next hop registered this circuit as ``circ_id`` on ``link``. Loop thread
        only."""
        self.hop_link = link
        self.hop_id = circ_id

    def on_hop_cell(self, command: int, payload: bytes) -> None:
        """A cell from the relay on the next hop's link. Loop thread only."""
        if command == _RELAY and self.state == "open":
            self.fwd_received += 1
            if not self.dirty:
                self.load.mark(self)
        elif command == _DESTROY:
            self.hop_link = None
            self.closed(f"DESTROY toward the next hop (reason {payload[0] if payload else 0})")

    def pump(self) -> None:
        """Write what the windows allow in each direction, once there is room for at least
        ``load.chunk`` cells. Loop thread only."""
        chunk = self.load.chunk
        forward = self.take_forward(self.load.window, chunk)
        if forward is not None:
            self.client_link.write_cells(forward, len(forward) // FIXED_CELL_LEN)
        backward = self.take_backward(self.load.window, chunk)
        if backward is not None and self.hop_link is not None:
            self.hop_link.write_cells(backward, len(backward) // FIXED_CELL_LEN)

    def take_forward(self, limit: int, least: int = 1) -> memoryview | None:
        """Wire cells for the relay from the previous hop: as many as the window allows, at
        most ``limit``, none unless at least ``least``; counted as sent. Loop thread only."""
        if self.state != "open" or not self.load.running:
            return None
        count = min(self.load.window - (self.fwd_sent - self.fwd_received), limit)
        if count < least:
            return None
        self.fwd_sent += count
        return self._fwd_buf[:count * FIXED_CELL_LEN]

    def take_backward(self, limit: int, least: int = 1) -> memoryview | None:
        """The same for the relay from the next hop. Loop thread only."""
        if self.state != "open" or not self.load.running or self.hop_link is None:
            return None
        count = min(self.load.window - (self.bwd_sent - self.bwd_received), limit)
        if count < least:
            return None
        self.bwd_sent += count
        return self._bwd_buf[:count * FIXED_CELL_LEN]

    def closed(self, reason: str, *, tell_relay: bool = True) -> None:
        """Stop this circuit (DESTROY both ways unless the relay sent one). Idempotent. Loop
        thread only."""
        if self.state == "closed":
            return
        was_open = self.state == "open"
        self.state = "closed"
        self.closed_reason = reason
        if tell_relay and self.client_link.is_open:
            self.client_link.destroy_circuit(self.client_id)
        if self.hop_link is not None and self.hop_link.is_open:
            self.hop_link.destroy_circuit(self.hop_id)
        self.load.circuit_closed(self, was_open)


class FakeHop:
    """The next hop of the circuits: a relay identity and a listener; answers CREATE2 with ntor
    and hands each circuit to its :class:`LoadCircuit`. Loop thread only."""

    def __init__(self, load: RelayLoad, identity: RelayIdentity, tls: bool) -> None:
        """Listen on a free loopback port. Loop thread only."""
        self.load = load
        self.identity = identity
        self._ntor = NtorServerKey(identity.identity_digest, identity.onion.ntor)
        self._server = ServerCredentials.of(identity) if tls else None
        self.links: list[Link] = []
        self.listener: Listener = listen(load.reactor, "127.0.0.1", 0, self._accepted)
        self.port = int(self.listener.address[1])

    def _accepted(self, stream: Stream) -> None:
        link = Link.accept(self.load.reactor, stream, server=self._server,
                           name=f"fake hop {self.identity.nickname}", on_cell=self._on_cell,
                           on_close=self._on_close)
        self.links.append(link)

    def _on_cell(self, link: Link, circ_id: int, command: int, payload: bytes) -> None:
        if command != _CREATE2:
            if command != _DESTROY:
                link.send_cell(circ_id, _DESTROY, bytes((DestroyReason.PROTOCOL,)))
            return
        try:
            hdata = decode_create2(payload).hdata
            circuit = self.load.pending.pop(hdata[_X_AT:NTOR_ONIONSKIN_LEN])
            reply, _ = ntor_server(self._ntor, hdata)
        except (KeyError, ValueError, HandshakeError):
            link.send_cell(circ_id, _DESTROY, bytes((DestroyReason.PROTOCOL,)))
            return
        link.add_circuit(circuit.on_hop_cell, circ_id)
        circuit.attach_hop(link, circ_id)
        link.send_cell(circ_id, _CREATED2, encode_created2(reply))

    def _on_close(self, link: Link, reason: str) -> None:
        self.load.link_closed(link, reason)

    def close(self) -> None:
        """Close the listener and every link. Loop thread only."""
        self.listener.close()
        for link in self.links:
            link.close("benchmark done")


class RelayLoad:
    """The load on one relay (see the module docstring). Loop thread only."""

    def __init__(self, reactor: Reactor, relay: RelayDescriptor, address: tuple[str, int], *,
                 tls: bool, workdir: Path, circuits: int = 32, links: int = 2,
                 window: int = DEFAULT_WINDOW, chunk: int = DEFAULT_CHUNK, rate: float = 0.0,
                 on_open: Callable[[RelayLoad], None] | None = None,
                 on_failure: Callable[[str], None] | None = None) -> None:
        """Make the identities (kept in ``workdir``) and the fake next hops; nothing connects
        before :meth:`start`. ``rate``: cells/s offered in total (both directions), 0 for as
        fast as the relay takes them. ``on_open`` runs once every circuit is open,
        ``on_failure`` with the reason when a link or a circuit is lost. Loop thread only."""
        if circuits < 1 or links < 1 or not 0 < chunk <= window or rate < 0:
            raise ValueError("need circuits >= 1, links >= 1, 0 < chunk <= window, rate >= 0")
        self.reactor = reactor
        self.relay = relay
        self.address = address
        self.tls = tls
        self.n_circuits = circuits
        self.window = window
        self.chunk = chunk
        self.rate = rate
        self.on_open = on_open
        self.on_failure = on_failure
        self.running = False
        self._credit = 0.0
        self._ticked_at = 0.0
        self.pending: dict[bytes, LoadCircuit] = {}
        self.circuits: list[LoadCircuit] = []
        self.failures: list[str] = []
        self._open = 0
        self._dirty: list[LoadCircuit] = []
        self._closing = False
        self.hops = [FakeHop(self, RelayIdentity.load_or_create(workdir / f"hop{i}", f"hop{i}"),
                             tls) for i in range(links)]
        self._identities = [RelayIdentity.load_or_create(workdir / f"prev{i}", f"prev{i}")
                            for i in range(links)]
        self.links: list[Link] = []

    def start(self) -> None:
        """Open the links to the relay and build every circuit; cells flow as each opens.
        Loop thread only."""
        self.running = True
        if self.rate:
            self._ticked_at = time.perf_counter()
            self.reactor.call_later(PACE_TICK, self._tick)
        host, port = self.address
        for index, identity in enumerate(self._identities):
            credentials = LinkCredentials.of(identity) if self.tls else None
            link = Link.connect(self.reactor, host, port, tls=self.tls, credentials=credentials,
                                name=f"previous hop {index}", on_open=self._link_open,
                                on_close=self.link_closed)
            self.links.append(link)

    def _link_open(self, link: Link) -> None:
        index = self.links.index(link)
        if self.tls and (link.peer_identity is None
                         or link.peer_identity.rsa_digest != self.relay.identity_digest):
            link.close("the relay did not prove the identity in its READY line")
            return
        for number in range(index, self.n_circuits, len(self.links)):
            circuit = LoadCircuit(self, number, link, self.hops[number % len(self.hops)])
            self.circuits.append(circuit)
            circuit.start(self.relay)

    def mark(self, circuit: LoadCircuit) -> None:
        """Pump ``circuit`` at the end of this loop iteration (paced: the ticks pump; a
        circuit stays marked so its handlers stop calling). Loop thread only."""
        circuit.dirty = True
        if self.rate:
            return
        self._dirty.append(circuit)
        if len(self._dirty) == 1:
            self.reactor.call_soon(self._pump)

    def _pump(self) -> None:
        dirty, self._dirty = self._dirty, []
        for circuit in dirty:
            circuit.dirty = False
            circuit.pump()

    def _tick(self) -> None:
        """Paced load: every :data:`PACE_TICK` s, spend the credit the rate earned since the
        last tick, spread evenly over the open circuits and both directions (capped at
        :data:`PACE_BURST` s of credit, so cells held up by full windows do not burst), with
        one write per link: as a relay flushes what its circuits have for a link at once."""
        if self._closing:
            return
        now = time.perf_counter()
        self._credit = min(self._credit + (now - self._ticked_at) * self.rate,
                           self.rate * PACE_BURST)
        self._ticked_at = now
        open_circuits = [circuit for circuit in self.circuits if circuit.state == "open"]
        share = int(self._credit / (2 * len(open_circuits))) if open_circuits else 0
        if share and self.running:
            writes: dict[Link, list[memoryview]] = {}
            for circuit in open_circuits:
                forward = circuit.take_forward(share)
                if forward is not None:
                    writes.setdefault(circuit.client_link, []).append(forward)
                backward = circuit.take_backward(share)
                if backward is not None and circuit.hop_link is not None:
                    writes.setdefault(circuit.hop_link, []).append(backward)
            for link, parts in writes.items():
                data = b"".join(parts)
                self._credit -= len(data) // FIXED_CELL_LEN
                link.write_cells(data, len(data) // FIXED_CELL_LEN)
        self.reactor.call_later(PACE_TICK, self._tick)

    def opened(self, circuit: LoadCircuit) -> None:
        """``circuit`` is open at both ends. Loop thread only."""
        self._open += 1
        if self._open == self.n_circuits and self.on_open is not None:
            self.on_open(self)

    @property
    def all_open(self) -> bool:
        """True while every circuit is open. Loop thread only."""
        return self._open == self.n_circuits and all(c.state == "open" for c in self.circuits)

    @property
    def delivered(self) -> int:
        """Relayed cells that reached either end, both directions. Loop thread only."""
        return sum(c.fwd_received + c.bwd_received for c in self.circuits)

    @property
    def in_flight(self) -> int:
        """Cells sent and not yet arrived, both directions. Loop thread only."""
        return sum(c.fwd_sent - c.fwd_received + c.bwd_sent - c.bwd_received
                   for c in self.circuits)

    def circuit_closed(self, circuit: LoadCircuit, was_open: bool) -> None:
        """A circuit stopped; a failure unless the load is closing. Loop thread only."""
        if was_open:
            self._open -= 1
        if not self._closing:
            self._fail(f"circuit {circuit.index}: {circuit.closed_reason}")

    def link_closed(self, link: Link, reason: str) -> None:
        """A link to or from the relay closed; a failure unless the load is closing. Loop
        thread only."""
        if not self._closing:
            self._fail(f"{link.name} closed: {reason}")

    def _fail(self, why: str) -> None:
        self.failures.append(why)
        if self.on_failure is not None:
            self.on_failure(why)

    def stop_sending(self) -> None:
        """Write no more cells (those in flight still arrive and are counted). Loop thread
        only."""
        self.running = False

    def close(self) -> None:
        """Close every circuit, link and listener. Idempotent. Loop thread only."""
        self._closing = True
        self.running = False
        for circuit in self.circuits:
            circuit.closed("benchmark done")
        for link in self.links:
            link.close("benchmark done")
        for hop in self.hops:
            hop.close()
