"""Bad input against real relay processes, from an independent blocking-socket peer.

The peer (``benchmarks.rawpeer.RawPeer``) is written with plain sockets and the cell codec, not with
the project's Link, so the relay is checked against a second implementation of the link
handshake. One network (echo service + 3 relays, separate processes) serves every test of the
module; after the bad input, each test checks that the relay still serves: a fresh link and a
full echo circuit work.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from collections.abc import Iterator

import pytest

from benchmarks.rawpeer import RawPeer
from examples.network import LocalNetwork
from relay.cells import CellCommand, DestroyReason, RelayCommand
from relay.circuits import pack_relay, relay_body
from tor1 import CELL_PAYLOAD_LEN

FIXED = 5 + CELL_PAYLOAD_LEN
OUR_HALF = 0x80000000  # the initiator's half of the circuit id space


@pytest.fixture(scope="module")
def network() -> Iterator[LocalNetwork]:
    net = LocalNetwork(3, threads=2, relay_args=["--log-level", "INFO"])
    net.start()
    try:
        yield net
    finally:
        net.stop()
        net.cleanup()


def relay_port(network: LocalNetwork, index: int = 0) -> int:
    return network.descriptors[index].port


def relay_log(network: LocalNetwork, index: int = 0) -> str:
    return network.relays[index].log_path.read_text(errors="replace")


def wait_for_log(network: LocalNetwork, index: int, text: str, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = relay_log(network, index)
        if text in log:
            return log
        time.sleep(0.05)
    raise AssertionError(f"{text!r} not in relay{index}'s log:\n{relay_log(network, index)}")


def assert_relay_still_serves(network: LocalNetwork, index: int = 0) -> None:
    """A new link, a CREATE_FAST circuit and a BEGIN/CONNECTED to the echo service."""
    peer = RawPeer(relay_port(network, index))
    try:
        peer.handshake()
        crypto = peer.create_fast(OUR_HALF | 0x77)
        host, port = network.echo_address
        begin = pack_relay(RelayCommand.BEGIN, 5, f"{host}:{port}".encode() + b"\0")
        peer.send_cell(OUR_HALF | 0x77, CellCommand.RELAY, crypto.encrypt(begin, 0))
        circ_id, command, payload = peer.recv_cell()
        assert (circ_id, command) == (OUR_HALF | 0x77, CellCommand.RELAY)
        hop, plain = crypto.decrypt(payload)
        assert hop == 0
        assert relay_body(plain)[:2] == (RelayCommand.CONNECTED, 5)
    finally:
        peer.close()


def test_unknown_circuit_id_gets_destroy(network: LocalNetwork) -> None:
    peer = RawPeer(relay_port(network))
    try:
        peer.handshake()
        unknown = OUR_HALF | 0x1234
        peer.send_cell(unknown, CellCommand.RELAY, os.urandom(CELL_PAYLOAD_LEN))
        circ_id, command, payload = peer.recv_cell()
        assert (circ_id, command, payload[0]) == (unknown, CellCommand.DESTROY,
                                                   DestroyReason.PROTOCOL)
        # The link itself stays usable: a circuit can be created on it afterwards.
        peer.create_fast(OUR_HALF | 0x99)
    finally:
        peer.close()
    assert_relay_still_serves(network)


def test_garbage_cell_command_closes_the_link_with_a_logged_reason(
    network: LocalNetwork,
) -> None:
    peer = RawPeer(relay_port(network, 1))
    try:
        peer.handshake()
        peer.send_cell(OUR_HALF | 1, 0x42, b"garbage" * 10)
        assert peer.closed_by_peer()
    finally:
        peer.close()
    wait_for_log(network, 1, "cell command 66 is not a Tor command")
    assert_relay_still_serves(network, 1)


def test_garbage_before_the_handshake_closes_the_link(network: LocalNetwork) -> None:
    peer = RawPeer(relay_port(network, 2))
    try:
        peer.sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
        assert peer.closed_by_peer()
    finally:
        peer.close()
    wait_for_log(network, 2, "474554202f204854")  # the first bytes, in hex, in the reason
    assert_relay_still_serves(network, 2)


def test_truncated_cell_closes_the_link(network: LocalNetwork) -> None:
    peer = RawPeer(relay_port(network, 1))
    try:
        peer.handshake()
        crypto = peer.create_fast(OUR_HALF | 5)
        cell = struct.pack(">IB", OUR_HALF | 5, CellCommand.RELAY) + crypto.encrypt(
            pack_relay(RelayCommand.DROP, 0), 0)
        peer.sock.sendall(cell[: FIXED // 2])
        peer.sock.shutdown(socket.SHUT_WR)
        assert peer.closed_by_peer()
    finally:
        peer.close()
    wait_for_log(network, 1, "truncated cell dropped")
    assert_relay_still_serves(network, 1)


def test_digest_mismatch_at_the_exit_destroys_the_circuit(network: LocalNetwork) -> None:
    peer = RawPeer(relay_port(network))
    try:
        peer.handshake()
        circ = OUR_HALF | 0x51
        crypto = peer.create_fast(circ)
        host, port = network.echo_address
        begin = bytearray(crypto.encrypt(
            pack_relay(RelayCommand.BEGIN, 1, f"{host}:{port}".encode() + b"\0"), 0))
        begin[6] ^= 0x01  # inside the digest field: decrypts to a wrong digest
        peer.send_cell(circ, CellCommand.RELAY, bytes(begin))
        circ_id, command, payload = peer.recv_cell()
        assert (circ_id, command, payload[0]) == (circ, CellCommand.DESTROY,
                                                   DestroyReason.PROTOCOL)
        # Only that circuit died: the link takes a new one.
        other = OUR_HALF | 0x52
        peer.create_fast(other)
    finally:
        peer.close()
    wait_for_log(network, 0, "digest mismatch")
    assert_relay_still_serves(network)
