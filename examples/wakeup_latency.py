"""Wake-up latency and burst throughput: how fast does a worker's result reach the loop thread?

Run ``python -m examples.wakeup_latency`` (``--quick`` for a short run, ``--json`` for
machine-readable output, ``--plot FILE.png`` for the latency distributions).

Four mechanisms carry an item from a worker thread to a handler on the loop thread:

``replyqueue``  ours: ``reactor.ReplyQueue.put`` - locked list, ``uv.Async.send`` only when the
                list goes empty -> non-empty, the loop swaps the whole list out.
``raw_async``   a locked deque (the same lean locking as ``put``), the same whole-deque swap on
                the loop, but ``Async.send()`` on every item.
``asyncio``     ``loop.call_soon_threadsafe(handler, item)`` on an asyncio loop.
``socketpair``  cpuworker style: item into a locked deque plus one byte down a socketpair; the
                loop polls the socket, reads the bytes, and pops one item per byte.

Each mechanism posts through one function, ``post(item)``, and the loop side calls the same
kind of per-item handler, so what differs is the mechanism.

Isolated: a worker stamps ``perf_counter_ns``, posts one item, and blocks until the item has
been handled (the handler lets the worker go on the loop's next iteration), many times. The
latency is from the stamp to the start of the handler: p50/p90/p99/max in microseconds. The
three pyuv mechanisms share one loop and one worker, which goes through them in a random order
each cycle, so they are sampled under the same CPU placement and background load; asyncio has its
own loop and runs in rounds alternating with the pyuv rounds.

Reading the numbers: the eventfd wake-up behind ``uv.Async`` is bimodal on this kind of machine
(about 4 us, or about 11 us when the woken loop thread has to wait for the worker to hand over
the GIL), with the modes often close to 50/50. A p50 that falls between the modes then moves by
several microseconds from run to run - even between two identical channels side by side - so
compare p50 together with the plot, where ``replyqueue`` and ``raw_async`` show the same modes.
The socketpair wake-up (a "sync" wake-up in the kernel) is unimodal.

Burst: one worker posts N items as fast as it can; items/s is N divided by the time from the
first post to the handling of the last item. ``wakeups_per_item`` counts the wake-up signals the
producer side issued (``Async.send`` calls, ``call_soon_threadsafe`` calls, bytes written) per
item. The table also shows loop passes per item: how often the loop-side code ran (one pass may
handle many items). Bursts rotate through the mechanisms and repeat; the median is reported.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import pyuv

from reactor import Reactor, ReplyQueue

MECHANISMS = ("replyqueue", "raw_async", "asyncio", "socketpair")
PYUV_MECHANISMS = ("replyqueue", "raw_async", "socketpair")
WARMUP = 100  # isolated samples discarded at the start of every round

Post = Callable[[int], object]
Handle = Callable[[int], None]


@dataclass
class Channel:
    """One mechanism set up on a loop: how to post, its counters, how to tear it down."""

    post: Post
    signals: Callable[[], int]  # wake-up signals issued by producers so far
    passes: Callable[[], int]  # loop-side passes so far
    close: Callable[[], None]


# --------------------------------------------------------------------------- mechanisms (pyuv)


def replyqueue_channel(reactor: Reactor, handle: Handle) -> Channel:
    """Ours. Loop thread."""
    queue: ReplyQueue[int] = ReplyQueue(reactor, handle)
    return Channel(
        post=queue.put,
        signals=lambda: queue.stats()["wakeups_sent"],
        passes=lambda: queue.stats()["callbacks"],
        close=queue.close,
    )


def raw_async_channel(reactor: Reactor, handle: Handle) -> Channel:
    """A locked deque, a whole-deque swap, and ``Async.send()`` per item. Loop thread."""
    lock = threading.Lock()
    acquire = lock.acquire
    release = lock.release
    box: list[deque[int]] = [deque()]
    counts = {"sent": 0, "passes": 0}

    def on_async(async_handle: pyuv.Async) -> None:
        counts["passes"] += 1
        with lock:
            items = box[0]
            box[0] = deque()
        for item in items:
            handle(item)

    wakeup = pyuv.Async(reactor.loop, on_async)
    wakeup.ref = False
    send = wakeup.send

    def post(item: int) -> None:
        # The same lean locking as ReplyQueue.put, so that only the mechanism differs.
        acquire()
        try:
            box[0].append(item)
        finally:
            release()
        send()
        counts["sent"] += 1  # one producer thread: no lock needed for the count

    def close() -> None:
        on_async(wakeup)
        wakeup.close()

    return Channel(post=post, signals=lambda: counts["sent"], passes=lambda: counts["passes"],
                   close=close)


def socketpair_channel(reactor: Reactor, handle: Handle) -> Channel:
    """A locked deque plus one byte per item down a socketpair, polled. Loop thread."""
    loop_sock, worker_sock = socket.socketpair()
    loop_sock.setblocking(False)
    lock = threading.Lock()
    items: deque[int] = deque()
    counts = {"passes": 0, "sent": 0}

    def on_readable(poll: pyuv.Poll, events: int, error: int | None) -> None:
        counts["passes"] += 1
        try:
            tokens = len(loop_sock.recv(65536))
        except BlockingIOError:
            return
        with lock:
            batch = [items.popleft() for _ in range(tokens)]
        for item in batch:
            handle(item)

    poll = pyuv.Poll(reactor.loop, loop_sock.fileno())
    poll.start(pyuv.UV_READABLE, on_readable)
    poll.ref = False
    send = worker_sock.send

    def post(item: int) -> None:
        with lock:
            items.append(item)
        counts["sent"] += send(b"\0")  # bytes written: one producer thread

    def close() -> None:
        poll.close()
        loop_sock.close()
        worker_sock.close()

    return Channel(post=post, signals=lambda: counts["sent"], passes=lambda: counts["passes"],
                   close=close)


PYUV_CHANNELS: dict[str, Callable[[Reactor, Handle], Channel]] = {
    "replyqueue": replyqueue_channel,
    "raw_async": raw_async_channel,
    "socketpair": socketpair_channel,
}


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


def isolated_pyuv_round(samples_each: int, seed: int) -> dict[str, list[int]]:
    """One round of the pyuv mechanisms side by side on one loop. Main thread runs the loop."""
    reactor = Reactor()
    recorder = IsolatedRecorder(samples_each * len(PYUV_MECHANISMS), reactor.call_soon,
                                reactor.stop)
    channels = [PYUV_CHANNELS[name](reactor, recorder.handler(name)) for name in PYUV_MECHANISMS]
    worker = threading.Thread(target=recorder.worker,
                              args=([c.post for c in channels], samples_each, seed))
    worker.start()
    reactor.run()
    worker.join()
    for channel in channels:
        channel.close()
    reactor.close()
    return {name: recorder.latencies[name][WARMUP:] for name in PYUV_MECHANISMS}


def isolated_asyncio_round(samples: int) -> list[int]:
    """One round of asyncio's ``call_soon_threadsafe``. Main thread runs the asyncio loop."""
    loop = asyncio.new_event_loop()
    recorder = IsolatedRecorder(samples, loop.call_soon, loop.stop)
    handle = recorder.handler("asyncio")
    call_soon_threadsafe = loop.call_soon_threadsafe

    def post(item: int) -> None:
        call_soon_threadsafe(handle, item)

    worker = threading.Thread(target=recorder.worker, args=([post], samples, 0))
    worker.start()
    loop.run_forever()
    worker.join()
    loop.close()
    return recorder.latencies["asyncio"][WARMUP:]


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


