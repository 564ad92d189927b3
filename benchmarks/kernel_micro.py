"""Micro-benchmark of the tor1 batch kernel against the pure-Python reference.

Run: ``python -m benchmarks.kernel_micro [--json] [--seconds S] [--reps N]``.

What it measures (cells per second; each figure is the best of ``--reps`` timed runs of about
``--seconds`` each, after one untimed warm-up: other processes on the machine can only slow a
run down, so the best run is the least disturbed one; the load average is printed too):

* single thread, joined batches of 32, 128 and 512 cells:
  - ``relay_forward``: a middle relay's Kf decrypt and recognized check (cells not for it),
  - ``relay_forward_exit``: the same at the last hop, every cell recognized (SHA-1 per cell),
  - ``origin_encrypt_3hops``: a client's digest set plus three AES layers,
  - ``origin_decrypt_3hops``: a client peeling three Kb layers per cell (per cell and hop),
    digest check where recognized,
  each for ``reference`` (``tor1.reference``, list form ``*_many``), ``kernel_list`` (the
  kernel behind the same list API) and ``kernel_buf`` (the kernel's joined-buffer fast path);
* two threads on two different circuits against one thread (kernel_buf, 128- and 512-cell
  batches for the relay, 128 for the origin): aggregate cells/s and the ratio (2.0 would be
  perfect on two idle cores; the GIL is released for each whole batch), and the same per second
  of thread CPU time (``cpu_efficiency`` 1.0: a thread crypts as fast beside another one as
  alone; this one holds even when other processes share the cores);
* the ceiling: ``openssl speed -evp aes-128-ctr -bytes 512`` on one core, as cells/s of 509
  bytes, and the fraction of it the kernel's ``relay_forward`` reaches. Skipped when the
  ``openssl`` command is missing.

Every kernel output is compared once with the reference before timing (a wrong byte aborts).
Single-threaded except for the two-thread section, whose threads each own their circuit.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from tor1 import CELL_PAYLOAD_LEN
from tor1._kernel import OPENSSL_VERSION
from tor1.fast import FastOriginCrypto, FastRelayCrypto
from tor1.reference import HOP_MATERIAL_LEN, HopKeys, OriginCrypto, RelayCrypto

BATCH_SIZES = (32, 128, 512)
EXIT_STREAM_CELLS = 1 << 14  # pre-encrypted cells for the exit workload (~8 MB)


@dataclass(frozen=True)
class Settings:
    """How long and how often each figure is measured."""

    seconds: float
    reps: int


def circuit_keys(seed: int, hops: int) -> list[HopKeys]:
    rng = random.Random(seed)
    return [HopKeys.from_material(rng.randbytes(HOP_MATERIAL_LEN)) for _ in range(hops)]


def plain_cells(rng: random.Random, count: int) -> list[bytes]:
    """Relay payloads as a client builds them: recognized and digest fields zero."""
    cells = []
    for _ in range(count):
        p = bytearray(rng.randbytes(CELL_PAYLOAD_LEN))
        p[1:9] = bytes(8)
        cells.append(bytes(p))
    return cells


def split(joined: bytes) -> list[bytes]:
    return [joined[i : i + CELL_PAYLOAD_LEN] for i in range(0, len(joined), CELL_PAYLOAD_LEN)]


def rate(make_step: Callable[[], Callable[[], int]], settings: Settings) -> float:
    """Best cells/s of ``reps`` runs; ``make_step()`` builds fresh state and returns a step
    that crypts one batch and returns its cell count."""
    results = []
    for rep in range(settings.reps + 1):
        step = make_step()
        cells = 0
        start = time.perf_counter()
        deadline = start + settings.seconds
        while True:
            cells += step()
            now = time.perf_counter()
            if now >= deadline:
                break
        if rep:  # the first run warms caches and allocators
            results.append(cells / (now - start))
    return max(results)


# --------------------------------------------------------------------------- workloads


def relay_forward_steps(batch: int) -> dict[str, Callable[[], Callable[[], int]]]:
    """A middle relay: random wire cells, none recognized."""
    keys = circuit_keys(1, 1)[0]
    rng = random.Random(2)
    cells = [rng.randbytes(CELL_PAYLOAD_LEN) for _ in range(batch)]
    joined = b"".join(cells)

    def reference() -> Callable[[], int]:
        relay = RelayCrypto(keys)
        return lambda: len(relay.forward_many(cells))

    def kernel_list() -> Callable[[], int]:
        relay = FastRelayCrypto(keys)
        return lambda: len(relay.forward_many(cells))

    def kernel_buf() -> Callable[[], int]:
        relay = FastRelayCrypto(keys)
        return lambda: len(relay.forward_buf(joined)[1])

    out, flags = FastRelayCrypto(keys).forward_buf(joined)
    assert RelayCrypto(keys).forward_many(cells) == [
        (bool(f), c) for f, c in zip(flags, split(out), strict=True)
    ], "kernel relay_forward differs from the reference"
    return {"reference": reference, "kernel_list": kernel_list, "kernel_buf": kernel_buf}


class Replay:
    """A step over pre-encrypted batches of one circuit's stream; when they run out, a fresh
    circuit state is built and the stream replayed from the start."""

    def __init__(self, new_circuit: Callable[[], Callable[[object], int]], batches: list) -> None:
        self.new_circuit = new_circuit
        self.batches = batches
        self.crypt = new_circuit()
        self.next = 0

    def __call__(self) -> int:
        if self.next == len(self.batches):
            self.crypt, self.next = self.new_circuit(), 0
        self.next += 1
        return self.crypt(self.batches[self.next - 1])


def stream_batches(stream: bytes, batch: int) -> tuple[list[bytes], list[list[bytes]]]:
    """``stream`` cut into batches of ``batch`` cells: as joined buffers, and as cell lists."""
    buf_batches = [stream[i : i + batch * CELL_PAYLOAD_LEN]
                   for i in range(0, len(stream), batch * CELL_PAYLOAD_LEN)]
    return buf_batches, [split(b) for b in buf_batches]


def replay_steps(
    reference: Callable[[], Callable[[object], int]],
    kernel_list: Callable[[], Callable[[object], int]],
    kernel_buf: Callable[[], Callable[[object], int]],
    buf_batches: list[bytes],
    list_batches: list[list[bytes]],
) -> dict[str, Callable[[], Callable[[], int]]]:
    """The three steps of a workload that replays one circuit's pre-encrypted stream: the
    reference and the kernel's list method over the cell lists, its buf method over buffers."""
    return {
        "reference": lambda: Replay(reference, list_batches),
        "kernel_list": lambda: Replay(kernel_list, list_batches),
        "kernel_buf": lambda: Replay(kernel_buf, buf_batches),
    }


