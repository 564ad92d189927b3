"""The cells, keys and expected bytes that every pipeline design is fed and checked against.

Two workloads, each a set of circuits with pre-generated input cells:

``relay_forward``
    A middle relay (hop 1 of a 3-hop circuit) receiving cells that travel away from the
    client and are meant for the exit: the relay decrypts with Kf, checks ``recognized`` and
    passes the cell on. The input is made the way a real one is: the client
    (:class:`tor1.reference.OriginCrypto`) encrypts relay payloads for hop 2 and the
    guard (:class:`~tor1.reference.RelayCrypto` of hop 0) peels its layer. No cell is
    recognized at the middle; that is checked too.
``origin``
    A client sending relay payloads through its 3-hop circuit: for each cell, the digest is set
    with hop 2's running SHA-1, then Kf of hops 2, 1 and 0 are applied.

Everything is generated and the expected output is computed with the pure-Python reference
(``tor1.reference``) before any timing starts, so the kernel the designs use is checked
against a second implementation of the same spec (the project's own; the reference itself is
checked against tor-spec's known answers and against a real tor relay in the tests).
Input arrives in *chunks*: ``chunk_cells`` cells of one circuit joined in one ``bytes`` object
(what one read of a TLS record holds), delivered round-robin over the circuits, so every
design sees exactly the same sequence of arrivals.

:class:`OutputChecker` compares each result with the expected bytes as it arrives and
:class:`OutputMismatch` names the first wrong cell.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from relay.cells import RelayCommand
from relay.circuits import pack_relay
from tor1 import CELL_PAYLOAD_LEN, RELAY_DATA_MAX
from tor1.fast import FastOriginCrypto, FastRelayCrypto
from tor1.reference import HOP_MATERIAL_LEN, HopKeys, OriginCrypto, RelayCrypto, kdf_tor

WORKLOADS = ("relay_forward", "origin")
HOPS = 3
#: The hop whose forward digest the origin workload sets (hop 2 of hops 0..2: the exit).
TARGET_HOP = HOPS - 1
#: The relay of the relay_forward workload (hop 1: the middle).
MIDDLE_HOP = 1
#: Reference calls are made in batches of this many cells when generating inputs.
_REFERENCE_BATCH = 64

#: ``crypt(state, joined_cells) -> (out, recognized flags or b"")``; the same for every design.
CryptFn = Callable[[Any, bytes], tuple[bytes, bytes]]


class OutputMismatch(AssertionError):
    """A design produced bytes that differ from the reference's."""


@dataclass(frozen=True)
class Workload:
    """One workload's circuits, arrivals and expected output. Immutable once built.

    ``arrivals`` is the delivery order: ``(circuit index, joined cells, cell count)``.
    ``expected_out[i]`` is circuit ``i``'s whole output, joined; ``expected_flags[i]`` its
    recognized flags (relay_forward; all zero) or ``b""`` (origin).
    """

    name: str
    circuits: int
    cells_per_circuit: int
    chunk_cells: int
    keys: tuple[tuple[HopKeys, ...], ...]
    arrivals: tuple[tuple[int, bytes, int], ...]
    expected_out: tuple[bytes, ...]
    expected_flags: tuple[bytes, ...]

    @property
    def total_cells(self) -> int:
        """Cells in the whole workload."""
        return self.circuits * self.cells_per_circuit

    @property
    def has_flags(self) -> bool:
        """True when results carry recognized flags (relay_forward)."""
        return self.name == "relay_forward"

    def new_state(self, circuit: int) -> Any:
        """A fresh kernel crypto state for one circuit (keystreams at position 0). Any thread."""
        if self.name == "relay_forward":
            return FastRelayCrypto(self.keys[circuit][MIDDLE_HOP])
        return FastOriginCrypto(self.keys[circuit])

    def crypt_fn(self) -> CryptFn:
        """The per-batch crypto call every design makes: same kernel, same wrapper."""
        return crypt_relay_forward if self.name == "relay_forward" else crypt_origin


def crypt_relay_forward(state: FastRelayCrypto, cells: bytes) -> tuple[bytes, bytes]:
    """Middle relay: Kf decrypt and recognized check of joined cells. Any thread, one owner."""
    return state.forward_buf(cells)


def crypt_origin(state: FastOriginCrypto, cells: bytes) -> tuple[bytes, bytes]:
    """Client: digest for the exit and three Kf layers on joined cells. Any thread, one owner."""
    return state.encrypt_buf(cells, TARGET_HOP), b""


def circuit_keys(seed: int, circuit: int) -> tuple[HopKeys, ...]:
    """Distinct, reproducible keys for every hop of one circuit."""
    prefix = seed.to_bytes(4, "big") + circuit.to_bytes(4, "big")
    return tuple(
        HopKeys.from_material(kdf_tor(prefix + bytes([hop]), HOP_MATERIAL_LEN))
        for hop in range(HOPS)
    )


def relay_payloads(count: int, stream_id: int) -> list[bytes]:
    """``count`` RELAY_DATA payloads (recognized 0, digest 0, 498 bytes of random data)."""
    body = os.urandom(count * RELAY_DATA_MAX)
    return [
        pack_relay(RelayCommand.DATA, stream_id,
                   body[i * RELAY_DATA_MAX : (i + 1) * RELAY_DATA_MAX])
        for i in range(count)
    ]


def _reference_batches(cells: list[bytes]) -> list[list[bytes]]:
    return [cells[i : i + _REFERENCE_BATCH] for i in range(0, len(cells), _REFERENCE_BATCH)]


