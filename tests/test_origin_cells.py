"""relay.origin: a client circuit takes a read's RELAY cells from its guard as one batch.

* the batches of one loop iteration are queued in order and the circuit is marked dirty once;
* a RELAY_EARLY among them (relays never send one toward the client) closes the circuit, as
  tor's clients do, and nothing of the read is kept.

The end-to-end order and integrity of what such batches carry is checked by the network tests
(every echoed byte through real relays).
"""

from __future__ import annotations

import os

from relay.cells import CellCommand
from relay.directory import RelayDescriptor
from relay.origin import OriginCircuit


class _Owner:
    """What an origin circuit asks of its client, recorded."""

    reactor = None
    circuits_built = 0

    def __init__(self) -> None:
        self.marked: list[OriginCircuit] = []
        self.closed: list[OriginCircuit] = []

    def mark_dirty(self, circuit: OriginCircuit) -> None:
        self.marked.append(circuit)

    def link_congested(self, circuit: OriginCircuit) -> bool:
        return False

    def block_on_link(self, circuit: OriginCircuit) -> None:
        pass

    def circuit_closed(self, circuit: OriginCircuit) -> None:
        self.closed.append(circuit)


def _circuit(owner: _Owner, closes: list[str]) -> OriginCircuit:
    path = [RelayDescriptor("g", "127.0.0.1", 9001, os.urandom(20), os.urandom(32))]
    circuit = OriginCircuit(owner, path, None, lambda c, why: closes.append(why))
    circuit.state = "open"
    return circuit


def test_batches_of_an_iteration_are_queued_in_order_and_marked_once() -> None:
    owner, closes = _Owner(), []
    circuit = _circuit(owner, closes)
    first, second = os.urandom(509 * 3), os.urandom(509 * 2)
    circuit._relay_batch(first, 3, None)
    circuit._relay_batch(second, 2, None)
    circuit._on_cell(CellCommand.RELAY, payload := os.urandom(509))  # a direct, single cell
    assert circuit._incoming == [first, second, payload]
    assert owner.marked == [circuit]
    assert closes == [] and circuit.state == "open"


def test_relay_early_from_the_guard_closes_the_circuit() -> None:
    owner, closes = _Owner(), []
    circuit = _circuit(owner, closes)
    circuit._relay_batch(os.urandom(509), 1, None)
    circuit._relay_batch(os.urandom(509 * 2), 2, (1,))
    assert circuit.state == "closed"
    assert closes == [f"unexpected cell command {int(CellCommand.RELAY_EARLY)} from the guard"]
    assert owner.closed == [circuit]
    assert circuit._incoming == []  # nothing of the reads is handled
