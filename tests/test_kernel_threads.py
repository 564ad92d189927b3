"""The kernel releases the GIL for a whole batch, and refuses two threads on one state.

No timing assertions: each test observes an interleaving that is only possible if the GIL
was released (another thread ran Python code while a kernel call was in progress), and
bounds its loops by the worker's progress, not by the clock.
"""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from support_kernel import Runner

from tor1 import CELL_PAYLOAD_LEN
from tor1._kernel import OriginState, RelayState

BIG_CELLS = 32 * 1024 * 1024 // CELL_PAYLOAD_LEN  # a ~32 MB joined batch
BIG = bytes(BIG_CELLS * CELL_PAYLOAD_LEN)


def relay_state(tag: int) -> RelayState:
    return RelayState(bytes([tag]) * 20, bytes([tag + 1]) * 20, bytes([tag + 2]) * 16,
                      bytes([tag + 3]) * 16)


def test_python_runs_while_a_batch_is_in_the_kernel() -> None:
    """The test thread counts loop iterations during which the worker's state is in use: only
    possible if the worker's call released the GIL."""
    state = relay_state(1)
    runner = Runner(lambda: state.forward(BIG))
    runner.start()
    counted_inside = 0
    while runner.is_alive() and counted_inside < 1000:
        if state.in_use:
            counted_inside += 1
    runner.stop.set()
    runner.join()
    assert runner.error is None
    assert counted_inside > 0


def test_two_circuits_crypt_concurrently() -> None:
    """Two workers on two circuits are observed inside the kernel at the same moment."""
    first, second = relay_state(1), relay_state(50)
    runners = [Runner(lambda: first.backward(BIG)), Runner(lambda: second.originate(BIG))]
    for r in runners:
        r.start()
    both_inside = False
    while not both_inside and all(r.is_alive() for r in runners):
        both_inside = first.in_use and second.in_use
    for r in runners:
        r.stop.set()
        r.join()
    assert [r.error for r in runners] == [None, None]
    assert both_inside


def test_concurrent_use_of_one_state_raises() -> None:
    """While a worker is inside a big call, the same state used from another thread raises
    RuntimeError instead of corrupting the keystream."""
    state = relay_state(3)
    runner = Runner(lambda: state.backward(BIG))
    runner.start()
    refused: RuntimeError | None = None
    while refused is None and runner.is_alive():
        try:
            state.backward(b"")
        except RuntimeError as exc:
            refused = exc
    runner.stop.set()
    runner.join()
    assert runner.error is None
    assert refused is not None and "in use" in str(refused)
    # The guard did not disturb the stream: the worker's calls produced one continuous
    # keystream, so the next cell is at offset calls * len(BIG).
    cell = bytes(CELL_PAYLOAD_LEN)
    offset = runner.calls * len(BIG)
    block, skip = divmod(offset, 16)
    ref = Cipher(algorithms.AES(bytes([6]) * 16),
                 modes.CTR(block.to_bytes(16, "big"))).encryptor()
    ref.update(bytes(skip))
    assert state.backward(cell) == ref.update(cell)


def test_origin_state_guard() -> None:
    hop = (bytes(20), bytes(20), bytes(16), bytes(16))
    state = OriginState([hop, hop, hop])
    runner = Runner(lambda: state.encrypt(BIG, 2))
    runner.start()
    refused = False
    while not refused and runner.is_alive():
        try:
            state.decrypt(b"")
        except RuntimeError:
            refused = True
    runner.stop.set()
    runner.join()
    assert runner.error is None
    assert refused
    with pytest.raises(ValueError):  # and the state is free again once the worker is done
        state.encrypt(b"", 3)


def test_input_is_pinned_while_the_kernel_reads_it() -> None:
    """A bytearray being crypted cannot be resized by another thread meanwhile (BufferError),
    so the kernel never reads freed memory; a list of pieces is pinned the same way."""
    state = relay_state(4)
    data = bytearray(BIG)
    pieces = [bytes(CELL_PAYLOAD_LEN), data]
    runner = Runner(lambda: state.backward(pieces))
    runner.start()
    blocked = False
    while not blocked and runner.is_alive():
        if state.in_use:
            try:  # a whole cell, so a resize landing between two calls keeps the input valid
                data.extend(bytes(CELL_PAYLOAD_LEN))
            except BufferError:
                blocked = True
    runner.stop.set()
    runner.join()
    assert runner.error is None
    assert blocked
