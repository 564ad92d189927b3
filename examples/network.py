"""A relay network on loopback: ``python -m examples.network`` (the project's demo).

What it runs
------------
An echo service and ``--relays`` relay processes (``examples.echo``, ``examples.relay``: each
relay a Reactor plus a WorkerPool on the fast crypto backend), all on free loopback ports; a
directory file describing the relays; and, in this process, the client
(``examples.client.EchoTransfer``): ``--circuits`` circuits of ``--hops`` relays (CREATE_FAST
to the guard, ntor through EXTEND2 beyond), one stream per circuit to the echo service,
``--total-bytes`` split over the streams, every echoed byte compared with what was sent. Real
cells over real TCP between processes. Defaults: 3 relays, 16 circuits, 16 MiB, 2 worker
threads per relay; it takes a few seconds on 2 cores.

What it prints
--------------
A live progress line on a terminal (stderr), then a summary: MB/s echoed intact, round trips
(single cells, and under load), and per relay the cells crypted per second, the mean worker
batch, wake-ups per cell and CPU per cell (each relay reports these in its ``STATS`` line when
it exits). ``--json`` prints the summary as one JSON object instead:
``{"relays", "circuits", "bytes_sent", "bytes_echoed_intact", "mbytes_per_s", "rtt_p50_ms",
"rtt_p99_ms", "cells_per_s", "wakeups_per_cell", "batch_mean", "batches_per_group",
"per_relay", "failures", "ok", ...}`` (``batches_per_group``: circuit batches per kernel call
on the pool's grouped path, 0 when no relay groups, e.g. with ``--pure``).
Exit status: 0 when every byte of every circuit came back intact, 1 otherwise
(a relay that died fails the circuits through it; Ctrl-C fails the unfinished ones), 2 when
the network did not start, 130 when interrupted while starting. Every process it started is
stopped in every case.

Protocol with a child
---------------------
Every child program of this project (``examples.echo``, ``examples.relay``) speaks the same
line protocol on its stdout: one ``READY {json}`` line when it is serving (the JSON says where),
and one ``STATS {json}`` line when it exits after SIGTERM or SIGINT. Started with
``--exit-on-stdin-eof``, it also exits when its stdin (a pipe from this process) ends, so no
child outlives the network even if the network is killed. Everything else goes to
stderr, which is kept in a log file per child in the work directory (shown when something
fails).

:class:`ChildProcess` starts one program with ``subprocess.Popen`` and a reader thread that
reads its stdout line by line: it records the READY and STATS payloads, and when the pipe ends
(the process exited, or was killed) it calls ``on_exit(child)`` from that thread, unless the
exit was asked for with :meth:`ChildProcess.stop`. The callback is how the network notices that
a relay died: it hands the news to its loop with ``Reactor.call_soon_threadsafe``.

:class:`LocalNetwork` starts one echo service and N relays (each with its own data directory),
waits for their READY lines, writes the directory file the client reads, and stops every
process it started -- by its own pid, SIGTERM first, SIGKILL after a grace period -- whatever
happened before (``with LocalNetwork(...) as net:``, or ``stop()`` in a ``finally``).

Threads: the public methods are called from the thread that owns the network (normally the
main thread); ``on_exit`` runs on a reader thread and must only hand the news on.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from relay.directory import RelayDescriptor, write_directory

__all__ = ["ChildProcess", "LocalNetwork", "NetworkStartError"]


class NetworkStartError(RuntimeError):
    """A child did not come up (its log tail is in the message)."""


class ChildProcess:
    """One child program speaking the READY/STATS line protocol on stdout."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        *,
        env: dict[str, str] | None = None,
        on_exit: Callable[[ChildProcess], None] | None = None,
    ) -> None:
        """Start the process and its stdout reader thread. Owner thread."""
        self.name = name
        self.log_path = log_path
        self.on_exit = on_exit
        self.ready_info: dict[str, Any] | None = None
        self.stats: dict[str, Any] | None = None
        self.other_lines: list[str] = []
        self._ready = threading.Event()
        self._exited = threading.Event()
        self._stopping = False
        self._log: IO[bytes] = open(log_path, "wb")
        # Own session: a Ctrl-C in the terminal reaches the network only, which stops its
        # children in order. stdin is a pipe the child watches: if this process dies without
        # stopping it (even by SIGKILL), the child reads EOF and exits on its own.
        self.popen = subprocess.Popen(
            [*argv, "--exit-on-stdin-eof"],
            stdin=subprocess.PIPE,
            start_new_session=True,
            stdout=subprocess.PIPE,
            stderr=self._log,
            env=env,
            text=True,
            bufsize=1,
        )
        self._reader = threading.Thread(
            target=self._read_lines, name=f"reader-{name}", daemon=True
        )
        self._reader.start()

    @property
    def pid(self) -> int:
        """The child's process id. Any thread."""
        return self.popen.pid

    @property
    def alive(self) -> bool:
        """True until its stdout ended. Any thread."""
        return not self._exited.is_set()

    def wait_ready(self, timeout: float) -> dict[str, Any]:
        """Block until the READY line; raise :class:`NetworkStartError` if it exits or times
        out first. Owner thread."""
        deadline = time.monotonic() + timeout
        while not self._ready.wait(0.05):
            if self._exited.is_set() or time.monotonic() > deadline:
                why = "exited" if self._exited.is_set() else f"not ready after {timeout:.0f} s"
                raise NetworkStartError(f"{self.name} {why}:\n{self.log_tail()}")
        assert self.ready_info is not None
        return self.ready_info

    def kill(self, signum: int = signal.SIGKILL) -> None:
        """Send ``signum`` to this child only (no stop expected: ``on_exit`` fires). Any
        thread."""
        if self.popen.poll() is None:
            os.kill(self.popen.pid, signum)

    def stop(self, timeout: float) -> dict[str, Any] | None:
        """SIGTERM, wait for exit (SIGKILL after ``timeout``); return its STATS. Owner thread."""
        # Once only: a second SIGTERM that lands while the child is shutting down (its reactor
        # has restored the default action) kills it with -15 before its final STATS line.
        already_signalled = self._stopping  # LocalNetwork.stop signals every child first
        self._stopping = True
        if self.popen.poll() is None and not already_signalled:
            try:
                os.kill(self.popen.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()
        self._reader.join(timeout)
        if self.popen.stdin is not None:
            self.popen.stdin.close()
        return self.stats

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of the child's stderr log. Any thread."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(f"  [{self.name}] {line}" for line in text.splitlines()[-lines:])

    def _read_lines(self) -> None:
        """Reader thread: record READY/STATS lines until EOF, then report the exit."""
        assert self.popen.stdout is not None
        try:
            for line in self.popen.stdout:
                tag, _, payload = line.strip().partition(" ")
                if tag in ("READY", "STATS"):
                    try:
                        # a relay's READY has key=value words before its JSON
                        data = json.loads(payload[payload.find("{"):])
                    except json.JSONDecodeError:
                        self.other_lines.append(line)
                        continue
                    if tag == "READY":
                        self.ready_info = data
                        self._ready.set()
                    else:
                        self.stats = data
                else:
                    self.other_lines.append(line)
        finally:
            self.popen.stdout.close()
            self.popen.wait()
            self._log.close()
            self._exited.set()
            if not self._stopping and self.on_exit is not None:
                self.on_exit(self)


class LocalNetwork:
    """An echo service and N relay processes on loopback, and the directory file describing
    them. See the module docstring."""

    def __init__(
        self,
        relays: int = 3,
        *,
        threads: int = 2,
        workdir: str | os.PathLike[str] | None = None,
        pure: bool = False,
        plain_links: bool = False,
        relay_args: Sequence[str] = (),
        on_exit: Callable[[ChildProcess], None] | None = None,
    ) -> None:
        """Configure; nothing starts before :meth:`start`. ``plain_links`` runs the relays
        without TLS (``--plain-links``). Owner thread."""
        if relays < 1:
            raise ValueError(f"need at least one relay, got {relays}")
        self.n_relays = relays
        self.threads = threads
        self.pure = pure
        self.plain_links = plain_links
        self.relay_args = list(relay_args)
        self.on_exit = on_exit
        self._tempdir: tempfile.TemporaryDirectory[str] | None = None
        if workdir is None:
            self._tempdir = tempfile.TemporaryDirectory(prefix="relaycrypt-net-")
            workdir = self._tempdir.name
        self.workdir = Path(workdir)
        self.directory_path = self.workdir / "directory.json"
        self.echo: ChildProcess | None = None
        self.relays: list[ChildProcess] = []
        self.descriptors: list[RelayDescriptor] = []
        self.echo_address: tuple[str, int] = ("127.0.0.1", 0)
        self.stopping = False

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        if self.pure:
            env["RELAYCRYPT_PURE"] = "1"
        root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
        return env

    def _child_exited(self, child: ChildProcess) -> None:
        if not self.stopping and self.on_exit is not None:
            self.on_exit(child)

    def start(self, timeout: float = 30.0) -> None:
        """Start the echo service and the relays, wait for all of them, write the directory.

        Owner thread (blocks). Raises :class:`NetworkStartError` (after stopping what started)
        if a child fails to come up."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        env = self._env()
        try:
            self.echo = ChildProcess(
                "echo",
                [sys.executable, "-m", "examples.echo", "--port", "0"],
                self.workdir / "echo.log",
                env=env,
                on_exit=self._child_exited,
            )
            for index in range(self.n_relays):
                name = f"relay{index}"
                argv = [
                    sys.executable, "-m", "examples.relay",
                    "--listen", "127.0.0.1:0",
                    "--nickname", name,
                    "--data-dir", str(self.workdir / name),
                    "--threads", str(self.threads),
                    # a private network on loopback: extends to 127.0.0.1 allowed, and exits
                    # to the echo service there (TestingTorNetwork's relaxations)
                    "--testing-network",
                    "--exit-policy", "accept 127.0.0.1:*, reject *:*",
                    # one client IP (127.0.0.1) for every circuit: tor's per-IP limits would
                    # treat a large demo as an attack (they are tested on their own)
                    "--dos-circuit-creation-enabled", "0", "--dos-connection-enabled", "0",
                    *(["--plain-links"] if self.plain_links else []),
                    *self.relay_args,
                ]
                self.relays.append(
                    ChildProcess(name, argv, self.workdir / f"{name}.log", env=env,
                                 on_exit=self._child_exited)
                )
            info = self.echo.wait_ready(timeout)
            self.echo_address = (str(info["address"]), int(info["port"]))
            self.descriptors = [
                RelayDescriptor.from_json(child.wait_ready(timeout)["descriptor"])
                for child in self.relays
            ]
        except BaseException:
            self.stop()
            raise
        write_directory(self.directory_path, self.descriptors)

    def children(self) -> list[ChildProcess]:
        """Every child started (echo first). Owner thread."""
        return ([self.echo] if self.echo is not None else []) + list(self.relays)

    def relay_by_nickname(self, nickname: str) -> ChildProcess:
        """The relay process named ``nickname``. Owner thread."""
        for child in self.relays:
            if child.name == nickname:
                return child
        raise KeyError(nickname)

    def stop(self, timeout: float = 10.0) -> dict[str, dict[str, Any] | None]:
        """Stop every child (SIGTERM, then SIGKILL after ``timeout``); return their STATS by
        name. Idempotent; the temporary work directory stays until :meth:`cleanup` (or the
        context manager's exit). Owner thread."""
        self.stopping = True
        stats: dict[str, dict[str, Any] | None] = {}
        children = self.children()
        for child in children:  # signal all first, so they shut down in parallel
            child._stopping = True
            if child.popen.poll() is None:
                try:
                    os.kill(child.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for child in children:
            stats[child.name] = child.stop(timeout)
        return stats

    def cleanup(self) -> None:
        """Remove the temporary work directory, if this network made one. Owner thread."""
        if self._tempdir is not None:
            self._tempdir.cleanup()
            self._tempdir = None

    def __enter__(self) -> LocalNetwork:
        """Start the network. Owner thread."""
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop every child and remove the temporary work directory. Owner thread."""
        self.stop()
        self.cleanup()


# --------------------------------------------------------------------------- the demo


def _format_progress(progress: dict[str, Any]) -> str:
    total = max(progress["bytes_total"], 1)
    seconds = max(progress["seconds"], 1e-9)
    return (f"\r{progress['bytes_echoed'] / total:6.1%} echoed  "
            f"{progress['bytes_echoed'] / 1e6:7.2f}/{total / 1e6:.2f} MB  "
            f"{progress['bytes_echoed'] / seconds / 1e6:6.2f} MB/s  "
            f"circuits: {progress['circuits_open']} open, {progress['circuits_done']} done, "
            f"{progress['circuits_failed']} failed  ")


def summarize(
    transfer: dict[str, Any], relay_stats: dict[str, dict[str, Any] | None], relays: int
) -> dict[str, Any]:
    """The demo's JSON: the transfer's figures plus each relay's counters. Any thread."""
    seconds = transfer["transfer_seconds"]
    per_relay: dict[str, Any] = {}
    cells = wakeups = batches = groups = grouped_batches = 0
    for name, stats in relay_stats.items():
        if not name.startswith("relay"):
            continue
        if stats is None:
            per_relay[name] = {"died": True}
            continue
        cells += stats["cells_crypted"]
        wakeups += stats["wakeups"]
        batches += stats["batches"]
        if stats.get("groups"):
            groups += stats["groups"]
            grouped_batches += stats["batches"]
        per_relay[name] = {
            "cells_crypted": stats["cells_crypted"],
            "cells_per_s": stats["cells_crypted"] / seconds if seconds else 0.0,
            "batch_mean": stats["batch_mean"],
            "groups": stats.get("groups", 0),
            "batches_per_group": stats.get("batches_per_group", 0.0),
            "wakeups_per_cell": stats["wakeups_per_cell"],
            "circuits_created": stats["circuits_created"],
            "process_cpu_s": stats["process_cpu_s"],
            "cpu_us_per_cell": stats["cpu_us_per_cell"],
            "backend": stats["backend"],
            "threads": stats["threads"],
            "link_closes": stats["link_closes"],
        }
    return {
        "relays": relays,
        **transfer,
        "cells_crypted": cells,
        "cells_per_s": cells / seconds if seconds else 0.0,
        "wakeups_per_cell": wakeups / cells if cells else 0.0,
        "batch_mean": cells / batches if batches else 0.0,
        "batches_per_group": grouped_batches / groups if groups else 0.0,
        "per_relay": per_relay,
    }


def _print_summary(summary: dict[str, Any]) -> None:
    ok = "OK: every byte intact" if summary["ok"] else "FAILED"
    print(f"\n{ok}")
    print(f"  {summary['relays']} relays, {summary['circuits']} circuits of {summary['hops']} "
          f"hops, {summary['bytes_per_circuit']} bytes each")
    print(f"  echoed intact: {summary['bytes_echoed_intact']} of "
          f"{summary['circuits'] * summary['bytes_per_circuit']} bytes in "
          f"{summary['transfer_seconds']:.2f} s: {summary['mbytes_per_s']:.2f} MB/s "
          f"(circuits built in {summary['build_seconds']:.2f} s)")
    print(f"  round trip (single cells): p50 {summary['rtt_p50_ms']:.2f} ms, "
          f"p99 {summary['rtt_p99_ms']:.2f} ms ({summary['rtt_samples']} samples); under load: "
          f"p50 {summary['rtt_load_p50_ms']:.1f} ms, p99 {summary['rtt_load_p99_ms']:.1f} ms")
    print(f"  relays: {summary['cells_per_s']:.0f} cells/s crypted in total, "
          f"{summary['wakeups_per_cell']:.4f} wake-ups per cell, "
          f"mean worker batch {summary['batch_mean']:.1f} cells"
          + (f", {summary['batches_per_group']:.1f} batches per kernel call (grouped)"
             if summary["batches_per_group"] else ""))
    for name, stats in summary["per_relay"].items():
        if stats.get("died"):
            print(f"    {name}: died")
            continue
        print(f"    {name}: {stats['cells_crypted']} cells, {stats['cells_per_s']:.0f} cells/s, "
              f"batch {stats['batch_mean']:.1f}, {stats['wakeups_per_cell']:.4f} wake-ups/cell, "
              f"{stats['cpu_us_per_cell']:.2f} CPU-us/cell, {stats['circuits_created']} "
              f"circuits, {stats['backend']} x{stats['threads']}")
    for failure in summary["failures"]:
        print(f"  FAILED circuit {failure['circuit']} {failure['path']}: {failure['reason']}")


def main(argv: list[str] | None = None) -> int:
    """Start the network, run the echo transfer, stop everything, report. Main thread."""
    from examples.client import parse_size

    parser = argparse.ArgumentParser(
        description="A relay network on loopback: echo service, N relay processes, C circuits.")
    parser.add_argument("--relays", type=int, default=3, help="relay processes (default 3)")
    parser.add_argument("--circuits", type=int, default=16, help="circuits (default 16)")
    parser.add_argument("--total-bytes", type=parse_size, default=16 << 20,
                        help="bytes echoed in total, split over the circuits (default 16MiB)")
    parser.add_argument("--hops", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="worker threads per relay")
    parser.add_argument("--pure", action="store_true",
                        help="force the pure-Python crypto reference in the relays")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--stall-timeout", type=float, default=30.0)
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument("--compare-pure", action="store_true",
                        help="then run the same network with the pure-Python crypto in the "
                             "relays and compare relay CPU per cell (make demo does this)")
    parser.add_argument("--plain-links", action="store_true",
                        help="links without TLS (faster, refused by any tor; for comparison)")
    parser.add_argument("--compare-plain", action="store_true",
                        help="then run the same network with plain links and compare echo "
                             "throughput and relay CPU (what TLS costs; make demo does this)")
    parser.add_argument("--log-level", default="WARNING", help="relays' and client's log level")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr)
    summary, code = _run_network(args, pure=args.pure)
    if code is not None:
        return code
    if args.compare_pure and summary["ok"] and not args.pure:
        reference, code = _run_network(args, pure=True)
        if code is not None:
            return code
        summary["compare_pure"] = _compare_backends(summary, reference)
        summary["ok"] = summary["ok"] and reference["ok"]
    if args.compare_plain and summary["ok"] and not args.plain_links:
        plain, code = _run_network(args, pure=args.pure, plain_links=True)
        if code is not None:
            return code
        summary["compare_plain"] = _compare_links(summary, plain)
        summary["ok"] = summary["ok"] and plain["ok"]
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        _print_summary(summary)
        if "compare_pure" in summary:
            _print_comparison(summary["compare_pure"])
        if "compare_plain" in summary:
            _print_links(summary["compare_plain"])
    return 0 if summary["ok"] else 1


def _run_network(args: argparse.Namespace, *, pure: bool, plain_links: bool | None = None,
                 ) -> tuple[dict[str, Any], int | None]:
    """Run one network and transfer; the summary, and an exit code if it could not run.

    Main thread.
    """
    from examples.client import EchoTransfer
    from reactor import Reactor

    plain_links = args.plain_links if plain_links is None else plain_links

    per_circuit = max(1, args.total_bytes // max(args.circuits, 1))
    interactive = sys.stderr.isatty() and not args.json

    with Reactor() as reactor:
        died: list[str] = []
        pids: dict[str, int] = {}
        transfer_holder: list[EchoTransfer] = []

        def relay_died(child: ChildProcess) -> None:  # reader thread
            reactor.call_soon_threadsafe(on_death, child)

        def on_death(child: ChildProcess) -> None:
            died.append(child.name)
            print(f"\n{child.name} (pid {child.pid}) exited unexpectedly:\n{child.log_tail(10)}",
                  file=sys.stderr)
            if child.name == "echo" and transfer_holder:
                transfer_holder[0].abort("the echo service died")

        network = LocalNetwork(args.relays, threads=args.threads, pure=pure,
                               plain_links=plain_links,
                               relay_args=["--log-level", args.log_level], on_exit=relay_died)
        try:
            try:
                network.start()
            except NetworkStartError as exc:
                print(f"the network did not start: {exc}", file=sys.stderr)
                return {}, 2
            except KeyboardInterrupt:  # Ctrl-C before the loop took over SIGINT
                print("interrupted while starting; stopped every process", file=sys.stderr)
                return {}, 130
            pids.update({child.name: child.pid for child in network.children()})
            transfer = EchoTransfer(
                reactor, network.descriptors, network.echo_address, circuits=args.circuits,
                bytes_per_circuit=per_circuit, hops=args.hops, seed=args.seed,
                stall_timeout=args.stall_timeout, tls=not plain_links,
                on_finished=lambda t: reactor.stop(),
            )
            transfer_holder.append(transfer)
            reactor.add_signal_handler(signal.SIGINT, transfer.abort, "interrupted (Ctrl-C)")
            reactor.add_signal_handler(signal.SIGTERM, transfer.abort, "terminated")

            def show_progress() -> None:
                if transfer.finished:
                    return
                if interactive:
                    print(_format_progress(transfer.progress()), end="", file=sys.stderr,
                          flush=True)
                reactor.call_later(0.25, show_progress)

            print(f"network up in {network.workdir}: {args.relays} relays, echo service at "
                  f"{network.echo_address[0]}:{network.echo_address[1]}; starting "
                  f"{args.circuits} circuits"
                  + (" (relays on the pure-Python crypto)" if pure else ""),
                  file=sys.stderr, flush=True)
            transfer.start()
            show_progress()
            reactor.run()
            if interactive:
                print(_format_progress(transfer.progress()), file=sys.stderr)
            results = transfer.results()
        finally:
            relay_stats = network.stop()
            network.cleanup()
    summary = summarize(results, relay_stats, args.relays)
    summary["relays_died"] = died
    summary["pids"] = pids
    return summary, None


def _relay_cpu_per_cell(summary: dict[str, Any]) -> float:
    """Relays' process CPU per crypted cell, counted from each relay's first cell (start-up
    excluded), weighted by cells, in microseconds. Any thread."""
    relays = [r for r in summary["per_relay"].values() if not r.get("died")]
    cells = sum(r["cells_crypted"] for r in relays)
    cpu_us = sum(r["cpu_us_per_cell"] * r["cells_crypted"] for r in relays)
    return cpu_us / cells if cells else 0.0


def _compare_backends(kernel: dict[str, Any], reference: dict[str, Any]) -> dict[str, Any]:
    """The same network with the kernel and with the pure-Python reference. Any thread."""
    kernel_cpu, reference_cpu = _relay_cpu_per_cell(kernel), _relay_cpu_per_cell(reference)
    return {
        "kernel_cpu_us_per_cell": kernel_cpu,
        "reference_cpu_us_per_cell": reference_cpu,
        "cpu_ratio": reference_cpu / kernel_cpu if kernel_cpu else 0.0,
        "kernel_mbytes_per_s": kernel["mbytes_per_s"],
        "reference_mbytes_per_s": reference["mbytes_per_s"],
        "reference_ok": reference["ok"],
    }


def _print_comparison(comparison: dict[str, Any]) -> None:
    print("\nThe same network with the relays on the pure-Python crypto reference:"
          f" {'every byte intact' if comparison['reference_ok'] else 'FAILED'}")
    print(f"  relay CPU per crypted cell: C kernel {comparison['kernel_cpu_us_per_cell']:.2f} us,"
          f" reference {comparison['reference_cpu_us_per_cell']:.2f} us "
          f"({comparison['cpu_ratio']:.2f}x less CPU with the kernel)")
    print(f"  echo throughput: kernel {comparison['kernel_mbytes_per_s']:.1f} MB/s, reference "
          f"{comparison['reference_mbytes_per_s']:.1f} MB/s (the in-process client and the "
          "relays' per-cell link work on the loop threads share the 2 cores with the crypto)")


def _compare_links(tls: dict[str, Any], plain: dict[str, Any]) -> dict[str, Any]:
    """The same network over TLS links and over plain ones. Any thread."""
    return {
        "tls_mbytes_per_s": tls["mbytes_per_s"],
        "plain_mbytes_per_s": plain["mbytes_per_s"],
        "throughput_ratio": (tls["mbytes_per_s"] / plain["mbytes_per_s"]
                             if plain["mbytes_per_s"] else 0.0),
        "tls_cpu_us_per_cell": _relay_cpu_per_cell(tls),
        "plain_cpu_us_per_cell": _relay_cpu_per_cell(plain),
        "plain_ok": plain["ok"],
    }


def _print_links(comparison: dict[str, Any]) -> None:
    print("\nThe same network with plain TCP links (no TLS):"
          f" {'every byte intact' if comparison['plain_ok'] else 'FAILED'}")
    print(f"  echo throughput: TLS {comparison['tls_mbytes_per_s']:.1f} MB/s, plain "
          f"{comparison['plain_mbytes_per_s']:.1f} MB/s "
          f"({comparison['throughput_ratio']:.2f}x of plain with TLS)")
    print(f"  relay CPU per crypted cell: TLS {comparison['tls_cpu_us_per_cell']:.2f} us, plain "
          f"{comparison['plain_cpu_us_per_cell']:.2f} us")


if __name__ == "__main__":
    sys.exit(main())
