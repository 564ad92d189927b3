"""benchmarks.cpu_profile: where a process's CPU goes, by library.

* the grouping of perf's shared-object names, and the parsing of its report;
* with perf here: a process busy in the interpreter is sampled as ``python``, one hashing
  through OpenSSL as ``openssl``;
* ``benchmarks.relay_cpu.measure(perf_data=...)``: the groups of a real relay's window add up
  to its CPU per cell, and the floor is its kernel + OpenSSL part.
"""

from __future__ import annotations

import math
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks.cpu_profile import (
    GROUPS,
    Recorder,
    by_group,
    classify,
    median_split,
    parse_thread_report,
    process_shares,
    thread_split,
    unavailable,
)
from benchmarks.relay_cpu import measure

REPORT = """\
# To display the perf.data header info, please use --header/--header-only options.
#
# Samples: 23K of event 'cpu-clock:ppp'
#
    51.36% |  4242:python |libpython3.11.so.1.0
    15.23% |  4242:python |[kernel.kallsyms]
    10.00% |  4243:python |libcrypto.so.3
     8.54% |  4242:python |libc.so.6
     5.00% |  4243:python |[kernel.kallsyms]
     3.08% |  4242:python |libcrypto.so.3
     1.87% |  4242:python |_cellkernel.cpython-311-x86_64-linux-gnu.so
     1.69% |  4243:python |libssl.so.3
     1.08% |  4242:python |_cpyuv.cpython-311-x86_64-linux-gnu.so
     0.38% |  4242:python |[vdso]
     0.10% |  4243:python |[unknown]
"""


@pytest.mark.parametrize(("dso", "group"), [
    ("[kernel.kallsyms]", "kernel"), ("[vdso]", "kernel"), ("libcrypto.so.3", "openssl"),
    ("libssl.so.3", "openssl"), ("libpython3.11.so.1.0", "python"), ("python3.11", "python"),
    ("_cellkernel.cpython-311-x86_64-linux-gnu.so", "extensions"), ("libc.so.6", "libc"),
    ("/usr/lib/x86_64-linux-gnu/libm.so.6", "libc"), ("tor", "tor"),
    ("libevent-2.1.so.7.0.1", "libevent"), ("[unknown]", "other"), ("libz.so.1", "other"),
])
def test_classify(dso: str, group: str) -> None:
    assert classify(dso) == group


def test_report_parsed_and_grouped() -> None:
    shares = process_shares(parse_thread_report(REPORT))  # two threads' shares added up
    assert len(shares) == 9  # the header lines are not objects
    assert shares["libcrypto.so.3"] == pytest.approx(0.1308)
    groups = by_group(shares)
    assert tuple(groups) == GROUPS
    assert groups["python"] == pytest.approx(0.5136)
    assert groups["kernel"] == pytest.approx(0.2023 + 0.0038)
    assert groups["openssl"] == pytest.approx(0.1308 + 0.0169)
    assert groups["extensions"] == pytest.approx(0.0187 + 0.0108)
    assert groups["other"] == pytest.approx(0.0010)
    assert groups["tor"] == 0.0
    assert math.fsum(groups.values()) == pytest.approx(math.fsum(shares.values()))


THREAD_REPORT = """\
# Samples: 5K of event 'cpu-clock:ppp'
#
    20.82% |  12679:python |libcrypto.so.3
    15.50% |  12677:python |[kernel.kallsyms]
    13.11% |  12677:python |libpython3.11.so.1.0
    10.07% |  12679:python |libc.so.6
     8.34% |  12677:python |_cellkernel.cpython-311-x86_64-linux-gnu.so
     5.01% |  12677:python |libc.so.6
     3.56% |  12679:relay worker 1 |[kernel.kallsyms]
     0.60% |  12677:python |[vdso]
"""


