"""The parent's side of log forwarding: worker records handled by this process's logging.

A worker sends the records its calls make as LOG frames (``worker_logs.py``), before
the call's reply; :meth:`WorkerHandle.recv <.worker_handle.WorkerHandle.recv>` hands
each to :meth:`LogSink.handle` as it arrives, in the caller's task: the record is
rebuilt, marked with the pool (``offload_pool``) and the call (``offload_call``), and
handled by the logger of its name, as if the call had run here.

Which records a worker sends depends on this process's levels at call time: the levels
set on loggers here (and ``logging.disable``) travel to a worker in a LOG frame before
a call, or with a stream's credit for one more item (``streams.py``), when they
changed since it last got them. A change is seen at the cost of a dict lookup per
call: logging clears every logger's ``_cache`` on ``setLevel``, ``disable`` and
configuration, and :func:`current_levels` keeps a mark there.
"""

from __future__ import annotations

import logging
import pickle
from typing import TYPE_CHECKING, Any

from .framing import log_frame

if TYPE_CHECKING:
    from ..._call import Call
    from ..._stats import Counters
    from .buffers import Buffer

__all__ = ("Levels", "LogSink", "current_levels")

logger = logging.getLogger("offload")

#: the mark in the root logger's cache: gone when logging cleared it (a level changed)
_MARK = object()
#: the root logger and its cache (``_clear_cache`` empties it, never replaces it), or
#: None where logging has no such cache: the levels are then read on every call
_root = logging.root
_root_cache: dict[Any, Any] | None = getattr(_root, "_cache", None)


class Levels:
    """This process's logger levels, as a LOG frame for a worker: ``(root level,
    logging.disable's level, {logger name: level})``, the loggers with a level of their
    own. A worker's handle keeps the one it was sent (compared by identity)."""

    __slots__ = ("frame", "state")

    def __init__(self, state: tuple[int, int, dict[str, int]]) -> None:
        self.state = state
        self.frame: list[Buffer] = log_frame(pickle.dumps(state, protocol=5))


def _read_levels() -> tuple[int, int, dict[str, int]]:
    root = logging.root
    named = {
        name: each.level
        for name, each in list(root.manager.loggerDict.items())
        if isinstance(each, logging.Logger) and each.level
    }
    return root.level, root.manager.disable, named


_current = Levels(_read_levels())


def current_levels() -> Levels:
    """This process's levels now: the same object until one of them changes."""
    global _current, _root, _root_cache
    if _root_cache is not None and _MARK in _root_cache and logging.root is _root:
        return _current
    if logging.root is not _root:  # replaced: watch the new one
        _root = logging.root
        _root_cache = getattr(_root, "_cache", None)
    if _root_cache is not None:
        _root_cache[_MARK] = True  # first: a change made while reading clears it again
    state = _read_levels()
    if state != _current.state:
        _current = Levels(state)
    return _current


class LogSink:
    """Where a pool's workers' LOG frames go: records to this process's loggers, counts
    of records dropped to the pool's counters."""

    __slots__ = ("_counters", "_failed", "_initializer", "_pool")

    def __init__(self, pool: str, initializer: str | None, counters: Counters) -> None:
        self._pool = pool
        self._initializer = initializer
        self._counters = counters
        self._failed = False

    def handle(self, data: Buffer, call: Call | None) -> None:
        """Handle one LOG frame's pickle from a worker running ``call`` (None: its
        initializer). Never raises: a record that fails is lost, alone."""
        try:
            state = pickle.loads(data)
        except Exception:
            self._counters.logs_dropped += 1
            return
        if type(state) is int:
            self._counters.logs_dropped += state
            return
        try:
            record = logging.makeLogRecord(state)
            record.offload_pool = self._pool
            record.offload_call = self._initializer if call is None else call.name
            target = logging.getLogger(record.name)
            # Its level here decides, as for a call made here: the worker's loggers
            # may have levels of their own.
            if target.isEnabledFor(record.levelno):
                target.handle(record)
        except Exception as exc:  # a handler that raises: the call goes on
            self._handler_failed(exc)

    def _handler_failed(self, exc: Exception) -> None:
        if self._failed:
            return
        self._failed = True  # once per pool: the handler would fail again
        try:
            logger.warning(
                "pool %r: a log record from a worker could not be handled, and is lost "
                "(%s: %s); others may be too, and are not reported",
                self._pool,
                type(exc).__qualname__,
                exc,
            )
        except Exception:
            pass
