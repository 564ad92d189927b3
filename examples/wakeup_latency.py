"""Wake-up latency and burst throughput: how fast does a worker's result reach the loop thread?

Run ``python -m examples.wakeup_latency`` (``--quick`` for a short run, ``--json`` for
machine-readable output, ``--plot FILE.png`` for the latency distributions).

The mechanisms (:mod:`examples.wakeup_channels` has each one) carry an item from a worker
thread to a handler on a loop thread, on four loop kinds:

* pyuv: ``replyqueue`` (ours), ``raw_async`` (``Async.send`` per item), ``socketpair``
  (cpuworker style);
* asyncio and uvloop: ``replyqueue_<loop>`` (ours: an eventfd watched with ``add_reader``,
  written once per empty -> non-empty transition), ``<loop>`` (the loop's own
  ``call_soon_threadsafe`` per item),
  ``replyqueue_<loop>_threadsafe`` (ours, woken with ``call_soon_threadsafe`` once per
  transition instead of the library's eventfd: the alternative measured for
  :mod:`reactor.aio`);
* trio: ``replyqueue_trio`` (ours: ``run_sync_soon`` per transition), ``trio``
  (``run_sync_soon`` per item).

uvloop and trio rows appear when those packages are installed.

Each mechanism posts through one function, ``post(item)``, and the loop side calls the same
kind of per-item handler, so what differs is the mechanism.

Isolated: a worker stamps ``perf_counter_ns``, posts one item, and blocks until the item has
been handled (the handler lets the worker go on the loop's next iteration), many times. The
latency is from the stamp to the start of the handler: p50/p90/p99/max in microseconds. The
mechanisms of one loop kind share one loop and one worker, which goes through them in a random
order each cycle, so they are sampled under the same CPU placement and background load; the
loop kinds run in rounds, their order rotating from round to round. Compare a row with the rows
of its own loop kind.

Reading the numbers: the eventfd wake-up behind ``uv.Async`` is bimodal on this kind of machine
(about 4 us, or about 11 us when the woken loop thread has to wait for the worker to hand over
the GIL), with the modes often close to 50/50. A p50 that falls between the modes then moves by
several microseconds from run to run - even between two identical channels side by side - so
compare p50 together with the plot. The socketpair wake-up (a "sync" wake-up in the kernel) is
unimodal.

Burst: one worker posts N items as fast as it can; items/s is N divided by the time from the
first post to the handling of the last item. ``wakeups_per_item`` counts the wake-up signals the
producer side issued (``Async.send`` / ``call_soon_threadsafe`` / ``run_sync_soon`` calls,
eventfd writes, bytes written) per item. The table also shows loop passes per item: how often the
loop-side code ran (one pass may handle many items). Bursts rotate through the mechanisms and
repeat; the median is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import pyuv

from examples.wakeup_channels import (
    CHANNELS,
    LOOPS,
    Handle,
    LoopCtx,
    Post,
    available_loops,
    run_loop,
)

WARMUP = 100  # isolated samples discarded at the start of every round
#: Our reply queue on each loop kind, and the loop's own per-item wake-up beside it.
OURS_VS_NATIVE = (
    ("replyqueue", "raw_async"),
    ("replyqueue_asyncio", "asyncio"),
    ("replyqueue_uvloop", "uvloop"),
    ("replyqueue_trio", "trio"),
)


def mechanisms(kinds: tuple[str, ...]) -> tuple[str, ...]:
    """Every mechanism of the given loop kinds, in table order. Any thread."""
    return tuple(name for kind in kinds for name in LOOPS[kind])


# --------------------------------------------------------------------------- isolated


class IsolatedRecorder:
    """Per-mechanism handlers that record latency and release the waiting worker.

    The handler releases the worker through ``call_soon``, i.e. on the loop's next iteration,
    outside the Async pass that ran the handler. Released directly, the worker could post its
    next item while libuv is still walking the loop's Async handles, and an Async created after
    the one being served would be caught in that same pass: a wake-up without a wake-up, which
    would favour whichever mechanism was created later.
    """

    def __init__(
        self, expected: int, call_soon: Callable[..., object], stop: Callable[[], object]
    ) -> None:
        """``stop`` runs on the loop thread after ``expected`` items. Main (loop) thread."""
        self.expected = expected
        self.call_soon = call_soon
        self.stop = stop
        self.handled = 0
        self.latencies: dict[str, list[int]] = {}
        self.released = threading.Lock()
        self.released.acquire()

    def handler(self, name: str) -> Handle:
        """The loop-side handler for one mechanism. Main (loop) thread."""
        samples = self.latencies.setdefault(name, [])
        perf = time.perf_counter_ns
        release = self.released.release
        call_soon = self.call_soon

        def handle(stamp: int) -> None:
            samples.append(perf() - stamp)
            self.handled += 1
            call_soon(release if self.handled < self.expected else self.finish)

        return handle

    def finish(self) -> None:
        """Release the worker a last time and stop the loop. Loop thread."""
        self.released.release()
        self.stop()

    def worker(self, posts: list[Post], samples_each: int, seed: int) -> None:
        """Stamp, post, wait; each cycle through ``posts`` in a random order. Worker thread.

        Random order (not a fixed rotation) so that no mechanism systematically follows
        another.
        """
        acquire = self.released.acquire
        perf = time.perf_counter_ns
        order = list(posts)
        shuffle = random.Random(seed).shuffle
        for _ in range(samples_each):
            shuffle(order)
            for post in order:
                post(perf())
                acquire()


def isolated_round(kind: str, samples_each: int, seed: int) -> dict[str, list[int]]:
    """One round of one loop kind's mechanisms side by side on one loop. Main thread."""
    names = LOOPS[kind]
    box: dict[str, IsolatedRecorder] = {}

    def setup(ctx: LoopCtx) -> Callable[[], None]:
        recorder = IsolatedRecorder(samples_each * len(names), ctx.call_soon, ctx.stop)
        box["recorder"] = recorder
        channels = [CHANNELS[name](ctx, recorder.handler(name)) for name in names]
        worker = threading.Thread(target=recorder.worker,
                                  args=([c.post for c in channels], samples_each, seed))
        worker.start()

        def cleanup() -> None:
            worker.join()
            for channel in channels:
                channel.close()

        return cleanup

    run_loop(kind, setup)
    return {name: box["recorder"].latencies[name][WARMUP:] for name in names}


