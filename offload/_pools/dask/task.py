"""What a dask pool runs on the cluster: its tasks' entry point on a worker, and the
small functions it runs on a worker or on the scheduler; the labels a call's log
records carry there.

Workers unpickle :func:`invoke` by reference, so they import this module, not the
pool's: it needs only distributed and cloudpickle.
"""

from __future__ import annotations

import contextvars
import logging
import os
import pickle
import signal
import threading
import time
import traceback
from typing import Any

import cloudpickle
from distributed import get_worker
from distributed.client import TOPIC_PREFIX_FORWARDED_LOG_RECORD
from distributed.utils import sync

from ..._context import enter, run_traced
from ..._where import mark_worker_thread, unmark_worker_thread

__all__ = (
    "Aborted",
    "CannotLoad",
    "CannotReportStart",
    "CannotSendException",
    "CannotSendResult",
    "allowed_failures",
    "begin_call",
    "end_call",
    "invoke",
    "kill_this_process",
    "load_call",
    "pickled_item",
    "pickled_result",
    "report_start",
    "stand_in_for",
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


class Aborted(Exception):
    """Raised on a worker in place of a ``BaseException`` that is not an ``Exception``
    (``SystemExit``, ``KeyboardInterrupt``, ``GeneratorExit``) raised by the function:
    as itself it would end the worker process, and with it every task running there.
    Carries its type's full name, its message, its traceback as text, and the
    original pickled if it pickles (``None`` otherwise)."""

    def __init__(self, type_name: str, message: str, tb: str, original: bytes | None) -> None:
        super().__init__(type_name, message, tb, original)
        self.type_name, self.message, self.tb, self.original = type_name, message, tb, original


class CannotSendResult(Exception):
    """Raised on a worker whose function returned what does not pickle, or whose
    pickling raised (down to a ``SystemExit``): a description and the traceback."""

    def __init__(self, description: str, tb: str) -> None:
        super().__init__(description, tb)
        self.description, self.tb = description, tb


class CannotReportStart(Exception):
    """Raised on a worker that could not tell the scheduler a task starts: the task
    does not run (were it to crash, it would be taken as never started, and run
    again)."""


def invoke(
    topic: str, key: str, blob: bytes, *large: Any, labels: tuple[str, str] | None = None
) -> tuple[bytes, list[memoryview], float]:
    """Run on a worker: tell the pool the call has started, unpickle it, run it;
    return its result pickled (its large buffers apart, out of band) and the seconds
    it ran (the pool's ``PoolStats.run_*``).

    The result is pickled here, and unpickled by the pool, rather than left to Dask:
    the user's pickling hooks may raise anything, down to a ``SystemExit``, which
    would end this worker process in Dask's hands, or the client's connection in
    the application; here and in the pool, it fails that call alone.

    The call travels pickled inside the task (``blob``), so that the scheduler never
    needs the user's modules, and a worker that lacks one fails this call alone, as
    :class:`CannotLoad` (Dask would break the worker's connection instead). Its
    large arguments arrive apart (``large``, scattered), for the holes of ``blob``.
    With ``labels``, the pool's name and the call's, each log record made while the
    call runs carries them as ``offload_pool`` and ``offload_call``.
    """
    labelled = begin_call(labels)
    try:
        fn, args, kwargs, ctx, carried = load_call(topic, key, blob, large)
        begun = time.perf_counter()
        try:
            if carried is None or carried[1] is None:
                result = ctx.run(fn, *args, **kwargs)
            else:
                result = ctx.run(run_traced, carried[1], fn, args, kwargs)
            ran = time.perf_counter() - begun
            return (*pickled_result(result), ran)
        except CannotSendResult:
            raise
        except BaseException as exc:
            stand_in = stand_in_for(exc)
            if stand_in is None:
                raise
        # Raised outside the handler: Dask pickles an exception with its __context__.
        raise stand_in
    finally:
        end_call(labelled)


def begin_call(labels: tuple[str, str] | None) -> contextvars.Token[Any] | None:
    """Before a task runs the user's code in this thread: a decorated function called
    in there runs inline; with ``labels``, the log records made meanwhile carry them.
    The token to give :func:`end_call`."""
    # Only while this task runs, for the thread is Dask's and runs other tasks too.
    mark_worker_thread()
    if labels is None:
        return None
    _label_records()
    _keep_records_sendable()
    return _labels.set(labels)


def end_call(labelled: contextvars.Token[Any] | None) -> None:
    """After a task ran the user's code (``labelled``: what :func:`begin_call` gave)."""
    if labelled is not None:
        _labels.reset(labelled)
    unmark_worker_thread()


def load_call(
    topic: str, key: str, blob: bytes, large: tuple[Any, ...]
) -> tuple[Any, tuple[Any, ...], dict[str, Any], contextvars.Context, Any]:
    """Tell the pool the call has started, then unpickle it: its function (the
    original of a decorated one), arguments, context, and what it carried."""
    try:
        report_start(topic, key)
    except Exception as exc:
        raise CannotReportStart(f"{type(exc).__name__}: {exc}") from None
    try:
        fn, npos, names, values, holes, carried = cloudpickle.loads(blob)
        # A context of its own, as a process worker's call has: Dask runs tasks
        # in a copy of its worker's, and other tasks in the same thread.
        ctx = enter(carried, contextvars.copy_context())
    except Exception as exc:
        raise CannotLoad(f"{type(exc).__name__}: {exc}") from None
    for i, value in zip(holes, large, strict=True):
        values[i] = value
    if getattr(type(fn), "__offload_function__", False):
        fn = getattr(fn, "__wrapped__")  # noqa: B009
    args, kwargs = tuple(values[:npos]), dict(zip(names, values[npos:], strict=True))
    return fn, args, kwargs, ctx, carried


def stand_in_for(exc: BaseException) -> Exception | None:
    """What is raised in place of the function's exception ``exc``, None for itself:
    see :class:`CannotSendException` and :class:`Aborted`."""
    if isinstance(exc, Exception):
        if _travels(exc):
            return None
        kind = type(exc)
        return CannotSendException(
            f"{kind.__module__}.{kind.__qualname__}", _str(exc), _format(exc)
        )
    # SystemExit and its kin, raised by the function: as themselves they would end
    # the worker process, and every task running in it.
    return _aborted(exc)


def pickled_item(item: Any) -> bytes:
    """A stream's item pickled, in band (it travels in a message through the
    scheduler), with cloudpickle what plain pickle refuses.

    :raises CannotSendResult: neither pickles it
    """
    failure = None
    try:
        return pickle.dumps(item, protocol=5)
    except BaseException:
        try:
            data: bytes = cloudpickle.dumps(item, protocol=5)
        except BaseException as exc:
            failure = CannotSendResult(_describe(exc), _format(exc))
        else:
            return data
    raise failure


def pickled_result(result: Any) -> tuple[bytes, list[memoryview]]:
    """``result`` pickled (protocol 5), its large buffers apart for Dask to send out
    of band, or with cloudpickle what plain pickle refuses (a lambda, a class from
    ``__main__``, sent by value).

    :raises CannotSendResult: neither pickles it; raised outside the handler, so that
        Dask does not pickle what failed along with it
    """
    buffers: list[pickle.PickleBuffer] = []
    failure = None
    data = b""
    try:
        data = pickle.dumps(result, protocol=5, buffer_callback=buffers.append)
    except BaseException:
        buffers.clear()
        try:
            data = cloudpickle.dumps(result, protocol=5, buffer_callback=buffers.append)
        except BaseException as exc:
            failure = CannotSendResult(_describe(exc), _format(exc))
    if failure is not None:
        raise failure
    # As memoryviews, which Dask sends as frames of their own, without a copy (it
    # cannot pickle a PickleBuffer: it does not always pickle with protocol 5).
    return data, [buffer.raw() for buffer in buffers]


def _aborted(exc: BaseException) -> Aborted:
    # Its pickling hooks and __str__ are the user's and may raise anything, down to
    # another SystemExit: what describes the exception must not.
    kind = type(exc)
    original: bytes | None = None
    try:
        blob = pickle.dumps(exc, protocol=5)
        pickle.loads(blob)  # the pool must be able to rebuild it, too
        original = blob
    except BaseException:
        pass
    return Aborted(f"{kind.__module__}.{kind.__qualname__}", _str(exc), _format(exc), original)


def _str(exc: BaseException) -> str:
    try:
        return str(exc)
    except BaseException:
        return "<str() failed>"


def _describe(exc: BaseException) -> str:
    """``TypeError: cannot pickle '_thread.lock' object``, whatever ``str()`` does."""
    message = _str(exc)
    name = type(exc).__qualname__
    return f"{name}: {message}" if message else name


def _format(exc: BaseException) -> str:
    """``exc`` with its traceback, as text; its frames alone when it cannot be shown."""
    try:
        return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    except BaseException:
        return "".join(traceback.format_tb(exc.__traceback__))


#: the pool's and the call's names, while a call that forwards its logs runs
_labels: contextvars.ContextVar[tuple[str, str] | None] = contextvars.ContextVar(
    "offload_dask_labels", default=None
)
_factory_lock = threading.Lock()
_factory_installed = False


def _label_records() -> None:
    """Make every log record of this process carry the labels of the call running in
    its thread, if any, once per process. A record factory, not a filter: a filter
    sees only the records logged on its own logger (or reaching its handler), and the
    handler that forwards them is Dask's (``Client.forward_logging``), which copies a
    record's attributes as they are."""
    global _factory_installed
    with _factory_lock:
        if _factory_installed:
            return
        previous = logging.getLogRecordFactory()

        def labelled_record(*args: Any, **kwargs: Any) -> logging.LogRecord:
            record = previous(*args, **kwargs)
            labels = _labels.get()
            if labels is not None:
                record.offload_pool, record.offload_call = labels
            return record

        logging.setLogRecordFactory(labelled_record)
        _factory_installed = True


def _travels(exc: BaseException) -> bool:
    """Whether ``exc`` and the exceptions chained to it pickle, and pickle rebuilds
    them, as Dask needs to send them to the pool. Paid only by a call that raised."""
    seen: set[int] = set()
    link: BaseException | None = exc
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        try:
            pickle.loads(cloudpickle.dumps(link))
        except BaseException:  # a pickling hook's SystemExit too: it does not travel
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


class _Sendable(logging.Filter):
    """Lets a record reach Dask's forwarding handler only once Dask can send it.

    The handler sends a record's attributes with the worker's messages, which carry
    only plain types; given anything else (``extra={"user": obj}``), it raises
    TypeError out of the ``logger.warning(...)`` call, failing the task. Such an
    attribute becomes its ``repr()`` (in this record, which the worker's other
    handlers see after this one).
    """

    #: what the handler replaces before sending: never looked at
    SKIP = frozenset({"msg", "args", "exc_info", "message"})

    def filter(self, record: logging.LogRecord) -> bool:
        attributes = record.__dict__
        for name, value in list(attributes.items()):
            if name not in self.SKIP and not _plain(value):
                try:
                    attributes[name] = repr(value)
                except BaseException:  # the user's __repr__: a SystemExit too
                    attributes[name] = f"<{type(value).__qualname__} object>"
        return True


_SENDABLE = _Sendable()


def _plain(value: object) -> bool:
    """Whether Dask sends ``value`` in a message as it is (its ``_is_dumpable``)."""
    kind = type(value)
    if value is None or kind in (str, bool, bytes, int, float):
        return True
    if kind in (list, tuple):
        return all(map(_plain, value))  # type: ignore[call-overload]
    if kind is dict:
        return all(type(k) is str and _plain(v) for k, v in value.items())  # type: ignore[attr-defined]
    return False


def _keep_records_sendable() -> None:
    """Put :class:`_Sendable` on each of Dask's forwarding handlers of the root
    logger (set up, or set up again, by ``Client.forward_logging``)."""
    for handler in logging.getLogger().handlers:
        topic = getattr(handler, "topic", None)
        if (
            isinstance(topic, str)
            and topic.startswith(TOPIC_PREFIX_FORWARDED_LOG_RECORD)
            and _SENDABLE not in handler.filters
        ):
            handler.addFilter(_SENDABLE)
