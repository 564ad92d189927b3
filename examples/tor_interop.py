"""Talk to a real tor relay: TLS link, CREATE_FAST and ntor circuits, BEGIN_DIR, all on the reactor.

    python -m examples.tor_interop --orport 127.0.0.1:9001 [--json]
    python -m examples.tor_interop --start-tor [--json]     # launches a private loopback tor

What it does, in order, every step checked:

1. opens a TLS link to the ORPort (``relay.link`` over a ``reactor`` Stream, TLS through
   ``relay.tls``): VERSIONS (4 and 5 offered), the relay's CERTS (RSA identity fingerprint,
   certificates bound to the TLS certificate), AUTH_CHALLENGE (ignored), NETINFO both ways;
2. builds a one-hop circuit with CREATE_FAST;
3. opens a BEGIN_DIR stream on it and sends ``GET /tor/server/authority HTTP/1.0`` (a fresh
   tor answers 404 for its first second or so: retried on a new stream);
4. reads the relay's descriptor: its ``fingerprint`` must equal the one from CERTS (and its
   ``signing-key`` must hash to it), and its ``ntor-onion-key`` is the curve25519 key for ntor;
5. builds a second circuit with CREATE2 / ntor using that identity and onion key, and fetches
   the descriptor again over it;
6. flow control v1 (authenticated SENDMEs, both ways): a third circuit, built by the client's own
   circuit code (``relay.origin``), fetches the descriptor a few hundred times over BEGIN_DIR
   streams (:mod:`examples.tor_flowcontrol`; no document of a consensus-less tor is bigger than
   100 cells, but SENDME windows are per circuit): tor sends more than its 1000-cell window, so
   it must have accepted our version-1 SENDMEs, and every circuit SENDME it sends us (one per
   100 of our request cells) is version 1 and its tag checks out;
7. tor checks those tags: on a fourth circuit, once tor has sent 100 DATA cells, a version-1
   SENDME with a made-up tag makes tor destroy the circuit (reason PROTOCOL; the warning it logs
   for it is the one expected);
8. destroys the circuits and closes the link.

Every relay cell of both circuits is encrypted and decrypted by a ``workers.WorkerPool``:
the loop thread submits payloads, worker threads run ``tor1.backend`` (tor1), and
the results come back through the pool's reply queue to the loop thread, which writes them to
the link. The example's sequential steps are a generator driven by the loop's callbacks
(:class:`Script`), so nothing blocks the loop thread.

With ``--start-tor`` the tor is started from ``relay.torpeer`` (private directory, free port,
``ProtocolWarnings 1``); its warnings are reported, and its log is printed on failure. Exit
status: 0 when every step succeeded, 1 otherwise. ``--json`` prints one JSON object.

Threads: everything here runs on the loop thread except the pool's crypto.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import logging
import sys
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat, load_pem_public_key

from examples.tor_flowcontrol import BulkDirFetch, OneLinkOwner, flow_control_report
from reactor import Reactor
from relay.cells import CellCommand, DestroyReason, RelayCommand
from relay.circuits import (
    CIRCWINDOW_INCREMENT,
    END_REASON_DONE,
    pack_relay,
    relay_body,
    wire_cells,
)
from relay.directory import RelayDescriptor
from relay.handshakes import (
    HTYPE_NTOR,
    CreateFastClient,
    NtorClient,
    decode_created2,
    encode_create2,
)
from relay.link import Link
from relay.origin import OriginCircuit as ClientCircuit
from relay.sendme import encode_sendme_v1
from relay.torpeer import TorPeer, TorStartError, start_tor
from tor1 import CELL_PAYLOAD_LEN, SENDME_TAG_LEN
from tor1.backend import OriginCryptoLike, backend_name, origin_crypto_for
from tor1.reference import HopKeys
from workers.pool import WorkerPool

log = logging.getLogger("examples.tor_interop")

FORWARD, BACKWARD = 0, 1
DESCRIPTOR_REQUEST = b"GET /tor/server/authority HTTP/1.0\r\n\r\n"
DIR_FETCHES = 300  # ~1500 DATA cells from tor, 300 from us: SENDMEs due both ways
PARALLEL_FETCHES = 16
FORGED_SENDME_WARNINGS = ("SENDME v1 cell digest do not match",
                          "connection_edge_process_relay_cell (away from origin) failed")
"""What tor logs (protocol warnings) when step 7's made-up tag reaches it, once each."""


