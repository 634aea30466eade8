"""What a dask pool runs on the cluster: its tasks' entry point on a worker, and the
small functions it runs on a worker or on the scheduler.

Workers unpickle :func:`invoke` by reference, so they import this module, not the
pool's: it needs only distributed and cloudpickle.
"""

from __future__ import annotations

import os
import pickle
import signal
import traceback
from typing import Any

import cloudpickle
from distributed import get_worker
from distributed.utils import sync

from ..._where import mark_worker_thread, unmark_worker_thread

__all__ = (
    "CannotLoad",
    "CannotReportStart",
    "CannotSendException",
    "allowed_failures",
    "invoke",
    "kill_this_process",
    "report_start",
)


class CannotLoad(Exception):
    """Raised on a worker that cannot unpickle a call: its function or arguments
    need a module, or a class, that the worker cannot import."""


class CannotSendException(Exception):
    """Raised on a worker in place of the function's exception when that one would not
    reach the pool: it does not pickle, or pickle cannot rebuild it (Dask would send a
    plain ``Exception`` holding its repr). Carries its type's full name, its message
    and its traceback, as text."""

    def __init__(self, type_name: str, message: str, tb: str) -> None:
        super().__init__(type_name, message, tb)
        self.type_name, self.message, self.tb = type_name, message, tb


class CannotReportStart(Exception):
    """Raised on a worker that could not tell the scheduler a task starts: the task
    does not run (were it to crash, it would be taken as never started, and run
    again)."""


def invoke(topic: str, key: str, blob: bytes, *large: Any) -> Any:
    """Run on a worker: tell the pool the call has started, unpickle it, run it.

    The call travels pickled inside the task (``blob``), so that the scheduler never
    needs the user's modules, and a worker that lacks one fails this call alone, as
    :class:`CannotLoad` (Dask would break the worker's connection instead). Its
    large arguments arrive apart (``large``, scattered), for the holes of ``blob``.
    """
    # A decorated function called in here runs inline; only while this task runs, for
    # the thread is Dask's and runs other tasks too.
    mark_worker_thread()
    try:
        try:
            report_start(topic, key)
        except Exception as exc:
            raise CannotReportStart(f"{type(exc).__name__}: {exc}") from None
        try:
            fn, npos, names, values, holes = cloudpickle.loads(blob)
        except Exception as exc:
            raise CannotLoad(f"{type(exc).__name__}: {exc}") from None
        for i, value in zip(holes, large, strict=True):
            values[i] = value
        if getattr(type(fn), "__offload_function__", False):
            fn = getattr(fn, "__wrapped__")  # noqa: B009
        try:
            return fn(*values[:npos], **dict(zip(names, values[npos:], strict=True)))
        except Exception as exc:
            if _travels(exc):
                raise
            kind = type(exc)
            stand_in = CannotSendException(
                f"{kind.__module__}.{kind.__qualname__}",
                str(exc),
                "".join(traceback.format_exception(kind, exc, exc.__traceback__)),
            )
        # Raised outside the handler: Dask pickles an exception with its __context__.
        raise stand_in
    finally:
        unmark_worker_thread()


def _travels(exc: BaseException) -> bool:
    """Whether ``exc`` and the exceptions chained to it pickle, and pickle rebuilds
    them, as Dask needs to send them to the pool. Paid only by a call that raised."""
    seen: set[int] = set()
    link: BaseException | None = exc
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        try:
            pickle.loads(cloudpickle.dumps(link))
        except Exception:
            return False
        link = link.__cause__ or link.__context__
    return True


def report_start(topic: str, key: str) -> None:
    """Log on the scheduler, and wait until it has, that the task ``key`` runs: a
    task whose worker dies without having said so never ran, and is sent again.

    Dask hands a worker more tasks than it has threads, and fails them all when it
    dies; the pool learns which of them ran from this event, which the scheduler
    sends it before it reports the worker's death (one stream, in order).
    """
    worker = get_worker()
    sync(worker.loop, worker.scheduler.log_event, topic=topic, msg=key)


async def kill_this_process() -> None:
    """Run on a worker by ``hard_cancel``: end the worker process at once. A
    coroutine function, as Dask requires of one that is run without waiting."""
    os.kill(os.getpid(), signal.SIGKILL)


def allowed_failures(dask_scheduler: Any) -> int:
    """Run on the scheduler: how often it retries a task whose worker died."""
    return int(dask_scheduler.allowed_failures)
