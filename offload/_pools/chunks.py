"""A chunk of a map's items, run as one call: the function over each item in turn.

Many tiny items sent one call each pay a round trip each; a chunk pays one for all
its items (``Executor.map``'s ``chunksize``). Each item keeps its own outcome, as a
call of its own would: its result, or its exception; one item failing fails none of
the others. An outcome is what a process worker answers for a call, ``(status,
value)`` (``process/framing.py``), so the map gives each item exactly the result or
the error :meth:`Pool.run` would have given it.

For a process or dask worker, items and results travel pickled (see
:class:`ChunkRunner`): an item that does not unpickle, or a result that does not
pickle, fails that item alone. In a thread, nothing is pickled.

Runs in worker processes, in threads and on Dask workers: no typing, no anyio.
"""

from __future__ import annotations

import contextvars
import pickle
from time import perf_counter

TYPE_CHECKING = False  # not typing's: workers import this module
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

__all__ = ("ChunkRunner",)

# Statuses of process/framing.py, which a worker process has imported already; here
# as numbers, so that a thread pool's chunk imports nothing of the process kind.
OK = 0
BAD_REQUEST = 3
BAD_RESULT = 4
#: in a thread: the exception itself, never pickled
RAISED_HERE = -1


class ChunkRunner:
    """Called with a chunk's items, returns ``(values, failures, seconds)``: a value
    per item, in order (``None`` where it failed), the failed items' outcomes by
    index, and how long the items took to run, their pickles aside (which
    ``ChunkSizer`` counts in the call's fixed cost: one item's run, taken with them,
    would look as costly as a chunk's pickles).

    In a thread, ``items`` is the list itself, and a failure is the exception
    (``(RAISED_HERE, exc)``). Pickled, ``items`` is the list pickled whole, and a
    failure is ``(status, value)`` as a process worker answers a call. If the whole
    list does not unpickle here, the answer is ``(None, (description, traceback),
    seconds)``: nothing ran, and the parent sends the items again pickled one by one
    (``items`` a list of pickles), so that only those that do not unpickle fail. The
    values go back pickled together (``bytes``), or, if that fails, one by one (a
    list of pickles; plain pickle, else cloudpickle), so that only those that do not
    pickle fail.

    ``__wrapped__`` is the function: what names the call in errors, logs and
    statistics, as if it ran alone (``offload._call.describe``).
    """

    __slots__ = ("__wrapped__", "pickled")

    def __init__(self, fn: Callable[[Any], Any], pickled: bool) -> None:
        self.__wrapped__ = fn
        self.pickled = pickled

    def __call__(self, items: Any) -> tuple[Any, Any, float]:
        fn = self.__wrapped__
        if getattr(type(fn), "__offload_function__", False):
            # A decorated function travels as itself (it pickles by its name); here
            # it runs inline all the same.
            fn = fn.__wrapped__  # type: ignore[attr-defined]
        failures: dict[int, tuple[int, Any]] = {}
        if not self.pickled:
            begun = perf_counter()
            values = _run_all(fn, items, failures, False)
            return values, failures, perf_counter() - begun
        if type(items) is bytes:
            try:
                loaded = pickle.loads(items)
            except BaseException as exc:
                _reraise_memory_error(exc)
                from .process.worker_errors import describe, traceback_of

                return None, (describe(exc), traceback_of(exc)), 0.0
        else:
            loaded = []
            for index, blob in enumerate(items):
                try:
                    loaded.append(pickle.loads(blob))
                except BaseException as exc:
                    _reraise_memory_error(exc)
                    loaded.append(None)
                    failures[index] = _failure(BAD_REQUEST, exc)
        del items
        begun = perf_counter()
        values = _run_all(fn, loaded, failures, True)
        ran = perf_counter() - begun
        del loaded
        try:
            # All at once: a pickle per value costs five times as much.
            return pickle.dumps(values, protocol=5), failures, ran
        except BaseException as exc:
            _reraise_memory_error(exc)
        blobs = [_pickled_alone(index, value, failures) for index, value in enumerate(values)]
        return blobs, failures, ran


def _run_all(
    fn: Callable[[Any], Any], items: list[Any], failures: dict[int, Any], pickled: bool
) -> list[Any]:
    values: list[Any] = []
    append = values.append
    copy_context = contextvars.copy_context
    for index, item in enumerate(items):
        if failures and index in failures:
            append(None)  # it did not unpickle
            continue
        try:
            # A context of its own for each item, as each call has: nothing one item
            # sets is there for the next.
            append(copy_context().run(fn, item))
        except BaseException as exc:
            _reraise_memory_error(exc)
            append(None)
            if pickled:
                from .process.worker_errors import exception_reply

                failures[index] = exception_reply(exc)
            else:
                # Without this frame in its traceback, whose locals hold it: no cycle.
                failures[index] = (RAISED_HERE, exc.with_traceback(_past_this(exc)))
    return values


def _past_this(exc: BaseException) -> Any:
    tb = exc.__traceback__
    return tb.tb_next if tb is not None else None


def _pickled_alone(index: int, value: Any, failures: dict[int, Any]) -> bytes:
    """As a call's answer is pickled (``process/worker.py``): plain pickle, else
    cloudpickle (a lambda, an instance of a class that came by value), else the
    item fails."""
    if index in failures:
        return b""
    try:
        return pickle.dumps(value, protocol=5)
    except BaseException as exc:
        _reraise_memory_error(exc)
        try:
            import cloudpickle

            return cloudpickle.dumps(value, protocol=5)  # type: ignore[no-any-return]
        except BaseException as again:
            _reraise_memory_error(again)
        failures[index] = _failure(BAD_RESULT, exc)
        return b""


def _reraise_memory_error(exc: BaseException) -> None:
    """Out of memory, the chunk stops: its worker may have to leave (a process
    worker under ``hard_memory_limit`` does), and the rest of it would fail too."""
    if isinstance(exc, MemoryError):
        raise exc


def _failure(status: int, exc: BaseException) -> tuple[int, tuple[str, str]]:
    from .process.worker_errors import describe, traceback_of

    return status, (describe(exc), traceback_of(exc))
