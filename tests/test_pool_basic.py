"""Worker pool basics: order per direction, buffers and lists, batching, counts, validation."""

from __future__ import annotations

import threading
from collections import defaultdict
from typing import Any

import pytest
from test_pool_support import CELL, Collector, OrderedState, cell, expected_stream

from workers.circuit import Circuit, CircuitClosedError
from workers.pool import PoolClosedError, WorkerPool


def crypt_joined(state: OrderedState, direction: int, batch: bytes) -> bytes:
    assert isinstance(batch, bytes)
    cells = [batch[i : i + CELL] for i in range(0, len(batch), CELL)]
    return b"".join(state.crypt_list(direction, cells))


def crypt_list(state: OrderedState, direction: int, batch: list[bytes]) -> list[bytes]:
    assert isinstance(batch, list)
    return state.crypt_list(direction, batch)


@pytest.mark.parametrize("joined", [True, False])
def test_order_kept_per_circuit_and_direction(joined: bool) -> None:
    replies = Collector()
    got: dict[tuple[int, int], list[bytes]] = defaultdict(list)
    cells_back: dict[tuple[int, int], int] = defaultdict(int)

    def on_result(circuit: Circuit, direction: int, result: Any) -> None:
        key = (circuit.context, direction)
        if joined:
            got[key].extend(result[i : i + 20] for i in range(0, len(result), 20))
        else:
            got[key].extend(result)

    pool = WorkerPool(
        replies, threads=3, joined=joined, process=crypt_joined if joined else crypt_list,
        cell_size=CELL
    )
    pool.start()
    circuits = [
        pool.open_circuit(OrderedState(i), on_result=on_result, context=i) for i in range(12)
    ]
    sent: dict[tuple[int, int], list[bytes]] = defaultdict(list)
    for round_ in range(40):
        for c in circuits:
            direction = (round_ + c.context) % 2
            batch = [
                cell(c.context * 1000 + direction, len(sent[(c.context, direction)]) + k)
                for k in range(1 + round_ % 5)
            ]
            sent[(c.context, direction)].extend(batch)
            # Alternate the two submit forms: a joined buffer and a list of cells.
            pool.submit(c, direction, b"".join(batch) if round_ % 2 else batch)
            cells_back[(c.context, direction)] += len(batch)
        if round_ % 7 == 0:
            replies.deliver_all(pool)
    replies.pump(pool, lambda: pool.in_flight == 0)
    pool.close()
    for (key, direction), cells in sent.items():
        assert got[(key, direction)] == expected_stream(key, direction, cells)
    stats = pool.stats()
    total = sum(cells_back.values())
    assert stats["submitted"] == stats["delivered"] == stats["cells"] == total
    assert stats["batches"] == replies.puts
    assert stats["batch_mean"] == total / stats["batches"]
    assert stats["alive_threads"] == 0


def test_one_reply_per_batch_and_cap_is_soft() -> None:
    """A batch takes whole submitted items until it holds at least batch_cells cells."""
    replies = Collector()
    sizes: list[int] = []
    pool = WorkerPool(
        replies, threads=1, batch_cells=10, joined=True, process=lambda s, d, b: len(b) // CELL,
        cell_size=CELL
    )
    c = pool.open_circuit(None, on_result=lambda c, d, r: sizes.append(r))
    # Queued before start, so the one worker finds all of it at once: items of 4 cells each.
    for _ in range(6):
        pool.submit(c, 0, bytes(CELL * 4))
    pool.start()
    replies.pump(pool, lambda: pool.in_flight == 0)
    pool.close()
    # 4+4+4 = 12 >= 10 ends a batch; then 4+4+4 again. Never a split item.
    assert sizes == [12, 12]
    assert pool.stats()["batches"] == 2


