"""relay.dircache over the real event loop: fetch, check, compress off the loop, install,
refresh on tor's schedule, refuse what does not verify, fall over to the next authority.

The "authority" here is a DirPort of this project serving the real documents of
tests/data/dirserv (signed by a real tor 0.4.9 authority); the real authority is
examples.dirserv_interop's (tests/test_dirserv_tor.py). Requests reaching it are recorded,
so the tests check what the cache asked for, in order.
"""

from __future__ import annotations

import random

import pytest

from reactor import Reactor
from relay.dircache import Authority, DirCache, next_fetch_time
from relay.dirdocs import ConsensusInfo, b64_digest, parse_consensus
from relay.dirhttp import Request
from relay.dirport import serve_dirport
from relay.dirstore import DirStore, stored_consensus
from tests.support_dirdata import (
    DESCRIPTOR,
    KEYS,
    MICRO,
    MICRO_INFO,
    NOW,
    NS,
    NS_INFO,
    V3IDENT,
    load_store,
)
from tests.support_loop import run_until_met


@pytest.fixture
def reactor():  # type: ignore[no-untyped-def]
    loop = Reactor()
    yield loop
    loop.close()


class FakeAuthority:
    """A DirPort serving ``store``, recording (target, status) of each request."""

    def __init__(self, reactor: Reactor, store: DirStore) -> None:
        self.seen: list[tuple[str, int | None]] = []
        self.listener = serve_dirport(reactor, "127.0.0.1", 0, store, clock=lambda: NOW,
                                      on_request=self._seen)
        self.port = self.listener.address[1]

    def _seen(self, request: Request, status: int | None) -> None:
        self.seen.append((request.target, status))


def _cache(reactor: Reactor, ports: list[int], updates: list, **options: object) -> DirCache:
    return DirCache(reactor, [Authority("127.0.0.1", p, V3IDENT) for p in ports],
                    clock=lambda: NOW, rng=random.Random(7),
                    on_update=lambda cache: updates.append(cache.installs), **options)


@pytest.mark.parametrize("in_thread", [True, False])
def test_first_refresh_fetches_checks_and_installs_everything(reactor: Reactor,
                                                              in_thread: bool) -> None:
    authority = FakeAuthority(reactor, load_store(own=False))
    updates: list[int] = []
    cache = _cache(reactor, [authority.port], updates, compress_in_thread=in_thread)
    cache.start()
    run_until_met(reactor, lambda: bool(updates), 20)
    store = cache.store
    assert store.consensus("microdesc").info.text == MICRO
    assert store.consensus("ns").info.text == NS
    assert [c.info.text for c in store.certificates()] == [KEYS]
    assert all(store.has_microdesc(d) for d in MICRO_INFO.microdesc_digests)
    assert store.microdesc_count == len(MICRO_INFO.microdesc_digests)
    assert set(store.consensus("microdesc").document.forms) == {
        "identity", "deflate", "gzip", "x-tor-lzma"}
    signature = MICRO_INFO.signatures[0]
    digests = sorted(MICRO_INFO.microdesc_digests)
    assert [target for target, _ in authority.seen] == [
        "/tor/status-vote/current/consensus-microdesc",
        "/tor/status-vote/current/consensus",
        f"/tor/keys/fp-sk/{V3IDENT}-{signature.signing_key_digest}",
        "/tor/micro/d/" + "-".join(b64_digest(d) for d in digests)]
    assert all(status == 200 for _, status in authority.seen)
    assert (cache.refreshes, cache.installs, cache.last_error) == (1, 1, None)
    assert cache.next_fetch_at == next_fetch_time(MICRO_INFO, NOW, random.Random(7))
    cache.stop()


def test_a_refresh_of_an_unchanged_consensus_costs_two_304s(reactor: Reactor) -> None:
    authority = FakeAuthority(reactor, load_store(own=False))
    updates: list[int] = []
    cache = _cache(reactor, [authority.port], updates)
    cache.start()
    run_until_met(reactor, lambda: len(updates) == 1, 20)
    cache.refresh_now()
    run_until_met(reactor, lambda: len(updates) == 2, 20)
    assert authority.seen[4:] == [("/tor/status-vote/current/consensus-microdesc", 304),
                                  ("/tor/status-vote/current/consensus", 304)]
    assert (cache.refreshes, cache.installs) == (2, 1)
    cache.stop()


