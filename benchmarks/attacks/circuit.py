"""Circuits built by hand over a :class:`benchmarks.rawpeer.RawPeer` link, for the attacks.

The client side of Tor circuits with the pure-Python reference crypto
(``tor1.reference.OriginCrypto``): a first hop by CREATE_FAST, further hops by EXTEND2 in a
RELAY_EARLY cell (ntor with a real relay's keys, or any 84 bytes toward a fake next relay,
whose hop gets made-up keys: the cells for it are only counted, never read), relay cells
encrypted for any hop, and answers read and decrypted. Every read has the socket's timeout;
a DESTROY for the circuit raises :class:`Destroyed` with its reason.

Threads: a :class:`Circuit` belongs to the thread that uses its peer.
"""

from __future__ import annotations

import contextlib
import os

from benchmarks.rawpeer import RawPeer, fixed_cell
from relay.cells import CellCommand, RelayCommand
from relay.circuits import pack_relay, relay_body
from relay.handshakes import (
    HTYPE_NTOR,
    NTOR_ONIONSKIN_LEN,
    CreateFastClient,
    Extend2Body,
    LinkSpecifier,
    NtorClient,
    decode_extended2,
)
from tor1.reference import HOP_MATERIAL_LEN, HopKeys, OriginCrypto

__all__ = [
    "FIRST_CIRC_ID",
    "Circuit",
    "Destroyed",
    "made_up_hop",
    "one_hop",
    "open_peer",
    "specifiers",
]

FIRST_CIRC_ID = 0x80000001
"""The first circuit id of a link we open (the initiator's half has the high bit set)."""


class Destroyed(Exception):
    """The circuit was destroyed; ``reason`` is the DESTROY reason byte."""

    def __init__(self, circ_id: int, reason: int) -> None:
        super().__init__(f"circuit {circ_id:#x} destroyed (reason {reason})")
        self.reason = reason


def made_up_hop() -> HopKeys:
    """Keys for a hop played by a fake relay (nothing it receives is ever decrypted)."""
    return HopKeys.from_material(os.urandom(HOP_MATERIAL_LEN))


def specifiers(host: str, port: int, identity: bytes | None) -> tuple[LinkSpecifier, ...]:
    """An EXTEND2's link specifiers: the address (IPv4 or IPv6) and, when given, the RSA
    identity."""
    address = LinkSpecifier.ipv6(host, port) if ":" in host else LinkSpecifier.ipv4(host, port)
    return (address,) if identity is None else (address, LinkSpecifier.legacy_id(identity))


class Circuit:
    """One circuit of a raw peer: its id and the client's crypto for each hop."""

    def __init__(self, peer: RawPeer, circ_id: int, crypto: OriginCrypto) -> None:
        """Wrap a circuit already built up to ``crypto``'s hops."""
        self.peer = peer
        self.circ_id = circ_id
        self.crypto = crypto
        self.other_cells = 0  # cells for other circuits skipped while waiting for ours

    @property
    def hops(self) -> int:
        """Hops the client has keys for."""
        return self.crypto.n_hops

    def wire(self, command: int, stream_id: int = 0, data: bytes = b"", *,
             hop: int | None = None, early: bool = False) -> bytes:
        """The wire bytes of one relay cell for ``hop`` (default: the last), as RELAY or
        RELAY_EARLY. Advances the client's forward crypto."""
        target = self.hops - 1 if hop is None else hop
        payload = self.crypto.encrypt(pack_relay(command, stream_id, data), target)
        return fixed_cell(self.circ_id,
                          CellCommand.RELAY_EARLY if early else CellCommand.RELAY, payload)

    def send(self, command: int, stream_id: int = 0, data: bytes = b"", *,
             hop: int | None = None, early: bool = False) -> None:
        """Send one relay cell (see :meth:`wire`)."""
        self.peer.sock.sendall(self.wire(command, stream_id, data, hop=hop, early=early))

    def next_cell(self) -> tuple[int, bytes]:
        """The next cell for this circuit, ``(command, payload)``; cells of other circuits
        are skipped (counted)."""
        while True:
            circ_id, command, payload = self.peer.next_cell()
            if circ_id == self.circ_id:
                return command, payload
            self.other_cells += 1

    def next_relay(self) -> tuple[int, int, int, bytes]:
        """The next relay cell for this circuit, decrypted: ``(hop, relay command, stream id,
        data)``; :class:`Destroyed` on DESTROY."""
        while True:
            command, payload = self.next_cell()
            if command == CellCommand.DESTROY:
                raise Destroyed(self.circ_id, payload[0])
            if command == CellCommand.RELAY:
                hop, plain = self.crypto.decrypt(payload)
                relay_command, stream_id, data = relay_body(plain)
                return hop, relay_command, stream_id, data

    def try_extend(self, specs: tuple[LinkSpecifier, ...], onionskin: bytes) -> bytes:
        """Send EXTEND2 (in RELAY_EARLY) to the last hop; the EXTENDED2 body, or
        :class:`Destroyed`."""
        body = Extend2Body(specs, HTYPE_NTOR, onionskin).encode()
        self.send(RelayCommand.EXTEND2, 0, body, early=True)
        while True:
            _, command, _, data = self.next_relay()
            if command == RelayCommand.EXTENDED2:
                return data

    def extend_to_relay(self, host: str, port: int, identity: bytes, onion_key: bytes) -> None:
        """Extend to a real relay with ntor; its hop is added. :class:`Destroyed` if refused."""
        client = NtorClient(identity, onion_key)
        reply = self.try_extend(specifiers(host, port, identity), client.onionskin)
        self.crypto.add_hop(HopKeys.from_material(client.complete(decode_extended2(reply))))

    def extend_to_fake(self, port: int, identity: bytes) -> None:
        """Extend to a fake next relay on 127.0.0.1; its hop gets made-up keys."""
        self.try_extend(specifiers("127.0.0.1", port, identity), os.urandom(NTOR_ONIONSKIN_LEN))
        self.crypto.add_hop(made_up_hop())


def one_hop(peer: RawPeer, circ_id: int) -> Circuit:
    """A CREATE_FAST circuit to the peer's relay (cells for other circuits that arrive first
    are skipped); :class:`Destroyed` if refused."""
    client = CreateFastClient()
    peer.send_cell(circ_id, CellCommand.CREATE_FAST, client.onionskin)
    circuit = Circuit(peer, circ_id, OriginCrypto([]))
    command, payload = circuit.next_cell()
    if command == CellCommand.DESTROY:
        raise Destroyed(circ_id, payload[0])
    if command != CellCommand.CREATED_FAST:
        raise RuntimeError(f"CREATE_FAST answered with cell command {command}")
    circuit.crypto.add_hop(HopKeys.from_material(client.complete(payload)))
    return circuit


def open_peer(stack: contextlib.ExitStack, port: int, *, timeout: float = 10.0,
              rcvbuf: int | None = None) -> RawPeer:
    """A link to the relay on 127.0.0.1:``port``, handshake done, closed with ``stack``."""
    peer = RawPeer(port, timeout=timeout, rcvbuf=rcvbuf)
    stack.callback(peer.close)
    peer.handshake()
    return peer
