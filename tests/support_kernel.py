"""A background thread that keeps the C kernel busy, for the kernel's threading tests; no tests.

:class:`Runner` calls ``work()`` (a big kernel call, or a ``crypt_group`` of them) over and over
until told to stop, so the test thread can observe what happens while a call is inside the
kernel (the GIL released, a state's in-use guard). It gives up after :data:`MAX_CALLS` calls,
so no test can hang on it: the tests bound their loops by the runner's progress, not the clock.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

MAX_CALLS = 50  # a background thread gives up after this many big calls: no test can hang


class Runner(threading.Thread):
    """Calls ``work()`` until told to stop (or MAX_CALLS); counts the exceptions in a group
    call's result list (``failed_jobs``) and keeps one that escaped ``work()`` (``error``)."""

    def __init__(self, work: Callable[[], object]) -> None:
        super().__init__(daemon=True)
        self.work = work
        self.stop = threading.Event()
        self.calls = 0
        self.failed_jobs = 0  # exception instances among a group call's results
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.stop.is_set() and self.calls < MAX_CALLS:
                result = self.work()
                if isinstance(result, list):
                    self.failed_jobs += sum(isinstance(r, BaseException) for r in result)
                self.calls += 1
        except BaseException as exc:  # reported to the test thread
            self.error = exc
