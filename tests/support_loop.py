"""Driving a reactor from a test until a condition holds; no tests here.

One polling loop serves every test that waits on the loop thread for something to happen:

* :func:`run_polled`: the loop itself. ``done()`` is called at once and then every ``poll``
  seconds on the loop thread; the run ends when it returns True or after ``deadline`` seconds.
  Once the run is over the poll stops rescheduling itself, so a later run of the same reactor
  is never stopped by an old condition.
* :func:`run_until`: returns ``done()`` (tests assert on it, or on what they wait for);
  nothing runs when it already holds.
* :func:`run_until_met`: fails the test (``AssertionError``) when the deadline ended the run.

The deadlines only keep a broken test from hanging; no test asserts on the time taken.
"""

from __future__ import annotations

from collections.abc import Callable

from reactor import Reactor


def run_polled(reactor: Reactor, done: Callable[[], bool], deadline: float, poll: float) -> bool:
    """Run the loop until ``done()`` (called at once, then every ``poll`` s) returns True or
    ``deadline`` seconds pass; return True if the deadline ended the run. Loop thread."""
    expired = [False]
    over = [False]

    def check() -> None:
        if over[0]:
            return
        if done():
            over[0] = True
            reactor.stop()
        else:
            reactor.call_later(poll, check)

    def give_up() -> None:
        expired[0] = True
        reactor.stop()

    stop_timer = reactor.call_later(deadline, give_up)
    reactor.call_soon(check)
    reactor.run()
    over[0] = True
    stop_timer.cancel()
    return expired[0]


def run_until(reactor: Reactor, done: Callable[[], bool], deadline: float = 20.0, *,
              poll: float = 0.002) -> bool:
    """Run the loop until ``done()`` (polled every ``poll`` s, 2 ms unless told) or ``deadline``
    seconds; return ``done()``. Does not run the loop if ``done()`` already holds. Loop
    thread."""
    if done():
        return True
    run_polled(reactor, done, deadline, poll)
    return done()


def run_until_met(reactor: Reactor, done: Callable[[], bool], timeout: float, *,
                  poll: float = 0.01) -> None:
    """Run the loop until ``done()`` (polled every ``poll`` s, 10 ms unless told); fail after
    ``timeout`` seconds. ``done()`` is called by the poll only, never once more before or after
    the run, so a ``done`` that counts its calls (as one that waits for N quiet polls does)
    sees exactly one call per poll. Loop thread."""
    expired = run_polled(reactor, done, timeout, poll)
    assert not expired, f"condition not met within {timeout} s"