def test_single_buffer_passes_through_without_copy() -> None:
    replies = Collector()
    seen: list[bool] = []
    payload = bytes(range(256)) * 4 + bytes(CELL * 3 - 1024)

    def process(state: Any, direction: int, batch: bytes) -> int:
        seen.append(batch is payload)
        return len(batch)

    pool = WorkerPool(replies, threads=1, joined=True, process=process, cell_size=CELL)
    c = pool.open_circuit(None, on_result=lambda c, d, r: None)
    pool.submit(c, 1, payload)
    pool.start()
    replies.pump(pool, lambda: pool.in_flight == 0)
    pool.close()
    assert seen == [True]


def test_count_given_for_cells_of_another_size() -> None:
    replies = Collector()
    got: list[list[bytes]] = []
    pool = WorkerPool(replies, threads=2, process=lambda s, d, b: b, cell_size=CELL)
    c = pool.open_circuit(None, on_result=lambda c, d, r: got.append(r))
    pool.submit(c, 0, b"aaabbbccc", count=3)
    replies_expected = [b"aaa", b"bbb", b"ccc"]
    pool.start()
    replies.pump(pool, lambda: pool.in_flight == 0)
    pool.close()
    assert got == [replies_expected]
    assert pool.stats()["cells"] == 3


def test_submit_many_takes_lock_once_and_schedules_each() -> None:
    replies = Collector()
    got: dict[int, list[bytes]] = defaultdict(list)
    pool = WorkerPool(replies, threads=2, process=crypt_list, cell_size=CELL)
    circuits = [
        pool.open_circuit(
            OrderedState(i), on_result=lambda c, d, r: got[c.context].extend(r), context=i
        )
        for i in range(5)
    ]
    pool.start()
    sent: dict[int, list[bytes]] = defaultdict(list)
    for _ in range(20):
        work = []
        for c in circuits:
            batch = [cell(c.context, len(sent[c.context]) + k) for k in range(3)]
            sent[c.context].extend(batch)
            work.append((c, 0, batch))
        assert pool.submit_many(work) is True
    replies.pump(pool, lambda: pool.in_flight == 0)
    pool.close()
    for key, cells in sent.items():
        assert got[key] == expected_stream(key, 0, cells)


def test_submit_validation() -> None:
    pool = WorkerPool(Collector(), threads=1, process=lambda s, d, b: b, cell_size=CELL)
    c = pool.open_circuit(None, on_result=lambda c, d, r: None)
    with pytest.raises(ValueError, match="lane"):
        pool.submit(c, 2, [b"x"])
    with pytest.raises(ValueError, match="lane"):
        pool.submit(c, -1, [b"x"])
    with pytest.raises(ValueError, match="whole number"):
        pool.submit(c, 0, bytes(CELL + 1))
    with pytest.raises(TypeError):
        pool.submit(c, 0, "text")
    sizeless = WorkerPool(Collector(), threads=1, process=lambda s, d, b: b)
    anonymous = sizeless.open_circuit(None, on_result=lambda c, d, r: None)
    with pytest.raises(ValueError, match="count="):
        sizeless.submit(anonymous, 0, bytes(CELL))  # no cell_size: a buffer needs its count
    sizeless.submit(anonymous, 0, bytes(3 * CELL), count=3)
    assert sizeless.in_flight == 3
    with pytest.raises(ValueError, match="priority class"):
        pool.set_priority(c, 3)
    with pytest.raises(ValueError, match="process"):
        WorkerPool(Collector(), cell_size=CELL).open_circuit(None)
    with pytest.raises(ValueError, match="priorities"):
        WorkerPool(Collector(), priorities=2, cell_size=CELL)
    assert pool.submit(c, 0, b"") is True  # nothing to do, nothing queued
    assert pool.in_flight == 0
    pool.close_circuit(c)
    with pytest.raises(CircuitClosedError):
        pool.submit(c, 0, [b"x"])
    pool.start()
    pool.close()
    c2 = pool.open_circuit(None, on_result=lambda c, d, r: None)
    with pytest.raises(PoolClosedError, match="closed"):
        pool.submit(c2, 0, [b"x"])
    with pytest.raises(PoolClosedError):
        pool.submit_many([(c2, 0, [b"x"])])


