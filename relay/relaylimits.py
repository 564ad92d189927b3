"""Per-circuit limits tor enforces on a relay: RELAY_EARLY count, cell-queue cap, MaxMemInQueues.

What tor does (tor 0.4.9)
-------------------------
* **RELAY_EARLY** (``command_process_relay_cell`` in ``src/core/or/command.c``; ``or.h``): a
  circuit accepts at most ``MAX_RELAY_EARLY_CELLS_PER_CIRCUIT`` = 8 RELAY_EARLY cells toward
  the exit; the 9th, or any RELAY_EARLY travelling toward the client, closes the circuit with
  reason PROTOCOL (``END_CIRC_REASON_TORPROTOCOL``).
* **Cell-queue cap** (``append_cell_to_circuit_queue`` in ``src/core/or/relay.c``): appending a
  cell to a circuit queue that already holds the maximum closes the circuit with
  RESOURCELIMIT. The maxima are the consensus parameters ``circ_max_cell_queue_size`` (toward
  the client; default 2500 = 50 x ``RELAY_CIRC_CELL_QUEUE_SIZE_MIN`` 50, range 50..INT32_MAX)
  and ``circ_max_cell_queue_size_out`` (toward the exit; defaults to the former). When the
  exit-ward queue of a relay circuit overflows, the previous hop's address is reported to the
  DoS subsystem (:meth:`relay.dos.DosGuard.note_max_outq`). The live consensus sets 1250 and
  1000: our defaults.
* **MaxMemInQueues** (``compute_real_max_mem_in_queues`` in ``src/app/config/config.c``;
  ``cell_queues_check_size`` in ``relay.c``; ``circuits_handle_oom`` in
  ``src/core/or/circuitlist.c``): 0 (the default) means: 40% of RAM when RAM >= 8 GiB, else
  75%, clamped to 256 MiB .. 8 GiB (2 GiB on 32-bit); 8 GiB if RAM is unknown (1 GiB on
  32-bit); a relay may not set less than 64 MiB. After each queued cell tor adds up its queue
  memory; at or above the limit the OOM handler sorts all circuits by the age of their oldest
  queued item, oldest first (O(n log n)), and closes them with RESOURCELIMIT (exit streams
  whose buffered data is older than the next circuit's go first), until it has recovered
  ``usage - 90% of the limit`` (``FRACTION_OF_DATA_TO_RETAIN_ON_OOM`` 0.90). Memory pressure
  is noted from 3/4 of the limit (``MaxMemInQueues_low_threshold``).

What we do: :class:`RelayEarlyBudget` and :class:`CellQueueCaps` are the two checks;
:class:`QueueMemory` is fed the queued bytes and the enqueue time of the oldest byte of each
circuit (or exit stream: any hashable key), keeps the total in O(1) per update, and returns the
keys to close when the total reaches the limit. A key with nothing queued is not tracked
(closing it would recover nothing).

Threads: the classes are loop thread only (mutable, no lock); the functions are any thread
(:func:`total_system_memory` reads ``/proc/meminfo``).
"""

from __future__ import annotations

import sys
from collections.abc import Hashable
from dataclasses import dataclass
from pathlib import Path

from relay.cells import DestroyReason

__all__ = [
    "CIRC_MAX_CELL_QUEUE_SIZE",
    "CIRC_MAX_CELL_QUEUE_SIZE_OUT",
    "FRACTION_OF_DATA_TO_RETAIN_ON_OOM",
    "MAX_RELAY_EARLY_CELLS_PER_CIRCUIT",
    "RELAY_CIRC_CELL_QUEUE_SIZE_DEFAULT",
    "RELAY_CIRC_CELL_QUEUE_SIZE_MIN",
    "CellQueueCaps",
    "CircuitVerdict",
    "QueueMemory",
    "RelayEarlyBudget",
    "compute_max_mem_in_queues",
    "total_system_memory",
]

MAX_RELAY_EARLY_CELLS_PER_CIRCUIT = 8
RELAY_CIRC_CELL_QUEUE_SIZE_MIN = 50
RELAY_CIRC_CELL_QUEUE_SIZE_MAX = 2**31 - 1
RELAY_CIRC_CELL_QUEUE_SIZE_DEFAULT = 50 * RELAY_CIRC_CELL_QUEUE_SIZE_MIN
#: The live consensus values of ``circ_max_cell_queue_size`` / ``..._out`` (our defaults).
CIRC_MAX_CELL_QUEUE_SIZE = 1250
CIRC_MAX_CELL_QUEUE_SIZE_OUT = 1000
FRACTION_OF_DATA_TO_RETAIN_ON_OOM = 0.90

_GIB = 1 << 30
_MIB = 1 << 20
_MIN_SERVER_MB = 64


@dataclass(frozen=True, slots=True)
class CircuitVerdict:
    """``allowed``, else close the circuit with DESTROY(``reason``); ``why`` for the log."""

    allowed: bool
    reason: DestroyReason | None = None
    why: str = ""


_OK = CircuitVerdict(True)


class RelayEarlyBudget:
    """One circuit's RELAY_EARLY allowance (8). Loop thread only."""

    __slots__ = ("remaining",)

    def __init__(self, allowance: int = MAX_RELAY_EARLY_CELLS_PER_CIRCUIT) -> None:
        """Loop thread only."""
        self.remaining = allowance

    def on_relay_early(self, toward_exit: bool) -> CircuitVerdict:
        """A RELAY_EARLY cell arrived on this circuit; ``toward_exit`` is its direction.

        Loop thread only."""
        if not toward_exit:
            return CircuitVerdict(False, DestroyReason.PROTOCOL,
                                  "inbound RELAY_EARLY cell (toward the client)")
        if self.remaining == 0:
            return CircuitVerdict(False, DestroyReason.PROTOCOL,
                                  f"more than {MAX_RELAY_EARLY_CELLS_PER_CIRCUIT} "
                                  "RELAY_EARLY cells")
        self.remaining -= 1
        return _OK


