"""A short soak of the relay network (the suite's version of ``make soak``), and the leak it
found.

What is checked, and why
------------------------
* ``examples.soak`` for a few seconds: relay processes carry back-to-back rounds of fresh
  three-hop circuits; at every round's end (a quiet point) each relay's RSS, thread count and
  open descriptors are sampled and its open circuits counted. After the warm-up rounds, RSS
  stays within 16 MiB of the first quiet point, descriptors within 4, threads do not change,
  and no circuit is left open; every round echoes every byte. The test reads the JSON and
  checks those numbers itself rather than only the tool's verdict. A leak of ~1 MiB per round
  (what the pyuv ``writelines`` leak below caused) fails it within a dozen seconds.
* ``Stream.writelines`` releases every buffer it was given once the write completed: pyuv
  1.4.0 never releases a sequence passed to ``write`` (the list, and so every buffer in it), so
  the exit's DATA to its targets leaked ~1.5 MB per soak round per relay until the stream
  handed pyuv one joined buffer instead.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from support_loop import run_until

from reactor import Reactor, Stream, connect, listen

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(120)
def test_short_soak_stays_flat() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "examples.soak", "--seconds", "12", "--interval", "1",
         "--warmup", "3", "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=110,
    )
    assert proc.stdout, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    assert summary["rounds"] >= 6, summary["rounds"]
    assert summary["circuits_failed"] == 0 and not summary["failures"]
    assert summary["bytes_echoed_intact"] == summary["circuits"] * 256 * 1024
    warm = summary["bounds"]["warmup_rounds"]
    for name, check in summary["relays"].items():
        quiet = [q for q in summary["quiet_points"][warm:] if name in q["relays"]]
        rss = [q["relays"][name]["rss_bytes"] for q in quiet]
        fds = [q["relays"][name]["fds"] for q in quiet]
        assert max(rss) - rss[0] <= 16 * 2**20, (name, rss)
        assert max(fds) - fds[0] <= 4, (name, fds)
        assert len(check["threads_seen"]) == 1, (name, check)
        assert {q["stats"][name]["circuits_open"] for q in summary["quiet_points"]} == {0}
        assert {q["stats"][name]["pool_errors"] for q in summary["quiet_points"]} == {0}
    assert summary["ok"], summary["relays"]
    assert proc.returncode == 0
    print(f"FIGURES soak-short: seconds={summary['seconds']} rounds={summary['rounds']} "
          f"circuits={summary['circuits']} bytes={summary['bytes_echoed_intact']} "
          + " ".join(f"{n}:rss={c['rss_quiet_first_mb']}->{c['rss_quiet_last_mb']}MiB,"
                     f"fds={c['fds_quiet']},threads={c['threads_seen']}"
                     for n, c in summary["relays"].items()))


def test_writelines_releases_every_buffer() -> None:
    reactor = Reactor()
    received = bytearray()
    accepted: list[Stream] = []

    def on_connection(stream: Stream) -> None:
        accepted.append(stream)
        stream.on_data = received.extend

    listener = listen(reactor, "127.0.0.1", 0, on_connection)
    streams: list[Stream] = []
    connect(reactor, *listener.address, streams.append)
    assert run_until(reactor, lambda: bool(streams) and bool(accepted))
    buffers = [bytes([i % 256]) * 509 + bytes(i % 7) for i in range(2000)]
    before = [sys.getrefcount(b) for b in buffers]
    for start in range(0, 2000, 100):
        streams[0].writelines(buffers[start : start + 100])
    total = sum(len(b) for b in buffers)
    assert run_until(reactor, lambda: len(received) == total)
    assert received == b"".join(buffers)
    assert run_until(reactor, lambda: streams[0].write_buffer_size == 0)
    after = [sys.getrefcount(b) for b in buffers]
    assert after == before  # nothing kept a reference once the writes completed
    reactor.close()