def _one_circuit(
    name: str, keys: tuple[HopKeys, ...], cells: int, stream_id: int
) -> tuple[bytes, bytes, bytes]:
    """(input, expected output, expected flags) of one circuit, all by the reference."""
    plain = relay_payloads(cells, stream_id)
    client = OriginCrypto(list(keys))
    if name == "origin":
        out: list[bytes] = []
        for batch in _reference_batches(plain):
            out.extend(client.encrypt_many(batch, TARGET_HOP))
        return b"".join(plain), b"".join(out), b""
    guard = RelayCrypto(keys[0])
    middle = RelayCrypto(keys[MIDDLE_HOP])
    arriving: list[bytes] = []
    out = []
    flags = bytearray()
    for batch in _reference_batches(plain):
        at_middle = [cell for _, cell in guard.forward_many(client.encrypt_many(batch, TARGET_HOP))]
        arriving.extend(at_middle)
        for recognized, cell in middle.forward_many(at_middle):
            out.append(cell)
            flags.append(1 if recognized else 0)
    if any(flags):
        raise AssertionError("the reference recognized a cell meant for the exit at the middle")
    return b"".join(arriving), b"".join(out), bytes(flags)


def build(
    name: str, circuits: int, cells_per_circuit: int, chunk_cells: int, seed: int = 1
) -> Workload:
    """Generate a workload and its expected output with the reference. Any thread."""
    if name not in WORKLOADS:
        raise ValueError(f"unknown workload {name!r}; choose from {WORKLOADS}")
    if circuits < 1 or chunk_cells < 1 or cells_per_circuit < chunk_cells:
        raise ValueError("need circuits >= 1 and cells_per_circuit >= chunk_cells >= 1")
    if cells_per_circuit % chunk_cells:
        raise ValueError("cells_per_circuit must be a multiple of chunk_cells")
    keys = tuple(circuit_keys(seed, c) for c in range(circuits))
    inputs: list[bytes] = []
    expected_out: list[bytes] = []
    expected_flags: list[bytes] = []
    for c in range(circuits):
        data, out, flags = _one_circuit(name, keys[c], cells_per_circuit, stream_id=c + 1)
        inputs.append(data)
        expected_out.append(out)
        expected_flags.append(flags)
    chunk_bytes = chunk_cells * CELL_PAYLOAD_LEN
    arrivals = tuple(
        (c, inputs[c][offset : offset + chunk_bytes], chunk_cells)
        for offset in range(0, cells_per_circuit * CELL_PAYLOAD_LEN, chunk_bytes)
        for c in range(circuits)
    )
    return Workload(
        name=name,
        circuits=circuits,
        cells_per_circuit=cells_per_circuit,
        chunk_cells=chunk_cells,
        keys=keys,
        arrivals=arrivals,
        expected_out=tuple(expected_out),
        expected_flags=tuple(expected_flags),
    )


class OutputChecker:
    """Checks results against the reference as they arrive; keeps nothing. Loop thread only.

    Each result must continue its circuit's expected bytes exactly where the previous one
    stopped (``bytes.startswith`` at an offset: a memcmp, no copy). The result can then be
    dropped, so a run never holds its whole output (retaining hundreds of MB would make every
    design pay page faults no relay pays, and the fastest ones most).
    """

    __slots__ = ("_flag_positions", "_positions", "workload")

    def __init__(self, workload: Workload) -> None:
        """Every circuit at position 0."""
        self.workload = workload
        self._positions = [0] * workload.circuits
        self._flag_positions = [0] * workload.circuits

    def check(self, circuit: int, out: bytes, flags: bytes) -> bool:
        """True when ``out`` (and ``flags``) are the next expected bytes; then advance."""
        position = self._positions[circuit]
        if not self.workload.expected_out[circuit].startswith(out, position):
            return False
        if self.workload.has_flags:
            flag_position = self._flag_positions[circuit]
            if not self.workload.expected_flags[circuit].startswith(flags, flag_position):
                return False
            self._flag_positions[circuit] = flag_position + len(flags)
        self._positions[circuit] = position + len(out)
        return True

    def explain(self, circuit: int, out: bytes, flags: bytes, design: str) -> OutputMismatch:
        """The error for a result :meth:`check` refused: which cell of which circuit."""
        position = self._positions[circuit]
        want = self.workload.expected_out[circuit][position : position + len(out)]
        first_cell = position // CELL_PAYLOAD_LEN
        if len(out) % CELL_PAYLOAD_LEN or len(want) != len(out):
            detail = f"{len(out)} bytes of output at cell {first_cell}, {len(want)} expected"
        elif out != want:
            detail = f"cell {first_cell + _first_difference(out, want)} differs from the reference"
        else:
            detail = f"recognized flags differ at cell {first_cell} ({flags.count(1)} set)"
        return OutputMismatch(f"{design}/{self.workload.name}: circuit {circuit}: {detail}")

    def check_complete(self, design: str) -> None:
        """Raise OutputMismatch unless every circuit's whole expected output has been seen."""
        for circuit, position in enumerate(self._positions):
            want = len(self.workload.expected_out[circuit])
            if position != want:
                raise OutputMismatch(
                    f"{design}/{self.workload.name}: circuit {circuit}: "
                    f"{position // CELL_PAYLOAD_LEN} of {want // CELL_PAYLOAD_LEN} cells came back"
                )


def _first_difference(got: bytes, want: bytes) -> int:
    """Index of the first differing cell of two equally long joined buffers."""
    for index in range(0, len(want), CELL_PAYLOAD_LEN):
        if got[index : index + CELL_PAYLOAD_LEN] != want[index : index + CELL_PAYLOAD_LEN]:
            return index // CELL_PAYLOAD_LEN
    return len(want) // CELL_PAYLOAD_LEN
