"""Flow control v1 against a real tor: many directory fetches on one circuit of our client.

Used by :mod:`examples.tor_interop`. A tor relay with no consensus serves no directory document
bigger than its own descriptor (about 2.2 KB, five DATA cells), far short of the 100 cells
after which a SENDME is due, let alone the 1000-cell window. But SENDME windows are per
*circuit*: :class:`BulkDirFetch` runs a few hundred ``GET /tor/server/authority`` requests, one
BEGIN_DIR stream each, some in parallel, on one circuit of :class:`relay.origin.OriginCircuit`
(the client's own circuit code, crypto inline on the loop thread). Then

* tor sends well over 1000 DATA cells on the circuit, so it keeps sending only because it
  accepts our version-1 SENDMEs (tor checks a v1 tag against the digest it recorded and closes
  the circuit when it differs: ``sendme_is_valid`` in tor's ``sendme.c``);
* we send one DATA cell per request, a few hundred in all, so tor sends us a circuit SENDME
  for every hundredth; it is version 1 (tor 0.4.9's default) and our circuit checks its tag.

:func:`flow_control_report` turns the circuit's counters into the report and says what does not
hold. :class:`OneLinkOwner` is the little a :class:`relay.origin.OriginCircuit` needs from
its owner when the program holds the link itself (``relay.client.Client`` would open its own).

Threads: loop thread only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from reactor import Reactor
from relay.circuits import (
    CIRCWINDOW_INCREMENT,
    CIRCWINDOW_START,
    END_REASON_DONE,
    IterationFlush,
)
from relay.origin import ClientStream, OriginCircuit

__all__ = ["BulkDirFetch", "OneLinkOwner", "flow_control_report"]


class OneLinkOwner:
    """The owner of origin circuits on a link the program opened itself (``CircuitOwner``).

    The circuits' uploads here are single request cells, so the link is never treated as
    congested. Loop thread only.
    """

    def __init__(self, reactor: Reactor) -> None:
        """No circuit yet. Loop thread only."""
        self.reactor = reactor
        self.circuits_built = 0
        self.closed: list[OriginCircuit] = []
        self._dirty: IterationFlush[OriginCircuit] = IterationFlush(reactor.call_after_io,
                                                                     self._flush)

    def mark_dirty(self, circuit: OriginCircuit) -> None:
        """Flush ``circuit`` at the end of this loop iteration. Loop thread only."""
        self._dirty.mark(circuit)

    def _flush(self, circuits: list[OriginCircuit]) -> None:
        for circuit in circuits:
            circuit.flush_in()

    def link_congested(self, circuit: OriginCircuit) -> bool:
        """Never: see the class docstring. Loop thread only."""
        return False

    def block_on_link(self, circuit: OriginCircuit) -> None:
        """Not called (the link is never congested). Loop thread only."""

    def circuit_closed(self, circuit: OriginCircuit) -> None:
        """Remember a closed circuit. Loop thread only."""
        self.closed.append(circuit)


class BulkDirFetch:
    """``count`` directory requests on ``circuit``, ``parallel`` streams at a time; each answer
    must be HTTP 200 with exactly ``expected_body``. ``on_done(error)`` runs once: None when
    every answer was right, else why not. Loop thread only."""

    def __init__(self, circuit: OriginCircuit, request: bytes, expected_body: bytes, *,
                 count: int, parallel: int, on_done: Callable[[str | None], None]) -> None:
        """Nothing is sent before :meth:`start`. Loop thread only."""
        self.circuit = circuit
        self.request = request
        self.expected_body = expected_body
        self.count = count
        self.parallel = parallel
        self.on_done = on_done
        self.started = 0
        self.completed = 0
        self._answers: dict[ClientStream, bytearray] = {}
        self._finished = False

    def start(self) -> None:
        """Open the first ``parallel`` streams. Loop thread only."""
        for _ in range(min(self.parallel, self.count)):
            self._open_one()

    def _open_one(self) -> None:
        self.started += 1
        stream = self.circuit.open_dir_stream(
            on_connected=lambda s: s.write(self.request),
            on_data=lambda s, data: self._answers[s].extend(data),
            on_end=self._ended)
        self._answers[stream] = bytearray()

    def _ended(self, stream: ClientStream, why: str) -> None:
        answer = self._answers.pop(stream, bytearray())
        if self._finished:
            return
        if why != f"END from the exit (reason {END_REASON_DONE})":
            self._finish(f"directory stream {stream.stream_id} ended: {why}")
            return
        head, _, body = bytes(answer).partition(b"\r\n\r\n")
        status = head.split(b"\r\n", 1)[0]
        if not status.startswith(b"HTTP/1.0 200 ") or body != self.expected_body:
            self._finish(f"directory stream {stream.stream_id} answered {status!r} with "
                         f"{len(body)} bytes, not the {len(self.expected_body)}-byte descriptor")
            return
        self.completed += 1
        if self.completed == self.count:
            self._finish(None)
        elif self.started < self.count:
            self._open_one()

    def _finish(self, error: str | None) -> None:
        if not self._finished:
            self._finished = True
            self.on_done(error)


def flow_control_report(circuit: OriginCircuit, fetch: BulkDirFetch) -> tuple[dict[str, Any],
                                                                               str | None]:
    """The counters of a finished :class:`BulkDirFetch` and what about them breaks tor's
    SENDME rules (None when nothing does). Loop thread only."""
    report = {
        "dir_fetches": fetch.completed,
        "data_cells_from_tor": circuit.data_cells_received,
        "sendmes_to_tor": circuit.sendmes_sent,
        "data_cells_to_tor": circuit.data_cells_sent,
        "sendmes_from_tor_checked": circuit.sendmes_accepted,
        "package_window": circuit.package_window,
    }
    if circuit.data_cells_received <= CIRCWINDOW_START:
        return report, (f"tor sent {circuit.data_cells_received} DATA cells: not more than a "
                        f"window, so it never needed our SENDMEs")
    if circuit.sendmes_sent != circuit.data_cells_received // CIRCWINDOW_INCREMENT:
        return report, "we did not send one SENDME per 100 DATA cells"
    expected = circuit.data_cells_sent // CIRCWINDOW_INCREMENT
    if expected < 1 or circuit.sendmes_accepted != expected:
        return report, (f"tor's checked SENDMEs: {circuit.sendmes_accepted}, expected "
                        f"{expected} (one per 100 of our {circuit.data_cells_sent} DATA cells)")
    if not circuit.is_open:
        return report, f"the circuit closed: {circuit.close_reason}"
    return report, None
