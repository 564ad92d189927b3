"""File-descriptor budget (tor's ConnLimit) and the idle/stuck rules for OR links.

What tor does
-------------
* **Descriptors** (``set_max_file_descriptors`` in ``src/lib/process/restrict.c``,
  ``tor_open_socket_with_extensions`` / ``tor_accept_socket_with_extensions`` in
  ``src/lib/net/socket.c``, ``src/app/config/config.c``): at start tor refuses to run when
  ``RLIMIT_NOFILE``'s hard limit is below ``ConnLimit`` (default 1000; at least 32), raises the
  soft limit to the hard one, and keeps ``ULIMIT_BUFFER`` = 32 descriptors for logs and files:
  ``max_sockets = soft limit - 32``. Every socket it would open or accept is refused (EMFILE)
  while ``open sockets >= max_sockets - 1``. Its out-of-sockets handler starts at
  ``ConnLimit_high_thresh = max_sockets - min(max_sockets / 20, 64)`` and aims for
  ``ConnLimit_low_thresh = 3/4 max_sockets``, but is off by default (``DisableOOSCheck 1``).
* **Idle OR links** (``run_connection_housekeeping`` in ``src/core/mainloop/mainloop.c``, once
  a second per link; ``channelpadding_get_channel_idle_timeout`` in
  ``src/core/or/channelpadding.c``): a link whose handshake has not finished
  ``KeepalivePeriod`` (300 s) after its last write is closed; a link with no circuits is
  closed once it has had none for its idle timeout, drawn once per link: 180 + rand(90) s
  (3-4.5 min) for a client link (the peer did not authenticate as a relay) or a
  non-canonical one, ``3/4 T + rand(T/2)`` with ``T = nf_conntimeout_relays`` (consensus,
  default 3600 s, 60 s to 1 week; so 45-75 min) for a canonical relay-to-relay link; a link
  that has neither emptied its output buffer nor been able to write for ``10 x
  KeepalivePeriod`` is closed as stuck; otherwise, ``KeepalivePeriod`` after the last write
  with nothing buffered, a PADDING cell is sent.

What we add: a ceiling for exit streams. tor lets any socket take the last descriptors, so a
flood of exit streams can leave no descriptor for a new OR link. Here exit streams may only
open below tor's out-of-sockets high threshold, so at least ``min(max_sockets / 20, 64)``
descriptors stay for links; refusals carry a reason to log, so nothing is starved silently.
The caller counts its open sockets (links, exit streams, listeners).

Threads: :class:`FdBudget`, :func:`channel_idle_timeout` and :func:`link_housekeeping` are any
thread (pure); :func:`raise_nofile_limit` changes the process's limit: call it once at start,
from the main thread.
"""

from __future__ import annotations

import random
import resource
from dataclasses import dataclass
from enum import Enum

__all__ = [
    "CONN_LIMIT_DEFAULT",
    "KEEPALIVE_PERIOD",
    "NF_CONNTIMEOUT_RELAYS_DEFAULT",
    "ULIMIT_BUFFER",
    "ConnLimitError",
    "FdBudget",
    "LinkAction",
    "LinkVerdict",
    "channel_idle_timeout",
    "link_housekeeping",
    "raise_nofile_limit",
]

ULIMIT_BUFFER = 32
CONN_LIMIT_DEFAULT = 1000
KEEPALIVE_PERIOD = 300
CONNTIMEOUT_CLIENTS_BASE = 180
NF_CONNTIMEOUT_RELAYS_DEFAULT = 60 * 60
NF_CONNTIMEOUT_RELAYS_MIN = 60
NF_CONNTIMEOUT_RELAYS_MAX = 7 * 24 * 60 * 60
_OOS_RESERVE_MAX = 64


class ConnLimitError(RuntimeError):
    """tor would refuse to start: the descriptor limit is below ConnLimit."""


def raise_nofile_limit() -> int:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard limit, as tor does at start; returns the
    soft limit in force afterwards (unchanged if the kernel refuses). Main thread, once."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


