"""relay.connlimit: the descriptor budget (tor's ConnLimit and ULIMIT_BUFFER), the exit-stream
ceiling that keeps descriptors for links, and tor's OR-link housekeeping rule."""

from __future__ import annotations

import random
import resource

import pytest

from relay.connlimit import (
    KEEPALIVE_PERIOD,
    ULIMIT_BUFFER,
    ConnLimitError,
    FdBudget,
    LinkAction,
    channel_idle_timeout,
    link_housekeeping,
)


def test_budget_from_the_real_rlimit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1000:
        pytest.skip("this machine's hard RLIMIT_NOFILE is below tor's ConnLimit")
    budget = FdBudget.from_rlimit()
    assert budget.max_sockets == min(soft, 2**31 - 1) - ULIMIT_BUFFER


def test_budget_numbers_follow_tor() -> None:
    budget = FdBudget.from_rlimit(soft=4096, hard=4096)
    assert budget.max_sockets == 4064
    assert budget.high_threshold == 4064 - 64          # min(4064 / 20, 64) kept in reserve
    assert budget.low_threshold == 3048
    small = FdBudget.from_rlimit(conn_limit=100, soft=232, hard=232)
    assert small.max_sockets == 200 and small.high_threshold == 190


@pytest.mark.parametrize("conn_limit, hard, why", [
    (31, 4096, "at least 32"),
    (1000, 999, "limited to 999"),
])
def test_tor_refuses_to_start_below_connlimit(conn_limit: int, hard: int, why: str) -> None:
    with pytest.raises(ConnLimitError, match=why):
        FdBudget.from_rlimit(conn_limit=conn_limit, soft=hard, hard=hard)


def test_links_use_every_socket_and_streams_stop_at_the_reserve() -> None:
    budget = FdBudget(max_sockets=1000)
    assert budget.may_open_link(998) is None
    refusal = budget.may_open_link(999)
    assert refusal is not None and "limit is 1000" in refusal
    assert budget.may_open_exit_stream(949) is None
    stream_refusal = budget.may_open_exit_stream(950)
    assert stream_refusal is not None and "keep 50 for relay links" in stream_refusal
    # Between the two ceilings a link is still accepted while streams are refused.
    assert budget.may_open_link(975) is None and budget.may_open_exit_stream(975) is not None


def test_idle_timeouts_are_drawn_like_tors() -> None:
    rng = random.Random(3)
    clients = {channel_idle_timeout(rng, client_or_noncanonical=True) for _ in range(2000)}
    assert min(clients) == 180 and max(clients) == 269
    relays = {channel_idle_timeout(rng, client_or_noncanonical=False) for _ in range(2000)}
    assert min(relays) >= 2700 and max(relays) <= 4499 and len(relays) > 100
    short = {channel_idle_timeout(rng, client_or_noncanonical=False, nf_conntimeout_relays=1)
             for _ in range(200)}
    assert min(short) >= 45 and max(short) < 75      # clamped to tor's minimum of 60 s


def housekeeping(now: float, **overrides: object) -> LinkAction:
    state: dict[str, object] = dict(is_open=True, circuits=0, last_had_circuits=0.0,
                                    idle_timeout=200, last_write=now, last_empty=now,
                                    outbuf_len=0)
    state.update(overrides)
    return link_housekeeping(now, **state).action  # type: ignore[arg-type]


def test_link_without_circuits_closes_after_its_idle_timeout() -> None:
    assert housekeeping(199.0) is LinkAction.KEEP
    assert housekeeping(200.0) is LinkAction.CLOSE
    assert housekeeping(5000.0, circuits=1) is LinkAction.KEEP
    assert housekeeping(5000.0, last_had_circuits=4900.0) is LinkAction.KEEP
    verdict = link_housekeeping(400.0, is_open=True, circuits=0, last_had_circuits=0.0,
                                idle_timeout=200, last_write=400.0, last_empty=400.0,
                                outbuf_len=0)
    assert "no circuits for 400; timeout 200" in verdict.why


def test_unopened_link_closes_after_keepalive_period() -> None:
    assert housekeeping(299.0, is_open=False, last_write=0.0) is LinkAction.KEEP
    assert housekeeping(300.0, is_open=False, last_write=0.0) is LinkAction.CLOSE


def test_stuck_link_closes_and_quiet_link_gets_a_keepalive() -> None:
    stuck = housekeeping(3000.0, circuits=2, last_write=0.0, last_empty=0.0, outbuf_len=512)
    assert stuck is LinkAction.CLOSE
    assert housekeeping(3000.0, circuits=2, last_write=0.0, last_empty=2999.0,
                        outbuf_len=0) is LinkAction.SEND_KEEPALIVE
    assert housekeeping(float(KEEPALIVE_PERIOD) - 1, circuits=1, last_write=0.0,
                        last_empty=0.0) is LinkAction.KEEP
    assert housekeeping(float(KEEPALIVE_PERIOD), circuits=1, last_write=0.0, last_empty=0.0,
                        outbuf_len=10) is LinkAction.KEEP    # data waiting: no padding
