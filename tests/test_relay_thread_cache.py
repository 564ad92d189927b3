"""A relay with TLS records on the pool runs with glibc's per-thread malloc cache off.

* ``workers.tuning.env_without_thread_cache``: the tunable added (alone, or after others), and
  nothing to do when the environment already sizes the cache;
* ``python -m examples.relay --tls-on-pool``: the process that says READY (the same process id
  the parent started) runs with the tunable in its environment, and works; without
  ``--tls-on-pool`` the relay is left as it was started;
* a ``RelayNode`` embedded in a process started without the tunable, with TLS records on the
  pool, says so in a warning (it cannot turn the cache off itself).

Why (a creeping RSS otherwise, measured with ``make soak``): docs/tuning.md.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from benchmarks.relay_proc import RelayProcess
from reactor import Reactor
from relay.config import RelayConfig
from relay.identity.keys import RelayIdentity
from relay.node import RelayNode
from workers.tuning import NO_THREAD_CACHE_TUNABLE, env_without_thread_cache

glibc = pytest.mark.skipif(not os.confstr_names.get("CS_GNU_LIBC_VERSION"),
                           reason="the C library is not glibc")


@glibc
def test_the_tunable_is_added_once() -> None:
    env = env_without_thread_cache({"PATH": "/bin"})
    assert env == {"PATH": "/bin", "GLIBC_TUNABLES": NO_THREAD_CACHE_TUNABLE}
    other = env_without_thread_cache({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
    assert other is not None
    assert other["GLIBC_TUNABLES"] == f"glibc.malloc.arena_max=2:{NO_THREAD_CACHE_TUNABLE}"
    assert env_without_thread_cache(env) is None
    assert env_without_thread_cache({"GLIBC_TUNABLES": "glibc.malloc.tcache_count=7"}) is None


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().partition("=")[::2] for item in raw if b"=" in item)


@glibc
@pytest.mark.parametrize("on_pool", [True, False])
def test_a_relay_with_tls_on_the_pool_runs_without_the_cache(tmp_path: Path,
                                                             on_pool: bool) -> None:
    if "GLIBC_TUNABLES" in os.environ:
        pytest.skip("this environment sets GLIBC_TUNABLES itself")
    relay = RelayProcess(tmp_path / "relay", tls=True, threads=2,
                         extra_args=("--tls-on-pool",) if on_pool else ())
    relay.start()
    try:
        tunables = _environ(relay.pid).get("GLIBC_TUNABLES")
        assert tunables == (NO_THREAD_CACHE_TUNABLE if on_pool else None)
        stats = relay.stats()  # the process it started answers, with its worker pool
        assert stats["threads"] == 2 and stats["worker_threads_alive"] == 2
    finally:
        final = relay.stop()
    assert final is not None and final["circuits_open"] == 0


@glibc
@pytest.mark.parametrize(("on_pool", "tunables", "warned"), [
    (True, None, True),
    (True, NO_THREAD_CACHE_TUNABLE, False),
    (True, "glibc.malloc.tcache_count=7", False),  # sized on purpose: left to its owner
    (False, None, False),
])
def test_an_embedded_node_warns_when_the_cache_is_on(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        on_pool: bool, tunables: str | None, warned: bool) -> None:
    if tunables is None:
        monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    else:
        monkeypatch.setenv("GLIBC_TUNABLES", tunables)
    identity = RelayIdentity.load_or_create(tmp_path / "id", "cached")
    caplog.set_level(logging.WARNING, logger="relay.node")
    with Reactor() as reactor:
        node = RelayNode(reactor, identity, RelayConfig(nickname="cached"), tls_on_pool=on_pool)
        node.close()
    warnings = [r.getMessage() for r in caplog.records if "per-thread malloc cache" in
                r.getMessage()]
    assert node.thread_cache_warned is warned
    assert len(warnings) == warned
    if warned:
        assert NO_THREAD_CACHE_TUNABLE in warnings[0]
