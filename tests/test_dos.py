"""relay.dos: tor's per-IP connection and circuit-creation limits and the per-circuit stream
limit, driven by a fake clock; the per-IP table's bounds under a flood of addresses."""

from __future__ import annotations

import ipaddress
import random

import pytest

from relay.cells import DestroyReason
from relay.circuits import END_REASON_MISC
from relay.dos import (
    CircuitDefense,
    ConnectionDefense,
    DosConfig,
    DosGuard,
    StreamDefense,
    TokenBucket,
)

T0 = 1_000_000.0
CLIENT = "198.51.100.20"


def guard(**config: object) -> DosGuard:
    return DosGuard(DosConfig(**config), rng=random.Random(5))  # type: ignore[arg-type]


def open_connections(g: DosGuard, address: str, count: int, now: float) -> list[object]:
    tickets = []
    for _ in range(count):
        assert g.check_connection(address, now).allowed
        tickets.append(g.connection_opened(address, now))
    return tickets


# --------------------------------------------------------------------------- token bucket


def test_token_bucket_rate_burst_and_whole_second_refill() -> None:
    bucket = TokenBucket(rate=2, burst=5, now=T0)
    assert [bucket.take(T0) for _ in range(6)] == [True] * 5 + [False]
    assert not bucket.take(T0 + 0.99)          # same whole second: no refill
    assert bucket.take(T0 + 1.0) and bucket.take(T0 + 1.2) and not bucket.take(T0 + 1.5)
    bucket.refill(T0 + 100)
    assert bucket.tokens == 5                   # capped at the burst
    bucket.refill(T0 - 50)                      # clock went backwards: full
    assert bucket.tokens == 5


def test_defaults_are_the_live_consensus_and_tor_builtin_differs() -> None:
    live = DosConfig()
    assert (live.circuit_creation_enabled, live.circuit_creation_min_connections,
            live.circuit_creation_rate, live.circuit_creation_burst,
            live.circuit_creation_defense_time_period) == (True, 2, 2, 60, 3600)
    assert (live.connection_enabled, live.connection_max_concurrent_count,
            live.connection_connect_rate, live.connection_connect_burst,
            live.connection_connect_defense_time_period) == (True, 50, 20, 40, 86400)
    assert (live.stream_creation_enabled, live.stream_creation_rate,
            live.stream_creation_burst) == (False, 100, 300)
    assert live.stream_creation_defense_type is StreamDefense.REFUSE_STREAM
    builtin = DosConfig.tor_builtin()
    assert not builtin.circuit_creation_enabled and not builtin.connection_enabled
    assert (builtin.circuit_creation_rate, builtin.circuit_creation_burst,
            builtin.connection_max_concurrent_count, builtin.num_circ_max_outq) == (3, 90, 100, 3)


@pytest.mark.parametrize("field, value", [
    ("circuit_creation_rate", 0), ("connection_connect_burst", 0),
    ("connection_connect_defense_time_period", 9), ("stream_creation_defense_type", 4),
])
def test_config_bounds(field: str, value: int) -> None:
    with pytest.raises(ValueError):
        DosConfig(**{field: value})  # type: ignore[arg-type]


# --------------------------------------------------------------------------- connections


def test_concurrent_connections_are_capped_at_max_plus_one() -> None:
    g = guard(connection_max_concurrent_count=3, connection_connect_burst=100)
    tickets = open_connections(g, CLIENT, 4, T0)   # count 3 is not above 3: the 4th is let in
    refused = g.check_connection(CLIENT, T0)
    assert not refused.allowed and "concurrent" in refused.why
    assert g.stats.connections_rejected == 1
    assert g.check_connection("198.51.100.21", T0).allowed     # another address is unaffected
    g.connection_closed(tickets[0])
    g.connection_closed(tickets[1])
    assert g.check_connection(CLIENT, T0).allowed


def test_defense_type_none_counts_but_allows() -> None:
    g = guard(connection_max_concurrent_count=1, connection_defense_type=ConnectionDefense.NONE)
    open_connections(g, CLIENT, 2, T0)
    assert g.check_connection(CLIENT, T0).allowed
    assert g.stats.connections_rejected == 1