class StepError(Exception):
    """A step failed; the message says which and why."""


# --------------------------------------------------------------------------- sequencing


class Pending:
    """A value that arrives later, on the loop thread. Loop thread only."""

    __slots__ = ("_callback", "_done", "_error", "_value")

    def __init__(self) -> None:
        """Not done yet. Loop thread only."""
        self._done = False
        self._value: Any = None
        self._error: BaseException | None = None
        self._callback: Callable[[Any, BaseException | None], None] | None = None

    @property
    def done(self) -> bool:
        """True once resolved or rejected. Loop thread only."""
        return self._done

    def resolve(self, value: Any = None) -> None:
        """Deliver the value (ignored if already done). Loop thread only."""
        self._finish(value, None)

    def reject(self, error: BaseException) -> None:
        """Deliver a failure (ignored if already done). Loop thread only."""
        self._finish(None, error)

    def _finish(self, value: Any, error: BaseException | None) -> None:
        if self._done:
            return
        self._done, self._value, self._error = True, value, error
        if self._callback is not None:
            self._callback(value, error)

    def on_done(self, callback: Callable[[Any, BaseException | None], None]) -> None:
        """Call ``callback(value, error)`` once done (now, if already). Loop thread only."""
        self._callback = callback
        if self._done:
            callback(self._value, self._error)


class Script:
    """Runs a generator that yields :class:`Pending` objects, resuming it with their results
    on a later loop iteration. Loop thread only."""

    def __init__(self, reactor: Reactor, steps: Generator[Pending, Any, Any],
                 on_finish: Callable[[BaseException | None], None]) -> None:
        """``on_finish(error)`` runs once the generator returns or raises. Loop thread only."""
        self._reactor = reactor
        self._steps = steps
        self._on_finish = on_finish

    def start(self) -> None:
        """Run the first step. Loop thread only."""
        self._advance(None, None)

    def _advance(self, value: Any, error: BaseException | None) -> None:
        try:
            pending = self._steps.throw(error) if error is not None else self._steps.send(value)
        except StopIteration:
            self._on_finish(None)
            return
        except Exception as exc:
            self._on_finish(exc)
            return
        pending.on_done(lambda v, e: self._reactor.call_soon(self._advance, v, e))


def sleep(reactor: Reactor, seconds: float) -> Pending:
    """A Pending resolved after ``seconds``. Loop thread only."""
    pending = Pending()
    reactor.call_later(seconds, pending.resolve)
    return pending


# --------------------------------------------------------------------------- circuits


def crypt_batch(state: OriginCryptoLike, direction: int, batch: bytes) -> Any:
    """The pool's process function (worker thread): encrypt for the last hop, or decrypt."""
    if direction == FORWARD:
        return state.encrypt_buf(batch, state.n_hops - 1)
    return state.decrypt_buf(batch)


