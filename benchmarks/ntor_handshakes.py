"""Micro-benchmark of the relay's ntor server handshake: the C kernel against the Python one.

Run: ``python -m benchmarks.ntor_handshakes [--json] [--seconds S] [--reps N] [--quick]``.

What it measures (each rate is the best of ``--reps`` timed runs of about ``--seconds`` each,
after one untimed warm-up; other processes can only slow a run down, so the best run is the
least disturbed one; the load average is printed too):

* one thread, handshakes/s: ``python`` (:func:`relay.handshakes.ntor_server`, one call per
  onionskin) and ``kernel`` (:func:`relay._ntor.ntor_server_batch`) for batches of 1, 8 and 64;
* two threads against one, each thread answering its own batches (64): the aggregate rate, the
  ratio (2.0 would be perfect on two idle cores) and the per-CPU-second efficiency (1.0: a
  thread is as fast beside another one as alone), for the kernel and for Python (whose X25519
  holds the GIL: its ratio stays near 1);
* a bystander: the main thread sleeps 1 ms at a time, as a loop thread waiting for I/O does,
  and records how late each wake-up is while one worker thread answers handshakes nonstop
  (none / Python / kernel); p50, p99 and max lateness in ms;
* CREATE_FAST, one thread: :func:`relay.handshakes.create_fast_server` against
  :func:`relay._ntor.create_fast_server_batch` (batches of 64);
* the ceiling: ``openssl speed ecdhx25519`` (X25519 derivations per second on one core); an
  ntor server handshake costs three X25519 scalar multiplications (Y = y*G, EXP(X,y),
  EXP(X,b)), so a third of that rate bounds it. Skipped without the ``openssl`` command.

Every kernel answer used is checked once against the Python server (a wrong byte aborts).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from relay._ntor import OPENSSL_VERSION, NtorKey, create_fast_server_batch, ntor_server_batch
from relay.handshakes import (
    CreateFastClient,
    NtorClient,
    NtorServerKey,
    create_fast_server,
    ntor_server,
)
from tor1.reference import HOP_MATERIAL_LEN

BATCH_SIZES = (1, 8, 64)
THREAD_BATCH = 64
SKINS = 256  # distinct onionskins cycled through by every workload


@dataclass(frozen=True)
class Settings:
    """How long and how often each figure is measured."""

    seconds: float
    reps: int


class Fixture:
    """One relay key (Python and kernel forms) and SKINS client onionskins for it."""

    def __init__(self, tag: int) -> None:
        self.server = NtorServerKey.generate(bytes([tag]) * 20)
        self.key = NtorKey(self.server.onion_key.private_bytes_raw(), self.server.identity_digest)
        clients = [NtorClient(self.server.identity_digest, self.server.onion_key_public)
                   for _ in range(SKINS)]
        self.skins = [c.onionskin for c in clients]
        self.jobs = [(self.key, s) for s in self.skins]
        self._check(clients)

    def _check(self, clients: list[NtorClient]) -> None:
        y = X25519PrivateKey.generate()
        [(reply, material)] = ntor_server_batch([(self.key, self.skins[0], y.private_bytes_raw())])
        if (reply, material[:HOP_MATERIAL_LEN]) != ntor_server(self.server, self.skins[0],
                                                               ephemeral=y):
            raise SystemExit("ntor_handshakes: the kernel disagrees with ntor_server")
        for client, (reply, material) in zip(clients, ntor_server_batch(self.jobs), strict=True):
            if client.complete(reply) != material[:HOP_MATERIAL_LEN]:
                raise SystemExit("ntor_handshakes: a client rejected the kernel's reply")

    def python_step(self, n: int) -> Callable[[], int]:
        """A callable answering n onionskins in Python; returns n."""
        skins = self.skins[:n]
        server = self.server

        def step() -> int:
            for skin in skins:
                ntor_server(server, skin)
            return n
        return step

    def kernel_step(self, batch: int) -> Callable[[], int]:
        """A callable answering one kernel batch of ``batch``; returns batch."""
        jobs = self.jobs[:batch]

        def step() -> int:
            ntor_server_batch(jobs)
            return batch
        return step


def rate(step: Callable[[], int], settings: Settings) -> tuple[float, float]:
    """Best (handshakes per wall second, per thread-CPU second) over the runs."""
    step()
    best_wall = best_cpu = 0.0
    for _ in range(settings.reps):
        done = 0
        wall0, cpu0 = time.perf_counter(), time.thread_time()
        while time.perf_counter() - wall0 < settings.seconds:
            done += step()
        wall, cpu = time.perf_counter() - wall0, time.thread_time() - cpu0
        best_wall = max(best_wall, done / wall)
        best_cpu = max(best_cpu, done / cpu if cpu > 0 else 0.0)
    return best_wall, best_cpu


def _run_for(step: Callable[[], int], seconds: float, start: threading.Barrier,
             out: list[float]) -> None:
    """Thread body: wait for the others, run ``step`` for ``seconds``; out = [done, cpu s]."""
    start.wait()
    cpu0, wall0 = time.thread_time(), time.perf_counter()
    done = 0
    while time.perf_counter() - wall0 < seconds:
        done += step()
    out[:] = [done, time.thread_time() - cpu0]


def two_threads(steps: list[Callable[[], int]], settings: Settings) -> tuple[float, float]:
    """Aggregate handshakes per wall second and mean per-thread-CPU-second rate, the threads
    running at the same time (best run)."""
    best_total = best_cpu = 0.0
    for _ in range(settings.reps):
        outs: list[list[float]] = [[0, 0.0] for _ in steps]
        start = threading.Barrier(len(steps) + 1)
        threads = [threading.Thread(target=_run_for, args=(step, settings.seconds, start, out))
                   for step, out in zip(steps, outs, strict=True)]
        for t in threads:
            t.start()
        start.wait()
        wall0 = time.perf_counter()
        for t in threads:
            t.join()
        wall = time.perf_counter() - wall0
        best_total = max(best_total, sum(done for done, _ in outs) / wall)
        best_cpu = max(best_cpu, statistics.mean(done / cpu for done, cpu in outs if cpu > 0))
    return best_total, best_cpu


def bystander(step: Callable[[], int] | None, seconds: float) -> dict[str, float]:
    """Lateness (ms) of 1 ms sleeps on this thread while ``step`` runs nonstop on another."""
    stop = threading.Event()

    def work() -> None:
        while not stop.is_set():
            step()  # type: ignore[misc]

    worker = threading.Thread(target=work) if step is not None else None
    if worker is not None:
        worker.start()
    late: list[float] = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        time.sleep(0.001)
        late.append((time.perf_counter() - t0 - 0.001) * 1000)
    stop.set()
    if worker is not None:
        worker.join()
    late.sort()
    return {"p50_ms": late[len(late) // 2], "p99_ms": late[int(len(late) * 0.99)],
            "max_ms": late[-1], "samples": len(late)}


def create_fast_rates(settings: Settings) -> dict[str, float]:
    skins = [CreateFastClient().onionskin for _ in range(THREAD_BATCH)]

    def python() -> int:
        for skin in skins:
            create_fast_server(skin)
        return len(skins)

    def kernel() -> int:
        create_fast_server_batch(skins)
        return len(skins)

    return {"python": rate(python, settings)[0], "kernel": rate(kernel, settings)[0]}


def openssl_x25519() -> float | None:
    """X25519 derivations per second on one core (``openssl speed``); None without it."""
    exe = shutil.which("openssl")
    if exe is None:
        return None
    done = subprocess.run([exe, "speed", "-mr", "-seconds", "1", "ecdhx25519"],
                          capture_output=True, text=True, check=False)
    for line in done.stdout.splitlines():
        # machine-readable ECDH result: +F5:<index>:<bits>:<seconds per op>
        if line.startswith("+F5:"):
            return 1.0 / float(line.rsplit(":", 1)[1])
    return None


def run(settings: Settings) -> dict[str, object]:
    load_before = os.getloadavg()[0]
    a, b = Fixture(1), Fixture(2)
    single = {"python": rate(a.python_step(8), settings)[0]}
    for batch in BATCH_SIZES:
        single[f"kernel_batch_{batch}"] = rate(a.kernel_step(batch), settings)[0]
    single["kernel_vs_python"] = single[f"kernel_batch_{THREAD_BATCH}"] / single["python"]
    threads: dict[str, dict[str, float]] = {}
    for name, make in (("kernel", lambda f: f.kernel_step(THREAD_BATCH)),
                       ("python", lambda f: f.python_step(8))):
        one_wall, one_cpu = rate(make(a), settings)
        both, cpu = two_threads([make(a), make(b)], settings)
        threads[name] = {"one_thread": one_wall, "two_threads": both, "ratio": both / one_wall,
                         "cpu_efficiency": cpu / one_cpu if one_cpu else 0.0}
    bystanders = {
        "idle": bystander(None, settings.seconds * settings.reps),
        "python_worker": bystander(a.python_step(8), settings.seconds * settings.reps),
        "kernel_worker": bystander(a.kernel_step(THREAD_BATCH), settings.seconds * settings.reps),
    }
    x25519 = openssl_x25519()
    return {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "openssl": OPENSSL_VERSION,
            "switch_interval_s": sys.getswitchinterval(),
            "loadavg_1min_at_start": load_before,
            "seconds_per_run": settings.seconds,
            "reps": settings.reps,
        },
        "single_thread_handshakes_per_s": single,
        "two_threads": threads,
        "bystander_sleep_lateness": bystanders,
        "create_fast_per_s": create_fast_rates(settings),
        "openssl_x25519_per_s": x25519,
        "ceiling_handshakes_per_s": x25519 / 3 if x25519 else None,
    }


def print_table(result: dict) -> None:
    m = result["machine"]
    print(f"ntor_handshakes: {m['cpus']} CPUs, Python {m['python']}, {m['openssl']}; best of "
          f"{m['reps']} x {m['seconds_per_run']} s; load average "
          f"{m['loadavg_1min_at_start']:.2f} at start")
    print("one thread, ntor server handshakes/s:")
    for name, value in result["single_thread_handshakes_per_s"].items():
        unit = "x" if name == "kernel_vs_python" else "/s"
        print(f"  {name:20} {value:>10,.2f}{unit}")
    print(f"two threads against one (batches of {THREAD_BATCH} / python loops of 8):")
    for name, f in result["two_threads"].items():
        print(f"  {name:8} 1 thread {f['one_thread']:>9,.0f}/s   2 threads "
              f"{f['two_threads']:>9,.0f}/s   ratio {f['ratio']:.2f}   per-CPU-second "
              f"efficiency {f['cpu_efficiency']:.2f}")
    print("bystander: lateness of 1 ms sleeps while one worker answers handshakes nonstop:")
    for name, f in result["bystander_sleep_lateness"].items():
        print(f"  {name:14} p50 {f['p50_ms']:7.3f} ms   p99 {f['p99_ms']:7.3f} ms   "
              f"max {f['max_ms']:7.3f} ms   ({f['samples']} sleeps)")
    fast = result["create_fast_per_s"]
    print(f"CREATE_FAST/s: python {fast['python']:,.0f}   kernel (batches of {THREAD_BATCH}) "
          f"{fast['kernel']:,.0f}")
    if result["openssl_x25519_per_s"] is None:
        print("openssl speed: not available, ceiling skipped")
    else:
        print(f"openssl speed ecdhx25519: {result['openssl_x25519_per_s']:,.0f} ops/s -> "
              f"ceiling {result['ceiling_handshakes_per_s']:,.0f} handshakes/s (3 per handshake)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--seconds", type=float, default=0.5, help="length of one timed run")
    parser.add_argument("--reps", type=int, default=3, help="timed runs per figure (best)")
    parser.add_argument("--quick", action="store_true", help="tiny runs (checks it works)")
    args = parser.parse_args(argv)
    settings = Settings(0.02, 1) if args.quick else Settings(args.seconds, args.reps)
    result = run(settings)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_table(result)


if __name__ == "__main__":
    main()