def test_connect_rate_marks_the_address_for_the_defense_period() -> None:
    g = guard(connection_connect_rate=1, connection_connect_burst=3,
              connection_connect_defense_time_period=100)
    tickets = open_connections(g, CLIENT, 3, T0)     # the 3rd empties the bucket: marked
    for ticket in tickets:
        g.connection_closed(ticket)
    refused = g.check_connection(CLIENT, T0 + 50)
    assert not refused.allowed and "too fast" in refused.why
    # Marked for 100 s plus a random 1..49 s: refused at +100, allowed after +150.
    assert not g.check_connection(CLIENT, T0 + 100).allowed
    assert g.check_connection(CLIENT, T0 + 151).allowed
    assert g.stats.connect_rejected == 2


def test_closing_an_untracked_or_stale_ticket_changes_nothing() -> None:
    g = guard(connection_max_concurrent_count=1)
    g.connection_closed(None)
    g.connection_closed(object())
    tickets = open_connections(g, CLIENT, 2, T0)
    g.connection_closed(tickets[0])
    g.connection_closed(tickets[0])
    g.connection_closed(tickets[0])   # never below zero
    assert g.check_connection(CLIENT, T0).allowed


def test_ipv4_mapped_sources_count_as_ipv4() -> None:
    g = guard(connection_max_concurrent_count=1)
    g.connection_opened(CLIENT, T0)
    g.connection_opened(f"::ffff:{CLIENT}", T0)
    assert not g.check_connection(ipaddress.ip_address(CLIENT), T0).allowed
    assert len(g) == 1


def test_disabled_mitigation_tracks_nothing() -> None:
    g = guard(connection_enabled=False, circuit_creation_enabled=False)
    assert g.connection_opened(CLIENT, T0) is None
    assert len(g) == 0 and g.check_connection(CLIENT, T0).allowed


def test_exempt_addresses_are_outside_the_limits() -> None:
    g = DosGuard(DosConfig(connection_max_concurrent_count=1),
                 exempt=frozenset({ipaddress.ip_address("127.0.0.1")}))
    for _ in range(5):
        assert g.check_connection("127.0.0.1", T0).allowed
        assert g.connection_opened("127.0.0.1", T0) is None
    assert g.circuit_create("127.0.0.1", T0, is_client=True).allowed
    assert len(g) == 0


# --------------------------------------------------------------------------- circuits


def test_circuit_creation_needs_burst_and_min_connections() -> None:
    g = guard(circuit_creation_burst=5, circuit_creation_rate=1,
              circuit_creation_min_connections=2, circuit_creation_defense_time_period=60)
    open_connections(g, CLIENT, 1, T0)
    # One connection only: an empty bucket does not mark the address.
    assert all(g.circuit_create(CLIENT, T0, is_client=True).allowed for _ in range(20))
    assert g.stats.marked_addresses == 0
    open_connections(g, CLIENT, 1, T0)
    verdict = g.circuit_create(CLIENT, T0, is_client=True)
    assert not verdict.allowed and verdict.close_circuit
    assert verdict.reason == DestroyReason.RESOURCELIMIT
    assert g.stats.marked_addresses == 1 and g.stats.circuits_rejected == 1
    # Relays (authenticated peers) are never limited by this.
    assert g.circuit_create(CLIENT, T0, is_client=False).allowed
    # Still marked while the bucket refills; unmarked after 60 + up to 29 s.
    assert not g.circuit_create(CLIENT, T0 + 30, is_client=True).allowed
    assert g.circuit_create(CLIENT, T0 + 200, is_client=True).allowed


def test_circuit_bucket_refills_at_the_rate() -> None:
    g = guard(circuit_creation_burst=3, circuit_creation_rate=2,
              circuit_creation_min_connections=1)
    open_connections(g, CLIENT, 1, T0)
    assert [g.circuit_create(CLIENT, T0, True).allowed for _ in range(2)] == [True, True]
    # Two more seconds give four tokens, capped at three.
    assert all(g.circuit_create(CLIENT, T0 + 2, True).allowed for _ in range(2))
    assert g.stats.marked_addresses == 0
    assert not g.circuit_create(CLIENT, T0 + 2, True).allowed   # the third empties it: marked


