"""The handler that sends a worker's log records to the parent (see ``worker_logs.py``).

Loaded in a worker once forwarding is on, with ``logging``; like the other modules a
worker loads, it imports neither typing nor anyio.
"""

from __future__ import annotations

import logging
import pickle
import socket
import sys
import threading

from .framing import HEADER, log_frame
from .sending import first_batch, remaining, send_parts

TYPE_CHECKING = False  # not typing's: see offload/__init__.py
if TYPE_CHECKING:
    from typing import Any

    from .buffers import Buffer

__all__ = ("Forwarder",)

#: a send that fails rather than waits for room in the channel
_DONTWAIT = getattr(socket, "MSG_DONTWAIT", 0)
#: types of a record's attribute values that travel as they are; others as repr()
_PLAIN = frozenset((str, int, float, bool, type(None)))
#: attributes rendered before they travel: the message and its arguments, the exception
_RENDERED = frozenset(("msg", "args", "exc_info", "exc_text"))
#: loggers whose threshold is remembered, at most (names can be made up on the fly)
_THRESHOLDS = 10_000
#: bytes of LOG frames that may wait in the worker for room in the channel; past
#: them, a record is dropped
BACKLOG = 1 << 20


class Forwarder(logging.Handler):
    """The handler on the worker's root logger that sends records to the parent.

    ``in_call``: a call (or the initializer) is running; set by the main thread, and
    read under ``sending`` by whichever thread sends, so that no record goes after
    the reply. ``dropped``: records not sent since the last reply.

    A frame the channel has no room for waits in the backlog (up to :data:`BACKLOG`
    bytes), sent before the next one; the rest of the backlog goes before the reply.
    """

    def __init__(self, sock: socket.socket, levels: tuple[int, int, dict[str, int]]) -> None:
        super().__init__()
        self.sock = sock
        self.in_call = False
        self.dropped = 0
        # Held while a frame goes to the channel, never while user code runs: no
        # RLock needed (Handler.lock is one, a little slower to take on every call).
        self.sending = threading.Lock()
        self._unsent: list[Buffer] = []  # the backlog: frames, the first maybe in part
        self._backlog = 0  # its bytes
        self._named: dict[str, int] = {}
        self._root = logging.WARNING
        self._disable = 0
        self._thresholds: dict[str, int] = {}
        self.set_levels(levels)

    def set_levels(self, levels: tuple[int, int, dict[str, int]]) -> None:
        """Give the worker's loggers the parent's levels: a record below them is not
        even made (``Logger.isEnabledFor``)."""
        root_level, disable, named = levels
        loggers = logging.root.manager.loggerDict
        for name in self._named.keys() - named.keys():
            logger = loggers.get(name)
            if isinstance(logger, logging.Logger):
                logger.level = logging.NOTSET
        for name, level in named.items():
            logging.getLogger(name).level = level
        self._named, self._root, self._disable = named, root_level, disable
        self._thresholds = {}
        logging.root.setLevel(root_level)  # clears the loggers' caches
        logging.disable(disable)

    def _threshold(self, name: str) -> int:
        """The least level the parent handles for logger ``name``, from its levels:
        a logger given a level in the worker alone may make records it would not."""
        named = self._named
        level = named.get(name, 0)
        prefix = name
        while not level and "." in prefix:
            prefix = prefix.rpartition(".")[0]
            level = named.get(prefix, 0)
        threshold = max(level or self._root, self._disable + 1)
        if len(self._thresholds) < _THRESHOLDS:
            self._thresholds[name] = threshold
        return threshold

    def handle(self, record: logging.LogRecord) -> bool:
        if not self.in_call:
            self._outside_a_call(record)
            return False
        try:
            threshold = self._thresholds.get(record.name)
            if threshold is None:
                threshold = self._threshold(record.name)
            if record.levelno < threshold:
                return False
            data: bytes | None = _render(record)
        except BaseException:  # a MemoryError, say: that record alone is lost
            data = None
        with self.sending:
            in_call: bool = self.in_call  # read again: the call may have ended
            if in_call and (data is None or not self._send(data)):
                self.dropped += 1
        if not in_call:  # the call ended meanwhile
            self._outside_a_call(record)
        return in_call

    def emit(self, record: logging.LogRecord) -> None:  # handle() does it all
        self.handle(record)

    def _send(self, data: bytes) -> bool:
        """Send a LOG frame, or keep it in the backlog, without waiting for room in
        the channel; whether it will go."""
        frame = log_frame(data)
        size = HEADER.size + len(data)
        sent = 0
        try:
            if self._unsent:
                self._send_backlog()
            if not self._unsent:
                sent = self.sock.sendmsg(frame, (), _DONTWAIT)
                if sent == size:
                    return True
        except BlockingIOError:
            pass  # no room
        except OSError:
            return False  # the parent is gone
        if sent == 0 and self._backlog + size > BACKLOG:
            return False
        # Sent in part, the rest must go before anything else: the stream holds.
        self._unsent += remaining(frame, sent)
        self._backlog += size - sent
        return True

    def _send_backlog(self) -> None:
        sent = self.sock.sendmsg(first_batch(self._unsent), (), _DONTWAIT)
        self._unsent = remaining(self._unsent, sent)
        self._backlog -= sent

    def end(self) -> None:
        """The call is over (``in_call`` was set at its start): no record goes after
        this. What is left of the backlog, and the count of records dropped, go now
        (blocking), before the reply."""
        self.in_call = False
        # A thread that takes the lock from now on sees in_call False and sends
        # nothing; one that holds it may be writing a frame: wait until it is done.
        if self.sending.locked():
            with self.sending:
                pass
        if self._unsent or self.dropped:
            self._flush()

    def _flush(self) -> None:
        try:
            if self._unsent:
                send_parts(self.sock, self._unsent)
            if self.dropped:
                send_parts(self.sock, log_frame(pickle.dumps(self.dropped, protocol=5)))
        except OSError:
            pass  # the parent is gone: the reply fails as well, and says so
        finally:
            self._unsent = []
            self._backlog = self.dropped = 0

    def forked(self) -> None:
        """In a process the function forked: the channel is not its own (it is
        /dev/null there); its records stay in it, as outside a call."""
        self.in_call = False
        self.sending = threading.Lock()  # another thread may have held it
        self._unsent = []
        self._backlog = 0

    def _outside_a_call(self, record: logging.LogRecord) -> None:
        """What logging does without this handler: hand the record to its last
        resort (stderr) when no other handler is found for it."""
        last_resort = logging.lastResort
        if last_resort is None or record.levelno < last_resort.level:
            return
        logger: logging.Logger | None = logging.getLogger(record.name)
        while logger is not None:
            if any(handler is not self for handler in logger.handlers):
                return
            logger = logger.parent if logger.propagate else None
        last_resort.handle(record)


