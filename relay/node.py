"""A relay: one Reactor, one WorkerPool, a listener, links, and the circuits joining them.

Shape
-----
:class:`RelayNode` accepts links on its OR port (``relay.link.Link.accept``: TLS with tor's
link authentication, or plain TCP behind ``plain_links`` for the in-process demos) and opens
links to other relays when a circuit asks to be extended (``Link.connect``; an open or opening
link to the same relay is reused). Circuits are :class:`relay.orcircuit.OrCircuit`; this module
is the host they call back into.

* **Creating circuits.** A cell for a circuit id the link does not know arrives in
  :meth:`_on_unrouted`: CREATE_FAST is answered at once with CREATED_FAST (first hop); CREATE2
  goes through tor's onion queue to the ntor handshake lanes on the pool
  (``relay.onionworkers``) and is answered with CREATED2. Any other cell for an unknown id is
  answered with DESTROY (PROTOCOL); DESTROY and padding are dropped. A link already holding
  ``max_circuits_per_link`` circuits gets DESTROY (RESOURCELIMIT) for any further CREATE, and
  the DoS guard (``relay.dos``) limits connections and circuit creation per address. A command
  that is not a Tor cell command at all means the peer sends garbage: the link is closed with
  that reason (logged by the link and counted here).
* **Per iteration, not per cell.** A link hands each circuit its cells of one read as one
  buffer (``relay.framing``); the circuit appends it and marks itself dirty; the first mark of
  an iteration schedules :meth:`_flush` with ``Reactor.call_after_io``
  (``relay.circuits.IterationFlush``), which runs after every read callback of this loop
  iteration, in the same iteration: small batches of idle circuits are crypted there
  (``inline_cells``), the rest go to the pool in ONE ``submit_many``.
* **Pool.** ``WorkerPool`` with three lanes (forward, backward, originate) over the fast
  crypto backend (``tor1.backend.relay_crypto_for``: the C kernel unless
  ``RELAYCRYPT_PURE=1``). A kernel circuit is opened with the node's one ``group`` function
  (``relay.orcircuit.new_relay_group``), so a worker crypts the batches of several circuits in
  one GIL-free ``crypt_group`` call (the pool's grouped path); a reference circuit gets
  ``relay.orcircuit.crypt_batch`` per batch. The same pool runs the ntor handshakes (a higher
  priority class) and, with ``tls_on_pool``, open links' TLS record crypto
  (``relay.tlspipe``). Replies
  come back through a ``reactor.ReplyQueue`` owned by the node, whose counters give the
  wake-ups per cell.

Back-pressure and memory
------------------------
* pool over its high-water mark after a flush: the links that fed the flushed circuits stop
  reading until the pool's low-water signal (``relay.circuits.ReadGate`` combines the reasons
  a link is paused);
* one circuit over its mark on the pool: the circuit holds the gates of its own links
  (``OrCircuit``);
* a link whose output backlog is above its high watermark (``Link.on_write_high``): nothing
  stops reading; cells bound for it wait in their circuits' queues and the link's round-robin
  (``relay.circuitmux``) writes them as it drains. A circuit whose queue passes tor's cap is
  closed (RESOURCELIMIT), and the relay-wide total, exit stream buffers included, is bounded
  by the OOM handler (MaxMemInQueues, ``relay.relaylimits.QueueMemory``): it closes the
  circuits with the oldest queued data first.
Each of these does work proportional to what it pauses or closes, never to all circuits.

Threads: everything is loop thread only; the pool's workers only run the process and group
functions of the relay crypto, the ntor lanes and the TLS lanes.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import os
import random
import time
from collections import Counter
from typing import Any

from reactor import Reactor, ReplyQueue, Stream, TimerHandle, listen
from reactor.net import Listener
from relay.cells import CellCommand, DestroyReason
from relay.circuits import IterationFlush, ReadGate
from relay.config import RelayConfig
from relay.connlimit import FdBudget, channel_idle_timeout
from relay.directory import RelayDescriptor
from relay.dos import DosGuard
from relay.exit import ExitEdge, Lookups, Sockets, refuse_every_exit
from relay.exitpolicy import ExitPolicy, ExitPolicyConfig, build_exit_policy
from relay.extendpolicy import ExtendAction, ExtendConfig, OurRelay, check_extend2
from relay.framing import FIXED_CELL_LEN
from relay.handshakes import (
    HTYPE_NTOR,
    BodyError,
    Extend2Body,
    HandshakeError,
    NtorServerKey,
    create_fast_server,
    decode_create2,
    encode_created2,
)
from relay.identity.keys import RelayIdentity
from relay.identity.periods import (
    ROTATE_OLD_ONION_KEYS,
    ROTATE_ONION_KEYS,
    ROTATE_RSA_CROSSCERT,
    ROTATE_SIGNING_KEY,
)
from relay.link import Link, LinkError
from relay.linkauth import LinkCredentials, ServerCredentials
from relay.onionworkers import OnionHandshakes, PendingCreate
from relay.orcircuit import (
    ExtendRequest,
    OrCircuit,
    Peer,
    crypt_batch,
    new_relay_group,
    relay_group_for,
)
from relay.publication import RelayDirectory
from relay.relaylimits import CellQueueCaps, QueueMemory
from relay.tls import TlsClientContext
from relay.tlspipe import DEFAULT_INLINE_TLS_BYTES, TlsOffload
from tor1.backend import backend_name, relay_crypto_for
from tor1.reference import HopKeys
from workers.pool import (
    DEFAULT_BATCH_CELLS,
    DEFAULT_CIRCUIT_HIGH_WATER,
    PoolClosedError,
    WorkerPool,
)
from workers.tuning import NO_THREAD_CACHE_TUNABLE, env_without_thread_cache

__all__ = ["RelayNode"]

log = logging.getLogger("relay.node")

_POOL = "pool"
RELAY_POOL_HIGH_WATER = 32768
"""Cells in flight on a relay's pool before its links stop reading (about 16 MB)."""
DEFAULT_INLINE_CELLS = 8
"""A circuit's flush of at most this many cells, with nothing of it on the pool, is crypted on the
loop thread: two thread wake-ups cost far more than the AES (docs/tuning.md)."""
DEFAULT_MAX_CIRCUITS_PER_LINK = 4096
"""Circuits one link may hold (created by the peer or extended through it) before CREATEs on
it are refused with DESTROY (RESOURCELIMIT)."""
_KNOWN_COMMANDS = frozenset(int(c) for c in CellCommand)
_CREATES = frozenset({int(CellCommand.CREATE), int(CellCommand.CREATE_FAST),
                      int(CellCommand.CREATE2)})