def test_a_consensus_that_does_not_verify_is_not_served(reactor: Reactor) -> None:
    forged = MICRO.replace(b"Running Stable", b"Running Stablf", 1)
    assert forged != MICRO
    store = load_store(own=False)
    store.install_consensus(stored_consensus(parse_consensus(forged)))
    authority = FakeAuthority(reactor, store)
    cache = _cache(reactor, [authority.port], [], retry_initial=600.0, flavors=("microdesc",))
    cache.start()
    run_until_met(reactor, lambda: cache.last_error is not None, 20)
    assert "consensus (microdesc) refused" in cache.last_error
    assert "0 valid signatures" in cache.last_error
    assert cache.store.consensus("microdesc") is None and cache.store.microdesc_count == 0
    assert not any(t.startswith("/tor/micro/") for t, _ in authority.seen)
    cache.stop()


def test_a_missing_certificate_means_no_consensus(reactor: Reactor) -> None:
    store = DirStore()
    store.install_consensus(stored_consensus(MICRO_INFO))
    authority = FakeAuthority(reactor, store)
    cache = _cache(reactor, [authority.port], [], retry_initial=600.0, flavors=("microdesc",))
    cache.start()
    run_until_met(reactor, lambda: cache.last_error is not None, 20)
    assert "key certificates" in cache.last_error and "404 Not found" in cache.last_error
    assert cache.store.consensus("microdesc") is None


def test_the_next_authority_is_tried_after_a_failure(reactor: Reactor) -> None:
    down = serve_dirport(reactor, "127.0.0.1", 0, DirStore())
    down_port = down.address[1]
    down.close()
    authority = FakeAuthority(reactor, load_store(own=False))
    updates: list[int] = []
    cache = _cache(reactor, [down_port, authority.port], updates, retry_initial=0.01)
    cache.start()
    run_until_met(reactor, lambda: bool(updates), 20)
    assert cache.store.consensus("microdesc").info.text == MICRO
    assert cache.last_error is None and cache.installs == 1
    cache.stop()


def test_microdescs_the_authority_lacks_do_not_stop_the_consensus(reactor: Reactor) -> None:
    store = load_store(own=False)
    dropped = sorted(MICRO_INFO.microdesc_digests)[0]
    store.retain_microdescs([d for d in MICRO_INFO.microdesc_digests if d != dropped])
    authority = FakeAuthority(reactor, store)
    updates: list[int] = []
    cache = _cache(reactor, [authority.port], updates, flavors=("microdesc",))
    cache.start()
    run_until_met(reactor, lambda: bool(updates), 20)
    assert cache.store.consensus("microdesc") is not None
    assert not cache.store.has_microdesc(dropped) and cache.store.microdesc_count == 1
    cache.stop()


def test_own_descriptor_and_bad_configuration(reactor: Reactor) -> None:
    cache = _cache(reactor, [1], [])
    cache.set_own_descriptor(DESCRIPTOR.decode("ascii"))
    assert cache.store.own_descriptor().document.text == DESCRIPTOR
    with pytest.raises(ValueError):
        DirCache(reactor, [])
    with pytest.raises(ValueError):
        _cache(reactor, [1], [], flavors=("unflavored",))
    with pytest.raises(RuntimeError):
        cache.refresh_now()  # not started


def _info(valid_after: int, fresh: int, valid: int) -> ConsensusInfo:
    return ConsensusInfo("microdesc", valid_after, valid_after + fresh, valid_after + valid,
                         (), (), b"", b"")


def test_next_fetch_time_is_tors_rule_for_caches() -> None:
    rng = random.Random(1)
    hourly = _info(0, 3600, 3 * 3600)  # the public network: hourly, valid three hours
    times = {next_fetch_time(hourly, 10, rng) for _ in range(2000)}
    assert min(times) >= 3600 + 120 and max(times) < 3600 + 120 + 1800
    fast = _info(0, 10, 20)  # this project's testing network
    times = {next_fetch_time(fast, 5, rng) for _ in range(500)}
    assert times == {11.0, 12.0, 13.0, 14.0, 15.0}
    assert next_fetch_time(fast, 21, rng) == 21  # expired: now
    assert next_fetch_time(NS_INFO, NS_INFO.valid_after - 1, rng) == NS_INFO.valid_after - 1
    tight = _info(0, 10, 12)  # the window must end before valid-until
    assert all(next_fetch_time(tight, 1, rng) < 12 for _ in range(200))


def test_a_stopped_cache_starts_again(reactor: Reactor) -> None:
    authority = FakeAuthority(reactor, load_store(own=False))
    updates: list[int] = []
    cache = _cache(reactor, [authority.port], updates)
    cache.start()
    run_until_met(reactor, lambda: len(updates) == 1, 20)
    cache.stop()
    cache.stop()
    cache.start()
    run_until_met(reactor, lambda: len(updates) == 2, 20)
    assert cache.refreshes == 2 and cache.installs == 1
    cache.stop()
