"""relaycrypt relays in a private Tor network of real tor processes (tornet): every position.

All but the last test share ONE network per session (``tornet_network`` in conftest.py): an
authority, tor relays t1-t3, a real tor client, an echo service, and two relaycrypt relays
started through the external-relay command line (``xrelay``: guard, middle or exit; ``xbridge``:
the bridge a second real tor client bootstraps from). Each push sends
real bytes through a circuit that tor reports built through exactly the chosen relays and checks
every echoed byte. The last test runs ``python -m examples.tornet``, interrupts it with SIGINT,
and checks that no process it (or its children) started survives.
"""

from __future__ import annotations

import base64
import json
import math
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from relay.identity.descriptor import RELAYCRYPT_PROTOCOLS
from tornet.control import ControlError, bootstrap_progress
from tornet.cpu import descendants
from tornet.netns import LOOPBACK
from tornet.network import TorNet
from tornet.procs import NetworkFailed, alive_of, process_identity
from tornet.push import PinError, open_pinned_stream

ROOT = Path(__file__).resolve().parent.parent
MIB = 1024 * 1024

pytestmark = pytest.mark.timeout(300)


def _flags(entry: str) -> list[str]:
    return next((line.split()[1:] for line in entry.splitlines() if line.startswith("s ")), [])


def test_bootstrap_reached(tornet_network: TorNet) -> None:
    net = tornet_network
    assert net.bootstrap_s is not None and net.bootstrap_s > 0
    bridge = net.external("xbridge")
    assert bridge.bridge_client is not None and net.client is not None
    for client in (net.client, bridge.bridge_client):
        phase = net.control(client).getinfo("status/bootstrap-phase")
        assert bootstrap_progress(phase) == 100, phase
    control = net.control(net.client)
    # Every non-bridge relay is listed Running and Valid under the fingerprint it announced.
    for relay in [*net.tor_relays, net.external("xrelay")]:
        flags = _flags(control.getinfo(f"ns/id/{relay.fingerprint}"))
        assert {"Running", "Valid"} <= set(flags), (relay.name, flags)
    # The external relay's READY line names the Ed25519 identity tor published for it.
    xrelay = net.external("xrelay")
    assert xrelay.ready is not None
    microdesc = control.getinfo(f"md/id/{xrelay.fingerprint}")
    published = [line.split()[2] for line in microdesc.splitlines()
                 if line.startswith("id ed25519 ")]
    assert published == [xrelay.ready.ed25519]
    assert len(base64.b64decode(xrelay.ready.ed25519 + "=")) == 32
    # A bridge is not in the consensus; its own client knows it from its descriptor.
    with pytest.raises(ControlError):
        control.getinfo(f"ns/id/{bridge.fingerprint}")
    assert net.group is not None and net.group.failure is None


def _protocols(text: str) -> dict[str, set[int]]:
    """``"Cons=1-2 Link=4"`` -> ``{"Cons": {1, 2}, "Link": {4}}`` (dir-spec's protocol list)."""
    found: dict[str, set[int]] = {}
    for item in text.split():
        name, _, ranges = item.partition("=")
        for part in ranges.split(","):
            low, _, high = part.partition("-")
            found.setdefault(name, set()).update(range(int(low), int(high or low) + 1))
    return found


#: What the README ("Running in a Tor network") says tor 0.4.9 requires of a relay and
#: relaycrypt's relay does not implement.
DOCUMENTED_MISSING = {"FlowCtrl": {2}, "HSDir": {2}, "HSIntro": {4, 5}, "HSRend": {2},
                      "Relay": {3, 4}}


def test_required_protocols_we_lack_are_the_documented_ones(tornet_network: TorNet) -> None:
    # The authority's consensus requires protocols our proto line does not claim; the README
    # names exactly these. The authority lists our relay Valid anyway, with our proto line.
    net = tornet_network
    assert net.authority is not None
    consensus = net.control(net.authority).getinfo("dir/status-vote/current/consensus")
    header = dict(line.split(" ", 1) for line in consensus.splitlines()
                  if line.startswith(("required-relay-protocols ",
                                      "recommended-relay-protocols ")))
    ours = _protocols(RELAYCRYPT_PROTOCOLS)
    for keyword in ("required-relay-protocols", "recommended-relay-protocols"):
        wanted = _protocols(header[keyword])
        missing = {name: versions - ours.get(name, set())
                   for name, versions in wanted.items() if versions - ours.get(name, set())}
        assert missing == DOCUMENTED_MISSING, (keyword, header[keyword])
    xrelay = net.external("xrelay")
    entries = consensus.split("\nr ")
    ours_entry = next(entry for entry in entries if entry.startswith("xrelay "))
    assert f"\npr {RELAYCRYPT_PROTOCOLS}\n" in ours_entry
    assert {"Running", "Valid"} <= set(_flags(ours_entry)), ours_entry
    identity = base64.b64decode(ours_entry.split()[1] + "=")
    assert identity.hex().upper() == xrelay.fingerprint.upper()