_SILENT = frozenset({int(CellCommand.DESTROY), int(CellCommand.PADDING),
                     int(CellCommand.VPADDING)})


_DESCRIBED_KEYS = frozenset({ROTATE_ONION_KEYS, ROTATE_SIGNING_KEY, ROTATE_RSA_CROSSCERT})
"""Rotations that change what the descriptor says (its keys and certificates)."""


class RelayNode:
    """One relay on the loop thread. See the module docstring."""

    def __init__(
        self,
        reactor: Reactor,
        identity: RelayIdentity,
        config: RelayConfig,
        *,
        batch_cells: int = DEFAULT_BATCH_CELLS,
        handshake_timeout: float = 30.0,
        pool_high_water: int = RELAY_POOL_HIGH_WATER,
        circuit_high_water: int = DEFAULT_CIRCUIT_HIGH_WATER,
        link_write_water: tuple[int, int] | None = None,
        max_circuits_per_link: int = DEFAULT_MAX_CIRCUITS_PER_LINK,
        queue_memory_limit: int | None = None,
        inline_cells: int = DEFAULT_INLINE_CELLS,
        tls_on_pool: bool = False,
        tls_inline_bytes: int = DEFAULT_INLINE_TLS_BYTES,
    ) -> None:
        """Configure; :meth:`start` listens and starts the pool. Loop thread only.

        ``identity`` holds the relay's keys (``RelayIdentity.load_or_create``); ``config`` its
        options (:class:`relay.config.RelayConfig`). ``pool_high_water`` /
        ``circuit_high_water``: cells in flight on the pool (all circuits / one circuit) at
        which reading pauses (it resumes at half).
        ``link_write_water``: ``(high, low)`` write-buffer watermarks of every link, in bytes
        (default: the reactor's). ``max_circuits_per_link``: CREATEs beyond it get DESTROY
        (RESOURCELIMIT). ``queue_memory_limit`` (bytes) overrides MaxMemInQueues, below tor's
        64 MiB floor too (tests, benchmarks). ``inline_cells``: a circuit's flush of at most
        this many cells, with none of its cells on the pool, is crypted on the loop thread
        (``relay.orcircuit``, "Small batches"); 0 sends every batch to the pool. ``tls_on_pool``:
        the TLS record crypto of open links runs on the pool (``relay.tlspipe``), reads and
        writes of at most ``tls_inline_bytes`` on the loop thread; by default all of it on the
        loop thread (less CPU per cell in all; docs/tuning.md). A process that turns it on should
        run with glibc's per-thread malloc cache off (``workers.tuning.env_without_thread_cache``:
        records made on workers and freed here otherwise pin the workers' arenas); a node made
        without it logs a warning and sets ``thread_cache_warned``."""
        self.reactor = reactor
        self.max_circuits_per_link = max_circuits_per_link
        if inline_cells < 0:
            raise ValueError(f"inline_cells must be >= 0, got {inline_cells}")
        self.inline_cells = inline_cells
        # one client context for every outgoing link (building one costs ~150 µs)
        self._tls_client = None if config.plain_links else TlsClientContext()
        self.identity = identity
        self.config = config
        self.nickname = nickname = config.nickname
        self.exit_rules: ExitPolicy | None = None  # built by start(): it needs our address
        self.directory = RelayDirectory(reactor, identity, config)
        self.dos = DosGuard(config.dos)
        # tor will not set MaxMemInQueues below 64 MiB; tests and benchmarks may go lower
        self._memory = QueueMemory(queue_memory_limit or config.max_mem_in_queues_bytes)
        self._lookups = Lookups()
        self.fd_budget = FdBudget.from_rlimit(config.conn_limit)
        self._exit_sockets = Sockets(
            lambda streams: self.fd_budget.may_open_exit_stream(self._open_sockets(streams)))
        self._rotation: TimerHandle | None = None
        self._host = config.or_host
        self._port = config.or_port
        self._server: ServerCredentials | None = (
            None if config.plain_links else ServerCredentials.of(identity))
        self._handshake_timeout = handshake_timeout
        self._extend_config = ExtendConfig(
            extend_allow_private_addresses=config.extend_allow_private_addresses)
        self._ours = OurRelay(identity.identity_digest, identity.ed25519_identity)
        self._rng = random.Random()
        self._link_write_water = link_write_water
        self.pool = WorkerPool(
            None,
            threads=config.threads,
            lanes=3,
            process=crypt_batch,
            joined=False,
            batch_cells=batch_cells,
            pool_high_water=pool_high_water,
            circuit_high_water=circuit_high_water,
            on_pool_pressure=self._on_pool_pressure,
            name=f"{nickname}-worker",
        )
        self._tls_offload = (TlsOffload(self.pool, tls_inline_bytes)
                             if tls_on_pool and not config.plain_links else None)
        # glibc reads its tunables once, at process start: all a node can do is say so
        self.thread_cache_warned = (self._tls_offload is not None
                                    and env_without_thread_cache(os.environ) is not None)
        if self.thread_cache_warned:
            log.warning("%s: TLS records on the pool while glibc's per-thread malloc cache is on: "
                        "the process's memory will creep; start it with GLIBC_TUNABLES=%s "
                        "(docs/tuning.md)", nickname, NO_THREAD_CACHE_TUNABLE)
        self._onion = OnionHandshakes(self.pool, self._ntor_keys, self._on_onionskin_answered,
                                      lanes=config.threads)
        # One group function for all of this node's kernel circuits: the pool crypts circuits
        # that share it in one call. None without the kernel extension.
        self._group = new_relay_group()
        self._replies: ReplyQueue[Any] | None = None
        self._listener: Listener | None = None
        self._peers: dict[Link, Peer] = {}
        # Links we opened, by the relay they are to: (address, RSA identity digest).
        self._outgoing: dict[tuple[tuple[str, int], bytes], Peer] = {}
        self._dirty: IterationFlush[OrCircuit] = IterationFlush(reactor.call_after_io, self._flush)
        # the data path's call: the flush's own mark, one call per batch instead of two
        self.mark_dirty = self._dirty.mark  # type: ignore[method-assign]
        self._pool_paused: dict[ReadGate, None] = {}
        self._closed = False
        # statistics
        self.circuits_created = 0
        self.circuits_open = 0
        self.circuits_closed = 0
        self.circuits_refused_limit = 0
        self.circuits_refused_dos = 0
        self.connections_refused_fds = 0
        self.idle_links_closed = 0
        self.circuits_closed_queue = 0
        self.oom_closes = 0
        self.connections_refused_dos = 0
        self.onionskins_refused = 0
        self.unknown_circuit_destroys = 0
        self.garbage_links = 0
        self.links_accepted = 0
        self.links_opened = 0
        self.link_closes: Counter[str] = Counter()
        self.flushes = 0
        self.pool_pauses = 0
        self.circuit_pressure_pauses = 0
        self.write_congestions = 0
        self.submits = 0
        self.cells_written = 0
        self.cells_crypted = 0  # relay cells, on the pool or here (CircuitHost)
        self.cells_crypted_inline = 0
        self.inline_crypto_errors = 0
        self.flush_errors = 0  # circuits closed because their flush raised
        self._exit_totals: Counter[str] = Counter()
        self._first_cell: float | None = None
        self._cpu_at_first_cell = 0.0
        self._last_cell: float | None = None

    # ------------------------------------------------------------------ life cycle

    def start(self) -> None:
        """Start the worker pool and listen on the OR port. Loop thread only."""
        self._replies = ReplyQueue(self.reactor, self.pool.deliver)
        self.pool.set_replies(self._replies, owned=True)
        self.pool.start()
        self._onion.start()
        self._listener = listen(self.reactor, self._host, self._port, self._on_accept)
        port = self._listener.address[1]
        self._ours = OurRelay(self.identity.identity_digest, self.identity.ed25519_identity,
                              {(ipaddress.ip_address(self.config.published_address), port)})
        self.exit_rules = self._build_exit_policy()
        log.info("%s: %s", self.nickname, self.exit_rules.describe())
        self.directory.start(port, self.exit_rules.descriptor_lines())
        self._rotation = self.reactor.call_later(self._rotation_check, self._rotate_keys)

    @property
    def _rotation_check(self) -> float:
        """Seconds between key rotation checks (tor checks every second; keys live hours)."""
        return 5.0 if self.config.testing_network else 60.0

    def _rotate_keys(self) -> None:
        """Replace keys and certificates that are due (``RelayIdentity.rotate``): new links get
        the new TLS certificate (open links keep theirs), and a descriptor with new keys is
        uploaded. Loop thread only (a timer)."""
        self._rotation = None
        if self._closed:
            return
        now = time.time()
        if self.identity.needs_rotation(now):
            changed = self.identity.rotate(now)
            log.info("%s: rotated %s", self.nickname, ", ".join(sorted(changed)))
            if not self.config.plain_links:
                self._server = ServerCredentials.of(self.identity)
            if changed & {ROTATE_ONION_KEYS, ROTATE_OLD_ONION_KEYS}:
                self._onion.refresh_keys()
            if changed & _DESCRIBED_KEYS:
                self.directory.republish("keys rotated: " + ", ".join(sorted(changed)))
        self._rotation = self.reactor.call_later(self._rotation_check, self._rotate_keys)

    def _build_exit_policy(self) -> ExitPolicy:
        """tor's exit policy from the configuration (``relay.exitpolicy``). Loop thread only."""
        config = self.config
        return build_exit_policy(
            ExitPolicyConfig(
                exit_policy=config.exit_policy,
                exit_policy_reject_private=config.exit_policy_reject_private,
                exit_policy_reject_local_interfaces=config.exit_policy_reject_local_interfaces,
            ),
            published_addresses=[config.published_address],
            port_addresses=[config.or_host],
        )

    @property
    def address(self) -> tuple[str, int]:
        """``(host, port)`` the OR port listens on. Loop thread only."""
        if self._listener is None:
            raise RuntimeError("RelayNode.start() first")
        return self._listener.address

    def descriptor(self) -> RelayDescriptor:
        """What a client of the local demo network needs of this relay (its directory file
        entry: address, RSA identity, ntor onion key). Loop thread only."""
        _, port = self.address
        return RelayDescriptor(self.nickname, self.config.published_address, port,
                               self.identity.identity_digest, self.identity.ntor_onion_key)

    def close(self) -> None:
        """Stop listening, close every link (which destroys every circuit), stop the pool.
        Idempotent. Loop thread only."""
        if self._closed:
            return
        self._closed = True
        if self._rotation is not None:
            self._rotation.cancel()
        self.directory.close()
        if self._listener is not None:
            self._listener.close()
        for peer in list(self._peers.values()):
            peer.link.close("relay shutting down")
        self._onion.close()
        self.pool.close(drain=False, timeout=10.0)

    # ------------------------------------------------------------------ links

    def _watch_writes(self, peer: Peer) -> None:
        link = peer.link
        if self._link_write_water is not None:
            link.stream.set_write_watermarks(*self._link_write_water)
        link.on_write_high = lambda: self._on_write_high(peer)
        link.on_write_low = lambda: self._on_write_low(peer)

    def _on_accept(self, stream: Stream) -> None:
        address = stream.peer_address
        name = f"{self.nickname}<-{address[0]}:{address[1]}" if address else self.nickname
        client_ip = str(address[0]) if address else None
        why = self.fd_budget.may_open_link(self._open_sockets())
        if why is not None:
            self.connections_refused_fds += 1
            log.warning("%s: refusing connection: %s (ConnLimit)", name, why)
            stream.close(f"out of descriptors: {why}")
            return
        if client_ip is not None:
            verdict = self.dos.check_connection(client_ip, time.monotonic())
            if not verdict.allowed:
                self.connections_refused_dos += 1
                log.log(logging.WARNING if self.connections_refused_dos % 1000 == 1
                        else logging.DEBUG, "%s: refusing connection: %s (DoS mitigation; "
                        "%d refused so far)", name, verdict.why, self.connections_refused_dos)
                stream.close(f"DoS mitigation: {verdict.why}")
                return
        link = Link.accept(
            self.reactor, stream, server=self._server, handshake_timeout=self._handshake_timeout,
            name=name, on_open=self._on_accepted_open, on_close=self._on_link_closed,
            on_cell=self._on_unrouted, tls_offload=self._tls_offload,
        )
        peer = Peer(link)
        if client_ip is not None:
            peer.client_ip = client_ip
            peer.dos_ticket = self.dos.connection_opened(client_ip, time.monotonic())
        self._peers[link] = peer
        self._watch_writes(peer)
        self.links_accepted += 1

    def _open_sockets(self, exit_streams: int | None = None) -> int:
        """Sockets this relay holds open: links, exit streams, the listener. O(1). Loop thread
        only."""
        streams = self._exit_sockets.open if exit_streams is None else exit_streams
        return len(self._peers) + streams + 1

    def _connect(self, address: tuple[str, int], identity: bytes) -> Peer:
        host, port = address
        plain = self.config.plain_links
        link = Link.connect(
            self.reactor, host, port, tls=not plain,
            credentials=None if plain else LinkCredentials.of(self.identity),
            handshake_timeout=self._handshake_timeout,
            name=f"{self.nickname}->{host}:{port}", on_open=self._on_link_open,
            on_close=self._on_link_closed, on_cell=self._on_unrouted,
            tls_context=self._tls_client, tls_offload=self._tls_offload,
        )
        peer = Peer(link, address, identity)
        self._peers[link] = peer
        self._outgoing[(address, identity)] = peer
        self._watch_writes(peer)
        self.links_opened += 1
        return peer

    def _on_accepted_open(self, link: Link) -> None:
        peer = self._peers.get(link)
        if peer is not None:
            self.link_idle(peer)

    # ------------------------------------------------------------------ idle links

    def link_idle(self, peer: Peer) -> None:
        """``peer``'s link may have no circuits left: if so, close it after tor's idle timeout
        (drawn once per link: 3-4.5 min for a client's link, 45-75 min between relays) unless
        a circuit comes first. O(1): a timer per idle link, no sweep. Loop thread only."""
        link = peer.link
        if peer.idle_timer is not None or not link.is_open or link.circuit_count:
            return
        if not peer.idle_timeout:
            peer.idle_timeout = channel_idle_timeout(self._rng,
                                                     client_or_noncanonical=not peer.relay_link)
        peer.idle_timer = self.reactor.call_later(peer.idle_timeout, self._idle_expired, peer)

    def link_in_use(self, peer: Peer) -> None:
        """A circuit now uses ``peer``'s link: it is not idle. Loop thread only."""
        if peer.idle_timer is not None:
            peer.idle_timer.cancel()
            peer.idle_timer = None

    def _idle_expired(self, peer: Peer) -> None:
        peer.idle_timer = None
        link = peer.link
        if link.is_open and not link.circuit_count and not self._closed:
            self.idle_links_closed += 1
            link.close(f"expiring non-used OR connection [no circuits for "
                       f"{int(peer.idle_timeout)} s]")

    def _on_link_open(self, link: Link) -> None:
        peer = self._peers.get(link)
        if peer is None:
            return
        wrong = self._wrong_identity(peer)
        if wrong is not None:
            open_waiters, peer.open_waiters = peer.open_waiters, []
            for circuit in open_waiters:
                circuit.extend_failed(wrong, DestroyReason.OR_IDENTITY)
            link.close(wrong)
            return
        open_waiters, peer.open_waiters = peer.open_waiters, []
        for circuit in open_waiters:
            request = circuit.extend_request
            mismatch = self._ed25519_mismatch(peer, request) if request is not None else None
            if mismatch is None:
                circuit.attach_next(peer)
            else:
                circuit.extend_failed(mismatch, DestroyReason.OR_IDENTITY)
        self.link_idle(peer)

    def _wrong_identity(self, peer: Peer) -> str | None:
        """Why the relay at the other end of an outgoing link is not the one we dialed (tor:
        "identity key was not as expected"), or None. Plain demo links prove nothing and are
        taken at their word. Loop thread only."""
        if self.config.plain_links or peer.identity is None:
            return None
        got = peer.link.peer_identity
        if got is None or got.rsa_digest != peer.identity:
            return (f"wrong identity at {peer.address}: wanted {peer.identity.hex().upper()}, "
                    f"got {got.fingerprint if got else 'none'}")
        return None

    def _on_link_closed(self, link: Link, reason: str) -> None:
        peer = self._peers.pop(link, None)
        self.link_closes[link.close_kind.value if link.close_kind else "unknown"] += 1
        if peer is None:
            return
        self.dos.connection_closed(peer.dos_ticket)
        self.link_in_use(peer)  # cancels its idle timer
        if peer.address is not None and peer.identity is not None:
            key = (peer.address, peer.identity)
            if self._outgoing.get(key) is peer:
                del self._outgoing[key]
        open_waiters, peer.open_waiters = peer.open_waiters, []
        for circuit in open_waiters:
            circuit.extend_failed(reason)
        self._pool_paused.pop(peer.gate, None)
        peer.gate.clear()

    def _on_write_high(self, peer: Peer) -> None:
        peer.scheduler.congested = True
        self.write_congestions += 1

    def _on_write_low(self, peer: Peer) -> None:
        peer.scheduler.drained()

    # ------------------------------------------------------------------ creating circuits

    def _on_unrouted(self, link: Link, circ_id: int, command: int, payload: bytes) -> None:
        peer = self._peers.get(link)
        if peer is None:
            return
        if command in _SILENT:
            return
        if command not in _KNOWN_COMMANDS:
            self._garbage(peer, command)
            return
        if circ_id == 0:
            link.close(f"protocol: {CellCommand(command).name} cell on circuit id 0")
            return
        if command in _CREATES:
            if command == CellCommand.CREATE2 and self.config.plain_links:
                peer.claimed_relay = True  # in the demo network only relays send CREATE2
            if link.circuit_count >= self.max_circuits_per_link:
                self._refuse_over_limit(link, circ_id)
                return
            if peer.client_ip is not None:
                verdict = self.dos.circuit_create(peer.client_ip, time.monotonic(),
                                                  is_client=not peer.relay_link)
                if not verdict.allowed:
                    self._refuse_dos(link, circ_id, verdict.why)
                    return
        try:
            if command == CellCommand.CREATE_FAST:
                reply, material = create_fast_server(payload)
                self._new_circuit(peer, circ_id, material)
                link.send_cell(circ_id, CellCommand.CREATED_FAST, reply)
                return
            if command == CellCommand.CREATE2:
                body = decode_create2(payload)
                if body.htype != HTYPE_NTOR:
                    raise HandshakeError(f"CREATE2 handshake type {body.htype} unsupported")
                self._queue_create2(peer, circ_id, body.hdata)
                return
        except (HandshakeError, BodyError, LinkError) as exc:
            log.warning("%s: refusing circuit %#x: %s", link.name, circ_id, exc)
            link.destroy_circuit(circ_id, DestroyReason.PROTOCOL)
            return
        self.unknown_circuit_destroys += 1
        log.info("%s: %s cell for unknown circuit %#x: answering DESTROY", link.name,
                 CellCommand(command).name, circ_id)
        link.destroy_circuit(circ_id, DestroyReason.PROTOCOL)

    def _refuse_over_limit(self, link: Link, circ_id: int) -> None:
        """DESTROY (RESOURCELIMIT) a CREATE beyond the per-link cap; the first refusal and every
        1000th are logged as warnings (a flood must not flood the log too)."""
        self.circuits_refused_limit += 1
        refused = self.circuits_refused_limit
        log.log(logging.WARNING if refused % 1000 == 1 else logging.DEBUG,
                "%s: refusing circuit %#x: the link already holds %d circuits "
                "(max_circuits_per_link); %d refused so far", link.name, circ_id,
                link.circuit_count, refused)
        link.destroy_circuit(circ_id, DestroyReason.RESOURCELIMIT)

    def _refuse_dos(self, link: Link, circ_id: int, why: str) -> None:
        """DESTROY (RESOURCELIMIT) a CREATE from an address marked by the DoS mitigation; the
        first refusal and every 1000th are logged as warnings."""
        self.circuits_refused_dos += 1
        log.log(logging.WARNING if self.circuits_refused_dos % 1000 == 1 else logging.DEBUG,
                "%s: refusing circuit %#x: %s (DoSCircuitCreation*); %d refused so far",
                link.name, circ_id, why, self.circuits_refused_dos)
        link.destroy_circuit(circ_id, DestroyReason.RESOURCELIMIT)

    def _ntor_keys(self) -> tuple[NtorServerKey, ...]:
        """The onion keys an onionskin may name now: the current one and, during its grace
        period after a rotation, the previous one. Loop thread only."""
        digest = self.identity.identity_digest
        return tuple(NtorServerKey(digest, key)
                     for key in self.identity.ntor_onion_keys(time.time()))

    def _queue_create2(self, peer: Peer, circ_id: int, hdata: bytes) -> None:
        """Reserve ``circ_id`` on the link and queue the onionskin for the handshake lanes
        (``relay.onionworkers``); what the onion queue refuses or culls gets DESTROY
        (RESOURCELIMIT), as tor does. Loop thread only."""
        pending = PendingCreate(peer, circ_id, hdata)

        def reserved(command: int, payload: bytes) -> None:
            if command == CellCommand.DESTROY:  # the client gave up (or the link closed)
                self._onion.cancel(pending)
                peer.link.remove_circuit(circ_id)

        peer.link.add_circuit(reserved, circ_id)
        for dropped in self._onion.add(pending):
            self.onionskins_refused += 1
            log.log(logging.WARNING if self.onionskins_refused % 1000 == 1 else logging.DEBUG,
                    "%s: refusing CREATE2 %#x: the onion queue is full (MaxOnionQueueDelay); "
                    "%d refused so far", dropped.peer.link.name, dropped.circ_id,
                    self.onionskins_refused)
            self._onion.cancel(dropped)
            dropped.peer.link.destroy_circuit(dropped.circ_id, DestroyReason.RESOURCELIMIT)

    def _on_onionskin_answered(self, pending: PendingCreate, reply: bytes | None,
                               material: bytes | None, error: str | None) -> None:
        """A handshake lane answered ``pending``: CREATED2 and the circuit, or DESTROY.
        Loop thread only."""
        link = pending.peer.link
        if link.closed or self._closed:
            return
        link.remove_circuit(pending.circ_id)  # the reservation
        if error is not None or reply is None or material is None:
            log.warning("%s: refusing circuit %#x: %s", link.name, pending.circ_id, error)
            link.destroy_circuit(pending.circ_id, DestroyReason.PROTOCOL)
            return
        try:
            self._new_circuit(pending.peer, pending.circ_id, material)
        except LinkError as exc:
            log.warning("%s: refusing circuit %#x: %s", link.name, pending.circ_id, exc)
            link.destroy_circuit(pending.circ_id, DestroyReason.PROTOCOL)
            return
        link.send_cell(pending.circ_id, CellCommand.CREATED2, encode_created2(reply))

    def _new_circuit(self, peer: Peer, circ_id: int, material: bytes) -> None:
        crypto = relay_crypto_for(HopKeys.from_material(material))
        OrCircuit(self, peer, circ_id, crypto, group=relay_group_for(crypto, self._group))
        self.link_in_use(peer)
        self.circuits_created += 1
        self.circuits_open += 1

    def _garbage(self, peer: Peer, command: int) -> None:
        self.garbage_links += 1
        reason = f"protocol: garbage on the link (cell command {command} is not a Tor command)"
        log.warning("%s: closing: %s", peer.link.name, reason)
        peer.link.close(reason)

    # ------------------------------------------------------------------ CircuitHost

    def mark_dirty(self, circuit: OrCircuit) -> None:
        """Flush ``circuit`` at the end of this loop iteration. Loop thread only."""
        self._dirty.mark(circuit)

    def _flush(self, dirty: list[OrCircuit]) -> None:
        self.flushes += 1
        now = time.perf_counter()
        if self._first_cell is None:
            self._first_cell = now
            self._cpu_at_first_cell = sum(os.times()[:2])
        self._last_cell = now
        work: list[tuple[Any, int, Any]] = []
        for circuit in dirty:
            try:
                circuit.take_submits(work)
            except Exception as exc:  # a bug: that circuit only, and the others still flush
                self.flush_errors += 1
                log.exception("%r: its flush failed; closing the circuit", circuit)
                circuit.close(f"internal error in the flush: {exc!r}", DestroyReason.INTERNAL)
        if work:
            # a small batch crypted here (take_submits) can close another circuit whose entry
            # is already in ``work`` (its link failed, or the OOM handler chose it)
            work = [entry for entry in work if not entry[0].closed]
        if work:
            self.submits += len(work)
            try:
                self.pool.submit_many(work)
            except PoolClosedError:
                return  # the relay is shutting down
        if self.pool.over_high_water and not self._closed:
            for circuit in dirty:
                for peer in (circuit.prev, circuit.next):
                    if peer is not None and peer.gate not in self._pool_paused:
                        self._pool_paused[peer.gate] = None
                        peer.gate.hold(_POOL)
                        self.pool_pauses += 1

    def _on_pool_pressure(self, over: bool) -> None:
        if over:
            return  # the links are paused in _flush, once the submits are done
        paused, self._pool_paused = self._pool_paused, {}
        for gate in paused:
            gate.release(_POOL)

    def cell_queue_caps(self) -> CellQueueCaps:
        """tor's per-circuit queue caps (``circ_max_cell_queue_size*``). Loop thread only."""
        return self.config.cell_queue_caps

    def queue_full(self, circuit: OrCircuit, toward_exit: bool, why: str) -> None:
        """Close ``circuit``, whose queue passed its cap, with RESOURCELIMIT; an outbound
        overflow on a client's circuit counts toward its address's DoS mark (tor's
        ``dos_num_circ_max_outq``). Loop thread only."""
        self.circuits_closed_queue += 1
        log.log(logging.WARNING if self.circuits_closed_queue % 1000 == 1 else logging.DEBUG,
                "%r: closing: %s (%d circuits closed for their queue so far)", circuit, why,
                self.circuits_closed_queue)
        peer = circuit.prev
        if toward_exit and peer.client_ip is not None:
            self.dos.note_max_outq(peer.client_ip, time.monotonic(),
                                   is_client=not peer.relay_link)
        circuit.close(f"cell queue full: {why}", DestroyReason.RESOURCELIMIT)

    def queued_changed(self, circuit: OrCircuit) -> None:
        """Account what ``circuit`` holds against MaxMemInQueues; past it, close the circuits
        with the oldest queued cells first (tor's OOM handler). Loop thread only."""
        queued = circuit.queued_toward_exit + circuit.queued_toward_client
        edge = circuit.edge
        if queued or edge is not None:
            held = queued * FIXED_CELL_LEN  # a queued cell counts as one on link protocol 4+
            oldest = circuit.oldest_queued()
            if edge is not None:  # its streams and buffers, as allocated (O(1))
                held += edge.buffered_bytes
                since = edge.buffered_since
                if since is not None and (oldest is None or since < oldest):
                    oldest = since
            if oldest is None:  # only open streams, nothing buffered: closed last
                oldest = math.inf
        else:  # the common case of a middle relay: everything it took is written
            held, oldest = 0, math.inf
        circuit.accounted_bytes = held
        if not self._memory.update(circuit, held, oldest):
            return
        victims = self._memory.victims()
        self.oom_closes += len(victims)
        log.warning("%s: queued cells reached MaxMemInQueues (%d bytes): closing %d circuits "
                    "with the oldest queued cells", self.nickname, self._memory.limit,
                    len(victims))
        for victim in victims:
            if isinstance(victim, OrCircuit):
                victim.close("MaxMemInQueues reached (OOM handler)",
                             DestroyReason.RESOURCELIMIT)

    def check_extend(self, circuit: OrCircuit, body: bytes, *, early: bool,
                     stream_id: int) -> ExtendRequest | None:
        """tor's checks of an EXTEND2 body (``relay.extendpolicy``): dropped cells are only
        logged; refused ones close the circuit with tor's reason. Loop thread only."""
        previous = circuit.prev.link.peer_identity
        decision = check_extend2(
            body, via_relay_early=early, stream_id=stream_id, already_extended=circuit.extended,
            previous_rsa_id=previous.rsa_digest if previous else None,
            previous_ed_id=previous.ed25519 if previous else None,
            ours=self._ours, config=self._extend_config,
        )
        if decision.action is ExtendAction.DROP:
            log.info("%r: dropping EXTEND2: %s", circuit, decision.why)
            return None
        if decision.action is ExtendAction.DESTROY:
            log.info("%r: refusing EXTEND2: %s", circuit, decision.why)
            circuit.close(f"refused EXTEND2: {decision.why}",
                          decision.reason or DestroyReason.PROTOCOL)
            return None
        host, port = decision.choose(self._rng)
        return ExtendRequest(Extend2Body.decode(body), (str(host), port), decision.rsa_id,
                             decision.ed_id)

    def extend(self, circuit: OrCircuit, request: ExtendRequest) -> None:
        """Get an open link to the relay ``request`` names for ``circuit``: a link we opened to
        that address and identity, else a new one (its identity checked when it opens).
        Loop thread only."""
        if self._closed:
            circuit.extend_failed("relay shutting down")
            return
        key = (request.address, request.rsa_id)
        peer = self._outgoing.get(key)
        if peer is None or peer.link.closed:
            peer = self._connect(request.address, request.rsa_id)
        if not peer.link.is_open:
            peer.open_waiters.append(circuit)
            return
        mismatch = self._ed25519_mismatch(peer, request)
        if mismatch is None:
            circuit.attach_next(peer)
        else:
            circuit.extend_failed(mismatch, DestroyReason.OR_IDENTITY)

    @staticmethod
    def _ed25519_mismatch(peer: Peer, request: ExtendRequest) -> str | None:
        """Why the link's peer is not the Ed25519 identity ``request`` names, or None (also
        when it names none, or the link proves none). Loop thread only."""
        wanted = request.ed25519_id
        got = peer.link.peer_identity
        if wanted is None or got is None or got.ed25519 is None or got.ed25519 == wanted:
            return None
        return (f"wrong Ed25519 identity at {peer.address}: wanted {wanted.hex()}, "
                f"got {got.ed25519.hex()}")

    def make_edge(self, circuit: OrCircuit) -> ExitEdge:
        """The exit edge of ``circuit``. Loop thread only."""
        return ExitEdge(
            self.reactor,
            circuit.originate,
            lambda why: circuit.close(why, DestroyReason.PROTOCOL),
            check=self.exit_rules.check if self.exit_rules is not None else refuse_every_exit,
            is_exit=self.exit_rules is not None and self.exit_rules.is_exit,
            lookups=self._lookups,
            sockets=self._exit_sockets,
            streams=self.dos.stream_limiter(time.monotonic()),
            dir_server=self.directory.dir_server,
            name=f"{self.nickname} exit {circuit.prev_id:#x}",
        )

    def circuit_closed(self, circuit: OrCircuit, why: str) -> None:
        """Bookkeeping when a circuit closes. Loop thread only."""
        self.circuits_open -= 1
        self.circuits_closed += 1
        self._memory.forget(circuit)
        for peer in (circuit.prev, circuit.next):
            if peer is not None:
                self.link_idle(peer)
        if circuit.edge is not None:
            self._exit_totals.update(circuit.edge.stats())
        log.debug("%r closed: %s", circuit, why)

    def unexpected_cell(self, peer: Peer, circ_id: int, command: int) -> bool:
        """A circuit got a cell it has no use for. Garbage closes the link (False); a known
        command closes just the circuit (True). Loop thread only."""
        if command not in _KNOWN_COMMANDS:
            self._garbage(peer, command)
            return False
        log.info("%s: unexpected %s on circuit %#x", peer.link.name,
                 CellCommand(command).name, circ_id)
        return True

    # ------------------------------------------------------------------ statistics

    def stats(self) -> dict[str, Any]:
        """Counters as a plain dict (JSON-ready). Loop thread only."""
        pool = self.pool.stats()
        replies = self._replies.stats() if self._replies is not None else {}
        cells = self.cells_crypted
        cpu = sum(os.times()[:2])
        wakeups = replies.get("wakeups_sent", 0)
        span = (
            self._last_cell - self._first_cell
            if self._first_cell is not None and self._last_cell is not None
            else 0.0
        )
        return {
            "nickname": self.nickname,
            "pid": os.getpid(),
            "backend": backend_name(),
            "threads": pool["threads"],
            # relay cells crypted (either direction, on the pool or on the loop thread)
            "cells_crypted": cells,
            "cells_crypted_inline": self.cells_crypted_inline,
            "inline_crypto_errors": self.inline_crypto_errors,
            "flush_errors": self.flush_errors,
            # everything the pool counted: relay cells, onionskins, TLS bytes in cells
            "pool_cells": pool["cells"],
            "batches": pool["batches"],
            "batch_mean": pool["batch_mean"],
            # kernel calls that crypted several circuits' batches (grouped path), and batches
            # per such call
            "groups": pool["groups"],
            "batches_per_group": pool["batches"] / pool["groups"] if pool["groups"] else 0.0,
            "cells_written": self.cells_written,
            "submits": self.submits,
            "flushes": self.flushes,
            "wakeups": wakeups,
            "reply_callbacks": replies.get("callbacks", 0),
            "wakeups_per_cell": wakeups / cells if cells else 0.0,
            "active_seconds": span,
            "process_cpu_s": cpu,
            # CPU of the whole process (loop and workers) since the first cell, per cell
            "cpu_us_per_cell": (cpu - self._cpu_at_first_cell) / cells * 1e6 if cells else 0.0,
            "circuits_created": self.circuits_created,
            "circuits_open": self.circuits_open,
            "circuits_closed": self.circuits_closed,
            "circuits_refused_limit": self.circuits_refused_limit,
            "onionskins_refused": self.onionskins_refused,
            "circuits_refused_dos": self.circuits_refused_dos,
            "connections_refused_fds": self.connections_refused_fds,
            "exit_streams_refused_fds": self._exit_sockets.refused,
            "idle_links_closed": self.idle_links_closed,
            "circuits_closed_queue": self.circuits_closed_queue,
            "oom_closes": self.oom_closes,
            "queued_bytes": self._memory.total,
            "max_mem_in_queues": self._memory.limit,
            "connections_refused_dos": self.connections_refused_dos,
            "onion": self._onion.stats(),
            "worker_threads_alive": pool["alive_threads"],
            "unknown_circuit_destroys": self.unknown_circuit_destroys,
            "garbage_links": self.garbage_links,
            "pool_pauses": self.pool_pauses,
            "circuit_pressure_pauses": self.circuit_pressure_pauses,
            "write_congestions": self.write_congestions,
            "queued_writes": sum(p.scheduler.queued_writes for p in self._peers.values()),
            "links_accepted": self.links_accepted,
            "links_opened": self.links_opened,
            "link_closes": dict(self.link_closes),
            "pool_discarded": pool["discarded"],
            "pool_cancelled": pool["cancelled"],
            "pool_errors": pool["errors"],
            "worker_cells": pool["worker_cells"],
            "exit": dict(self._exit_totals),
        }