def test_circuit_defense_none_marks_but_allows() -> None:
    g = guard(circuit_creation_burst=1, circuit_creation_min_connections=1,
              circuit_creation_defense_type=CircuitDefense.NONE)
    open_connections(g, CLIENT, 1, T0)
    assert all(g.circuit_create(CLIENT, T0, True).allowed for _ in range(3))
    assert g.stats.marked_addresses == 1 and g.stats.circuits_rejected == 3


def test_outbound_queue_overflows_mark_the_address() -> None:
    g = guard(num_circ_max_outq=3)
    open_connections(g, CLIENT, 1, T0)
    for _ in range(2):
        g.note_max_outq(CLIENT, T0, is_client=True)
    assert g.circuit_create(CLIENT, T0, True).allowed
    g.note_max_outq(CLIENT, T0, is_client=True)
    assert not g.circuit_create(CLIENT, T0, True).allowed
    assert g.stats.marked_addresses_max_queue == 1
    off = guard(num_circ_max_outq=0)
    open_connections(off, CLIENT, 1, T0)
    for _ in range(10):
        off.note_max_outq(CLIENT, T0, is_client=True)
    assert off.circuit_create(CLIENT, T0, True).allowed


# --------------------------------------------------------------------------- streams


@pytest.mark.parametrize("defense, reason, close", [
    (StreamDefense.REFUSE_STREAM, END_REASON_MISC, False),
    (StreamDefense.CLOSE_CIRCUIT, DestroyReason.RESOURCELIMIT, True),
])
def test_stream_creation_limit(defense: StreamDefense, reason: int, close: bool) -> None:
    g = guard(stream_creation_enabled=True, stream_creation_rate=2, stream_creation_burst=4,
              stream_creation_defense_type=defense)
    limiter = g.stream_limiter(T0)
    assert all(limiter.on_begin(T0).allowed for _ in range(4))
    refused = limiter.on_begin(T0)
    assert not refused.allowed and refused.reason == reason and refused.close_circuit is close
    assert limiter.on_begin(T0 + 1).allowed and limiter.on_begin(T0 + 1).allowed
    assert not limiter.on_begin(T0 + 1).allowed
    assert g.stats.streams_rejected == 2
    # Each circuit has its own bucket.
    assert g.stream_limiter(T0 + 1).on_begin(T0 + 1).allowed


def test_stream_limit_off_by_default() -> None:
    limiter = guard().stream_limiter(T0)
    assert all(limiter.on_begin(T0).allowed for _ in range(1000))


# --------------------------------------------------------------------------- table bounds


def test_a_flood_of_distinct_addresses_stays_within_max_entries() -> None:
    g = DosGuard(DosConfig(), max_entries=500, rng=random.Random(1))
    base = int(ipaddress.ip_address("2001:db8::"))
    for i in range(20_000):
        address = ipaddress.IPv6Address(base + i)
        g.check_connection(address, T0 + i * 0.001)
        g.connection_opened(address, T0 + i * 0.001)
        assert len(g) <= 500
    assert g.stats.entries_evicted == 20_000 - 500  # every entry held an open connection


def test_idle_entries_expire_and_busy_ones_stay() -> None:
    g = DosGuard(DosConfig(), max_entries=1000, rng=random.Random(1))
    held = g.connection_opened(CLIENT, T0)
    for i in range(50):
        ticket = g.connection_opened(f"203.0.113.{i}", T0)
        g.connection_closed(ticket)
    assert len(g) == 51
    # Once their buckets are full again (60 / 2 s for circuits), the idle entries go, two per
    # event; the one with an open connection stays.
    for step in range(40):
        g.check_connection("192.0.2.1", T0 + 31 + step)
    assert len(g) == 1
    g.connection_closed(held)
    assert g.check_connection(CLIENT, T0 + 100).allowed


def test_evicted_entry_forgets_its_connections() -> None:
    g = DosGuard(DosConfig(connection_max_concurrent_count=1), max_entries=2,
                 rng=random.Random(1))
    first = open_connections(g, CLIENT, 2, T0)
    g.connection_opened("203.0.113.1", T0)
    g.connection_opened("203.0.113.2", T0)     # evicts CLIENT (least recently used)
    assert g.stats.entries_evicted == 1
    assert g.check_connection(CLIENT, T0).allowed
    g.connection_closed(first[0])               # stale ticket: ignored
    fresh = g.connection_opened(CLIENT, T0)
    assert fresh is not first[0]
    assert "addresses tracked" in g.heartbeat()