def relay_forward_exit_steps(batch: int) -> dict[str, Callable[[], Callable[[], int]]]:
    """The last hop: a stream of cells the client encrypted for it, all recognized."""
    keys = circuit_keys(3, 1)[0]
    rng = random.Random(4)
    plain = b"".join(plain_cells(rng, EXIT_STREAM_CELLS))
    stream = FastOriginCrypto([keys]).encrypt_buf(plain, 0)
    buf_batches, list_batches = stream_batches(stream, batch)

    def reference_circuit() -> Callable[[object], int]:
        forward_many = RelayCrypto(keys).forward_many
        return lambda cells: len(forward_many(cells))  # type: ignore[arg-type]

    def kernel_list_circuit() -> Callable[[object], int]:
        forward_many = FastRelayCrypto(keys).forward_many
        return lambda cells: len(forward_many(cells))  # type: ignore[arg-type]

    def kernel_buf_circuit() -> Callable[[object], int]:
        forward_buf = FastRelayCrypto(keys).forward_buf
        return lambda buf: sum(forward_buf(buf)[1])  # type: ignore[arg-type]

    assert FastRelayCrypto(keys).forward_many(list_batches[0]) == RelayCrypto(
        keys
    ).forward_many(list_batches[0]), "kernel relay_forward_exit differs from the reference"
    return replay_steps(reference_circuit, kernel_list_circuit, kernel_buf_circuit,
                        buf_batches, list_batches)


def origin_encrypt_steps(batch: int) -> dict[str, Callable[[], Callable[[], int]]]:
    """A client sending to the third hop: digest plus three AES layers."""
    keys = circuit_keys(5, 3)
    cells = plain_cells(random.Random(6), batch)
    joined = b"".join(cells)

    def reference() -> Callable[[], int]:
        origin = OriginCrypto(keys)
        return lambda: len(origin.encrypt_many(cells, 2))

    def kernel_list() -> Callable[[], int]:
        origin = FastOriginCrypto(keys)
        return lambda: len(origin.encrypt_many(cells, 2))

    def kernel_buf() -> Callable[[], int]:
        origin = FastOriginCrypto(keys)
        return lambda: len(origin.encrypt_buf(joined, 2)) // CELL_PAYLOAD_LEN

    assert FastOriginCrypto(keys).encrypt_buf(joined, 2) == b"".join(
        OriginCrypto(keys).encrypt_many(cells, 2)
    ), "kernel origin_encrypt differs from the reference"
    return {"reference": reference, "kernel_list": kernel_list, "kernel_buf": kernel_buf}


