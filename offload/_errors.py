"""Every error offload raises itself.

::

    OffloadError
    ├── OffloadTimeout (also TimeoutError)   the call's deadline passed
    ├── WorkerCrashed                        the worker running this call died
    ├── PoolOverloaded                       the pool's queue is full; refused at once
    ├── PoolClosed                           the pool is shutting down or stopped
    │   └── ClusterUnavailable (also ConnectionError)  a dask pool's cluster cannot be reached
    ├── PoolStartError                       a pool could not start
    ├── SerializationError                   arguments, function or result would not pickle
    ├── CallAborted                          the function raised SystemExit, KeyboardInterrupt...
    └── CallCancelled                        raised inside an abandoned thread call

An exception raised by the user's function is never wrapped: it reaches the caller
as its own type, with the worker's formatted traceback as ``__cause__``
(a :class:`RemoteTraceback`). The exception: a ``BaseException`` that is not an
``Exception`` arrives as :class:`CallAborted`, the original as its ``__cause__``.
"""

from __future__ import annotations

import signal
from typing import Any

__all__ = (
    "CallAborted",
    "CallCancelled",
    "ClusterUnavailable",
    "OffloadError",
    "OffloadTimeout",
    "PoolClosed",
    "PoolOverloaded",
    "PoolStartError",
    "RemoteTraceback",
    "SerializationError",
    "WorkerCrashed",
)


class OffloadError(Exception):
    """Base class of every error raised by offload itself."""


class OffloadTimeout(OffloadError, TimeoutError):
    """The call's deadline passed before it finished; the work was stopped."""


class WorkerCrashed(OffloadError):
    """The worker process running this call died (signal, ``os._exit``, out of memory).

    :ivar pid: the process id of the dead worker
    :ivar exitcode: its exit status: negative for a signal, as in :mod:`subprocess`;
        ``None`` when it could not be read
    :ivar function: the name of the function it was running (``module.qualname``), or
        of the initializer (its import string) for a worker that died while starting;
        ``None`` when unknown
    :ivar traceback: what the worker's fault handler wrote when a fatal signal
        (SIGSEGV, SIGABRT, SIGBUS, SIGFPE, SIGILL) ended it: the Python stack of each
        of its threads, most recent call first (at most 64 KiB); ``None`` when it
        wrote nothing (``os._exit``, SIGKILL) or the pool cannot tell
    """

    def __init__(
        self,
        message: str,
        *,
        pid: int | None = None,
        exitcode: int | None = None,
        function: str | None = None,
        traceback: str | None = None,
    ) -> None:
        super().__init__(message)
        self.pid = pid
        self.exitcode = exitcode
        self.function = function
        self.traceback = traceback

    def __reduce__(self) -> tuple[object, ...]:
        return (
            _rebuild_crash,
            (self.args[0], self.pid, self.exitcode, self.function, self.traceback),
        )


def _rebuild_crash(
    message: str,
    pid: int | None,
    exitcode: int | None,
    function: str | None = None,
    traceback: str | None = None,
) -> WorkerCrashed:
    return WorkerCrashed(
        message, pid=pid, exitcode=exitcode, function=function, traceback=traceback
    )


class PoolOverloaded(OffloadError):
    """The pool's pending queue is full: the call was refused without waiting."""


class PoolClosed(OffloadError):
    """The pool is shutting down or stopped and accepts no calls."""


class ClusterUnavailable(PoolClosed, ConnectionError):
    """The pool's cluster cannot be reached: its scheduler is down or the connection
    to it was lost. A call refused with it never ran; a call in flight when the
    connection was lost may have run. The pool reconnects by itself."""


class PoolStartError(OffloadError):
    """A pool could not start (its initializer failed, its workers did not come up in
    time, or it was started where it must not be)."""


class SerializationError(OffloadError):
    """The function, its arguments or its result could not be pickled or unpickled."""


class CallAborted(OffloadError):
    """The call ended with ``SystemExit``, ``KeyboardInterrupt`` or another
    ``BaseException`` that is not an ``Exception``: re-raising it would end the
    caller's program. The original is its ``__cause__``."""


class CallCancelled(OffloadError):
    """Raised by :func:`offload.check_cancelled` inside a thread whose caller gave up."""


class RemoteTraceback(Exception):
    """Carries the formatted traceback of an exception raised in a worker."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return f'\n"""\n{self.tb}"""'


#: what may have sent a SIGKILL that offload did not send
_SIGKILL_HINT = (
    " (often the kernel's out-of-memory killer: see `dmesg` or the container's OOM "
    "events; else another process)"
)


def describe_exit(exitcode: int | None, *, unexpected: bool = False) -> str:
    """Say how a process ended, naming the signal when there was one.

    ``unexpected``: offload did not stop it, so a SIGKILL comes with its likely
    senders (the out-of-memory killer first).
    """
    if exitcode is None:
        return "exit status unknown"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        hint = _SIGKILL_HINT if unexpected and name == "SIGKILL" else ""
        return f"killed by {name}{hint}"
    return f"exited with code {exitcode}"


def describe_error(exc: BaseException) -> str:
    """``TypeError: cannot pickle '_thread.lock' object``, whatever the exception's
    ``str()`` does (the user's, called on an error path: it may raise anything)."""
    try:
        message = str(exc)
    except BaseException:
        message = "<str() failed>"
    name = type(exc).__qualname__
    return f"{name}: {message}" if message else name


def unpickle(data: Any, what: str, buffers: Any = None) -> Any:
    """``pickle.loads(data)``; whatever the user's unpickling hooks raise, down to a
    ``SystemExit``, as a :class:`SerializationError` saying ``what`` "cannot be
    unpickled" (but a Ctrl-C, which is meant for this process)."""
    import pickle

    try:
        return pickle.loads(data, buffers=buffers)
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt):
            raise
        failure = SerializationError(f"{what} cannot be unpickled: {describe_error(exc)}")
        failure.__cause__ = exc.with_traceback(None)
    raise failure