@dataclass(frozen=True, slots=True)
class FdBudget:
    """How many sockets may be open: ``max_sockets`` (the soft limit less 32)."""

    max_sockets: int

    @classmethod
    def from_rlimit(cls, conn_limit: int = CONN_LIMIT_DEFAULT, soft: int | None = None,
                    hard: int | None = None) -> FdBudget:
        """The budget for the current ``RLIMIT_NOFILE`` (or the ``soft``/``hard`` given).

        Raises :class:`ConnLimitError` when ``conn_limit`` is below 32 or above the hard limit
        (tor refuses to start). Any thread (reads the limit)."""
        if soft is None or hard is None:
            got_soft, got_hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            soft = got_soft if soft is None else soft
            hard = got_hard if hard is None else hard
        if conn_limit < ULIMIT_BUFFER:
            raise ConnLimitError(f"ConnLimit must be at least {ULIMIT_BUFFER}")
        if hard != resource.RLIM_INFINITY and hard < conn_limit:
            raise ConnLimitError(f"we need {conn_limit} file descriptors (ConnLimit) and are "
                                 f"limited to {hard}: raise ulimit -n")
        soft = min(soft if soft != resource.RLIM_INFINITY else 2**31 - 1, 2**31 - 1)
        return cls(max(soft - ULIMIT_BUFFER, 0))

    @property
    def high_threshold(self) -> int:
        """tor's ``ConnLimit_high_thresh``: ``max_sockets - min(max_sockets / 20, 64)``."""
        return self.max_sockets - min(self.max_sockets // 20, _OOS_RESERVE_MAX)

    @property
    def low_threshold(self) -> int:
        """tor's ``ConnLimit_low_thresh``: three quarters of ``max_sockets``."""
        return (self.max_sockets // 4) * 3

    def may_open_link(self, open_sockets: int) -> str | None:
        """None when a link may be accepted or dialed with ``open_sockets`` open, else why not
        (tor's EMFILE rule). Any thread (pure)."""
        if open_sockets >= self.max_sockets - 1:
            return (f"{open_sockets} sockets open, the limit is {self.max_sockets} "
                    f"(RLIMIT_NOFILE less {ULIMIT_BUFFER})")
        return None

    def may_open_exit_stream(self, open_sockets: int) -> str | None:
        """None when an exit stream may connect with ``open_sockets`` open, else why not:
        streams stop at the high threshold so that links keep a reserve. Any thread (pure)."""
        if open_sockets >= self.high_threshold:
            return (f"{open_sockets} sockets open: exit streams stop at {self.high_threshold} "
                    f"to keep {self.max_sockets - self.high_threshold} for relay links")
        return None


def channel_idle_timeout(rng: random.Random, *, client_or_noncanonical: bool,
                         nf_conntimeout_relays: int = NF_CONNTIMEOUT_RELAYS_DEFAULT) -> int:
    """One link's idle timeout in seconds, drawn once when the link opens, as tor does.

    Any thread (uses ``rng``)."""
    if client_or_noncanonical:
        return CONNTIMEOUT_CLIENTS_BASE + rng.randrange(CONNTIMEOUT_CLIENTS_BASE // 2)
    t = min(max(nf_conntimeout_relays, NF_CONNTIMEOUT_RELAYS_MIN), NF_CONNTIMEOUT_RELAYS_MAX)
    return 3 * t // 4 + rng.randrange(t // 2)


class LinkAction(Enum):
    """What the once-a-second housekeeping does with one OR link."""

    KEEP = "keep"
    SEND_KEEPALIVE = "keepalive"  # send a PADDING cell
    CLOSE = "close"


@dataclass(frozen=True, slots=True)
class LinkVerdict:
    """``action`` and, for CLOSE, why (tor's log words)."""

    action: LinkAction
    why: str = ""


def link_housekeeping(now: float, *, is_open: bool, circuits: int, last_had_circuits: float,
                      idle_timeout: float, last_write: float, last_empty: float,
                      outbuf_len: int, keepalive_period: int = KEEPALIVE_PERIOD) -> LinkVerdict:
    """tor's rule for one OR link, run once a second (``run_connection_housekeeping``).

    ``last_had_circuits`` is when the link last carried a circuit (its open time before the
    first); ``last_write`` when it last could write; ``last_empty`` when its output buffer
    was last empty; ``idle_timeout`` from :func:`channel_idle_timeout`.
    Any thread (pure)."""
    past_keepalive = now >= last_write + keepalive_period
    if not is_open:
        if past_keepalive:
            return LinkVerdict(LinkAction.CLOSE, "expiring non-open OR connection")
        return LinkVerdict(LinkAction.KEEP)
    if circuits == 0 and now - idle_timeout >= last_had_circuits:
        return LinkVerdict(LinkAction.CLOSE, f"expiring non-used OR connection [no circuits "
                           f"for {int(now - last_had_circuits)}; timeout {int(idle_timeout)}]")
    if (now >= last_empty + keepalive_period * 10
            and now >= last_write + keepalive_period * 10):
        return LinkVerdict(LinkAction.CLOSE, f"expiring stuck OR connection ({outbuf_len} "
                           f"bytes to flush; {int(now - last_write)} seconds since last write)")
    if past_keepalive and outbuf_len == 0:
        return LinkVerdict(LinkAction.SEND_KEEPALIVE)
    return LinkVerdict(LinkAction.KEEP)