def origin_decrypt_steps(batch: int) -> dict[str, Callable[[], Callable[[], int]]]:
    """A client receiving from the third hop: peel three Kb layers, digest check at each hop
    whose layer leaves recognized == 0 (the exit's)."""
    keys = circuit_keys(7, 3)
    plain = b"".join(plain_cells(random.Random(8), EXIT_STREAM_CELLS))
    stream = FastRelayCrypto(keys[2]).originate_buf(plain)
    stream = FastRelayCrypto(keys[0]).backward_buf(FastRelayCrypto(keys[1]).backward_buf(stream))
    buf_batches, list_batches = stream_batches(stream, batch)

    def reference_circuit() -> Callable[[object], int]:
        decrypt_many = OriginCrypto(keys).decrypt_many
        return lambda cells: len(decrypt_many(cells))  # type: ignore[arg-type]

    def kernel_list_circuit() -> Callable[[object], int]:
        decrypt_many = FastOriginCrypto(keys).decrypt_many
        return lambda cells: len(decrypt_many(cells))  # type: ignore[arg-type]

    def kernel_buf_circuit() -> Callable[[object], int]:
        decrypt_buf = FastOriginCrypto(keys).decrypt_buf
        return lambda buf: len(decrypt_buf(buf)[1])  # type: ignore[arg-type]

    assert FastOriginCrypto(keys).decrypt_many(list_batches[0]) == OriginCrypto(
        keys
    ).decrypt_many(list_batches[0]), "kernel origin_decrypt differs from the reference"
    return replay_steps(reference_circuit, kernel_list_circuit, kernel_buf_circuit,
                        buf_batches, list_batches)


WORKLOADS: dict[str, Callable[[int], dict[str, Callable[[], Callable[[], int]]]]] = {
    "relay_forward": relay_forward_steps,
    "relay_forward_exit": relay_forward_exit_steps,
    "origin_encrypt_3hops": origin_encrypt_steps,
    "origin_decrypt_3hops": origin_decrypt_steps,
}


# --------------------------------------------------------------------------- two threads


@dataclass(frozen=True)
class ThreadedRate:
    """Aggregate wall-clock cells/s, and cells per second of thread CPU time (summed over the
    threads): the second does not depend on how many cores other processes leave free."""

    cells_per_s: float
    cells_per_cpu_s: float


def threaded_rate(make_step: Callable[[], Callable[[], int]], threads: int,
                  settings: Settings) -> ThreadedRate:
    """Best over ``reps`` runs (by wall-clock rate) of ``threads`` threads, each on its own
    circuit, started together and stopped together."""
    walls, cpus = [], []
    for rep in range(settings.reps + 1):
        steps = [make_step() for _ in range(threads)]
        counts = [0] * threads
        cpu_seconds = [0.0] * threads
        barrier = threading.Barrier(threads + 1)
        stop = threading.Event()

        def run(index: int, step: Callable[[], int], counts: list[int] = counts,
                cpu_seconds: list[float] = cpu_seconds, barrier: threading.Barrier = barrier,
                stop: threading.Event = stop) -> None:
            barrier.wait()
            cpu_start = time.thread_time()
            done = 0
            while not stop.is_set():
                done += step()
            cpu_seconds[index] = time.thread_time() - cpu_start
            counts[index] = done

        workers = [threading.Thread(target=run, args=(i, s)) for i, s in enumerate(steps)]
        for w in workers:
            w.start()
        barrier.wait()
        start = time.perf_counter()
        time.sleep(settings.seconds)
        stop.set()
        for w in workers:
            w.join()
        elapsed = time.perf_counter() - start
        if rep:
            walls.append(sum(counts) / elapsed)
            cpus.append(sum(counts) / sum(cpu_seconds))
    best = max(range(len(walls)), key=walls.__getitem__)
    return ThreadedRate(walls[best], cpus[best])


