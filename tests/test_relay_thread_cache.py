"""A relay with TLS records on the pool runs with glibc's per-thread malloc cache off.

* ``workers.tuning.env_without_thread_cache``: the tunable added (alone, or after others), and
  nothing to do when the environment already sizes the cache;
* ``python -m examples.relay --tls-on-pool``: the process that says READY (the same process id
  the parent started) runs with the tunable in its environment, and works; without
  ``--tls-on-pool`` the relay is left as it was started.

Why (a creeping RSS otherwise, measured with ``make soak``): docs/tuning.md.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from benchmarks.relay_proc import RelayProcess
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