def test_all_tor_push_is_intact(tornet_network: TorNet) -> None:
    net = tornet_network
    push = net.push("all_tor", 2 * MIB)
    assert push.path == ["t1", "t2", "t3"]
    assert push.tor_path == [node.fingerprint for node in net.tor_relays[:3]]
    result = push.result
    assert result.bytes_sent == result.bytes_echoed == result.bytes_echoed_intact == 2 * MIB
    assert result.first_mismatch is None and result.intact
    assert push.cells == math.ceil(4 * MIB / 498)
    assert set(push.cpu_s) == {"t1", "t2", "t3"}
    assert all(seconds >= 0 for seconds in push.cpu_s.values())


@pytest.mark.parametrize(("position", "name", "hop"), [
    ("guard", "xrelay", 0), ("middle", "xrelay", 1), ("exit", "xrelay", 2),
    ("bridge", "xbridge", 0)])
def test_external_relay_at_each_position(tornet_network: TorNet, position: str, name: str,
                                         hop: int) -> None:
    net = tornet_network
    external = net.external(name)
    push = net.push(position, MIB, external)
    assert push.path[hop] == name
    assert push.tor_path[hop] == external.fingerprint
    others = [fingerprint for i, fingerprint in enumerate(push.tor_path) if i != hop]
    assert set(others) <= {node.fingerprint for node in net.tor_relays}
    assert len(set(push.tor_path)) == 3
    result = push.result
    assert result.bytes_sent == result.bytes_echoed_intact == MIB and result.intact


def test_tor_refuses_an_unknown_hop_clearly(tornet_network: TorNet) -> None:
    net = tornet_network
    assert net.client is not None and net.client.socks_port is not None
    assert net.place is not None
    t2, t3 = (node.fingerprint for node in net.tor_relays[1:3])
    with pytest.raises(PinError, match="refused to build the circuit"):
        open_pinned_stream(net.control(net.client), net.place.connect, net.client.socks_port,
                           ["AB" * 20, t2, t3], (LOOPBACK, net.echo_port), timeout=20)
    # The client is still usable afterwards.
    assert net.push("all_tor", 64 * 1024).result.intact


def test_external_relay_added_after_start_joins(tornet_network: TorNet) -> None:
    net = tornet_network
    late = net.add_external_relay("xlate", exit=False, timeout=120)
    assert late is not None and late.ready is not None
    assert late.argv[late.argv.index("--exit-policy") + 1] == "reject *:*"
    flags = _flags(net.control(net.client).getinfo(f"ns/id/{late.fingerprint}"))
    assert "Running" in flags and "Exit" in flags  # TestingDirAuthVoteExit: a flag, no policy
    push = net.push("middle", MIB, late)
    assert push.tor_path[1] == late.fingerprint and push.result.intact


def test_a_relay_that_never_says_ready_is_stopped_alone(tornet_network: TorNet) -> None:
    net = tornet_network
    silent = f"{sys.executable} -c 'import time; time.sleep(120)'"
    with pytest.raises(NetworkFailed, match="xsilent said nothing"):
        net.add_external_relay("xsilent", exit=False, command=silent, timeout=3)
    assert "xsilent" not in [relay.name for relay in net.externals]
    stopped = [process for process in net.group.processes if process.name == "xsilent"]
    assert len(stopped) == 1 and not stopped[0].alive() and stopped[0].returncode == -15
    net.check()  # the rest of the network is up
    assert net.push("all_tor", 64 * 1024).result.intact


def _read_lines(stream: object, lines: queue.Queue[str | None]) -> None:
    for line in stream:  # type: ignore[attr-defined]
        lines.put(line)
    lines.put(None)


def test_sigint_to_the_example_leaves_no_process(tor_programs: None) -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "examples.tornet", "--json", "--positions", "all_tor",
         "--size", "1"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue[str | None] = queue.Queue()
    threading.Thread(target=_read_lines, args=(process.stderr, lines), daemon=True).start()
    seen = []
    deadline = time.monotonic() + 150
    try:
        while time.monotonic() < deadline:
            try:
                line = lines.get(timeout=1)
            except queue.Empty:
                continue
            assert line is not None, "the example exited early:\n" + "".join(seen)
            seen.append(line)
            if "external relays READY" in line:
                break
        else:
            pytest.fail("the network did not come up:\n" + "".join(seen))
        tree = {identity for pid in descendants(process.pid)
                if (identity := process_identity(pid)) is not None}
        # the echo service, the authority, t1-t3 and an external relay at least
        assert len(tree) >= 6, tree
        process.send_signal(signal.SIGINT)
        out, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 130, out
    report = json.loads(out)
    assert report["ok"] is False and "SIGINT" in report["error"]
    assert alive_of(tree) == [], f"left running after SIGINT: {alive_of(tree)}"
