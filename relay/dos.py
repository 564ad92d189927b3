"""tor's DoS mitigation for relays: per-client-IP connection and circuit-creation limits, and
per-circuit stream-creation limits, with tor 0.4.9's names and semantics.

What tor does (``src/core/or/dos.c``, ``dos.h``, ``src/core/mainloop/connection.c``,
``src/core/or/command.c``, ``src/core/or/connection_edge.c``)
-----------------------------------------------------------------------------------------
* **Connections** (``DoSConnection*``), per client IP, for every inbound ORPort connection
  (since 0.4.8.4 also known relays and connections still in their handshake: bug 40821). At
  accept: refused (closed at once) while the address is *marked*, or when it already has
  more than ``DoSConnectionMaxConcurrentCount`` open (so at most that plus one). Counted when
  accepted: the concurrent count goes up and a connect token bucket (``DoSConnectionConnectRate``
  per second, ``DoSConnectionConnectBurst``) loses a token; when it is empty the address is
  marked for ``DoSConnectionConnectDefenseTimePeriod`` plus a random 1 to half of it seconds.
  ``DoSConnectionDefenseType`` 1 (none) or 2 (close).
* **Circuit creation** (``DoSCircuitCreation*``), for CREATE cells on *client* channels (the
  peer did not authenticate as a relay): each takes a token from the address's bucket
  (``DoSCircuitCreationRate`` per second, ``DoSCircuitCreationBurst``; whole seconds, as tor);
  when the bucket is empty while the address has at least ``DoSCircuitCreationMinConnections``
  open connections, it is marked for ``DoSCircuitCreationDefenseTimePeriod`` plus a random 1 to
  half of it. A marked address's CREATE cells are answered with DESTROY(RESOURCELIMIT)
  (``DoSCircuitCreationDefenseType`` 2; 1 is none). Also marked: an address whose circuits hit
  the *outbound* cell-queue cap ``dos_num_circ_max_outq`` times (consensus parameter; see
  :mod:`relay.relaylimits`).
* **Stream creation** (``DoSStreamCreation*``, new in 0.4.9, exits only), per *circuit*: each
  BEGIN or RESOLVE (not BEGIN_DIR) takes a token (``DoSStreamCreationRate`` per second,
  ``DoSStreamCreationBurst``); past it ``DoSStreamCreationDefenseType`` 2 answers END(MISC) (tor
  avoids RESOURCELIMIT so clients do not mark the exit as broken), 3 closes the circuit with
  RESOURCELIMIT, 1 does nothing. tor has no other per-circuit stream limit for exits (only the
  16-bit stream-id space).
tor keeps the per-IP state in its geoip client cache, dropped at stats intervals or by the OOM
handler.

Defaults: what the live network runs with
----------------------------------------
tor's torrc defaults (0 / auto) mean "use the consensus parameter"; a tor that has no consensus
uses its compiled-in defaults (``dos.h``), under which connection and circuit-creation
mitigation are *off*. We apply the live consensus values standalone (``params`` of the
consensus of 2026-01-17, unchanged since 2023), and tor's compiled-in defaults for what the
consensus does not set (:meth:`DosConfig.tor_builtin` gives the compiled-in set):

========================================  ========  ===================
option / consensus parameter              ours      tor compiled-in
========================================  ========  ===================
DoSCircuitCreationEnabled                 1         0
DoSCircuitCreationMinConnections          2         3
DoSCircuitCreationRate                    2         3
DoSCircuitCreationBurst                   60        90
DoSCircuitCreationDefenseType             2         2
DoSCircuitCreationDefenseTimePeriod       3600      3600
DoSConnectionEnabled                      1         0
DoSConnectionMaxConcurrentCount           50        100
DoSConnectionDefenseType                  2         2
DoSConnectionConnectRate                  20        20
DoSConnectionConnectBurst                 40        40
DoSConnectionConnectDefenseTimePeriod     86400     86400
DoSStreamCreationEnabled                  0         0 (not in the consensus)
DoSStreamCreationRate                     100       100
DoSStreamCreationBurst                    300       300
DoSStreamCreationDefenseType              2         2
dos_num_circ_max_outq                     5         3
========================================  ========  ===================

What we do differently
----------------------
* **Bounded memory, O(1) per event.** The per-IP table is an insertion-ordered dict used as an
  LRU: every event moves its entry to the end; past ``max_entries`` the least recently used
  entry is evicted (even one with open connections: its later close is then ignored, as tor
  does for an entry its cache dropped). Each event also looks at the two oldest entries and
  drops one that is *idle*: no open connection, no mark, both buckets full again, no max-queue
  hit; such an entry decides exactly what a fresh one would, so dropping it loses nothing.
  A flood of distinct (even spoofed) source addresses therefore holds at most ``max_entries``
  entries.
* IPv4-mapped IPv6 sources count as their IPv4 address; a scope id is ignored.
* ``exempt``: addresses the caller wants outside the per-IP limits. tor 0.4.9 exempts nothing
  (it exempted known relays' addresses before 0.4.8.4); pass the known relays to get the old
  behaviour, e.g. on a loopback test network where every relay shares 127.0.0.1.

Threads: :class:`DosGuard` and :class:`StreamCreationLimiter` are loop thread only (mutable, no
lock); :class:`DosConfig` and :class:`TokenBucket` construction are any thread (pure).
"""