# --------------------------------------------------------------------------- burst


@dataclass
class BurstResult:
    """One burst: items/s, producer wake-up signals per item, loop passes per item."""

    items_per_s: float
    wakeups_per_item: float
    passes_per_item: float


class BurstCounter:
    """The loop-side handler of a burst: counts, stamps the last item, stops the loop."""

    def __init__(self, expected: int, stop: Callable[[], object]) -> None:
        """Main (loop) thread."""
        self.expected = expected
        self.stop = stop
        self.handled = 0
        self.first_post_ns = 0
        self.last_handled_ns = 0

    def handle(self, item: int) -> None:
        """Count one item. Loop thread."""
        self.handled += 1
        if self.handled == self.expected:
            self.last_handled_ns = time.perf_counter_ns()
            self.stop()

    def worker(self, post: Post) -> None:
        """Post ``expected`` items as fast as possible. Worker thread."""
        self.first_post_ns = time.perf_counter_ns()
        for i in range(self.expected):
            post(i)

    def result(self, signals: int, passes: int) -> BurstResult:
        """Summarise. Main thread, after the run."""
        seconds = (self.last_handled_ns - self.first_post_ns) / 1e9
        return BurstResult(self.expected / seconds, signals / self.expected,
                           passes / self.expected)


def burst(kind: str, name: str, items: int) -> BurstResult:
    """One burst through one mechanism on a fresh loop of ``kind``. Main thread."""
    box: dict[str, BurstResult] = {}

    def setup(ctx: LoopCtx) -> Callable[[], None]:
        counter = BurstCounter(items, ctx.stop)
        channel = CHANNELS[name](ctx, counter.handle)
        worker = threading.Thread(target=counter.worker, args=(channel.post,))
        worker.start()

        def cleanup() -> None:
            worker.join()
            passes = channel.passes()
            # -1: the mechanism runs one loop callback per item by construction.
            box["result"] = counter.result(channel.signals(), items if passes < 0 else passes)
            channel.close()

        return cleanup

    run_loop(kind, setup)
    return box["result"]


# --------------------------------------------------------------------------- the run