class OriginCircuit:
    """A client circuit of one hop over a link; relay cells crypted by the worker pool.
    Loop thread only."""

    def __init__(self, link: Link, pool: WorkerPool, name: str) -> None:
        """Register a circuit id on ``link``; nothing is sent yet. Loop thread only."""
        self.link = link
        self.pool = pool
        self.name = name
        self.circ_id = link.add_circuit(self._on_cell)
        self._created: Pending | None = None
        self._handshake: Callable[[bytes], bytes] | None = None
        self._pool_circuit: Any = None
        self._streams: dict[int, Callable[[int, bytes], None]] = {}
        self._next_stream = 1
        self.closed_reason: str | None = None
        self.cells_sent = 0
        self.cells_received = 0
        self.data_cells_received = 0
        self.destroyed = Pending()  # resolved with the reason of a DESTROY from the relay

    # ---- building

    def create_fast(self) -> Pending:
        """Send CREATE_FAST; resolves when CREATED_FAST checked out. Loop thread only."""
        client = CreateFastClient()
        return self._create(CellCommand.CREATE_FAST, client.onionskin, client.complete)

    def create_ntor(self, identity_digest: bytes, onion_key: bytes) -> Pending:
        """Send CREATE2 (ntor) for the relay's identity and onion key. Loop thread only."""
        client = NtorClient(identity_digest, onion_key)
        return self._create(CellCommand.CREATE2, encode_create2(HTYPE_NTOR, client.onionskin),
                            lambda body: client.complete(decode_created2(body)))

    def _create(self, command: int, body: bytes, complete: Callable[[bytes], bytes]) -> Pending:
        self._created = Pending()
        self._handshake = complete
        self.link.send_cell(self.circ_id, command, body)
        return self._created

    def _on_created(self, payload: bytes) -> None:
        assert self._created is not None and self._handshake is not None
        try:
            material = self._handshake(payload)
        except Exception as exc:  # HandshakeError, BodyError
            self._fail(f"handshake failed: {exc}")
            return
        crypto = origin_crypto_for([HopKeys.from_material(material)])
        self._pool_circuit = self.pool.open_circuit(
            crypto, process=crypt_batch, joined=True, on_result=self._on_crypted,
            on_error=self._on_crypto_error, context=self.name)
        self._created.resolve()

    # ---- relay cells

    def send_relay(self, command: int, stream_id: int, data: bytes = b"") -> None:
        """Queue one relay cell for encryption (then the link). Loop thread only."""
        if self._pool_circuit is None or self.closed_reason is not None:
            raise StepError(f"{self.name}: circuit not usable ({self.closed_reason})")
        self.pool.submit(self._pool_circuit, FORWARD, pack_relay(command, stream_id, data))

    def open_stream(self, on_relay: Callable[[int, bytes], None]) -> int:
        """Allocate a stream id whose relay cells go to ``on_relay(command, data)``.
        Loop thread only."""
        stream_id = self._next_stream
        self._next_stream += 1
        self._streams[stream_id] = on_relay
        return stream_id

    def close_stream(self, stream_id: int) -> None:
        """Forget a stream id. Loop thread only."""
        self._streams.pop(stream_id, None)

    def _on_crypted(self, circuit: Any, direction: int, result: Any) -> None:
        if direction == FORWARD:
            if self.link.is_open:
                count = len(result) // CELL_PAYLOAD_LEN
                self.link.write_cells(wire_cells(self.circ_id, CellCommand.RELAY, result), count)
                self.cells_sent += count
            return
        plain, _hops = result
        for offset in range(0, len(plain), CELL_PAYLOAD_LEN):
            self.cells_received += 1
            command, stream_id, data = relay_body(plain, offset)
            if command == RelayCommand.DATA:
                self.data_cells_received += 1
            handler = self._streams.get(stream_id)
            if handler is not None:
                handler(command, data)
            elif command not in (RelayCommand.SENDME, RelayCommand.DROP):
                log.info("%s: relay %s for unknown stream %d ignored", self.name,
                         _relay_name(command), stream_id)

    def _on_crypto_error(self, circuit: Any, direction: int, exc: BaseException) -> None:
        self._fail(f"relay crypto failed ({'forward' if direction == FORWARD else 'backward'}):"
                   f" {exc!r}")

    def _on_cell(self, command: int, payload: bytes) -> None:
        if command in (CellCommand.CREATED_FAST, CellCommand.CREATED2) and self._created:
            self._on_created(payload)
        elif command in (CellCommand.RELAY, CellCommand.RELAY_EARLY) and self._pool_circuit:
            self.pool.submit(self._pool_circuit, BACKWARD, payload)
        elif command == CellCommand.DESTROY:
            self.destroyed.resolve(payload[0])
            self._fail(f"relay destroyed the circuit (reason {payload[0]})", send_destroy=False)
        else:
            self._fail(f"unexpected cell command {command}")

    # ---- closing

    def _fail(self, reason: str, *, send_destroy: bool = True) -> None:
        if self.closed_reason is not None:
            return
        self.closed_reason = reason
        log.warning("%s: %s", self.name, reason)
        self._teardown(send_destroy)
        error = StepError(f"{self.name}: {reason}")
        if self._created is not None:
            self._created.reject(error)
        for handler in list(self._streams.values()):
            handler(-1, reason.encode())

    def destroy(self) -> None:
        """Send DESTROY and release the circuit. Loop thread only."""
        if self.closed_reason is None:
            self.closed_reason = "destroyed by us"
            self._teardown(True)

    def _teardown(self, send_destroy: bool) -> None:
        if self._pool_circuit is not None:
            self.pool.close_circuit(self._pool_circuit)
        if send_destroy:
            self.link.destroy_circuit(self.circ_id, DestroyReason.NONE)
        else:
            self.link.remove_circuit(self.circ_id)


