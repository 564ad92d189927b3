"""tornet's parts that need no tor: the external-relay contract, torrc text, process group,
network namespace, CPU accounting, byte verification, and the stand-in's refusals.

Real processes, sockets and /proc throughout; the only stand-in peer is a local TCP "echo" that
changes one byte, to prove a changed byte is caught and located.
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tornet import torrc
from tornet.cpu import CpuSample
from tornet.external import (
    READY_PATTERN,
    RelayCommand,
    RelayOptions,
    exit_policy_for,
    format_ready,
    parse_ready,
)
from tornet.netns import NetPlace
from tornet.procs import NetworkFailed, ProcessGroup, alive_of, process_identity
from tornet.push import transfer

ROOT = Path(__file__).resolve().parent.parent
FINGERPRINT = "0123456789ABCDEF0123456789ABCDEF01234567"
ED25519 = "Z44gDjt4xifSbfWpafNRtotFeZLJM7kQ/+UQV2i9H+0"
DIRAUTH = f"auth orport=5000 no-v2 v3ident={'AB' * 20} 127.0.0.1:5001 {FINGERPRINT}"


# -- the external-relay contract ------------------------------------------------------------

def test_ready_line_round_trip_and_refusals() -> None:
    line = format_ready(9001, FINGERPRINT.lower(), ED25519)
    assert line == (f"READY orport=127.0.0.1:9001 fingerprint={FINGERPRINT.lower()} "
                    f"ed25519={ED25519}")
    info = parse_ready(line)
    assert (info.orport, info.fingerprint, info.ed25519) == (9001, FINGERPRINT, ED25519)
    assert parse_ready(line + "=").ed25519 == ED25519  # padded base64 is accepted too
    for bad in (line.replace("127.0.0.1", "10.0.0.1"),        # not loopback
                line.replace(FINGERPRINT.lower(), "0123"),     # short fingerprint
                line.replace(ED25519, ED25519[:-2]),           # short key
                "READY " + line):
        with pytest.raises(ValueError):
            parse_ready(bad)
    assert READY_PATTERN.match("  " + line) is None


def test_relay_options_are_the_documented_command_line(tmp_path: Path) -> None:
    options = RelayOptions(nickname="x1", data_dir=tmp_path, orport=9001,
                           dirauths=(DIRAUTH, DIRAUTH.replace("auth ", "auth2 ")),
                           exit_policy=exit_policy_for(5555), bridge=True)
    command = RelayCommand.parse("python -m examples.relay --threads 2")
    assert command.prefix == (sys.executable, "-m", "examples.relay", "--threads", "2")
    assert command.argv(options) == [
        sys.executable, "-m", "examples.relay", "--threads", "2",
        "--testing-network", "--nickname", "x1", "--data-dir", str(tmp_path),
        "--orport", "127.0.0.1:9001", "--dirauth", DIRAUTH,
        "--dirauth", DIRAUTH.replace("auth ", "auth2 "),
        "--exit-policy", "accept 127.0.0.1:5555, reject *:*", "--bridge"]
    assert exit_policy_for(None) == "reject *:*"
    with pytest.raises(ValueError):
        RelayOptions("x", tmp_path, 1, ()).argv()


def test_standin_refuses_to_run_outside_a_test_network(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tornet.standin", "--dirauth", DIRAUTH, "--data-dir",
         str(tmp_path), "--nickname", "x1", "--orport", "127.0.0.1:9001"],
        cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "--testing-network" in result.stderr
    result = subprocess.run(
        [sys.executable, "-m", "tornet.standin", "--testing-network", "--dirauth", DIRAUTH,
         "--data-dir", str(tmp_path), "--nickname", "x1", "--orport", "192.0.2.1:9001"],
        cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "127.0.0.1:PORT" in result.stderr


# -- torrc -------------------------------------------------------------------------------------

def test_torrc_comments_each_reason_and_refuses_newlines(tmp_path: Path) -> None:
    base = torrc.common(nickname="t1", data_dir=tmp_path / "data", log_file=tmp_path / "log",
                        dirauths=[DIRAUTH], control_port=9051, owner_pid=1234)
    options = torrc.relay(base, orport=9001, resolv_conf=tmp_path / "resolv.conf",
                          exit_policy=exit_policy_for(5555))
    text = torrc.render(options)
    lines = text.splitlines()
    for option in options:
        line = f"{option.key} {option.value}".rstrip()
        index = lines.index(line)
        if option.why:
            assert lines[index - 1] == f"# {option.why}"
    assert f"DirAuthority {DIRAUTH}" in lines
    assert "ExitPolicy accept 127.0.0.1:5555, reject *:*" in lines
    assert "__OwningControllerProcess 1234" in lines
    addresses = [word for line in lines if not line.startswith("#")
                 for word in line.replace(",", " ").split() if word.count(".") == 3]
    assert addresses and all(a.startswith("127.0.0.1") for a in addresses), addresses
    with pytest.raises(ValueError):
        torrc.render([torrc.Option("Nickname", "a\nExitPolicy accept *:*")])
    with pytest.raises(ValueError):
        torrc.common(nickname="t1", data_dir=tmp_path, log_file=tmp_path / "log", dirauths=[],
                     control_port=None, owner_pid=None)


# -- processes ---------------------------------------------------------------------------------

def _wait_for(predicate: object, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def test_group_stops_everything_when_one_child_dies(tmp_path: Path) -> None:
    place = NetPlace(want_namespace=False)
    group = ProcessGroup(place, poll_interval=0.05)
    try:
        # A child that starts a grandchild in its session and waits for it.
        parent = group.start("parent", ["sh", "-c", "sleep 300 & echo $! > grandchild; wait"],
                             tmp_path / "parent")
        victim = group.start("victim", ["sleep", "300"], tmp_path / "victim")
        grandchild_file = tmp_path / "parent" / "grandchild"
        _wait_for(lambda: grandchild_file.exists() and grandchild_file.read_text().strip())
        grandchild = int(grandchild_file.read_text())
        tree = {process_identity(pid) for pid in (parent.pid, victim.pid, grandchild)}
        assert None not in tree
        subprocess.run(["kill", "-KILL", str(victim.pid)], check=True)
        _wait_for(lambda: group.failure is not None)
        assert group.failure is not None and "victim" in group.failure
        assert "status -9" in group.failure
        _wait_for(lambda: alive_of(tree) == [])  # type: ignore[arg-type]
        with pytest.raises(NetworkFailed, match="victim"):
            group.check()
        with pytest.raises(NetworkFailed, match="not starting"):
            group.start("late", ["true"], tmp_path / "late")
    finally:
        group.stop_all()
        place.close()


def test_stopping_a_child_on_purpose_is_no_failure(tmp_path: Path) -> None:
    place = NetPlace(want_namespace=False)
    group = ProcessGroup(place, poll_interval=0.05)
    try:
        child = group.start("child", ["sleep", "300"], tmp_path / "child",
                            read_stdout=True, stdin_pipe=True)
        other = group.start("other", [sys.executable, "-c", "print('READY x', flush=True); "
                                      "import time; time.sleep(300)"],
                            tmp_path / "other", read_stdout=True)
        assert other.wait_line(re.compile(r"^READY (\w+)$"), 30).group(1) == "x"
        assert group.stop_one(child) == -15
        time.sleep(0.3)  # several watchdog rounds
        assert group.failure is None
        group.check()
        assert other.alive()
    finally:
        group.stop_all()
        place.close()
    assert not other.alive() and other.returncode == -15


def test_a_fresh_namespace_has_only_loopback() -> None:
    place = NetPlace(want_namespace=True)
    try:
        if not place.namespace:
            pytest.skip(f"no network namespace here: {place.description}")
        out = place.popen(["ip", "-o", "link"], stdout=subprocess.PIPE).communicate()[0]
        names = [line.split(":")[1].strip() for line in out.decode().splitlines()]
        assert names == ["lo"]
        ports = {place.free_port() for _ in range(50)}
        assert len(ports) == 50 and all(20000 <= port < 32000 for port in ports)
        # A listener in the namespace is invisible from the host's loopback.
        listener = place.call(socket.create_server, ("127.0.0.1", place.free_port()))
        port = listener.getsockname()[1]
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
        place.connect(port).close()
        listener.close()
    finally:
        place.close()


# -- CPU from /proc ----------------------------------------------------------------------------

_SPINNER = """
import sys, threading, time
def spin():
    print(threading.get_native_id(), flush=True)
    sys.stdin.readline()
    start = time.thread_time()
    while time.thread_time() - start < 0.5:
        pass
    print("spun", flush=True)
    sys.stdin.readline()
