"""A private Tor network of real tor processes on loopback, with room for external relays.

:class:`TorNet` builds, in a fresh network namespace when permitted (:mod:`tornet.netns`):

- an echo service (``python -m examples.echo``), the target of every stream;
- one directory authority (keys from :mod:`tornet.keys`; a first consensus ~5 s after start,
  then one every ``voting_interval`` s);
- ``tor_relays`` tor relays (``t1``, ``t2``, ...), each an exit to the echo service only;
- the external relays declared with :meth:`TorNet.add_external_relay` (any program speaking
  the command line and READY line of :mod:`tornet.external`), each with a bridge client of its
  own when it runs as a bridge;
- one tor client with a SocksPort and a ControlPort.

Every process is a child in one :class:`tornet.procs.ProcessGroup`: when any of them dies
unexpectedly the whole network stops and the next call raises
:class:`tornet.procs.NetworkFailed` with that process's log. :meth:`TorNet.stop` (also the end
of ``with TorNet() as net:``) stops everything it started and, unless ``keep_files``, removes
the work directory.

:meth:`TorNet.start` returns once the network is usable: every non-bridge relay is Running and
Valid in the authority's consensus, in every tor relay's and in the client's (which also holds
its microdescriptor); the client and every bridge client bootstrapped to 100 % with a first
circuit (:mod:`tornet.dirinfo`). The order of the start is chosen for speed (see the comments
in :meth:`TorNet.start`): about 20 s on 2 cores. :meth:`TorNet.push` sends bytes through a
circuit pinned hop by hop (:mod:`tornet.push`) and measures each relay's CPU on the way
(:mod:`tornet.cpu`).

Threads: the owner thread calls everything (start, add_external_relay, push, stop); ``stop`` may
also be called from another thread (it is idempotent), and the process watchdog runs on its own.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from tornet import torrc
from tornet.control import ControlConnection, ControlError
from tornet.cpu import CpuSample
from tornet.dirinfo import complete_bootstrap, wait_descriptor, wait_listed
from tornet.external import (
    DEFAULT_RELAY_COMMAND,
    READY_PATTERN,
    ReadyInfo,
    RelayCommand,
    RelayOptions,
    exit_policy_for,
    ready_from_match,
)
from tornet.keys import make_authority_keys, read_identity
from tornet.netns import LOOPBACK, NetPlace
from tornet.procs import ManagedProcess, NetworkFailed, ProcessGroup
from tornet.push import PushResult, StreamRefused, open_pinned_stream, relayed_cells, transfer
from tornet.tornode import TorNode, find_program, open_control, start_tor, wait_log

__all__ = ["POSITIONS", "ExternalRelay", "TorNet"]

POSITIONS = ("bridge", "guard", "middle", "exit")
"""The positions an external relay can take on a 3-hop circuit."""
_ROOT = Path(__file__).resolve().parent.parent
_ECHO_READY = re.compile(r"^READY (\{.*\})\s*$")
# tor's nickname rule (dir-spec), written here again on purpose: tornet runs relays as programs
# and imports nothing of relaycrypt (relay.identity.descriptor.NICKNAME_RE is the relay's own)
_NICKNAME = re.compile(r"^[A-Za-z0-9]{1,19}$")
_CONSENSUS_PUBLISHED = "Published microdesc consensus"
"""The authority's notice-log line when it made a consensus (clients use the microdesc one)."""


@dataclass
class ExternalRelay:
    """An external relay of the network: what it was asked to be, how it was started (once the
    network starts it), and what its READY line said."""

    name: str
    exit: bool
    """An exit to the echo service (``--exit-policy "accept 127.0.0.1:ECHO, reject *:*"``)."""
    bridge: bool
    """Run as a bridge (``--bridge``), with a bridge client of its own."""
    command: RelayCommand
    options: RelayOptions | None = None
    argv: list[str] = field(default_factory=list)
    """The full command line it was started with."""
    process: ManagedProcess | None = field(default=None, repr=False)
    ready: ReadyInfo | None = None
    bridge_client: TorNode | None = None

    @property
    def fingerprint(self) -> str:
        """HEX40 from its READY line. Any thread."""
        if self.ready is None:
            raise NetworkFailed(f"{self.name} is not ready")
        return self.ready.fingerprint

    @property
    def pid(self) -> int:
        """The process the network started (CPU counts it and its descendants). Any thread."""
        assert self.process is not None
        return self.process.pid