def _relay_name(command: int) -> str:
    try:
        return RelayCommand(command).name
    except ValueError:
        return str(command)


def fetch_directory(circuit: OriginCircuit, request: bytes) -> Pending:
    """BEGIN_DIR on ``circuit``, send ``request``, resolve with the whole HTTP response
    (``bytes``) once the relay ENDs the stream. Loop thread only."""
    pending = Pending()
    chunks: list[bytes] = []

    def on_relay(command: int, data: bytes) -> None:
        if command == RelayCommand.CONNECTED:
            circuit.send_relay(RelayCommand.DATA, stream_id, request)
        elif command == RelayCommand.DATA:
            chunks.append(data)
        elif command == RelayCommand.END:
            circuit.close_stream(stream_id)
            reason = data[0] if data else 0
            if reason == END_REASON_DONE or (chunks and reason == 0):
                pending.resolve(b"".join(chunks))
            else:
                pending.reject(StepError(f"directory stream ended with reason {reason}"))
        elif command == -1:  # the circuit failed
            pending.reject(StepError(data.decode()))
        elif command != RelayCommand.SENDME:
            pending.reject(StepError(f"unexpected relay {_relay_name(command)} on the stream"))

    stream_id = circuit.open_stream(on_relay)
    circuit.send_relay(RelayCommand.BEGIN_DIR, stream_id)
    return pending


# --------------------------------------------------------------------------- descriptors


@dataclass(frozen=True)
class Descriptor:
    """The parts of a relay's server descriptor this example checks."""

    nickname: str
    fingerprint: str
    ntor_onion_key: bytes
    signing_key_digest: str | None
    ed25519_identity: bytes | None


def _b64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


def parse_descriptor(text: str) -> Descriptor:
    """Pick the router line, fingerprint, ntor-onion-key (base64, padding optional),
    signing-key and master-key-ed25519 out of a server descriptor. Any thread."""
    nickname = fingerprint = None
    ntor: bytes | None = None
    ed_identity: bytes | None = None
    lines = text.splitlines()
    signing_digest: str | None = None
    for index, line in enumerate(lines):
        keyword, _, rest = line.partition(" ")
        if keyword == "router":
            nickname = rest.split(" ")[0]
        elif keyword == "fingerprint":
            fingerprint = rest.replace(" ", "").upper()
        elif keyword == "ntor-onion-key":
            ntor = _b64(rest.strip())
        elif keyword == "master-key-ed25519":
            ed_identity = _b64(rest.strip())
        elif keyword == "signing-key":
            end = next(i for i in range(index, len(lines)) if lines[i].startswith("-----END"))
            key = load_pem_public_key("\n".join(lines[index + 1 : end + 1]).encode())
            der = key.public_bytes(Encoding.DER, PublicFormat.PKCS1)
            signing_digest = hashlib.sha1(der).hexdigest().upper()
    if nickname is None or fingerprint is None or ntor is None:
        raise StepError("descriptor lacks router / fingerprint / ntor-onion-key")
    if len(fingerprint) != 40 or len(ntor) != 32:
        raise StepError(f"descriptor fingerprint {fingerprint!r} or ntor key is malformed")
    return Descriptor(nickname, fingerprint, ntor, signing_digest, ed_identity)


def http_body(response: bytes) -> tuple[int, bytes]:
    """``(status, body)`` of an HTTP/1.0 response. Any thread."""
    head, sep, body = response.partition(b"\r\n\r\n")
    if not sep:
        raise StepError(f"not an HTTP response: {response[:60]!r}")
    status_line = head.split(b"\r\n", 1)[0].split()
    if len(status_line) < 2 or not status_line[1].isdigit():
        raise StepError(f"bad HTTP status line {head[:60]!r}")
    return int(status_line[1]), body


