"""Name resolution on the loop thread: ``resolve(reactor, host, on_done)`` without blocking it.

libuv runs ``getaddrinfo`` on its own thread pool and calls back on the loop thread;
:func:`resolve` turns the result into plain address strings, first-seen order, without
duplicates (one per family and address: getaddrinfo lists each once per socket type), and
calls ``on_done(addresses, None)`` or ``on_done([], error)`` exactly once, also when the lookup
outlasts ``timeout`` (libuv cannot cancel a lookup that has started; its late answer is
dropped). An address literal is answered at once without a lookup.

Threads: loop thread only; the callback runs on the loop thread.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING

import pyuv

from reactor.uverrors import describe

if TYPE_CHECKING:
    from reactor.loop import Reactor

__all__ = ["ResolveDone", "resolve"]

ResolveDone = Callable[[list[str], str | None], object]
"""``on_done(addresses, error)``: the addresses found (IPv4 first as getaddrinfo orders them),
or ``[]`` and why not."""


def resolve(reactor: Reactor, host: str, on_done: ResolveDone, *, timeout: float = 10.0) -> None:
    """Look ``host`` up; ``on_done`` follows once, on the loop thread. Loop thread only."""
    reactor.check_loop_thread("resolve()")
    try:
        literal = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        literal = None
    if literal is not None:
        reactor.call_soon(on_done, [str(literal)], None)
        return
    state = {"done": False}

    def finish(addresses: list[str], error: str | None) -> None:
        if state["done"]:
            return
        state["done"] = True
        timer.cancel()
        on_done(addresses, error)

    def answered(result: list[object] | None, errorno: int | None) -> None:
        if errorno is not None or not result:
            finish([], describe(errorno) if errorno is not None else "no address")
            return
        seen: dict[str, None] = {}
        for entry in result:
            family, sockaddr = entry[0], entry[4]  # type: ignore[index]
            if family in (socket.AF_INET, socket.AF_INET6):
                seen.setdefault(str(sockaddr[0]).split("%")[0], None)
        finish(list(seen), None if seen else "no IPv4 or IPv6 address")

    timer = reactor.call_later(timeout, finish, [], f"lookup of {host!r} timed out")
    try:
        pyuv.dns.getaddrinfo(reactor.loop, host, 0, callback=answered)
    except (pyuv.error.UVError, TypeError, ValueError) as exc:
        reactor.call_soon(finish, [], f"lookup of {host!r} failed: {exc}")