class TorNet:
    """The private network; see the module docstring."""

    def __init__(
        self,
        workdir: str | os.PathLike[str] | None = None,
        *,
        tor_relays: int = 3,
        namespace: bool = True,
        relay_command: RelayCommand | str = DEFAULT_RELAY_COMMAND,
        tor_binary: str | None = None,
        keep_files: bool = False,
        voting_interval: int = 10,
        tor_log_level: str = "notice",
        progress: Callable[[str], None] | None = None,
    ) -> None:
        """Configure; nothing runs before :meth:`start`. Owner thread."""
        if tor_relays < 3:
            raise ValueError("an all-tor 3-hop path needs at least 3 tor relays")
        self.tor = tor_binary or find_program("tor")
        self.tor_gencert = find_program("tor-gencert")
        if self.tor is None or self.tor_gencert is None:
            raise NetworkFailed("tor and tor-gencert are needed (tools/install_tor.sh)")
        self.relay_command = (RelayCommand.parse(relay_command)
                              if isinstance(relay_command, str) else relay_command)
        self.keep_files = keep_files
        self.voting_interval = voting_interval
        self.tor_log_level = tor_log_level
        self.progress = progress
        self.n_tor_relays = tor_relays
        self.want_namespace = namespace
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="relaycrypt-tornet-"))
        self.place: NetPlace | None = None
        self.group: ProcessGroup | None = None
        self.echo_port = 0
        self.echo: ManagedProcess | None = None
        self.authority: TorNode | None = None
        self.dirauths: list[str] = []
        self.tor_relays: list[TorNode] = []
        self.client: TorNode | None = None
        self.externals: list[ExternalRelay] = []
        self._controls: dict[str, ControlConnection] = {}
        self._push_lock = threading.Lock()
        self.bootstrap_s: float | None = None
        self.timeline: list[tuple[str, float]] = []
        """(event, seconds since start) of :meth:`start`'s steps."""
        self.started_at = 0.0
        self._stopped = False

    # -- building -------------------------------------------------------------------------

    def add_external_relay(
        self, name: str, *, exit: bool = True, bridge: bool = False,
        command: RelayCommand | str | None = None, timeout: float = 90.0,
    ) -> ExternalRelay:
        """Add a relay run by ``command`` (default: the network's ``relay_command``) with the
        options of :mod:`tornet.external`: an exit to the echo service when ``exit``, a bridge
        (with its own bridge client) when ``bridge``. Added before :meth:`start`, it starts
        with the rest (the returned handle fills in then); added after, it starts now and the
        call returns once it is usable (in the client's consensus with a descriptor, or its
        bridge client bootstrapped through it), within ``timeout`` s; if it is not, it is
        stopped, the rest of the network stays up, and NetworkFailed says why. Owner thread."""
        if exit and bridge:
            raise ValueError("a bridge is the first hop: it cannot be the exit here")
        if not _NICKNAME.match(name):
            raise ValueError(f"a relay name is a tor nickname ([A-Za-z0-9]{{1,19}}): {name!r}")
        if any(relay.name == name for relay in self.externals) or name in self._tor_names():
            raise ValueError(f"a relay is already called {name!r}")
        parsed = RelayCommand.parse(command) if isinstance(command, str) else command
        relay = ExternalRelay(name, exit, bridge, parsed or self.relay_command)
        self.externals.append(relay)
        if self.group is not None:
            self._start_external(relay)
            try:
                self._wait_external(relay, timeout)
            except NetworkFailed:
                if self.group.failure is None:  # the rest of the network stays up
                    client = relay.bridge_client
                    for process in (client.process if client else None, relay.process):
                        if process is not None:
                            self.group.stop_one(process)
                self.externals.remove(relay)
                raise
        return relay

    def _tor_names(self) -> set[str]:
        return {"auth", "client", *(f"t{i}" for i in range(1, self.n_tor_relays + 1))}

    def start(self, timeout: float = 120.0) -> float:
        """Start every process, wait until the network is usable, return the seconds it took
        (also :attr:`bootstrap_s`). Raises NetworkFailed (after stopping everything) when a
        process dies or it takes longer than ``timeout``. Owner thread."""
        if self.group is not None:
            raise RuntimeError("this network was started already")
        self.started_at = time.monotonic()
        self.workdir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.place = NetPlace(self.want_namespace)
        self.group = ProcessGroup(self.place)
        deadline = self.started_at + timeout
        try:
            self._start_echo(timeout)
            self._start_authority()
            assert self.authority is not None
            self._mark("authority started")
            # Relays publish their descriptor only once they hold a consensus: starting them
            # after the authority's first one (~3 s) saves them a failed fetch and its back-off.
            wait_log(self.authority, _CONSENSUS_PUBLISHED, deadline - time.monotonic(),
                     self.group.check)
            self._mark("first consensus")
            self.tor_relays = [self._start_tor_relay(f"t{i}")
                               for i in range(1, self.n_tor_relays + 1)]
            for node in self.tor_relays:
                self._node_fingerprint(node)
            relays = [relay for relay in self.externals if not relay.bridge]
            bridges = [relay for relay in self.externals if relay.bridge]
            for relay in relays:
                self._start_external(relay)
            # The client starts once the authority's consensus lists every relay, so that its
            # first consensus is complete (a client refetches only every voting interval).
            authority = self.control(self.authority, deadline)
            for relay in relays:
                self._wait_ready(relay, deadline)
            self._mark("external relays READY")
            for hop in [*self.tor_relays, *relays]:
                self._wait_listed(authority, hop, deadline)
            self._mark("every relay in the authority's consensus")
            # A bridge client takes its consensus from its bridge: a bridge started now fetches
            # the complete one first (started earlier, it would hand out a stale one until its
            # next fetch, and the bridge client would wait for it).
            for relay in bridges:
                self._start_external(relay)
            self.client = self._start_client("client", [])
            # An exit refuses a stream whose previous hop is a relay missing from its own
            # consensus ("open a stream from unknown relay"): wait until every tor relay's
            # consensus lists every relay (an external relay's is out of sight: see push()).
            for node in self.tor_relays:
                for hop in [*self.tor_relays, *relays]:
                    self._wait_listed(self.control(node, deadline), hop, deadline)
            self._mark("every tor relay knows every relay")
            for relay in [*self.tor_relays, *relays]:
                self._wait_usable(relay, deadline)
            self._finish_bootstrap(self.client, self.path_for("all_tor")[1], deadline)
            for relay in bridges:
                self._wait_ready(relay, deadline)
                self._start_bridge_client(relay)
            for relay in bridges:
                self._wait_usable(relay, deadline)
                self._finish_bootstrap(*self.path_for("bridge", relay), deadline)
        except BaseException:
            self.stop()
            raise
        self.bootstrap_s = time.monotonic() - self.started_at
        return self.bootstrap_s

    def _mark(self, event: str) -> None:
        seconds = time.monotonic() - self.started_at
        self.timeline.append((event, seconds))
        if self.progress is not None:
            self.progress(f"{seconds:6.2f} s  {event}")

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = str(_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def _start_echo(self, timeout: float) -> None:
        assert self.group is not None
        self.echo = self.group.start(
            "echo", [sys.executable, "-m", "examples.echo", "--host", LOOPBACK, "--port", "0",
                     "--exit-on-stdin-eof"],
            self.workdir / "echo", read_stdout=True, stdin_pipe=True, env=self._env(),
            cwd=_ROOT)
        ready = json.loads(self.echo.wait_line(_ECHO_READY, timeout).group(1))
        self.echo_port = int(ready["port"])

    def _base(self, node: TorNode) -> list[torrc.Option]:
        return torrc.common(nickname=node.name, data_dir=node.data_dir,
                            log_file=node.log_file, dirauths=self.dirauths,
                            control_port=node.control_port, owner_pid=os.getpid(),
                            log_level=self.tor_log_level)

    def _start_authority(self) -> None:
        assert self.place is not None and self.group is not None
        assert self.tor is not None and self.tor_gencert is not None
        node = TorNode("auth", "authority", self.workdir / "auth",
                       control_port=self.place.free_port(), orport=self.place.free_port(),
                       dirport=self.place.free_port())
        node.prepare()
        assert node.orport is not None and node.dirport is not None
        keys = make_authority_keys(self.tor, self.tor_gencert, node.data_dir, node.name,
                                   node.orport, node.dirport)
        node.fingerprint = keys.fingerprint
        self.dirauths = [torrc.dirauth_line(node.name, node.orport, node.dirport,
                                            keys.v3ident, keys.fingerprint)]
        start_tor(self.group, self.tor, node, torrc.authority(
            self._base(node), orport=node.orport, dirport=node.dirport,
            resolv_conf=node.resolv_conf, voting_interval=self.voting_interval))
        self.authority = node

    def _start_tor_relay(self, name: str) -> TorNode:
        assert self.place is not None and self.group is not None and self.tor is not None
        node = TorNode(name, "relay", self.workdir / name,
                       control_port=self.place.free_port(), orport=self.place.free_port())
        assert node.orport is not None
        start_tor(self.group, self.tor, node, torrc.relay(
            self._base(node), orport=node.orport, resolv_conf=node.resolv_conf,
            exit_policy=exit_policy_for(self.echo_port)))
        return node

    def _start_client(self, name: str, bridges: list[str]) -> TorNode:
        assert self.place is not None and self.group is not None and self.tor is not None
        node = TorNode(name, "bridge-client" if bridges else "client", self.workdir / name,
                       control_port=self.place.free_port(), socks_port=self.place.free_port())
        assert node.socks_port is not None
        start_tor(self.group, self.tor, node,
                  torrc.client(self._base(node), socks_port=node.socks_port, bridges=bridges))
        return node

    def _start_external(self, relay: ExternalRelay) -> None:
        assert self.place is not None and self.group is not None
        directory = self.workdir / relay.name
        data_dir = directory / "relay"
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        relay.options = RelayOptions(
            nickname=relay.name, data_dir=data_dir, orport=self.place.free_port(),
            dirauths=tuple(self.dirauths),
            exit_policy=exit_policy_for(self.echo_port if relay.exit else None),
            bridge=relay.bridge)
        relay.argv = relay.command.argv(relay.options)
        relay.process = self.group.start(relay.name, relay.argv, directory, read_stdout=True,
                                         stdin_pipe=True, env=self._env(), cwd=_ROOT)

    def _wait_ready(self, relay: ExternalRelay, deadline: float) -> None:
        """Until the relay printed its READY line (checked against its options)."""
        assert relay.process is not None
        try:
            match = relay.process.wait_line(READY_PATTERN,
                                            max(0.0, deadline - time.monotonic()))
        except NetworkFailed:
            self._check()  # the root cause, when another process died first
            raise
        relay.ready = ready_from_match(match)
        assert relay.options is not None
        if relay.ready.orport != relay.options.orport:
            raise NetworkFailed(f"{relay.name} listens on {relay.ready.orport}, "
                                f"not the --orport {relay.options.orport} it was given")

    def _start_bridge_client(self, relay: ExternalRelay) -> TorNode:
        assert relay.ready is not None
        line = f"{LOOPBACK}:{relay.ready.orport} {relay.ready.fingerprint}"
        relay.bridge_client = self._start_client(f"bc{relay.name}"[:19], [line])
        return relay.bridge_client

    def _wait_usable(self, relay: TorNode | ExternalRelay, deadline: float) -> None:
        """Until the client that uses ``relay`` can put it on a circuit: the client lists it
        (Running, Valid) with a descriptor; for a bridge, its bridge client has descriptors of
        the tor relays that follow it."""
        assert self.client is not None
        if isinstance(relay, ExternalRelay) and relay.bridge:
            assert relay.bridge_client is not None
            control = self.control(relay.bridge_client, deadline)
            for hop in [relay, *self.tor_relays]:
                wait_descriptor(control, hop.name, hop.fingerprint, deadline, self._check)
            return
        control = self.control(self.client, deadline)
        self._wait_listed(control, relay, deadline)
        wait_descriptor(control, relay.name, relay.fingerprint, deadline, self._check)

    def _finish_bootstrap(self, client: TorNode, path: list[TorNode | ExternalRelay],
                          deadline: float) -> None:
        """Bootstrap ``client`` to 100 % with a first circuit through ``path``."""
        complete_bootstrap(self.control(client, deadline), [hop.fingerprint for hop in path],
                           deadline, self._check)
        self._mark(f"{client.name} bootstrapped")

    def _wait_external(self, relay: ExternalRelay, timeout: float) -> None:
        """A relay added after start: READY, in the authority's consensus, then usable."""
        assert self.authority is not None
        deadline = time.monotonic() + timeout
        self._wait_ready(relay, deadline)
        self._mark(f"{relay.name} READY")
        if relay.bridge:
            self._start_bridge_client(relay)
        else:
            self._wait_listed(self.control(self.authority, deadline), relay, deadline)
            self._mark(f"{relay.name} in the authority's consensus")
        self._wait_usable(relay, deadline)
        self._mark(f"{relay.name} usable by its client")
        if relay.bridge:
            self._finish_bootstrap(*self.path_for("bridge", relay), deadline)

    # -- waiting --------------------------------------------------------------------------

    def _check(self) -> None:
        if self.group is None:
            raise NetworkFailed("the network is not started")
        self.group.check()

    def control(self, node: TorNode, deadline: float | None = None) -> ControlConnection:
        """The network's control connection to one of its tors (opened on first use, waiting
        until ``deadline`` (monotonic; default 30 s from now) for tor to listen). Commands are
        serialised per connection; do not SETEVENTS on a client's while a push runs. Owner
        thread."""
        if deadline is None:
            deadline = time.monotonic() + 30
        if node.name not in self._controls:
            assert self.place is not None
            self._controls[node.name] = open_control(
                self.place, node, max(1.0, deadline - time.monotonic()), self._check)
        return self._controls[node.name]

    def _node_fingerprint(self, node: TorNode, timeout: float = 20.0) -> str:
        deadline = time.monotonic() + timeout
        while not node.fingerprint:
            self._check()
            try:
                node.fingerprint = read_identity(node.data_dir)[0]
            except FileNotFoundError:
                if time.monotonic() > deadline:
                    raise NetworkFailed(f"{node.name} wrote no fingerprint") from None
                time.sleep(0.05)
        return node.fingerprint

    def _wait_listed(self, control: ControlConnection, relay: TorNode | ExternalRelay,
                     deadline: float) -> None:
        wait_listed(control, relay.name, relay.fingerprint, deadline, self._check,
                    self._authority_tail)

    def _authority_tail(self) -> str:
        if self.authority is None or self.authority.process is None:
            return ""
        return self.authority.process.log_tail(15)

    # -- using ----------------------------------------------------------------------------

    def relay(self, name: str) -> TorNode | ExternalRelay:
        """The tor relay or external relay called ``name``. Owner thread."""
        for node in [*self.tor_relays, *self.externals]:
            if node.name == name:
                return node
        raise KeyError(name)

    def external(self, name: str) -> ExternalRelay:
        """The external relay called ``name``. Owner thread."""
        for relay in self.externals:
            if relay.name == name:
                return relay
        raise KeyError(name)

    def check(self) -> None:
        """Raise NetworkFailed if a process of the network died or it was stopped. Any
        thread."""
        self._check()

    def path_for(self, position: str, external: ExternalRelay | None = None) -> tuple[
            TorNode, list[TorNode | ExternalRelay]]:
        """``(client, [guard, middle, exit])`` that puts ``external`` at ``position`` (one of
        :data:`POSITIONS`) and tor relays t1, t2, t3 elsewhere; ``"all_tor"``: t1, t2, t3.
        Owner thread."""
        assert self.client is not None
        t1, t2, t3 = self.tor_relays[:3]
        if position == "all_tor":
            return self.client, [t1, t2, t3]
        if external is None:
            raise ValueError(f"position {position!r} needs an external relay")
        if position == "bridge":
            if external.bridge_client is None:
                raise ValueError(f"{external.name} is not a bridge")
            return external.bridge_client, [external, t2, t3]
        if external.bridge:
            raise ValueError(f"{external.name} is a bridge: it can only be the bridge")
        paths = {"guard": [external, t2, t3], "middle": [t1, external, t3],
                 "exit": [t1, t2, external]}
        if position not in paths:
            raise ValueError(f"unknown position {position!r}")
        if position == "exit" and not external.exit:
            raise ValueError(f"{external.name} is not an exit")
        return self.client, paths[position]

    def push(self, position: str, size: int, external: ExternalRelay | None = None,
             *, timeout: float = 120.0, retry_window: float = 20.0) -> PushResult:
        """Send ``size`` random bytes to the echo service on a circuit that puts ``external``
        at ``position`` (see :meth:`path_for`), read them back, compare every byte, and measure
        each relay's CPU during the transfer. A stream that does not open (before any byte is
        sent) is tried again on a new circuit for up to ``retry_window`` s: a relay refuses a
        stream from a previous hop missing in its consensus until its next consensus fetch,
        and an external relay's consensus cannot be watched. Raises PinError when tor refuses
        the path (StreamRefused with the last refusal), NetworkFailed when a process died.
        Owner thread (pushes are serialised)."""
        client, hops = self.path_for(position, external)
        assert self.place is not None and client.socks_port is not None
        pids = {hop.name: hop.pid for hop in hops}
        payload = os.urandom(size)
        refusals: list[str] = []
        with self._push_lock:
            control = self.control(client, time.monotonic() + 30)
            retry_until = time.monotonic() + retry_window
            while True:
                try:
                    sock, circuit = open_pinned_stream(
                        control, self.place.connect, client.socks_port,
                                [hop.fingerprint for hop in hops], (LOOPBACK, self.echo_port),
                        timeout=timeout, check=self._check)
                    break
                except StreamRefused as exc:
                    # Nothing was sent yet. A relay that fetched its consensus before the
                    # previous hop was listed refuses it as unknown until its next fetch.
                    refusals.append(str(exc))
                    if time.monotonic() > retry_until:
                        raise
                    time.sleep(1.0)
            before = {name: CpuSample.take(pid) for name, pid in pids.items()}
            result = transfer(sock, payload, timeout)
            after = {name: CpuSample.take(pid) for name, pid in pids.items()}
            with contextlib.suppress(ControlError):  # tor may have closed it already
                control.command(f"CLOSECIRCUIT {circuit.id}")
        cpu_s, threads = {}, {}
        for name in pids:
            cpu_s[name], threads[name] = after[name].since(before[name])
        return PushResult(position, [hop.name for hop in hops], circuit.path, result,
                          relayed_cells(result.bytes_sent, result.bytes_echoed), cpu_s,
                          threads, refusals)

    # -- observing and stopping -----------------------------------------------------------

    @property
    def description(self) -> str:
        """Where the network runs. Any thread."""
        return self.place.description if self.place else "not started"

    def pids(self) -> list[int]:
        """Every process the network started (not their descendants). Any thread."""
        return self.group.pids() if self.group else []

    def stop(self) -> None:
        """Close control connections, stop every process, remove the work directory unless
        ``keep_files``. Idempotent. Owner thread (or any thread, once)."""
        if self._stopped:
            return
        self._stopped = True
        for control in self._controls.values():
            control.close()
        self._controls.clear()
        if self.group is not None:
            self.group.stop_all()
        if self.place is not None:
            self.place.close()
        if self._own_workdir and not self.keep_files:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> TorNet:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