# --------------------------------------------------------------------------- the run


class Interop:
    """The whole conversation with one tor relay. Loop thread only."""

    def __init__(self, reactor: Reactor, pool: WorkerPool, host: str, port: int,
                 *, fetch_retry_for: float, say: Callable[[str], None]) -> None:
        """Prepare the report; :meth:`steps` does the work. Loop thread only."""
        self.reactor = reactor
        self.pool = pool
        self.host, self.port = host, port
        self.fetch_retry_for = fetch_retry_for
        self.say = say
        self.report: dict[str, Any] = {
            "orport": f"{host}:{port}", "link_protocol": None, "tls_version": None,
            "fingerprint": None, "cert_bindings": [], "fingerprint_matches_descriptor": False,
            "ed25519_identity_matches": None, "create_fast": False, "ntor": False,
            "descriptor_bytes": 0, "ntor_descriptor_bytes": 0, "descriptor_fetch_attempts": 0,
            "relay_cells_sent": 0, "relay_cells_received": 0, "crypto_backend": backend_name(),
            "flow_control_v1": None, "tor_refused_forged_sendme": False,
            "closed_cleanly": False, "error": None,
        }
        self.link: Link | None = None
        self._link_open = Pending()
        self._link_closed = Pending()

    def steps(self) -> Generator[Pending, Any, None]:
        """The steps, in order; each ``yield`` waits for the loop. Loop thread only."""
        report = self.report
        self.link = Link.connect(self.reactor, self.host, self.port, tls=True,
                                 name=f"tor {self.host}:{self.port}",
                                 on_open=lambda link: self._link_open.resolve(),
                                 on_close=self._on_link_close)
        yield self._link_open
        link = self.link
        report.update(link_protocol=link.link_version, tls_version=link.tls_version,
                      fingerprint=link.peer_fingerprint,
                      cert_bindings=list(link.peer_cert_bindings))
        self.say(f"link open: protocol {link.link_version} over {link.tls_version}, relay "
                 f"{link.peer_fingerprint}")

        fast = OriginCircuit(link, self.pool, "CREATE_FAST circuit")
        yield fast.create_fast()
        report["create_fast"] = True
        self.say(f"CREATE_FAST circuit {fast.circ_id:#010x} built")

        response = yield from self._fetch_with_retry(fast)
        descriptor = parse_descriptor(response.decode(errors="replace"))
        report["descriptor_bytes"] = len(response)
        self.say(f"descriptor of {descriptor.nickname} ({len(response)} bytes, attempt "
                 f"{report['descriptor_fetch_attempts']}): fingerprint {descriptor.fingerprint}")
        if descriptor.fingerprint != link.peer_fingerprint:
            raise StepError(f"descriptor fingerprint {descriptor.fingerprint} differs from the "
                            f"one in CERTS {link.peer_fingerprint}")
        if descriptor.signing_key_digest not in (None, descriptor.fingerprint):
            raise StepError("descriptor's signing-key does not hash to its fingerprint")
        report["fingerprint_matches_descriptor"] = True
        certs = link.peer_certs
        if certs is not None and descriptor.ed25519_identity is not None:
            report["ed25519_identity_matches"] = (
                certs.ed25519_identity == descriptor.ed25519_identity)
            if not report["ed25519_identity_matches"]:
                raise StepError("descriptor's master-key-ed25519 differs from the CERTS cell's")

        ntor = OriginCircuit(link, self.pool, "ntor circuit")
        yield ntor.create_ntor(bytes.fromhex(descriptor.fingerprint), descriptor.ntor_onion_key)
        self.say(f"ntor circuit {ntor.circ_id:#010x} built (CREATE2, onion key "
                 f"{base64.b64encode(descriptor.ntor_onion_key).decode()[:12]}...)")
        again = yield from self._fetch_with_retry(ntor)
        if parse_descriptor(again.decode(errors="replace")).fingerprint != descriptor.fingerprint:
            raise StepError("the ntor circuit fetched a different relay's descriptor")
        report["ntor"] = True
        report["ntor_descriptor_bytes"] = len(again)
        self.say(f"descriptor fetched again over the ntor circuit ({len(again)} bytes)")

        yield from self._flow_control_v1(link, descriptor, response)
        forged = yield from self._forged_sendme(link)

        for circuit in (fast, ntor, forged):
            report["relay_cells_sent"] += circuit.cells_sent
            report["relay_cells_received"] += circuit.cells_received
            circuit.destroy()
        link.close("done")
        yield self._link_closed
        report["closed_cleanly"] = True
        self.say("circuits destroyed, link closed")

    def _flow_control_v1(self, link: Link, descriptor: Descriptor,
                         body: bytes) -> Generator[Pending, Any, None]:
        """Step 6: :data:`DIR_FETCHES` fetches on one circuit of ``relay.origin``."""
        owner = OneLinkOwner(self.reactor)
        relay = RelayDescriptor(descriptor.nickname, self.host, self.port,
                                bytes.fromhex(descriptor.fingerprint), descriptor.ntor_onion_key)
        opened, fetched = Pending(), Pending()
        circuit = ClientCircuit(
            owner, [relay], on_open=lambda c: opened.resolve(),
            on_close=lambda c, why: opened.reject(StepError(f"flow control circuit: {why}")))
        circuit.start(link, 30.0)
        yield opened
        fetch = BulkDirFetch(
            circuit, DESCRIPTOR_REQUEST, body, count=DIR_FETCHES, parallel=PARALLEL_FETCHES,
            on_done=lambda error: fetched.resolve() if error is None
            else fetched.reject(StepError(error)))
        fetch.start()
        yield fetched
        flow, problem = flow_control_report(circuit, fetch)
        self.report["flow_control_v1"] = flow
        if problem is not None:
            raise StepError(f"flow control v1: {problem}")
        circuit.close("done")
        self.say(f"flow control v1: {flow['dir_fetches']} fetches on one circuit, "
                 f"{flow['data_cells_from_tor']} DATA cells from tor for our "
                 f"{flow['sendmes_to_tor']} v1 SENDMEs; tor's {flow['sendmes_from_tor_checked']} "
                 f"v1 SENDMEs checked")

    def _forged_sendme(self, link: Link) -> Generator[Pending, Any, OriginCircuit]:
        """Step 7: a made-up tag, once tor has recorded the tag of its 100th DATA cell."""
        circuit = OriginCircuit(link, self.pool, "forged-SENDME circuit")
        yield circuit.create_fast()
        while circuit.data_cells_received < CIRCWINDOW_INCREMENT:
            status, _ = http_body((yield fetch_directory(circuit, DESCRIPTOR_REQUEST)))
            if status != 200:
                raise StepError(f"GET /tor/server/authority answered HTTP {status}")
        circuit.send_relay(RelayCommand.SENDME, 0, encode_sendme_v1(bytes(SENDME_TAG_LEN)))
        reason = yield circuit.destroyed
        if reason != DestroyReason.PROTOCOL:
            raise StepError(f"tor answered a forged SENDME tag with DESTROY reason {reason}")
        self.report["tor_refused_forged_sendme"] = True
        self.say(f"tor destroyed the circuit for a forged SENDME v1 tag after "
                 f"{circuit.data_cells_received} DATA cells (reason PROTOCOL)")
        return circuit

    def _fetch_with_retry(self, circuit: OriginCircuit) -> Generator[Pending, Any, bytes]:
        waited = 0.0
        delay = 0.2
        while True:
            self.report["descriptor_fetch_attempts"] += 1
            response = yield fetch_directory(circuit, DESCRIPTOR_REQUEST)
            status, body = http_body(response)
            if status == 200:
                return body
            if status != 404 or waited >= self.fetch_retry_for:
                raise StepError(f"GET /tor/server/authority answered HTTP {status}")
            self.say(f"  HTTP {status} (tor has no descriptor yet); retrying in {delay:.1f} s")
            yield sleep(self.reactor, delay)
            waited += delay

    def _on_link_close(self, link: Link, reason: str) -> None:
        error = StepError(f"link closed ({link.close_kind.value if link.close_kind else '?'}):"
                          f" {reason}")
        self._link_open.reject(error)
        self._link_closed.resolve()


