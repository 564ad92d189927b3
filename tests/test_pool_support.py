"""Helpers shared by the worker-pool tests (no tests here).

``Collector`` stands in for ``reactor.ReplyQueue``: workers ``put`` from their threads, and the
test thread plays the loop thread, handing replies to ``WorkerPool.deliver`` in put order.
``OrderedState`` is a crypto-like stream state: its output for a cell depends on every cell
before it, so a reordered, lost or duplicated cell changes the bytes. ``OwnerGuard`` fails
loudly (records a violation) if two workers are ever inside one circuit at once.
"""

from __future__ import annotations

import hashlib
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

from workers.circuit import Circuit
from workers.pool import WorkerPool

CELL = 509


class Collector:
    """A thread-safe reply sink with the ``put`` of ``reactor.ReplyQueue``."""

    def __init__(self) -> None:
        self._items: deque[Any] = deque()
        self._cond = threading.Condition()
        self.puts = 0

    def put(self, item: Any) -> bool:
        """Any thread."""
        with self._cond:
            was_empty = not self._items
            self._items.append(item)
            self.puts += 1
            self._cond.notify()
        return was_empty

    def take(self, wait: float) -> list[Any]:
        """Everything put so far, waiting up to ``wait`` s for something. Test (loop) thread."""
        with self._cond:
            if not self._items:
                self._cond.wait(wait)
            items = list(self._items)
            self._items.clear()
        return items

    def pump(self, pool: WorkerPool, until: Callable[[], bool], limit: float = 10.0) -> None:
        """Deliver replies on this thread until ``until()``; fail if it never comes. Loop thread.

        ``limit`` only guards against a hang (a failing test); nothing asserts on time.
        """
        waited = 0.0
        while not until():
            items = self.take(0.05)
            if not items:
                waited += 0.05
                stats = pool.stats()
                if stats["threads"] and not stats["alive_threads"]:
                    raise AssertionError(f"pump: every worker thread is dead; stats={stats}")
                if waited > limit:
                    raise AssertionError(f"pump: condition not reached; stats={pool.stats()}")
                continue
            waited = 0.0
            for item in items:
                pool.deliver(item)

    def deliver_all(self, pool: WorkerPool) -> int:
        """Deliver what is already there, without waiting. Loop thread."""
        items = self.take(0)
        for item in items:
            pool.deliver(item)
        return len(items)


class OwnerGuard:
    """Records a violation when two threads are inside one circuit's process call at once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._inside: dict[int, int] = {}
        self.violations: list[str] = []
        self.entries = 0

    def enter(self, key: int) -> None:
        """Worker thread."""
        me = threading.get_ident()
        with self._lock:
            self.entries += 1
            other = self._inside.get(key)
            if other is not None:
                self.violations.append(f"circuit {key}: thread {me} entered while {other} inside")
            self._inside[key] = me

    def leave(self, key: int) -> None:
        """Worker thread."""
        with self._lock:
            self._inside.pop(key, None)


class OrderedState:
    """A per-circuit, per-direction stream: each output cell chains a hash over all before it."""

    def __init__(self, key: int, directions: int = 2) -> None:
        self.key = key
        self.chains = [hashlib.sha1(b"%d:%d" % (key, d)) for d in range(directions)]

    def crypt_list(self, direction: int, cells: list[bytes]) -> list[bytes]:
        """Owner thread only."""
        chain = self.chains[direction]
        out = []
        for cell in cells:
            chain.update(cell)
            out.append(chain.digest())
        return out


def expected_stream(key: int, direction: int, cells: list[bytes]) -> list[bytes]:
    """What ``OrderedState.crypt_list`` yields for these cells sent in this order."""
    return OrderedState(key).crypt_list(direction, cells)


def cell(tag: int, index: int) -> bytes:
    """A distinct 509-byte cell."""
    head = b"%d/%d;" % (tag, index)
    return head + bytes(CELL - len(head))


def bare_circuit(cls: int, context: Any = None) -> Circuit:
    """A one-direction circuit of priority class ``cls`` outside any pool, for run-queue tests."""
    return Circuit(
        None,
        lambda s, d, b: b,
        lambda c, d, r: None,
        None,
        None,
        lanes=1,
        priority=cls,
        joined=False,
        high_water=10,
        low_water=5,
        context=context,
    )
