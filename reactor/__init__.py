"""relaycrypt: reactor - the loop thread (pyuv), the cross-thread reply queue, TCP streams.

``Reactor`` owns (or wraps) a ``pyuv.Loop``; ``ReplyQueue`` carries results from worker threads
to the loop thread with one wake-up per empty -> non-empty transition; ``reactor.net`` has
``listen``/``connect`` and ``Stream`` with back-pressure. See each module's docstring.
"""

from reactor.loop import Reactor, SignalHandle, TimerHandle
from reactor.net import (
    DEFAULT_HIGH_WATER,
    DEFAULT_LOW_WATER,
    CloseReason,
    Listener,
    Stream,
    StreamClosedError,
    connect,
    listen,
)
from reactor.replyqueue import ReplyQueue, ReplyQueueClosedError, ReplySink

__all__ = [
    "DEFAULT_HIGH_WATER",
    "DEFAULT_LOW_WATER",
    "CloseReason",
    "Listener",
    "Reactor",
    "ReplyQueue",
    "ReplyQueueClosedError",
    "ReplySink",
    "SignalHandle",
    "Stream",
    "StreamClosedError",
    "TimerHandle",
    "connect",
    "listen",
]