thread = threading.Thread(target=spin)
thread.start()
thread.join()
"""


def test_cpu_sample_counts_a_busy_thread() -> None:
    """A child process spins one thread for 0.5 s of CPU between two samples: /proc shows it
    on that thread, in the process, and in the sample's total."""
    child = subprocess.Popen([sys.executable, "-c", _SPINNER], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdin is not None
        tid = int(child.stdout.readline())
        before = CpuSample.take(child.pid)
        child.stdin.write("go\n")
        child.stdin.flush()
        assert child.stdout.readline().strip() == "spun"
        after = CpuSample.take(child.pid)  # the spinning thread is still alive here
        child.stdin.write("\n")
        child.stdin.flush()
    finally:
        child.wait(30)
    key = (child.pid, tid)
    assert key in before.threads and key in after.threads
    spent = after.threads[key][1] - before.threads[key][1]
    assert spent >= 0.5 - 0.03  # /proc counts in 10 ms ticks
    total, by_name = after.since(before)
    # The kernel scales each thread's and the process's tick counts separately: a few ticks
    # of disagreement between the two views are normal.
    assert total >= spent - 0.05
    assert sum(by_name.values()) >= spent - 0.05


# -- byte verification ------------------------------------------------------------------------

def test_transfer_finds_a_changed_byte() -> None:
    server = socket.create_server(("127.0.0.1", 0))
    flip_at = 100_000

    def corrupting_echo() -> None:
        conn, _ = server.accept()
        seen = 0
        with conn:
            while chunk := conn.recv(65536):
                data = bytearray(chunk)
                if seen <= flip_at < seen + len(data):
                    data[flip_at - seen] ^= 0x01
                seen += len(data)
                conn.sendall(data)

    threading.Thread(target=corrupting_echo, daemon=True).start()
    payload = bytes(range(256)) * 1024  # 256 KiB
    sock = socket.create_connection(server.getsockname())
    result = transfer(sock, payload, timeout=30)
    server.close()
    assert result.bytes_sent == result.bytes_echoed == len(payload)
    assert result.first_mismatch == flip_at
    assert result.bytes_echoed_intact == len(payload) - 1
    assert not result.intact