def percentile(sorted_values: list[int], fraction: float) -> int:
    """Nearest-rank percentile of an ascending, non-empty list. Any thread."""
    rank = -(-len(sorted_values) * fraction // 1)  # ceil
    return sorted_values[min(len(sorted_values), max(1, int(rank))) - 1]


def measure(
    isolated: int, rounds: int, burst_items: int, repeats: int, kinds: tuple[str, ...]
) -> dict[str, dict]:
    """Run everything; JSON-shaped results plus raw data under ``_``-keys. Main thread."""
    per_round = -(-isolated // rounds)  # ceil: at least `isolated` samples in total
    names = mechanisms(kinds)
    latencies: dict[str, list[int]] = {name: [] for name in names}
    for round_index in range(rounds):
        shift = round_index % len(kinds)
        for kind in kinds[shift:] + kinds[:shift]:
            for name, samples in isolated_round(kind, per_round + WARMUP, round_index).items():
                latencies[name].extend(samples)
    bursts: dict[str, list[BurstResult]] = {name: [] for name in names}
    pairs = [(kind, name) for kind in kinds for name in LOOPS[kind]]
    for repeat in range(repeats):
        shift = repeat % len(pairs)
        for kind, name in pairs[shift:] + pairs[:shift]:
            bursts[name].append(burst(kind, name, burst_items))
    results: dict[str, dict] = {}
    for name in names:
        values = sorted(latencies[name])
        runs = sorted(bursts[name], key=lambda r: r.items_per_s)
        median = runs[len(runs) // 2]
        results[name] = {
            "isolated": {
                "p50_us": percentile(values, 0.50) / 1000,
                "p90_us": percentile(values, 0.90) / 1000,
                "p99_us": percentile(values, 0.99) / 1000,
                "max_us": values[-1] / 1000,
                "n": len(values),
            },
            "burst": {
                "items_per_s": median.items_per_s,
                "wakeups_per_item": median.wakeups_per_item,
            },
            "_passes_per_item": median.passes_per_item,
            "_latencies_ns": values,
        }
    return results


def targets(results: dict[str, dict]) -> list[tuple[str, bool]]:
    """The project's targets, evaluated on this run. Any thread."""
    ours = results["replyqueue"]
    raw = results["raw_async"]
    p50_ratio = ours["isolated"]["p50_us"] / raw["isolated"]["p50_us"]
    burst_ratio = ours["burst"]["items_per_s"] / raw["burst"]["items_per_s"]
    checks = [
        (f"replyqueue isolated p50 <= 1.25x raw_async: {p50_ratio:.2f}x", p50_ratio <= 1.25),
        (f"replyqueue burst items/s >= 1.0x raw_async: {burst_ratio:.2f}x", burst_ratio >= 1.0),
    ]
    if "replyqueue_asyncio" in results:
        ratio = (results["replyqueue_asyncio"]["isolated"]["p50_us"]
                 / results["asyncio"]["isolated"]["p50_us"])
        checks.append((f"replyqueue_asyncio isolated p50 <= 1.1x asyncio call_soon_threadsafe: "
                       f"{ratio:.2f}x", ratio <= 1.1))
    for name, _ in OURS_VS_NATIVE:
        if name in results:
            wakeups = results[name]["burst"]["wakeups_per_item"]
            checks.append((f"{name} wake-ups per item <= 0.01: {wakeups:.5f}", wakeups <= 0.01))
    return checks


def comparisons(results: dict[str, dict]) -> list[str]:
    """Ours against each loop's own per-item wake-up, and the call_soon_threadsafe alternative.
    Any thread."""
    lines = []
    pairs = (*OURS_VS_NATIVE[1:], ("replyqueue_asyncio_threadsafe", "asyncio"),
             ("replyqueue_uvloop_threadsafe", "uvloop"))
    for ours, native in pairs:
        if ours in results and native in results:
            p50 = results[ours]["isolated"]["p50_us"] / results[native]["isolated"]["p50_us"]
            rate = (results[ours]["burst"]["items_per_s"]
                    / results[native]["burst"]["items_per_s"])
            lines.append(f"  {ours} / {native}: isolated p50 {p50:.2f}x, burst items/s "
                         f"{rate:.2f}x")
    return lines


def print_table(results: dict[str, dict], args: argparse.Namespace) -> None:
    """Print the human-readable report. Any thread."""
    print(
        f"wake-up latency: Python {platform.python_version()}, pyuv {pyuv.__version__}, "
        f"{os.cpu_count()} CPUs, switch interval {sys.getswitchinterval() * 1000:.0f} ms\n"
        f"isolated: {args.isolated} samples per mechanism in {args.rounds} rounds; "
        f"burst: {args.burst} items, {args.repeats} per mechanism, median shown; "
        f"loops: {', '.join(args.loops)}"
    )
    header = (
        f"{'mechanism':<30} {'p50 us':>8} {'p90 us':>8} {'p99 us':>8} {'max us':>9}"
        f" {'burst items/s':>14} {'wake-ups/item':>14} {'loop passes/item':>17}"
    )
    print(header)
    print("-" * len(header))
    for name in results:
        iso = results[name]["isolated"]
        burst = results[name]["burst"]
        print(
            f"{name:<30} {iso['p50_us']:>8.1f} {iso['p90_us']:>8.1f} {iso['p99_us']:>8.1f}"
            f" {iso['max_us']:>9.1f} {burst['items_per_s']:>14,.0f}"
            f" {burst['wakeups_per_item']:>14.5f} {results[name]['_passes_per_item']:>17.5f}"
        )
    print()
    print("ours against each loop's own wake-up (same loop, same run):")
    for line in comparisons(results):
        print(line)
    print()
    for text, ok in targets(results):
        print(f"  [{'ok' if ok else 'MISSED'}] {text}")


def plot(results: dict[str, dict], path: str) -> None:
    """Draw the isolated latency distributions (CDFs, log x) into a PNG. Main thread."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(9, 6))
    for name in results:
        values = [v / 1000 for v in results[name]["_latencies_ns"]]
        fractions = [(i + 1) / len(values) for i in range(len(values))]
        p50 = results[name]["isolated"]["p50_us"]
        axes.plot(values, fractions, label=f"{name} (p50 {p50:.1f} us)")
    axes.set_xscale("log")
    axes.set_xlabel("worker post -> loop handler (microseconds, log scale)")
    axes.set_ylabel("fraction of wake-ups")
    axes.set_title("Isolated wake-up latency, one worker thread -> loop thread")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(loc="lower right", fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse the command line. Any thread."""
    parser = argparse.ArgumentParser(
        prog="python -m examples.wakeup_latency",
        description="Wake-up latency and burst throughput, worker thread -> loop thread.",
    )
    parser.add_argument("-n", "--isolated", type=int, default=20_000,
                        help="isolated wake-ups measured per mechanism (default 20000)")
    parser.add_argument("--rounds", type=int, default=10,
                        help="isolated rounds, the loop kinds rotating (default 10)")
    parser.add_argument("--burst", type=int, default=100_000,
                        help="items per burst (default 100000)")
    parser.add_argument("--repeats", type=int, default=7,
                        help="bursts per mechanism; the median is reported (default 7)")
    parser.add_argument("--quick", action="store_true",
                        help="a fast run: 2000 isolated in 2 rounds, one burst of 20000")
    parser.add_argument("--loops", default=",".join(available_loops()),
                        help="loop kinds to measure (default: every one installed: "
                        "%(default)s); pyuv is always included")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    parser.add_argument("--plot", metavar="FILE.png", help="draw the latency distributions")
    args = parser.parse_args(argv)
    if args.quick:
        args.isolated, args.rounds, args.burst, args.repeats = 2_000, 2, 20_000, 1
    if min(args.isolated, args.rounds, args.burst, args.repeats) < 1:
        parser.error("counts must be >= 1")
    kinds = [k for k in args.loops.split(",") if k]
    unknown = [k for k in kinds if k not in LOOPS]
    if unknown:
        parser.error(f"unknown loop kinds {unknown}; choose from {', '.join(LOOPS)}")
    args.loops = tuple(["pyuv"] + [k for k in kinds if k != "pyuv"])
    return args


def main(argv: list[str] | None = None) -> int:
    """Entry point. Main thread (it runs the loops)."""
    args = parse_args(argv)
    results = measure(args.isolated, args.rounds, args.burst, args.repeats, args.loops)
    if args.json:
        public = {
            name: {"isolated": results[name]["isolated"], "burst": results[name]["burst"]}
            for name in results
        }
        print(json.dumps(public, indent=2))
    else:
        print_table(results, args)
    if args.plot:
        plot(results, args.plot)
        if not args.json:
            print(f"\nplot written to {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