def burst_pyuv(name: str, items: int) -> BurstResult:
    """One burst through a pyuv mechanism. Main thread runs the loop."""
    reactor = Reactor()
    counter = BurstCounter(items, reactor.stop)
    channel = PYUV_CHANNELS[name](reactor, counter.handle)
    worker = threading.Thread(target=counter.worker, args=(channel.post,))
    worker.start()
    reactor.run()
    worker.join()
    result = counter.result(channel.signals(), channel.passes())
    channel.close()
    reactor.close()
    return result


def burst_asyncio(items: int) -> BurstResult:
    """One burst through ``call_soon_threadsafe``. Main thread runs the asyncio loop."""
    loop = asyncio.new_event_loop()
    counter = BurstCounter(items, loop.stop)
    handle = counter.handle
    call_soon_threadsafe = loop.call_soon_threadsafe
    # Count the loop's real wake-up signals: call_soon_threadsafe writes to the loop's
    # self-pipe through this (private, but stable since 3.4) method.
    writes = [0]
    write_to_self = loop._write_to_self  # type: ignore[attr-defined]

    def counting_write_to_self() -> None:
        writes[0] += 1
        write_to_self()

    loop._write_to_self = counting_write_to_self  # type: ignore[attr-defined]

    def post(item: int) -> None:
        call_soon_threadsafe(handle, item)

    worker = threading.Thread(target=counter.worker, args=(post,))
    worker.start()
    loop.run_forever()
    worker.join()
    loop.close()
    return counter.result(writes[0], items)  # one loop callback per call


# --------------------------------------------------------------------------- the run