from __future__ import annotations

import ipaddress
import random
from collections import OrderedDict
from collections.abc import Collection
from dataclasses import dataclass, field
from enum import IntEnum

from relay.addrpolicy import IPAddress
from relay.cells import DestroyReason
from relay.circuits import END_REASON_MISC

__all__ = [
    "DEFAULT_MAX_ENTRIES",
    "CircuitDefense",
    "ConnectionDefense",
    "DosConfig",
    "DosGuard",
    "DosStats",
    "DosVerdict",
    "StreamCreationLimiter",
    "StreamDefense",
    "TokenBucket",
]

DEFAULT_MAX_ENTRIES = 65536
"""Per-IP entries kept at most (a few hundred bytes each)."""

_SWEEP_STEPS = 2


class CircuitDefense(IntEnum):
    """``DoSCircuitCreationDefenseType``."""

    NONE = 1
    REFUSE_CELL = 2


class ConnectionDefense(IntEnum):
    """``DoSConnectionDefenseType``."""

    NONE = 1
    CLOSE = 2


class StreamDefense(IntEnum):
    """``DoSStreamCreationDefenseType``."""

    NONE = 1
    REFUSE_STREAM = 2
    CLOSE_CIRCUIT = 3


@dataclass(frozen=True, slots=True)
class DosConfig:
    """The ``DoS*`` options (snake_case of the torrc names) and ``dos_num_circ_max_outq``.

    Defaults: the live network's consensus values (module docstring)."""

    circuit_creation_enabled: bool = True
    circuit_creation_min_connections: int = 2
    circuit_creation_rate: int = 2
    circuit_creation_burst: int = 60
    circuit_creation_defense_type: CircuitDefense = CircuitDefense.REFUSE_CELL
    circuit_creation_defense_time_period: int = 3600
    connection_enabled: bool = True
    connection_max_concurrent_count: int = 50
    connection_defense_type: ConnectionDefense = ConnectionDefense.CLOSE
    connection_connect_rate: int = 20
    connection_connect_burst: int = 40
    connection_connect_defense_time_period: int = 24 * 60 * 60
    stream_creation_enabled: bool = False
    stream_creation_rate: int = 100
    stream_creation_burst: int = 300
    stream_creation_defense_type: StreamDefense = StreamDefense.REFUSE_STREAM
    num_circ_max_outq: int = 5

    def __post_init__(self) -> None:
        """tor's bounds (``networkstatus_get_param`` minimums). Any thread (pure)."""
        for name in ("circuit_creation_min_connections", "circuit_creation_rate",
                     "circuit_creation_burst", "connection_max_concurrent_count",
                     "connection_connect_rate", "connection_connect_burst",
                     "stream_creation_rate", "stream_creation_burst"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.circuit_creation_defense_time_period < 0 or self.num_circ_max_outq < 0:
            raise ValueError("defense period and dos_num_circ_max_outq must be >= 0")
        if self.connection_connect_defense_time_period < 10:
            raise ValueError("connection_connect_defense_time_period must be at least 10")
        object.__setattr__(self, "circuit_creation_defense_type",
                           CircuitDefense(self.circuit_creation_defense_type))
        object.__setattr__(self, "connection_defense_type",
                           ConnectionDefense(self.connection_defense_type))
        object.__setattr__(self, "stream_creation_defense_type",
                           StreamDefense(self.stream_creation_defense_type))

    @classmethod
    def tor_builtin(cls) -> DosConfig:
        """tor 0.4.9's compiled-in defaults (``dos.h``, ``dos.c``): what a tor without a
        consensus runs with (connection and circuit mitigation off). Any thread (pure)."""
        return cls(circuit_creation_enabled=False, circuit_creation_min_connections=3,
                   circuit_creation_rate=3, circuit_creation_burst=90,
                   connection_enabled=False, connection_max_concurrent_count=100,
                   num_circ_max_outq=3)


@dataclass(frozen=True, slots=True)
class DosVerdict:
    """``allowed``, else what to do: ``close_circuit`` (DESTROY with ``reason``, a
    :class:`relay.cells.DestroyReason`) or, for a refused stream, END with ``reason``; a
    refused connection is simply closed. ``why`` is for the log."""

    allowed: bool
    reason: int = 0
    close_circuit: bool = False
    why: str = ""


_ALLOWED = DosVerdict(True)


class TokenBucket:
    """tor's ``token_bucket_ctr_t``: ``rate`` tokens per whole second up to ``burst``, starting
    full. A clock that goes backwards refills it (as ``cc_stats_refill_bucket`` does)."""

    __slots__ = ("burst", "last", "rate", "tokens")

    def __init__(self, rate: int, burst: int, now: float) -> None:
        """Any thread (pure)."""
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.last = int(now)

    def refill(self, now: float) -> None:
        """Add ``rate`` per whole second since the last refill, capped at ``burst``.
        Owner's thread."""
        second = int(now)
        elapsed = second - self.last
        if elapsed < 0 or elapsed * self.rate >= self.burst - self.tokens:
            self.tokens = self.burst
        else:
            self.tokens += elapsed * self.rate
        self.last = second

    def take(self, now: float) -> bool:
        """Refill, then take one token if there is one; False when empty. Owner's thread."""
        self.refill(now)
        if self.tokens > 0:
            self.tokens -= 1
            return True
        return False

    def full_at(self) -> int:
        """The whole second from which the bucket is full again. Owner's thread."""
        missing = self.burst - self.tokens
        return self.last + (missing + self.rate - 1) // self.rate


class _Entry:
    """Per-IP state (``dos_client_stats_t``)."""

    __slots__ = ("cc_bucket", "cc_marked_until", "concurrent", "conn_bucket",
                 "conn_marked_until", "key", "outq_hits")

    def __init__(self, key: IPAddress, config: DosConfig, now: float) -> None:
        self.key = key
        self.concurrent = 0
        self.conn_bucket = TokenBucket(config.connection_connect_rate,
                                       config.connection_connect_burst, now)
        self.conn_marked_until: float | None = None
        self.cc_bucket = TokenBucket(config.circuit_creation_rate,
                                     config.circuit_creation_burst, now)
        self.cc_marked_until: float | None = None
        self.outq_hits = 0

    def idle(self, now: float) -> bool:
        """Nothing here differs from a fresh entry."""
        return (self.concurrent == 0 and self.outq_hits == 0
                and not _marked(self.conn_marked_until, now)
                and not _marked(self.cc_marked_until, now)
                and self.conn_bucket.full_at() <= now and self.cc_bucket.full_at() <= now)


def _marked(until: float | None, now: float) -> bool:
    return until is not None and until >= now


def _key(address: str | IPAddress) -> IPAddress:
    """The table key: an ``ipaddress`` object, mapped IPv6 as IPv4, without a scope id."""
    if isinstance(address, str):
        address = ipaddress.ip_address(address.strip("[]"))
    if address.version == 6:
        plain = ipaddress.IPv6Address(int(address))
        return plain.ipv4_mapped or plain
    return address


@dataclass
class DosStats:
    """Counters for a heartbeat line, as tor's ``dos_log_heartbeat`` reports them."""

    circuits_rejected: int = 0
    marked_addresses: int = 0
    marked_addresses_max_queue: int = 0
    connections_rejected: int = 0
    connect_rejected: int = 0
    streams_rejected: int = 0
    entries_evicted: int = 0


@dataclass
class DosGuard:
    """The per-IP DoS state of one relay. Loop thread only.

    ``now`` arguments are seconds on one monotonic clock (the caller's; tests pass their own).
    """

    config: DosConfig = field(default_factory=DosConfig)
    max_entries: int = DEFAULT_MAX_ENTRIES
    rng: random.Random = field(default_factory=random.Random)
    exempt: Collection[IPAddress] = frozenset()
    stats: DosStats = field(default_factory=DosStats)
    _table: OrderedDict[IPAddress, _Entry] = field(default_factory=OrderedDict, init=False,
                                                   repr=False)

    def __post_init__(self) -> None:
        if self.max_entries < 1:
            raise ValueError("max_entries must be at least 1")

    def __len__(self) -> int:
        """Entries held. Loop thread only."""
        return len(self._table)

    @property
    def enabled(self) -> bool:
        """Connection or circuit-creation mitigation is on (tor tracks nothing otherwise).
        Loop thread only."""
        return self.config.connection_enabled or self.config.circuit_creation_enabled

    def _mark_until(self, now: float, period: int) -> float:
        half = period // 2
        return now + period + (self.rng.randrange(1, half) if half > 1 else 1)

    def _sweep(self, now: float) -> None:
        """Look at the oldest entries: drop idle ones, rotate the others to the end."""
        for _ in range(min(_SWEEP_STEPS, len(self._table))):
            key, entry = next(iter(self._table.items()))
            if entry.idle(now):
                del self._table[key]
            else:
                self._table.move_to_end(key)

    def _lookup(self, key: IPAddress, now: float, create: bool) -> _Entry | None:
        self._sweep(now)
        entry = self._table.get(key)
        if entry is not None:
            self._table.move_to_end(key)
            return entry
        if not create:
            return None
        entry = self._table[key] = _Entry(key, self.config, now)
        while len(self._table) > self.max_entries:
            self._table.popitem(last=False)
            self.stats.entries_evicted += 1
        return entry

    # ------------------------------------------------------------------ connections

    def check_connection(self, address: str | IPAddress, now: float) -> DosVerdict:
        """At accept, before the connection is counted: may this address open another ORPort
        connection? (``dos_conn_addr_get_defense_type``). A refusal means: close it now.
        Loop thread only."""
        key = _key(address)
        if not self.config.connection_enabled or key in self.exempt:
            return _ALLOWED
        entry = self._lookup(key, now, create=False)
        if entry is None:
            return _ALLOWED
        refuse = self.config.connection_defense_type == ConnectionDefense.CLOSE
        if _marked(entry.conn_marked_until, now):
            self.stats.connect_rejected += 1
            return DosVerdict(not refuse, why=f"{key} is marked for connecting too fast")
        entry.conn_marked_until = None
        if entry.concurrent > self.config.connection_max_concurrent_count:
            self.stats.connections_rejected += 1
            return DosVerdict(not refuse, why=f"{key} has {entry.concurrent} concurrent "
                              "connections, more than DoSConnectionMaxConcurrentCount")
        return _ALLOWED

    def connection_opened(self, address: str | IPAddress, now: float) -> object | None:
        """An inbound connection from ``address`` was accepted (``dos_new_client_conn``).

        Returns a ticket to pass to :meth:`connection_closed`, or None when not tracked.
        Loop thread only."""
        key = _key(address)
        if not self.enabled or key in self.exempt:
            return None
        entry = self._lookup(key, now, create=True)
        assert entry is not None
        entry.concurrent += 1
        entry.conn_bucket.take(now)
        if entry.conn_bucket.tokens == 0 and entry.conn_marked_until is None:
            entry.conn_marked_until = self._mark_until(
                now, self.config.connection_connect_defense_time_period)
        return entry

    def connection_closed(self, ticket: object | None) -> None:
        """That connection closed (``dos_close_client_conn``); a ticket whose entry was
        evicted meanwhile is ignored. Loop thread only."""
        if not isinstance(ticket, _Entry) or self._table.get(ticket.key) is not ticket:
            return
        if ticket.concurrent > 0:
            ticket.concurrent -= 1

    # ------------------------------------------------------------------ circuits

    def circuit_create(self, address: str | IPAddress, now: float, is_client: bool
                       ) -> DosVerdict:
        """A CREATE/CREATE2/CREATE_FAST cell arrived on a link from ``address``
        (``dos_cc_new_create_cell`` then ``dos_cc_get_defense_type``). ``is_client``: the peer
        did not authenticate as a relay. A refusal means DESTROY(RESOURCELIMIT) for that
        circuit id. Loop thread only."""
        key = _key(address)
        config = self.config
        if not config.circuit_creation_enabled or not is_client or key in self.exempt:
            return _ALLOWED
        entry = self._lookup(key, now, create=False)
        if entry is None:
            return _ALLOWED
        entry.cc_bucket.take(now)
        if (entry.cc_bucket.tokens == 0
                and entry.concurrent >= config.circuit_creation_min_connections):
            if entry.cc_marked_until is None:
                self.stats.marked_addresses += 1
            entry.cc_marked_until = self._mark_until(
                now, config.circuit_creation_defense_time_period)
        if _marked(entry.cc_marked_until, now):
            self.stats.circuits_rejected += 1
            if config.circuit_creation_defense_type == CircuitDefense.REFUSE_CELL:
                return DosVerdict(False, DestroyReason.RESOURCELIMIT, True,
                                  f"{key} is marked for creating circuits too fast")
        return _ALLOWED

    def note_max_outq(self, address: str | IPAddress, now: float, is_client: bool) -> None:
        """A circuit from ``address`` hit the outbound cell-queue cap
        (``dos_note_circ_max_outq``): after ``dos_num_circ_max_outq`` hits the address is
        marked as for circuit creation. Loop thread only."""
        key = _key(address)
        config = self.config
        if (not config.circuit_creation_enabled or not is_client or key in self.exempt
                or config.num_circ_max_outq == 0):
            return
        entry = self._lookup(key, now, create=False)
        if entry is None or _marked(entry.cc_marked_until, now):
            return
        entry.outq_hits += 1
        if entry.outq_hits >= config.num_circ_max_outq:
            if entry.cc_marked_until is None:
                self.stats.marked_addresses_max_queue += 1
            entry.cc_marked_until = self._mark_until(
                now, config.circuit_creation_defense_time_period)

    # ------------------------------------------------------------------ streams

    def stream_limiter(self, now: float) -> StreamCreationLimiter:
        """A new circuit's stream-creation bucket (``dos_stream_init_circ_tbf``).
        Loop thread only."""
        return StreamCreationLimiter(self, now)

    def heartbeat(self) -> str:
        """One line like tor's DoS heartbeat. Loop thread only."""
        s = self.stats
        return (f"DoS mitigation: {s.circuits_rejected} circuits rejected, "
                f"{s.marked_addresses} marked addresses, {s.marked_addresses_max_queue} marked "
                f"for max queue, {s.connections_rejected} same address concurrent connections "
                f"rejected, {s.connect_rejected} connections rejected, {s.streams_rejected} "
                f"streams rejected; {len(self._table)} addresses tracked, "
                f"{s.entries_evicted} evicted")


class StreamCreationLimiter:
    """One circuit's ``DoSStreamCreation*`` token bucket. Loop thread only."""

    __slots__ = ("_bucket", "_guard")

    def __init__(self, guard: DosGuard, now: float) -> None:
        """Full at creation, as tor. Loop thread only."""
        config = guard.config
        self._guard = guard
        self._bucket = TokenBucket(config.stream_creation_rate, config.stream_creation_burst, now)

    def on_begin(self, now: float) -> DosVerdict:
        """A BEGIN or RESOLVE arrived on this circuit (``dos_stream_new_begin_or_resolve_cell``;
        BEGIN_DIR is not counted). Refusals: END(MISC) for the stream, or
        ``close_circuit`` with RESOURCELIMIT. Loop thread only."""
        config = self._guard.config
        if not config.stream_creation_enabled or self._bucket.take(now):
            return _ALLOWED
        self._guard.stats.streams_rejected += 1
        defense = config.stream_creation_defense_type
        if defense == StreamDefense.REFUSE_STREAM:
            return DosVerdict(False, END_REASON_MISC, False, "stream creation rate exceeded")
        if defense == StreamDefense.CLOSE_CIRCUIT:
            return DosVerdict(False, DestroyReason.RESOURCELIMIT, True,
                              "stream creation rate exceeded")
        return _ALLOWED