def _render(record: logging.LogRecord) -> bytes:
    """The record as a pickle of plain values: its message rendered, its exception
    formatted, its other attributes as they are or as their repr(). Whatever the
    user's objects do meanwhile, a pickle, with a note of what failed."""
    state: dict[str, Any] = {}
    for key, value in list(record.__dict__.items()):
        if key not in _RENDERED:
            state[key] = value if type(value) in _PLAIN else _repr(value)
    try:
        message = record.getMessage()
    except BaseException as exc:
        message = (
            f"{_str(record.msg)} [offload: the arguments {_repr(record.args)} could not "
            f"be rendered into the message: {_describe(exc)}]"
        )
    state["msg"] = message
    state["args"] = None
    exc_text = record.exc_text
    if not exc_text and record.exc_info:
        exc_text = _format_exception(record.exc_info)
    state["exc_text"] = exc_text if type(exc_text) is str else None
    state["exc_info"] = None
    return pickle.dumps(state, protocol=5)


def _format_exception(exc_info: Any) -> str:
    import traceback

    try:
        if exc_info is True:
            exc_info = sys.exc_info()
        elif isinstance(exc_info, BaseException):
            exc_info = (type(exc_info), exc_info, exc_info.__traceback__)
        text = "".join(traceback.format_exception(*exc_info))
    except BaseException as exc:
        return f"[offload: the exception could not be formatted: {_describe(exc)}]"
    return text[:-1] if text.endswith("\n") else text  # as logging's Formatter does


# The user's hooks (__str__, __repr__) may raise anything: what renders a record must not.


def _repr(value: object) -> str:
    try:
        return repr(value)
    except BaseException:
        try:
            return f"<{type(value).__qualname__} object: repr() failed>"
        except BaseException:
            return "<repr() failed>"


def _str(value: object) -> str:
    try:
        return str(value)
    except BaseException:
        return _repr(value)


def _describe(exc: BaseException) -> str:
    try:
        name = type(exc).__qualname__
    except BaseException:
        name = "exception"
    message = _str(exc)
    return f"{name}: {message}" if message else name
