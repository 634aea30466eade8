"""A chunk of a map's items, run as one call: the function over each item in turn.

Many tiny items sent one call each pay a round trip each; a chunk pays one for all
its items (``Executor.map``'s ``chunksize``). Each item keeps its own outcome, as a
call of its own would: its result, or its exception; one item failing fails none of
the others. An outcome is what a process worker answers for a call, ``(status,
value)`` (``process/framing.py``), so the map gives each item exactly the result or
the error :meth:`Pool.run` would have given it.

For a process or dask worker, items arrive pickled one by one, and each outcome
leaves pickled on its own: an item that does not unpickle, or a result that does
not pickle, fails that item alone. In a thread, nothing is pickled.

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
    """Called with a chunk's items, returns ``(outcomes, seconds)``: one outcome per
    item, in order, and how long the whole chunk took in the worker.

    ``__wrapped__`` is the function: what names the call in errors, logs and
    statistics, as if it ran alone (``offload._call.describe``).
    """

    __slots__ = ("__wrapped__", "pickled")

    def __init__(self, fn: Callable[[Any], Any], pickled: bool) -> None:
        self.__wrapped__ = fn
        self.pickled = pickled

    def __call__(self, items: list[Any]) -> tuple[list[Any], float]:
        begun = perf_counter()
        fn = self.__wrapped__
        if getattr(type(fn), "__offload_function__", False):
            # A decorated function travels as itself (it pickles by its name); here
            # it runs inline all the same.
            fn = fn.__wrapped__  # type: ignore[attr-defined]
        outcomes: list[Any] = []
        if not self.pickled:
            for item in items:
                outcomes.append(_run(fn, item, False))
            return outcomes, perf_counter() - begun
        for blob in items:
            try:
                item = pickle.loads(blob)
            except BaseException as exc:
                _reraise_memory_error(exc)
                outcomes.append(_dumps(_failure(BAD_REQUEST, exc)))
                continue
            outcome = _run(fn, item, True)
            del item
            outcomes.append(_encode(outcome))
            del outcome
        return outcomes, perf_counter() - begun


def _run(fn: Callable[[Any], Any], item: Any, pickled: bool) -> tuple[int, Any]:
    try:
        # A context of its own for each item, as each call has: nothing one item
        # sets is there for the next.
        return OK, contextvars.copy_context().run(fn, item)
    except BaseException as exc:
        _reraise_memory_error(exc)
        if not pickled:
            return RAISED_HERE, exc
        from .process.worker_errors import exception_reply

        return exception_reply(exc)


def _encode(outcome: tuple[int, Any]) -> bytes:
    """As a call's answer is pickled (``process/worker.py``): plain pickle, else
    cloudpickle (a lambda, an instance of a class that came by value), else the
    failure to pickle it, which fails the item."""
    try:
        return pickle.dumps(outcome, protocol=5)
    except BaseException as exc:
        _reraise_memory_error(exc)
        try:
            import cloudpickle

            return cloudpickle.dumps(outcome, protocol=5)  # type: ignore[no-any-return]
        except BaseException as again:
            _reraise_memory_error(again)
        return _dumps(_failure(BAD_RESULT, exc))


def _reraise_memory_error(exc: BaseException) -> None:
    """Out of memory, the chunk stops: its worker may have to leave (a process
    worker under ``hard_memory_limit`` does), and the rest of it would fail too."""
    if isinstance(exc, MemoryError):
        raise exc


def _failure(status: int, exc: BaseException) -> tuple[int, tuple[str, str]]:
    from .process.worker_errors import describe, traceback_of

    return status, (describe(exc), traceback_of(exc))


def _dumps(outcome: tuple[int, Any]) -> bytes:
    return pickle.dumps(outcome, protocol=5)