def test_thread_report_parsed_per_thread_and_split() -> None:
    threads = parse_thread_report(THREAD_REPORT)
    assert sorted(threads) == [12677, 12679]
    assert threads[12679] == pytest.approx({"libcrypto.so.3": 0.2082, "libc.so.6": 0.1007,
                                            "[kernel.kallsyms]": 0.0356})
    loop = by_group(threads[12677])
    assert math.fsum(loop.values()) == pytest.approx(0.4256)
    split = thread_split(loop, 0.8512)  # the thread's own CPU per cell, from /proc
    by = split["loop_cpu_by_group_us_per_cell"]
    assert math.fsum(by.values()) == pytest.approx(0.8512)
    assert split["loop_kernel_us_per_cell"] == pytest.approx((0.1550 + 0.0060) * 2)
    assert by["python"] == pytest.approx(0.1311 * 2) and by["openssl"] == 0.0
    assert thread_split(dict.fromkeys(GROUPS, 0.0), 1.0) == {}  # no samples: no split


def test_median_split_takes_the_loop_split_when_every_run_has_it() -> None:
    def run(kernel: float, loop_kernel: float | None) -> dict[str, object]:
        figures: dict[str, object] = {
            "floor_us_per_cell": kernel,
            "cpu_by_group_us_per_cell": dict.fromkeys(GROUPS, 0.0) | {"kernel": kernel}}
        if loop_kernel is not None:
            figures.update({"loop_kernel_us_per_cell": loop_kernel,
                            "loop_cpu_by_group_us_per_cell":
                                dict.fromkeys(GROUPS, 0.0) | {"kernel": loop_kernel}})
        return figures

    both = median_split([run(1.0, 0.2), run(3.0, 0.4), run(2.0, 0.9)])
    assert both["floor_us_per_cell"] == 2.0 and both["loop_kernel_us_per_cell"] == 0.4
    assert both["loop_cpu_by_group_us_per_cell"]["kernel"] == 0.4
    partial = median_split([run(1.0, 0.2), run(3.0, None)])
    assert partial["floor_us_per_cell"] == 2.0 and "loop_kernel_us_per_cell" not in partial


_NO_PERF = unavailable()
needs_perf = pytest.mark.skipif(_NO_PERF is not None, reason=f"perf: {_NO_PERF}")

BUSY = {
    "python": "import time\nend = time.monotonic() + 20\nn = 0\n"
              "while time.monotonic() < end:\n    n += 1\n",
    "openssl": "import hashlib, time\nblock = bytes(1 << 20)\nend = time.monotonic() + 20\n"
               "while time.monotonic() < end:\n    hashlib.sha256(block).digest()\n",
}


@needs_perf
@pytest.mark.parametrize("group", sorted(BUSY))
def test_busy_process_lands_in_its_group(tmp_path: Path, group: str) -> None:
    child = subprocess.Popen([sys.executable, "-c", BUSY[group]])
    try:
        time.sleep(0.3)  # past start-up
        recorder = Recorder(child.pid, tmp_path / "busy.perf")
        recorder.start()
        time.sleep(1.0)
        groups = recorder.stop()
    finally:
        child.kill()
        child.wait()
    assert groups[group] > 0.6, groups
    assert math.fsum(groups.values()) == pytest.approx(1.0, abs=0.01)


@needs_perf
def test_relay_window_split_adds_up(tmp_path: Path) -> None:
    result = measure(True, tmp_path / "run", circuits=8, warmup=0.3, window=1.0, rate=20_000,
                     perf_data=tmp_path / "relay.perf")
    groups = result["cpu_by_group_us_per_cell"]
    assert set(groups) == set(GROUPS)
    assert math.fsum(groups.values()) == pytest.approx(result["cpu_us_per_cell"], rel=0.01)
    assert result["floor_us_per_cell"] == pytest.approx(groups["kernel"] + groups["openssl"])
    # a relay with TLS links: system calls, ciphers and the interpreter all take their share
    for name in ("kernel", "openssl", "python"):
        assert groups[name] > 0.0, groups
    assert groups["tor"] == groups["libevent"] == 0.0
    # the loop thread's own split adds up to its CPU; its socket I/O is in the kernel part
    loop = result["loop_cpu_by_group_us_per_cell"]
    assert math.fsum(loop.values()) == pytest.approx(result["loop_cpu_us_per_cell"], rel=0.01)
    assert 0.0 < result["loop_kernel_us_per_cell"] == loop["kernel"] <= groups["kernel"] * 1.15
