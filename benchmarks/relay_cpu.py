"""One run of the relay under saturating outside load: CPU per relayed cell by thread, cells/s.

:func:`measure` starts the relay under test (:class:`benchmarks.relay_proc.RelayProcess`,
unmodified ``python -m examples.relay``), puts it in the middle of ``circuits`` circuits driven
from this process (:class:`benchmarks.relay_load.RelayLoad`), waits until every circuit is open
and ``warmup`` seconds more, and then measures a *window* of ``window`` seconds of steady
transfer:

* at each edge of the window, the CPU of every thread of the relay from /proc (first) and the
  relay's own counters through SIGUSR1 (then); both are taken the same way at both edges, so
  the few milliseconds between them cancel out;
* **relayed cells** = the growth of the relay's ``cells_crypted`` counter over the window: each
  RELAY cell it took from one link and passed to the other after one layer of crypto (a middle
  relay crypts every cell it relays once and nothing else). The cells that reached the far
  ends over the same window (``load_cells``) are reported beside it as a cross-check;
* CPU per relayed cell: loop thread (the main thread), worker threads, and all threads, each
  over the window, divided by the relayed cells; cells/s and MB/s (514 bytes per cell, a
  link-protocol-4 cell before TLS) over the window;
* how busy the relay was: loop-thread CPU seconds per wall second (1.0: the loop is the
  bottleneck), and the same for the workers; this process's own CPU per relayed cell (the
  load generator's cost, for comparison).

The load keeps ``window_cells`` cells in flight per circuit and direction, far more than the
relay needs to stay busy, so the relay runs as fast as the machine lets it: the throughput is
the relay's saturation throughput on this machine *with the load generator sharing it*. With
``rate`` the load is paced instead (that many cells/s offered, in small batches every 2 ms):
the relay's cost per cell at a modest, steady load.

Threads: main thread only (it runs the load's Reactor).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from benchmarks.cpu_profile import Recorder, split_per_cell, thread_split
from benchmarks.relay_load import DEFAULT_WINDOW, RelayLoad
from benchmarks.relay_proc import RelayProcess
from benchmarks.relay_torpeer import TorRelayProcess
from reactor import Reactor
from relay.framing import FIXED_CELL_LEN

__all__ = ["LoadFailed", "measure"]


class LoadFailed(RuntimeError):
    """The load lost a circuit or link, or could not open its circuits."""


def measure(tls: bool, workdir: Path, *, threads: int = 2, circuits: int = 32, links: int = 2,
            warmup: float = 1.0, window: float = 5.0, window_cells: int = DEFAULT_WINDOW,
            rate: float = 0.0, tor: bool = False, build_timeout: float = 60.0,
            extra_args: tuple[str, ...] = (), perf_data: Path | None = None) -> dict[str, Any]:
    """One run (see the module docstring); the figures as a JSON-ready dict. ``rate``: offer
    that many cells/s (paced, :class:`benchmarks.relay_load.RelayLoad`) instead of saturating
    the relay; ``extra_args`` go to our relay's command line. ``tor``: the relay under test is
    C tor (:class:`benchmarks.relay_torpeer.TorRelayProcess`, TLS only), its relayed cells counted
    at the far ends (``load_cells``). ``perf_data``: also sample the relay with perf over the
    window into that file (:mod:`benchmarks.cpu_profile`), adding ``cpu_by_group_us_per_cell``
    and ``floor_us_per_cell`` (kernel + OpenSSL), and the loop thread's own split,
    ``loop_cpu_by_group_us_per_cell`` and ``loop_kernel_us_per_cell``. Raises :class:`LoadFailed` or
    :class:`benchmarks.relay_proc.RelayStartError`. Main thread."""
    relay: RelayProcess | TorRelayProcess
    if tor:
        if not tls:
            raise ValueError("tor speaks TLS links only")
        relay = TorRelayProcess(workdir / "tor")
    else:
        relay = RelayProcess(workdir / ("relay-tls" if tls else "relay-plain"), tls=tls,
                             threads=threads, extra_args=extra_args)
    relay.start()
    edges: list[dict[str, Any]] = []
    failures: list[str] = []
    recorder = Recorder(relay.pid, perf_data) if perf_data is not None else None
    try:
        with Reactor() as reactor:
            assert relay.descriptor is not None

            def edge() -> None:
                times = relay.times()
                edges.append({"times": times, "stats": relay.counters(), "load": load.delivered,
                              "wall": time.perf_counter(), "own_cpu": time.process_time(),
                              "all_open": load.all_open})

            def begin(_: RelayLoad) -> None:
                def first() -> None:
                    edge()
                    if recorder is not None:
                        recorder.start()
                    reactor.call_later(window, last)
                reactor.call_later(warmup, first)

            def last() -> None:
                edge()
                if recorder is not None:
                    recorder.halt()
                reactor.stop()

            def failed(why: str) -> None:
                failures.append(why)
                reactor.stop()

            def not_built() -> None:
                if not edges and not failures:
                    failed(f"circuits not open after {build_timeout:.0f} s "
                           f"({sum(c.state == 'open' for c in load.circuits)} of {circuits})")

            load = RelayLoad(reactor, relay.descriptor, relay.address, tls=tls,
                             workdir=workdir / "load", circuits=circuits, links=links,
                             window=window_cells, rate=rate, on_open=begin,
                             on_failure=failed)
            load.start()
            reactor.call_later(build_timeout, not_built)
            reactor.run()
            load.close()
    finally:
        groups = None
        try:
            if recorder is not None:
                groups = recorder.stop()
        except RuntimeError:
            if len(edges) == 2:
                raise  # a window was measured, and perf has nothing for it
        finally:
            final = relay.stop()
    if failures or len(edges) != 2:
        raise LoadFailed("; ".join(failures) or "the window did not complete"
                         + f"\n{relay.log_tail()}")
    first, last_edge = edges
    split = relay.split(first["times"], last_edge["times"])
    before, after = first["stats"], last_edge["stats"]
    load_cells = last_edge["load"] - first["load"]
    cells = after["cells_crypted"] - before["cells_crypted"] if after else load_cells
    seconds = last_edge["wall"] - first["wall"]
    if cells <= 0:
        raise LoadFailed("the relay relayed no cell during the window")
    per_cell = 1e6 / cells
    result: dict[str, Any] = {
        "relay": "tor" if tor else "relaycrypt",
        "cells_counted_by": "the far ends" if tor else "the relay (cells_crypted)",
        "seconds": seconds,
        "cells": cells,
        "load_cells": load_cells,
        "circuits": circuits,
        "links": links,
        "threads": 0 if tor else threads,
        "window_cells": window_cells,
        "offered_cells_per_s": rate,
        "loop_cpu_s": split.loop_s,
        "workers_cpu_s": split.workers_s,
        "other_cpu_s": split.other_s,
        "cpu_s": split.total_s,
        "cpu_ticks_s": split.ticks_s,
        "per_worker_cpu_s": list(split.per_worker_s),
        "loop_cpu_us_per_cell": split.loop_s * per_cell,
        "workers_cpu_us_per_cell": split.workers_s * per_cell,
        "cpu_us_per_cell": split.total_s * per_cell,
        "cells_per_s": cells / seconds,
        "mb_per_s": cells * FIXED_CELL_LEN / seconds / 1e6,
        "loop_busy": split.loop_s / seconds,
        "workers_busy": split.workers_s / seconds,
        "loadgen_cpu_us_per_cell": (last_edge["own_cpu"] - first["own_cpu"]) * per_cell,
        "steady": first["all_open"] and last_edge["all_open"],
    }
    if groups is not None:
        assert recorder is not None
        result.update(split_per_cell(groups, result["cpu_us_per_cell"]))
        loop = recorder.thread_groups.get(relay.pid)  # the main thread's tid is the pid
        if loop is not None:
            result.update(thread_split(loop, result["loop_cpu_us_per_cell"]))
    if after:
        batches = after["batches"] - before["batches"]
        result.update({
            "relay_own_cpu_us_per_cell":
                (after["process_cpu_s"] - before["process_cpu_s"]) * per_cell,
            "batch_mean": cells / batches if batches else 0.0,
            "wakeups_per_cell": (after["wakeups"] - before["wakeups"]) / cells,
            "circuits_closed_by_relay": (final or after)["circuits_closed_queue"],
        })
    return result