def two_thread_section(settings: Settings) -> dict[str, dict[str, float]]:
    section = {}
    for name, workload, batch in (
        ("relay_forward_128", relay_forward_steps, 128),
        ("relay_forward_512", relay_forward_steps, 512),
        ("origin_encrypt_3hops_128", origin_encrypt_steps, 128),
    ):
        make = workload(batch)["kernel_buf"]
        one = threaded_rate(make, 1, settings)
        two = threaded_rate(make, 2, settings)
        section[name] = {
            "one_thread": one.cells_per_s,
            "two_threads": two.cells_per_s,
            "ratio": two.cells_per_s / one.cells_per_s,
            "one_thread_per_cpu_s": one.cells_per_cpu_s,
            "two_threads_per_cpu_s": two.cells_per_cpu_s,
            # 1.0: a thread crypts as fast beside another as alone (no contention in the kernel)
            "cpu_efficiency": two.cells_per_cpu_s / one.cells_per_cpu_s,
        }
    return section


# --------------------------------------------------------------------------- ceiling


def openssl_ceiling() -> dict[str, float] | None:
    """``openssl speed`` AES-128-CTR at 512-byte blocks, one core; None without openssl."""
    exe = shutil.which("openssl")
    if exe is None:
        return None
    done = subprocess.run(
        [exe, "speed", "-mr", "-evp", "aes-128-ctr", "-seconds", "1", "-bytes", "512"],
        capture_output=True, text=True, check=False,
    )
    for line in done.stdout.splitlines():
        # machine-readable result line: +F:<index>:<cipher>:<bytes per second>
        if line.startswith("+F:"):
            bytes_per_s = float(line.rsplit(":", 1)[1])
            return {"bytes_per_s": bytes_per_s, "cells_per_s": bytes_per_s / CELL_PAYLOAD_LEN}
    return None


# --------------------------------------------------------------------------- main


def run(settings: Settings) -> dict[str, object]:
    load_before = os.getloadavg()[0]
    single: dict[str, dict[str, dict[str, float]]] = {}
    for name, workload in WORKLOADS.items():
        single[name] = {}
        for batch in BATCH_SIZES:
            figures = {impl: rate(make, settings) for impl, make in workload(batch).items()}
            figures["speedup_buf_vs_reference"] = figures["kernel_buf"] / figures["reference"]
            single[name][str(batch)] = figures
    ceiling = openssl_ceiling()
    if ceiling is not None:
        best = max(v["kernel_buf"] for v in single["relay_forward"].values())
        ceiling["kernel_relay_forward_fraction"] = best / ceiling["cells_per_s"]
    return {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "openssl": OPENSSL_VERSION,
            "switch_interval_s": sys.getswitchinterval(),
            # other processes compete for the cores: a high load average skews every figure
            "loadavg_1min_at_start": load_before,
            "seconds_per_run": settings.seconds,
            "reps": settings.reps,
        },
        "single_thread": single,
        "two_threads": two_thread_section(settings),
        "openssl_ceiling": ceiling,
    }


def print_table(result: dict) -> None:
    m = result["machine"]
    print(f"kernel_micro: {m['cpus']} CPUs, Python {m['python']}, {m['openssl']}; "
          f"best of {m['reps']} x {m['seconds_per_run']} s; "
          f"load average {m['loadavg_1min_at_start']:.2f} at start")
    print(f"{'workload':24} {'batch':>5} {'reference':>12} {'kernel_list':>12} "
          f"{'kernel_buf':>12} {'buf/ref':>8}")
    for name, by_batch in result["single_thread"].items():
        for batch, f in by_batch.items():
            print(f"{name:24} {batch:>5} {f['reference']:>12,.0f} {f['kernel_list']:>12,.0f} "
                  f"{f['kernel_buf']:>12,.0f} {f['speedup_buf_vs_reference']:>7.1f}x")
    print("\ntwo threads, two circuits (kernel_buf), cells/s:")
    for name, f in result["two_threads"].items():
        print(f"  {name:26} 1 thread {f['one_thread']:>12,.0f}   2 threads "
              f"{f['two_threads']:>12,.0f}   ratio {f['ratio']:.2f}   per-CPU-second "
              f"efficiency {f['cpu_efficiency']:.2f}")
    ceiling = result["openssl_ceiling"]
    if ceiling is None:
        print("\nopenssl speed: not available, ceiling skipped")
    else:
        print(f"\nopenssl speed -evp aes-128-ctr -bytes 512: {ceiling['bytes_per_s'] / 1e9:.2f} "
              f"GB/s = {ceiling['cells_per_s']:,.0f} cells/s; kernel relay_forward reaches "
              f"{ceiling['kernel_relay_forward_fraction']:.0%}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--seconds", type=float, default=0.25, help="length of one timed run")
    parser.add_argument("--reps", type=int, default=3, help="timed runs per figure (best)")
    args = parser.parse_args(argv)
    result = run(Settings(seconds=args.seconds, reps=args.reps))
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_table(result)


if __name__ == "__main__":
    main()
