"""Back-pressure and cell accounting of a worker pool, kept on the loop thread only.

In-flight cells are cells submitted and not yet delivered back (or cancelled): ``+n`` when the
loop submits them, ``-n`` when their reply is delivered or when they are cancelled or their
circuit is closed. Per circuit (``Circuit.in_flight``) and pool-wide (:attr:`Pressure.in_flight`),
crossing the high-water mark calls ``on_pressure(circuit, True)`` / ``on_pool_pressure(True)``
and falling to the low-water mark calls them with False. Nothing is ever dropped: the submit
functions also return False while a mark is exceeded, so a producer can stop reading without a
callback.

Every counter here is read and written by the loop thread only, so there is no lock: the
workers never see this object (cells they cancel themselves are counted on their own records
and summed by ``WorkerPool.stats()``). Every method is O(1) per circuit it is given.
"""

from __future__ import annotations

from collections.abc import Callable

from workers.circuit import Circuit


class Pressure:
    """Pool-wide in-flight count, high/low-water signals and delivery counters. Loop thread."""

    __slots__ = (
        "cancelled",
        "delivered",
        "discarded",
        "discarded_cells",
        "errors_delivered",
        "high",
        "in_flight",
        "low",
        "on_pool_pressure",
        "over_high_water",
        "submitted",
    )

    def __init__(
        self, high: int, low: int, on_pool_pressure: Callable[[bool], None] | None
    ) -> None:
        """Marks are in cells; ``low`` must be below ``high``. Loop thread."""
        if low >= high:
            raise ValueError("low-water marks must be below their high-water marks")
        self.high = high
        self.low = low
        self.on_pool_pressure = on_pool_pressure
        self.in_flight = 0
        self.over_high_water = False
        self.submitted = 0
        self.delivered = 0
        self.cancelled = 0  # by the loop thread (workers count theirs on their records)
        self.discarded = 0  # replies of closed circuits
        self.discarded_cells = 0
        self.errors_delivered = 0

    def add(self, circuit: Circuit, n: int) -> bool:
        """Count ``n`` submitted cells of ``circuit``; signal high water. Loop thread.

        Returns True when neither the circuit nor the pool is above its high-water mark.
        """
        self.submitted += n
        circuit.in_flight += n
        self.in_flight += n
        if not circuit.over_high_water and circuit.in_flight >= circuit.high_water:
            circuit.over_high_water = True
            if circuit.on_pressure is not None:
                circuit.on_pressure(circuit, True)
        if not self.over_high_water and self.in_flight >= self.high:
            self.over_high_water = True
            if self.on_pool_pressure is not None:
                self.on_pool_pressure(True)
        return not (circuit.over_high_water or self.over_high_water)

    def add_many(self, circuits: list[Circuit], counts: list[int]) -> bool:
        """:meth:`add` for many circuits, the pool's mark checked once. Loop thread."""
        total = 0
        below = True
        for circuit, n in zip(circuits, counts, strict=True):
            total += n
            circuit.in_flight += n
            if circuit.over_high_water:
                below = False
            elif circuit.in_flight >= circuit.high_water:
                circuit.over_high_water = True
                below = False
                if circuit.on_pressure is not None:
                    circuit.on_pressure(circuit, True)
        self.submitted += total
        self.in_flight += total
        if not self.over_high_water and self.in_flight >= self.high:
            self.over_high_water = True
            if self.on_pool_pressure is not None:
                self.on_pool_pressure(True)
        return below and not self.over_high_water

    def delivered_cells(self, circuit: Circuit, n: int) -> None:
        """``n`` cells of an open circuit came back. Loop thread (before the callback runs)."""
        self.delivered += n
        circuit.in_flight -= n
        self.in_flight -= n

    def check_circuit_low_water(self, circuit: Circuit) -> None:
        """Signal the circuit's resume when at or below its low water. Loop thread.

        Called after a delivery's callback, even one that raised: a resume is never missed.
        """
        if (
            circuit.over_high_water
            and not circuit.closed
            and circuit.in_flight <= circuit.low_water
        ):
            circuit.over_high_water = False
            if circuit.on_pressure is not None:
                circuit.on_pressure(circuit, False)

    def check_pool_low_water(self) -> None:
        """Signal the pool's resume when at or below low water. Loop thread."""
        if self.over_high_water and self.in_flight <= self.low:
            self.over_high_water = False
            if self.on_pool_pressure is not None:
                self.on_pool_pressure(False)

    def closed(self, circuit: Circuit) -> None:
        """A circuit was closed: everything of it not yet delivered leaves the counts now.

        Loop thread. Its replies still on their way are discarded later without touching the
        counts again (see ``WorkerPool.deliver``).
        """
        self.in_flight -= circuit.in_flight
        circuit.in_flight = 0
        self.check_pool_low_water()

    def cancel(self, circuit: Circuit, n: int) -> None:
        """``n`` queued cells of a circuit no worker will serve were dropped. Loop thread."""
        self.cancelled += n
        circuit.in_flight -= n
        self.in_flight -= n
