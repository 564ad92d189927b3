"""The link's per-read cell routing and per-batch framing: C against the Python reference.

``relay._cells.route``/``frame``/``crypt_frame`` (C) must give exactly what
``relay.framing.route_py``, ``relay.circuits.wire_cells_py`` and ``crypt_frame_py`` give, on
any byte stream: fixed and variable-length cells, RELAY_EARLY among RELAY, circuits with and
without batch handlers, unknown ids, a partial tail, more circuits than one call groups. Then
the framer on top: order against control cells, a pause inside a batch handler, a close. And
``data_runs`` (a client's DATA bodies per stream) against ``relay.circuits.data_runs_py``.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay import _cells
from relay.circuits import crypt_frame_py, data_runs_py, wire_cells_py
from relay.framing import FIXED_CELL_LEN, MAX_GROUPS, CellFramer, fixed_cell, route_py, var_cell

RELAY, EARLY, DESTROY, CREATE2, VPADDING = 3, 9, 4, 10, 128


def handler_for(circ_id: int) -> tuple[str, int]:
    return ("batch", circ_id)  # any object: route only hands it back


def cell_strategy() -> st.SearchStrategy[bytes]:
    ids = st.integers(min_value=0, max_value=12) | st.integers(min_value=1, max_value=2**32 - 1)
    fixed = st.tuples(ids, st.sampled_from([RELAY, RELAY, RELAY, EARLY, DESTROY, CREATE2, 0]),
                      st.binary(min_size=0, max_size=509)).map(
        lambda t: fixed_cell(t[0], t[1], t[2]))
    variable = st.tuples(ids, st.sampled_from([VPADDING, 7, 130]),
                         st.binary(max_size=600)).map(lambda t: var_cell(*t))
    return st.one_of(fixed, fixed, fixed, variable)


def normalized(result: tuple) -> tuple:
    end, groups, other = result
    return end, [(h, bytes(p), n, e) for h, p, n, e in groups], other


@settings(max_examples=300, deadline=None)
@given(cells=st.lists(cell_strategy(), max_size=40), cut=st.integers(min_value=0, max_value=600),
       registered=st.sets(st.integers(min_value=1, max_value=12)))
def test_c_route_equals_the_python_reference(cells: list[bytes], cut: int,
                                             registered: set[int]) -> None:
    stream = b"".join(cells)
    stream = stream[: max(0, len(stream) - cut)]  # a partial tail, often
    batches = {circ_id: handler_for(circ_id) for circ_id in registered}
    offset = 0
    while True:
        c_result = normalized(_cells.route(stream, offset, batches))
        assert c_result == normalized(route_py(stream, offset, batches))
        end, groups, other = c_result
        if not groups and other is None:
            break
        offset = end
    assert offset <= len(stream)


def test_every_cell_is_routed_once_in_order_across_calls() -> None:
    """A read of 3 * MAX_GROUPS circuits' cells, a DESTROY and a CREATE2 in the middle: every
    RELAY payload reaches its circuit once, in order, and the control cells come in place."""
    circuits = 3 * MAX_GROUPS
    expected: dict[int, list[bytes]] = {c: [] for c in range(1, circuits + 1)}
    stream = []
    events: list[tuple] = []
    for round_ in range(3):
        for circ_id in range(1, circuits + 1):
            payload = os.urandom(509)
            expected[circ_id].append(payload)
            stream.append(fixed_cell(circ_id, RELAY, payload))
        stream.append(fixed_cell(5, DESTROY, bytes([round_])))
    data = b"".join(stream)
    seen: dict[int, list[bytes]] = {c: [] for c in expected}
    batches = {c: c for c in expected}
    for route in (_cells.route, route_py):
        for key in seen:
            seen[key] = []
        events.clear()
        offset = 0
        calls = 0
        while offset < len(data):
            offset, groups, other = route(data, offset, batches)
            calls += 1
            for circ_id, payloads, count, early in groups:
                assert early is None and len(payloads) == count * 509
                seen[circ_id].extend(payloads[i * 509 : (i + 1) * 509] for i in range(count))
            if other is not None:
                events.append((other[0], other[1], other[2][:1], sum(map(len, seen.values()))))
        assert seen == expected
        # each DESTROY arrived after exactly the RELAY cells before it in the stream
        assert [e[:3] for e in events] == [(5, DESTROY, bytes([r])) for r in range(3)]
        assert [e[3] for e in events] == [circuits * (r + 1) for r in range(3)]
        assert calls == 3 * 3  # 64 circuits per call at most, the third ends at the DESTROY


def test_relay_early_positions_are_per_group() -> None:
    data = b"".join([fixed_cell(1, RELAY, b"a"), fixed_cell(2, EARLY, b"b"),
                     fixed_cell(1, EARLY, b"c"), fixed_cell(1, RELAY, b"d"),
                     fixed_cell(2, RELAY, b"e")])
    for route in (_cells.route, route_py):
        end, groups, other = route(data, 0, {1: "one", 2: "two"})
        assert end == len(data) and other is None
        assert [(h, n, e) for h, _, n, e in groups] == [("one", 3, (1,)), ("two", 2, (0,))]


@settings(max_examples=200, deadline=None)
@given(circ_id=st.integers(min_value=0, max_value=2**32 - 1),
       command=st.sampled_from([RELAY, EARLY, 0, 128]), count=st.integers(0, 20),
       early=st.sets(st.integers(0, 19)))
def test_c_frame_equals_the_python_reference(circ_id: int, command: int, count: int,
                                             early: set[int]) -> None:
    payloads = os.urandom(509 * count)
    positions = tuple(sorted(p for p in early if p < count)) or None
    assert _cells.frame(circ_id, command, payloads, positions) == wire_cells_py(
        circ_id, command, payloads, positions)


def test_frame_refuses_partial_cells_and_positions_outside() -> None:
    with pytest.raises(ValueError):
        _cells.frame(1, RELAY, b"x" * 510)
    with pytest.raises(ValueError):
        _cells.frame(1, RELAY, b"x" * 509, (1,))
    with pytest.raises(ValueError):
        wire_cells_py(1, RELAY, b"x" * 509, (1,))


@settings(max_examples=200, deadline=None)
@given(circ_id=st.integers(min_value=0, max_value=2**32 - 1), count=st.integers(0, 12),
       kind=st.sampled_from(["bytes", "tuple"]), recognized=st.sets(st.integers(0, 11)))
def test_c_crypt_frame_equals_the_python_reference(circ_id: int, count: int, kind: str,
                                                   recognized: set[int]) -> None:
    payloads, out = os.urandom(509 * count), os.urandom(509 * count)
    flags = bytes(int(i in recognized) for i in range(count))
    result = out if kind == "bytes" else (out, flags, b"tags")
    calls: list[bytes] = []

    def crypt(buf: bytes) -> object:
        calls.append(buf)
        return result

    c_result = _cells.crypt_frame(crypt, payloads, circ_id)
    py_result = crypt_frame_py(crypt, payloads, circ_id)
    assert calls == [payloads, payloads]  # crypt called once each, on the payloads given
    if kind == "tuple" and any(flags):  # a cell for this relay: the tuple, untouched
        assert c_result is result and py_result is result
    else:
        assert c_result == py_result == wire_cells_py(circ_id, RELAY, out)


def test_crypt_frame_with_the_kernel_gives_the_bytes_of_crypt_then_frame() -> None:
    from tor1.backend import ReferenceRelayCrypto
    from tor1.fast import FastRelayCrypto
    from tor1.reference import HopKeys

    keys = HopKeys.from_material(os.urandom(72))
    batch = os.urandom(509 * 7)
    for make in (FastRelayCrypto, ReferenceRelayCrypto):
        fused, apart = make(keys), make(keys)  # two states in step
        for _ in range(3):  # the states advance alike, call after call
            assert _cells.crypt_frame(fused.backward_buf, batch, 77) == _cells.frame(
                77, RELAY, apart.backward_buf(batch))
            out, flags, _ = apart.forward_tagged_buf(batch)
            assert not any(flags)  # random cells are never recognized
            assert _cells.crypt_frame(fused.forward_tagged_buf, batch, 78) == _cells.frame(
                78, RELAY, out)
    kernel, wrapped = FastRelayCrypto(keys), FastRelayCrypto(keys)
    forward, backward = kernel.kernel_batch_methods  # the same bytes without the wrapper
    assert forward(batch) == wrapped.forward_tagged_buf(batch)
    assert backward(batch) == wrapped.backward_buf(batch)


def test_crypt_frame_passes_errors_on() -> None:
    def broken(buf: bytes) -> bytes:
        raise RuntimeError("crypto failed")

    with pytest.raises(RuntimeError, match="crypto failed"):
        _cells.crypt_frame(broken, b"x" * 509, 1)
    with pytest.raises(ValueError):
        _cells.crypt_frame(lambda buf: b"x" * 510, b"x" * 509, 1)  # not whole cells
    with pytest.raises(TypeError):
        _cells.crypt_frame(lambda buf: (b"", b""), b"", 1)  # not (out, recognized, tags)


def test_a_pause_in_a_batch_handler_keeps_the_next_control_cell_pending() -> None:
    got: list[tuple] = []
    circuits = {1: lambda command, payload: got.append(("cell", 1, command)),
                2: lambda command, payload: got.append(("cell", 2, command))}
    framer = CellFramer(circuits, lambda c, command, p: got.append(("unrouted", c, command)))
    framer.version = 4
    framer.running = True

    def batch1(payloads: bytes, count: int, early: object) -> None:
        got.append(("batch", 1, count))
        framer.running = False  # e.g. the pool went over its high-water mark

    framer.batches.update({1: batch1, 2: lambda p, n, e: got.append(("batch", 2, n))})
    data = b"".join([fixed_cell(1, RELAY), fixed_cell(2, RELAY), fixed_cell(1, RELAY),
                     fixed_cell(2, DESTROY), fixed_cell(1, RELAY)])
    offset = framer.dispatch(data, 0)
    # the groups of the call are all delivered; the DESTROY is not consumed
    assert got == [("batch", 1, 2), ("batch", 2, 1)]
    assert offset == 3 * FIXED_CELL_LEN
    framer.running = True
    offset = framer.dispatch(data, offset)
    assert offset == len(data)
    assert got[2:] == [("cell", 2, DESTROY), ("batch", 1, 1)]
    assert framer.cells == 5


def test_nothing_is_delivered_after_the_link_closes() -> None:
    got: list[tuple] = []
    framer = CellFramer({}, lambda c, command, p: got.append((c, command)))
    framer.version = 4
    framer.running = True

    def closing(payloads: bytes, count: int, early: object) -> None:
        got.append(("batch", 1))
        framer.running = False
        framer.closed = True

    framer.batches.update({1: closing, 2: lambda p, n, e: got.append(("batch", 2))})
    data = b"".join([fixed_cell(1, RELAY), fixed_cell(2, RELAY), fixed_cell(3, CREATE2)])
    framer.dispatch(data, 0)
    assert got == [("batch", 1)]


def relay_payload(command: int, stream_id: int, body: bytes, length: int | None = None) -> bytes:
    """A 509-byte decrypted relay payload (``length`` may lie about the body)."""
    size = len(body) if length is None else length
    header = bytes([command]) + bytes(2) + stream_id.to_bytes(2, "big") + bytes(4) \
        + size.to_bytes(2, "big")
    return (header + body).ljust(509, b"\0")


def payload_strategy() -> st.SearchStrategy[bytes]:
    data = st.tuples(st.integers(1, 6), st.binary(max_size=498)).map(
        lambda t: relay_payload(2, t[0], t[1]))
    other = st.tuples(st.sampled_from([1, 3, 4, 5, 9]), st.integers(0, 6),
                      st.binary(max_size=20)).map(lambda t: relay_payload(*t))
    too_long = st.integers(499, 0xFFFF).map(lambda n: relay_payload(2, 1, b"", n))
    return st.one_of(data, data, data, other, too_long)


@settings(max_examples=300, deadline=None)
@given(payloads=st.lists(payload_strategy(), max_size=30), start=st.integers(0, 30))
def test_c_data_runs_equals_the_python_reference(payloads: list[bytes], start: int) -> None:
    plain = b"".join(payloads)
    offset = min(start, len(payloads)) * 509
    assert _cells.data_runs(plain, offset) == data_runs_py(plain, offset)


def test_data_runs_gathers_each_stream_in_order_up_to_the_first_other_cell() -> None:
    plain = b"".join([relay_payload(2, 7, b"ab"), relay_payload(2, 3, b"cd"),
                      relay_payload(2, 7, b"ef"), relay_payload(5, 0, b"\x01"),
                      relay_payload(2, 3, b"gh"), relay_payload(2, 1, b"x", 499)])
    for data_runs in (_cells.data_runs, data_runs_py):
        assert data_runs(plain, 0) == (3 * 509, 3, [(7, b"abef", 2), (3, b"cd", 1)])
        assert data_runs(plain, 3 * 509) == (3 * 509, 0, [])  # a SENDME: not DATA
        assert data_runs(plain, 4 * 509) == (5 * 509, 1, [(3, b"gh", 1)])
        assert data_runs(plain, 5 * 509) == (5 * 509, 0, [])  # length 499: not a DATA body
        assert data_runs(plain, len(plain)) == (len(plain), 0, [])


def test_data_runs_stops_at_a_65th_stream_and_goes_on_from_there() -> None:
    plain = b"".join(relay_payload(2, stream, bytes([stream])) for stream in range(1, 70))
    for data_runs in (_cells.data_runs, data_runs_py):
        end, cells, runs = data_runs(plain, 0)
        assert (end, cells, len(runs)) == (64 * 509, 64, 64)
        assert runs[-1] == (64, b"\x40", 1)
        assert data_runs(plain, end) == (len(plain), 5, [(s, bytes([s]), 1)
                                                         for s in range(65, 70)])


@pytest.mark.parametrize(("size", "offset"), [(508, 0), (509, 1), (509, 1018), (509, -509)])
def test_data_runs_refuses_partial_payloads_and_bad_offsets(size: int, offset: int) -> None:
    for data_runs in (_cells.data_runs, data_runs_py):
        with pytest.raises(ValueError):
            data_runs(bytes(size), offset)


def test_the_c_kernels_use_the_cell_sizes_python_defines() -> None:
    """The C kernels define their sizes again (C cannot import them): pinned to the one
    Python definition here."""
    from relay._cells import _cellkernel
    from tor1 import CELL_PAYLOAD_LEN, SENDME_TAG_LEN
    from tor1._kernel import _tor1

    assert _cellkernel.PAYLOAD_LEN == _tor1.CELL_LEN == CELL_PAYLOAD_LEN
    assert _cellkernel.CELL_LEN == FIXED_CELL_LEN
    assert _tor1.TAG_LEN == SENDME_TAG_LEN