def run(host: str, port: int, *, timeout: float, threads: int, fetch_retry_for: float,
        say: Callable[[str], None]) -> dict[str, Any]:
    """Run every step against ``host:port``; return the report (``report["ok"]``). Call from
    the thread that will be the loop thread."""
    reactor = Reactor()
    pool = WorkerPool.attach(reactor, threads=threads, joined=True,
                             cell_size=CELL_PAYLOAD_LEN)
    interop = Interop(reactor, pool, host, port, fetch_retry_for=fetch_retry_for, say=say)
    outcome: list[BaseException | None] = []

    def finished(error: BaseException | None) -> None:
        outcome.append(error)
        reactor.stop()

    def expired() -> None:
        if not outcome:
            finished(StepError(f"timed out after {timeout} s"))

    Script(reactor, interop.steps(), finished).start()
    timer = reactor.call_later(timeout, expired)
    try:
        reactor.run()
    finally:
        timer.cancel()
        if interop.link is not None and not interop.link.closed:
            interop.link.close("stopping")
        stats = pool.stats()
        pool.close(drain=False, timeout=10)
        reactor.close()
    error = outcome[0] if outcome else StepError("the loop stopped early")
    report = interop.report
    report["pool_cells"] = stats.get("cells")
    report["ok"] = error is None
    report["error"] = None if error is None else str(error)
    return report


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status. Main thread."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--orport", metavar="HOST:PORT", help="a tor relay's ORPort")
    target.add_argument("--start-tor", action="store_true",
                        help="start a private loopback tor (relay.torpeer) and use it")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--timeout", type=float, default=60.0, help="overall limit, seconds")
    parser.add_argument("--threads", type=int, default=2, help="crypto worker threads")
    parser.add_argument("--retry-for", type=float, default=20.0,
                        help="keep retrying a 404 descriptor fetch this long, seconds")
    parser.add_argument("-v", "--verbose", action="store_true", help="log link events")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.ERROR,
                        format="%(name)s: %(message)s", stream=sys.stderr)

    def say(line: str) -> None:
        if not args.json:
            print(line, flush=True)

    tor: TorPeer | None = None
    if args.start_tor:
        try:
            tor = start_tor()
        except TorStartError as exc:
            print(f"tor_interop: {exc}", file=sys.stderr)
            return 1
        host, port = tor.host, tor.orport
        say(f"started tor pid {tor.pid} on {host}:{port} in {tor.directory}")
    else:
        host, _, port_text = args.orport.rpartition(":")
        if not host or not port_text.isdigit():
            parser.error("--orport must be HOST:PORT with an IP address")
        port = int(port_text)
    try:
        report = run(host, port, timeout=args.timeout, threads=args.threads,
                     fetch_retry_for=args.retry_for, say=say)
        if tor is not None:
            time.sleep(0.3)  # let tor log anything it had to say about our DESTROYs and close
            warnings = tor.unexpected_warnings()
            expected = [next((line for line in warnings if text in line), None)
                        for text in FORGED_SENDME_WARNINGS]
            report["tor_logged_forged_sendme"] = None not in expected
            if report["tor_refused_forged_sendme"]:  # step 7's warnings are the expected ones
                for line in expected:
                    if line is not None:
                        warnings.remove(line)
            report["tor_pid"] = tor.pid
            report["tor_warnings"] = warnings
            if warnings and report["ok"]:
                report["ok"] = False
                report["error"] = f"tor logged warnings about this run: {warnings}"
            if not report["ok"]:
                print(f"--- tor's log ({tor.log_path}) ---\n{tor.log_text()}", file=sys.stderr)
    finally:
        if tor is not None:
            tor.stop()
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
    elif report["ok"]:
        print(f"OK: link protocol {report['link_protocol']}, fingerprint "
              f"{report['fingerprint']}, CREATE_FAST and ntor circuits both fetched the "
              f"descriptor ({report['relay_cells_sent']} relay cells sent, "
              f"{report['relay_cells_received']} received, crypto on the worker pool: "
              f"{report['crypto_backend']})")
    else:
        print(f"FAILED: {report['error']}", file=sys.stderr)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
