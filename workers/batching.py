"""Batches: how submitted items are counted on the loop thread and joined on a worker.

Per-cell Python work on either side of the pool is the cost to remove (docs/tuning.md), so the
unit the pool moves is a *submitted item*, not a cell. ``WorkerPool.submit`` takes either

* a joined buffer of many cells (``bytes``, ``bytearray`` or ``memoryview``); it holds
  ``len(buffer) // cell_size`` cells unless the caller gives the count, or
* a list (or tuple) of cells, one object per cell,

and appends it to the circuit's pending list as ONE entry ``(payload, cells)``:
:func:`count_cells` is the only per-submit work, and it is O(1).

On the worker, :func:`take_items` takes whole entries until the batch holds at least ``budget``
cells (a soft cap: a batch never splits an entry, so it may exceed the cap by less than one
entry), and :func:`assemble` turns them into what the process function asked for:

* ``joined=True``: one ``bytes`` buffer. A single buffer entry is passed through untouched
  (zero copy); several are joined with one ``bytes.join`` call;
* ``joined=False``: one list of cells. List entries are concatenated; a buffer entry is cut into
  equal cells (its length must be a multiple of its cell count).

The grouped path (a circuit with a ``group`` function, see :mod:`workers.worker`) uses
:func:`take_pieces` instead: it takes entries the same way and returns them as ONE flat list of
bytes-like pieces -- buffer entries as they are, list entries' cells one by one -- which the
kernel reads as their concatenation, gathering them with the GIL released. Nothing is joined
or split in Python.

These functions touch only the pending list of a circuit the calling worker owns, and locals.
"""

from __future__ import annotations

from typing import Any

BUFFER_TYPES = (bytes, bytearray, memoryview)


def count_cells(payload: Any, count: int | None, cell_size: int | None) -> int:
    """Number of cells in a submitted item; raises ValueError when it cannot be told. Any thread.

    O(1): a buffer's count is its length divided by ``cell_size`` (or ``count`` when given), a
    sequence's count is its length.
    """
    if isinstance(payload, BUFFER_TYPES):
        if count is None:
            if not cell_size:
                raise ValueError("a joined buffer needs count=, or a pool made with cell_size=")
            size = len(payload)
            count, rest = divmod(size, cell_size)
            if rest:
                raise ValueError(
                    f"a buffer of {size} bytes is not a whole number of {cell_size}-byte cells;"
                    " pass count= for cells of another size"
                )
        elif count < 0:
            raise ValueError(f"count must be >= 0, got {count}")
        return count
    if isinstance(payload, str):
        raise TypeError("cells must be bytes-like or a list of bytes-like, not str")
    if count is not None and count != len(payload):
        raise ValueError(f"count={count} but the sequence holds {len(payload)} cells")
    return len(payload)


def take_items(pending: list[tuple[Any, int]], budget: int) -> tuple[list[tuple[Any, int]], int]:
    """Remove whole entries from the front of ``pending`` until ``budget`` cells. Worker thread.

    Returns the entries in order and their total cell count. The caller owns the circuit: the
    only other thread that touches ``pending`` is the loop thread, appending at the end. The
    prefix is copied with one slice and removed with one ``del`` (each atomic under the GIL);
    entries appended in between lie past the prefix and stay for the next batch.
    """
    count = len(pending)
    cells = 0
    taken = 0
    while taken < count and cells < budget:
        cells += pending[taken][1]
        taken += 1
    items = pending[:taken]
    del pending[:taken]
    return items, cells


def take_pieces(pending: list[tuple[Any, int]], budget: int) -> tuple[list[Any], int]:
    """Like :func:`take_items`, but return the taken entries as one flat list of pieces.

    Worker thread, owning the circuit. A buffer entry is one piece; a list (or tuple) entry
    contributes its cells, in order. Returns ``(pieces, cells)``.
    """
    items, cells = take_items(pending, budget)
    pieces: list[Any] = []
    for payload, _ in items:
        if isinstance(payload, BUFFER_TYPES):
            pieces.append(payload)
        else:
            pieces.extend(payload)
    return pieces, cells


def assemble(items: list[tuple[Any, int]], joined: bool) -> Any:
    """Build the batch handed to the process function from taken entries. Worker thread."""
    if joined:
        if len(items) == 1:
            payload = items[0][0]
            if isinstance(payload, bytes):
                return payload
        return b"".join(
            payload if isinstance(payload, BUFFER_TYPES) else b"".join(payload)
            for payload, _ in items
        )
    if len(items) == 1 and type(items[0][0]) is list:
        return items[0][0]
    batch: list[Any] = []
    for payload, cells in items:
        if isinstance(payload, BUFFER_TYPES):
            batch.extend(split_cells(payload, cells))
        else:
            batch.extend(payload)
    return batch


def split_cells(buffer: bytes | bytearray | memoryview, cells: int) -> list[bytes]:
    """Cut a joined buffer into ``cells`` equal ``bytes`` cells. Any thread."""
    if cells == 0:
        return []
    size, rest = divmod(len(buffer), cells)
    if rest:
        raise ValueError(f"a buffer of {len(buffer)} bytes does not split into {cells} cells")
    data = bytes(buffer)
    return [data[i : i + size] for i in range(0, len(data), size)]