def percentile(sorted_values: list[int], fraction: float) -> int:
    """Nearest-rank percentile of an ascending, non-empty list. Any thread."""
    rank = -(-len(sorted_values) * fraction // 1)  # ceil
    return sorted_values[min(len(sorted_values), max(1, int(rank))) - 1]


def measure(isolated: int, rounds: int, burst: int, repeats: int) -> dict[str, dict]:
    """Run everything; JSON-shaped results plus raw data under ``_``-keys. Main thread."""
    per_round = -(-isolated // rounds)  # ceil: at least `isolated` samples in total
    latencies: dict[str, list[int]] = {name: [] for name in MECHANISMS}
    for round_index in range(rounds):
        if round_index % 2:
            latencies["asyncio"].extend(isolated_asyncio_round(per_round + WARMUP))
        for name, samples in isolated_pyuv_round(per_round + WARMUP, round_index).items():
            latencies[name].extend(samples)
        if not round_index % 2:
            latencies["asyncio"].extend(isolated_asyncio_round(per_round + WARMUP))
    bursts: dict[str, list[BurstResult]] = {name: [] for name in MECHANISMS}
    for repeat in range(repeats):
        order = MECHANISMS[repeat % 4 :] + MECHANISMS[: repeat % 4]
        for name in order:
            result = burst_asyncio(burst) if name == "asyncio" else burst_pyuv(name, burst)
            bursts[name].append(result)
    results: dict[str, dict] = {}
    for name in MECHANISMS:
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
    """The issue's three targets, evaluated on this run. Any thread."""
    ours = results["replyqueue"]
    raw = results["raw_async"]
    p50_ratio = ours["isolated"]["p50_us"] / raw["isolated"]["p50_us"]
    burst_ratio = ours["burst"]["items_per_s"] / raw["burst"]["items_per_s"]
    wakeups = ours["burst"]["wakeups_per_item"]
    return [
        (f"replyqueue isolated p50 <= 1.25x raw_async: {p50_ratio:.2f}x", p50_ratio <= 1.25),
        (f"replyqueue burst items/s >= 1.0x raw_async: {burst_ratio:.2f}x", burst_ratio >= 1.0),
        (f"replyqueue wake-ups per item <= 0.01: {wakeups:.5f}", wakeups <= 0.01),
    ]


def print_table(results: dict[str, dict], args: argparse.Namespace) -> None:
    """Print the human-readable report. Any thread."""
    print(
        f"wake-up latency: Python {platform.python_version()}, pyuv {pyuv.__version__}, "
        f"{os.cpu_count()} CPUs, switch interval {sys.getswitchinterval() * 1000:.0f} ms\n"
        f"isolated: {args.isolated} samples per mechanism in {args.rounds} rounds; "
        f"burst: {args.burst} items, {args.repeats} per mechanism, median shown"
    )
    header = (
        f"{'mechanism':<11} {'p50 us':>8} {'p90 us':>8} {'p99 us':>8} {'max us':>9}"
        f" {'burst items/s':>14} {'wake-ups/item':>14} {'loop passes/item':>17}"
    )
    print(header)
    print("-" * len(header))
    for name in MECHANISMS:
        iso = results[name]["isolated"]
        burst = results[name]["burst"]
        print(
            f"{name:<11} {iso['p50_us']:>8.1f} {iso['p90_us']:>8.1f} {iso['p99_us']:>8.1f}"
            f" {iso['max_us']:>9.1f} {burst['items_per_s']:>14,.0f}"
            f" {burst['wakeups_per_item']:>14.5f} {results[name]['_passes_per_item']:>17.5f}"
        )
    print()
    for text, ok in targets(results):
        print(f"  [{'ok' if ok else 'MISSED'}] {text}")


def plot(results: dict[str, dict], path: str) -> None:
    """Draw the isolated latency distributions (CDFs, log x) into a PNG. Main thread."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 5))
    for name in MECHANISMS:
        values = [v / 1000 for v in results[name]["_latencies_ns"]]
        fractions = [(i + 1) / len(values) for i in range(len(values))]
        p50 = results[name]["isolated"]["p50_us"]
        axes.plot(values, fractions, label=f"{name} (p50 {p50:.1f} us)")
    axes.set_xscale("log")
    axes.set_xlabel("worker post -> loop handler (microseconds, log scale)")
    axes.set_ylabel("fraction of wake-ups")
    axes.set_title("Isolated wake-up latency, one worker thread -> loop thread")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(loc="lower right")
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
                        help="isolated rounds, pyuv and asyncio alternating (default 10)")
    parser.add_argument("--burst", type=int, default=100_000,
                        help="items per burst (default 100000)")
    parser.add_argument("--repeats", type=int, default=7,
                        help="bursts per mechanism; the median is reported (default 7)")
    parser.add_argument("--quick", action="store_true",
                        help="a fast run: 2000 isolated in 2 rounds, one burst of 20000")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    parser.add_argument("--plot", metavar="FILE.png", help="draw the latency distributions")
    args = parser.parse_args(argv)
    if args.quick:
        args.isolated, args.rounds, args.burst, args.repeats = 2_000, 2, 20_000, 1
    if min(args.isolated, args.rounds, args.burst, args.repeats) < 1:
        parser.error("counts must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    """Entry point. Main thread (it runs the loops)."""
    args = parse_args(argv)
    results = measure(args.isolated, args.rounds, args.burst, args.repeats)
    if args.json:
        public = {
            name: {"isolated": results[name]["isolated"], "burst": results[name]["burst"]}
            for name in MECHANISMS
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