def test_worker_state_only_on_workers() -> None:
    pool = WorkerPool(Collector(), threads=1, process=lambda s, d, b: b, cell_size=CELL)
    with pytest.raises(RuntimeError, match="worker"):
        pool.worker_state()
    pool.close()


def test_close_from_worker_refused() -> None:
    replies = Collector()
    errors: list[BaseException] = []
    holder: list[WorkerPool] = []

    def process(state: Any, direction: int, batch: Any) -> Any:
        holder[0].close()
        return batch

    pool = WorkerPool(replies, threads=1, process=process, cell_size=CELL)
    holder.append(pool)
    c = pool.open_circuit(
        None, on_result=lambda c, d, r: None, on_error=lambda c, d, e: errors.append(e)
    )
    pool.submit(c, 0, [b"x"])
    pool.start()
    replies.pump(pool, lambda: pool.in_flight == 0)
    pool.close()
    assert len(errors) == 1 and isinstance(errors[0], RuntimeError)
    assert "join itself" in str(errors[0])


def test_submit_many_rejects_an_entry_but_keeps_the_ones_before() -> None:
    replies = Collector()
    got: list[Any] = []
    pool = WorkerPool(replies, threads=1, process=lambda s, d, b: b, cell_size=CELL)
    good = pool.open_circuit(None, on_result=lambda c, d, r: got.append(r))
    closed = pool.open_circuit(None, on_result=lambda c, d, r: got.append(r))
    pool.close_circuit(closed)
    with pytest.raises(CircuitClosedError):
        pool.submit_many([(good, 0, [b"a"]), (closed, 0, [b"b"]), (good, 0, [b"c"])])
    assert pool.in_flight == 1 and pool.stats()["queue_depth"] == [0, 1, 0]
    pool.start()
    replies.pump(pool, lambda: pool.in_flight == 0)
    pool.close()
    assert got == [[b"a"]]


def test_resume_signal_survives_a_raising_result_callback() -> None:
    replies = Collector()
    events: list[bool] = []

    def on_result(c: Circuit, d: int, r: Any) -> None:
        raise RuntimeError("application bug")

    pool = WorkerPool(replies, threads=1, process=lambda s, d, b: b, circuit_high_water=2,
                      cell_size=CELL)
    c = pool.open_circuit(
        None, on_result=on_result, on_pressure=lambda c, over: events.append(over)
    )
    assert pool.submit(c, 0, [b"a", b"b", b"c"]) is False
    pool.start()
    [reply] = replies.take(30.0)
    with pytest.raises(RuntimeError, match="application bug"):
        pool.deliver(reply)  # a ReplyQueue would log and count this
    assert events == [True, False] and pool.in_flight == 0
    pool.close()


def test_context_manager_starts_and_drains() -> None:
    replies = Collector()
    got: list[Any] = []
    with WorkerPool(replies, threads=2, process=lambda s, d, b: b, cell_size=CELL) as pool:
        c = pool.open_circuit(None, on_result=lambda c, d, r: got.append(r))
        pool.submit(c, 0, [b"a"])
        assert pool.stats()["alive_threads"] == 2
    assert pool.closed and pool.stats()["alive_threads"] == 0
    replies.deliver_all(pool)
    assert got == [[b"a"]]


def test_attach_needs_replies_before_start() -> None:
    pool = WorkerPool(None, threads=1, process=lambda s, d, b: b, cell_size=CELL)
    with pytest.raises(RuntimeError, match="reply queue"):
        pool.start()
    pool.set_replies(Collector())
    pool.start()
    with pytest.raises(RuntimeError, match="before start"):
        pool.set_replies(Collector())
    pool.close()
    assert not any(t.name.startswith("relaycrypt-worker") for t in threading.enumerate())