def _clamp_queue_size(value: int) -> int:
    return min(max(value, RELAY_CIRC_CELL_QUEUE_SIZE_MIN), RELAY_CIRC_CELL_QUEUE_SIZE_MAX)


@dataclass(frozen=True, slots=True)
class CellQueueCaps:
    """``circ_max_cell_queue_size`` (toward the client) and ``circ_max_cell_queue_size_out``
    (toward the exit), clamped to tor's range 50..INT32_MAX."""

    toward_client: int = CIRC_MAX_CELL_QUEUE_SIZE
    toward_exit: int = CIRC_MAX_CELL_QUEUE_SIZE_OUT

    def __post_init__(self) -> None:
        object.__setattr__(self, "toward_client", _clamp_queue_size(self.toward_client))
        object.__setattr__(self, "toward_exit", _clamp_queue_size(self.toward_exit))

    @classmethod
    def tor_builtin(cls) -> CellQueueCaps:
        """tor's compiled-in defaults (2500 both ways): a tor without a consensus. Any thread."""
        return cls(RELAY_CIRC_CELL_QUEUE_SIZE_DEFAULT, RELAY_CIRC_CELL_QUEUE_SIZE_DEFAULT)

    def check(self, queued: int, toward_exit: bool, adding: int = 1) -> CircuitVerdict:
        """May ``adding`` cells join a queue holding ``queued``? tor appends one at a time and
        closes on the one that finds the queue full, so: no when ``queued + adding`` exceeds
        the cap. An exit-ward refusal on a relay circuit should also be reported with
        :meth:`relay.dos.DosGuard.note_max_outq`. Any thread (pure)."""
        cap = self.toward_exit if toward_exit else self.toward_client
        if queued + adding > cap:
            direction = "outbound" if toward_exit else "inbound"
            return CircuitVerdict(False, DestroyReason.RESOURCELIMIT,
                                  f"{direction} circuit queue would hold {queued + adding} "
                                  f"cells, maximum allowed is {cap}")
        return _OK


def total_system_memory(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    """``MemTotal`` in bytes, or None when unknown (tor's ``get_total_system_memory`` on
    Linux). Any thread."""
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def compute_max_mem_in_queues(configured: int = 0, *, is_server: bool = True,
                              total_ram: int | None = None, is_64bit: bool | None = None) -> int:
    """tor's ``compute_real_max_mem_in_queues``: the MaxMemInQueues in force.

    ``configured`` 0 picks the default from ``total_ram`` (read from ``/proc/meminfo`` when
    None; 0 means unknown, as for tor). Any thread."""
    if is_64bit is None:
        is_64bit = sys.maxsize > 2**32
    if configured == 0:
        ram = total_system_memory() if total_ram is None else total_ram
        if not ram:
            return 8 * _GIB if is_64bit else _GIB
        avail = (ram // 5) * 2 if (is_64bit and ram >= 8 * _GIB) else (ram // 4) * 3
        ceiling = 8 * _GIB if is_64bit else 2 * _GIB
        return min(max(avail, _GIB // 4), ceiling)
    if is_server and configured < _MIN_SERVER_MB * _MIB:
        return _MIN_SERVER_MB * _MIB
    return configured


class QueueMemory:
    """Queued bytes per circuit (or stream) against ``MaxMemInQueues``. Loop thread only."""

    __slots__ = ("_entries", "limit", "total")

    def __init__(self, max_mem_in_queues: int) -> None:
        """Loop thread only."""
        if max_mem_in_queues <= 0:
            raise ValueError("max_mem_in_queues must be positive")
        self.limit = max_mem_in_queues
        self.total = 0
        self._entries: dict[Hashable, tuple[int, float]] = {}

    @property
    def low_threshold(self) -> int:
        """``MaxMemInQueues_low_threshold``: 3/4 of the limit. Loop thread only."""
        return (self.limit // 4) * 3

    @property
    def under_pressure(self) -> bool:
        """At or above the low threshold. Loop thread only."""
        return self.total >= self.low_threshold

    def update(self, key: Hashable, queued_bytes: int, oldest_at: float) -> bool:
        """``key`` now holds ``queued_bytes``, the oldest enqueued at ``oldest_at`` (seconds
        on the caller's monotonic clock). True when the total reached the limit: call
        :meth:`victims`. O(1). Loop thread only."""
        old = self._entries.pop(key, None)
        if old is not None:
            self.total -= old[0]
        if queued_bytes > 0:
            self._entries[key] = (queued_bytes, oldest_at)
            self.total += queued_bytes
        return self.total >= self.limit

    def forget(self, key: Hashable) -> None:
        """``key`` was closed or drained. O(1). Loop thread only."""
        self.update(key, 0, 0.0)

    def __len__(self) -> int:
        """Keys with bytes queued. Loop thread only."""
        return len(self._entries)

    def victims(self) -> list[Hashable]:
        """When the total is at or above the limit: the keys to close (RESOURCELIMIT), oldest
        queued item first, until closing them brings the total to 90% of the limit; they are
        forgotten here. Empty below the limit. O(n log n). Loop thread only."""
        if self.total < self.limit:
            return []
        to_recover = self.total - int(self.limit * FRACTION_OF_DATA_TO_RETAIN_ON_OOM)
        order = sorted(self._entries.items(), key=lambda item: item[1][1])
        chosen: list[Hashable] = []
        recovered = 0
        for key, (size, _) in order:
            if recovered >= to_recover:
                break
            chosen.append(key)
            recovered += size
        for key in chosen:
            self.forget(key)
        return chosen
