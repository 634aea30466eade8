"""How ``Executor.map`` groups items into chunks, and what travels for one.

A call costs a fixed price on top of its work: the round trip to a process worker
(tens of microseconds), a Dask task (a millisecond or more), the loop's wake-ups for
a thread. For items whose work is smaller than that, one call per item spends most
of the time on the price; a chunk of items in one call pays it once.

How many (``chunksize=None``): :class:`ChunkSizer` measures each chunk, its latency
in the parent and how long it ran in the worker, and picks the next chunk's size so
that the fixed price is at most ``OVERHEAD_SHARE`` of the work::

    price  = the smallest (latency - ran) seen: the call's fixed cost
    work   = ran / items over the recent chunks: one item's cost in the worker
    size   = price / (OVERHEAD_SHARE * work), within the limits below

The first call of a map is a chunk of one item: the first measurement. Limits: at most
``MAX_ITEMS`` items, ``MAX_SECONDS`` of work (results keep coming, and a slow chunk
does not leave the other workers idle at the end), ``MAX_BYTES`` of pickled items and
results; and, when the number of items is known, a quarter of each worker's share,
as the standard library's documentation advises for ``chunksize``. Items or results
of ``LARGE`` bytes or more are not batched: each such item is a call of its own,
which takes the pool's ways of moving large buffers (out of band, across memory)
that a chunk's pickles would not.

A chunk's deadline is the per-item ``timeout`` times its number of items.
"""

from __future__ import annotations

import copy
import math
import os
import pickle
import time
from typing import TYPE_CHECKING, Any, cast

import anyio

from ._errors import CallAborted, OffloadTimeout, SerializationError, describe_error, unpickle
from ._pools.chunks import RAISED_HERE, ChunkRunner

if TYPE_CHECKING:
    from ._call import Call
    from ._executor import Executor

__all__ = ("ChunkSizer", "Failed", "detached", "looks_large", "run_chunk")

#: the fixed cost of a call may be at most this share of a chunk's work
OVERHEAD_SHARE = 0.05
MAX_ITEMS = 4096
MAX_SECONDS = 0.05
MAX_BYTES = 1 << 20
#: an item (or result) this large, pickled, goes alone
LARGE = 1 << 16


class Failed:
    """An item's call raised: its exception, to raise at its position."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error


def detached(exc: BaseException) -> BaseException:
    """``exc`` without offload's own frames at the head of its traceback: only the
    frames of the code that raised it (a thread's function, an iterable).

    A frame in a traceback keeps its caller's frame alive (``f_back``), with the
    locals that caller ends with; the map's frames end holding the outcomes, hence
    ``exc``: a cycle only the GC would free, once per failed item. The user's frames
    keep their callers too, which are a worker thread's, done with the error.
    """
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename.startswith(_OURS):
        tb = tb.tb_next
    return exc.with_traceback(tb)


_OURS = os.path.dirname(os.path.abspath(__file__)) + os.sep


async def run_chunk(
    executor: Executor,
    runner: ChunkRunner,
    items: list[Any],
    first: int,
    per_item: float | None,
    sizer: ChunkSizer,
    name: str,
) -> tuple[list[Any], bool]:
    """Run ``items`` as one call: the outcome of each item, in order (its result, or
    :class:`Failed`), and whether any failed. When the call as a whole fails (a
    crash, the deadline, the pool closing), every item fails, each with an error of
    its own that says it was in this chunk. An item that does not pickle fails at
    its position, and the chunk ends before it: no item after it is delivered (the
    map stops at its first error).
    """
    count = len(items)
    payload: Any = items
    refused: BaseException | None = None
    if runner.pickled:
        payload, refused = _encode(items, first, name)
        count = len(items) if refused is None else len(payload)
        if not count:
            assert refused is not None
            return [Failed(refused)], True
    if per_item is not None:
        executor = executor.options(timeout=per_item * count)
    started = time.perf_counter()
    try:
        values, failures, ran = await executor.run(runner, payload)
        if values is None:
            # The list did not unpickle in the worker, and nothing ran: again, each
            # item apart, so that only those to blame fail.
            payload = [_dumps(item, first + i, name) for i, item in enumerate(items[:count])]
            values, failures, ran = await executor.run(runner, payload)
    except anyio.get_cancelled_exc_class():
        raise
    except BaseException as exc:
        return _chunk_failed(exc, first, count, per_item, name), True
    latency = time.perf_counter() - started
    nbytes = 0
    if runner.pickled:
        sent = len(payload) if type(payload) is bytes else sum(map(len, payload))
        nbytes = sent + (len(values) if type(values) is bytes else sum(map(len, values)))
    sizer.measured(count, latency, ran, nbytes)
    each_pickled = runner.pickled
    if type(values) is bytes:
        try:
            values = unpickle(values, f"the results of {name}")
        except SerializationError as exc:
            # Which result is to blame, this side cannot tell: every item fails,
            # each with an error of its own (see _chunk_failed).
            return _chunk_failed(exc, first, count, None, name), True
        each_pickled = False
    outcomes, failed = _decode(values, failures, each_pickled, runner.pickled, name)
    if refused is not None:
        outcomes.append(Failed(refused))
    return outcomes, failed or refused is not None


def _chunk_failed(
    error: BaseException, first: int, count: int, timeout: float | None, name: str
) -> list[Any]:
    error = detached(error)
    last = first + count - 1
    where = f"a chunk of {count} items ({first} to {last})"
    if isinstance(error, OffloadTimeout) and timeout is not None:
        message = (
            f"{name}: {where} did not finish within {timeout * count:g} s ({timeout:g} s per item)"
        )
        return [Failed(_caused(OffloadTimeout(message), error)) for _ in range(count)]
    errors = [error, *(_copy(error) for _ in range(count - 1))]
    if hasattr(error, "add_note"):  # Python 3.11+
        for position, own in enumerate(errors, first):
            if own is not error or position == first:  # a copy that failed: noted once
                own.add_note(f"item {position} was in {where}, which failed as a whole")
    return [Failed(own) for own in errors]


def _caused(error: BaseException, cause: BaseException) -> BaseException:
    error.__cause__ = cause
    return error


def _copy(error: BaseException) -> BaseException:
    """Another instance of ``error``, for another item, with notes of its own."""
    try:
        own = copy.copy(error)
    except Exception:
        return error
    own.__cause__ = error.__cause__
    # A dict of its own: copy.copy may share the original's (tblib's reducer for
    # exceptions, which importing distributed installs, does), and notes live there.
    own.__dict__ = dict(error.__dict__)
    notes = getattr(error, "__notes__", None)
    if isinstance(notes, list):
        own.__notes__ = list(notes)
    return own


class ChunkSizer:
    """How many items the next call of a map takes."""

    __slots__ = (
        "_bytes",
        "_items",
        "_ran",
        "bytes_per_item",
        "fixed",
        "price",
        "share",
        "work",
        "workers",
    )

    def __init__(self, fixed: int | None, workers: int, length: int | None) -> None:
        self.fixed = fixed
        self.workers = max(1, workers)
        #: when the iterable says how many items it has: a chunk's most, so that each
        #: worker gets a few (as the standard library's docs advise for map)
        self.share = None if length is None else max(1, math.ceil(length / (4 * workers)))
        self.price = math.inf
        self.work = 0.0  # seconds per item in the worker
        self.bytes_per_item = 0.0  # pickled, items and results
        self._items = self._ran = self._bytes = 0.0  # decayed sums behind them

    @property
    def auto(self) -> bool:
        return self.fixed is None

    @property
    def unmeasured(self) -> bool:
        """Chosen automatically, and nothing measured yet."""
        return self.fixed is None and self.price == math.inf

    @property
    def large(self) -> bool:
        """Items (or their results) are large, chosen automatically: each goes alone,
        as a call of its own."""
        return self.fixed is None and self.bytes_per_item >= LARGE

    def size(self) -> int:
        if self.fixed is not None:
            return self.fixed
        if self.price == math.inf:
            return 1  # nothing measured yet
        if self.bytes_per_item >= LARGE:
            return 1
        work = max(self.work, 1e-7)
        size = min(
            self.price / (OVERHEAD_SHARE * work),
            MAX_ITEMS,
            MAX_SECONDS / work,
            MAX_BYTES / max(self.bytes_per_item, 1.0),
        )
        if self.share is not None:
            size = min(size, self.share)
        return max(1, round(size))

    def measured(self, items: int, latency: float, ran: float, nbytes: int) -> None:
        """A chunk of ``items`` came back after ``latency`` seconds, having run for
        ``ran`` in its worker, its items and outcomes ``nbytes`` pickled."""
        self.price = min(self.price, max(0.0, latency - ran))
        # Per item, over the recent chunks, each weighing as many items as it had:
        # a chunk of a thousand outweighs the probe of one (whose time is mostly
        # the chunk's own cost), and older chunks count for less and less.
        self._items = self._items / 2 + items
        self._ran = self._ran / 2 + ran
        self._bytes = self._bytes / 2 + nbytes
        self.work = self._ran / self._items
        self.bytes_per_item = self._bytes / self._items


def looks_large(item: object) -> bool:
    """Whether ``item`` is a large buffer at first sight (bytes, an array), which a
    chunk would copy through pickles: it goes alone, unpickled here."""
    if isinstance(item, (bytes, bytearray, memoryview)):
        return len(item) >= LARGE
    nbytes = getattr(type(item), "nbytes", None)
    if nbytes is None:
        return False
    try:
        return int(item.nbytes) >= LARGE  # type: ignore[attr-defined]
    except Exception:
        return False


def _encode(items: list[Any], first: int, name: str) -> tuple[Any, BaseException | None]:
    """The chunk's items pickled whole, as a call's arguments are (plain pickle, else
    cloudpickle: a lambda, a class of ``__main__``); or, if they do not pickle, each
    apart up to the first that does not, and its error.
    """
    try:
        blob = pickle.dumps(items, protocol=5)
        if b"__main__" not in blob:  # a worker's __main__ is not this one
            return blob, None
    except BaseException as exc:
        _reraise_interrupt(exc)
    try:
        import cloudpickle

        return cloudpickle.dumps(items, protocol=5), None
    except BaseException as exc:
        _reraise_interrupt(exc)
    blobs = []
    for i, item in enumerate(items):
        try:
            blobs.append(_dumps(item, first + i, name))
        except SerializationError as exc:
            return blobs, exc
    return blobs, None  # pickled apart, though not together: so be it


def _dumps(item: object, position: int, name: str) -> bytes:
    """One item pickled, as :func:`_encode` pickles them all.

    :raises SerializationError: it does not pickle
    """
    try:
        blob = pickle.dumps(item, protocol=5)
        if b"__main__" not in blob:
            return blob
    except BaseException as exc:
        _reraise_interrupt(exc)
    try:
        import cloudpickle

        return cloudpickle.dumps(item, protocol=5)  # type: ignore[no-any-return]
    except BaseException as exc:
        _reraise_interrupt(exc)
        raise SerializationError(
            f"item {position} of the map of {name} cannot be pickled: {describe_error(exc)}"
        ) from exc


class _Named:
    """What ``call_encoding.outcome`` reads of a call: its name (and it notes ``ran``)."""

    __slots__ = ("name", "ran")

    def __init__(self, name: str) -> None:
        self.name = name
        self.ran: float | None = None


def _decode(
    values: list[Any], failures: dict[int, Any], each_pickled: bool, pickled: bool, name: str
) -> tuple[list[Any], bool]:
    """Each item's result from a chunk's answer (see ``ChunkRunner``), or
    :class:`Failed` with the exception :meth:`Pool.run` would have raised for it;
    and whether any failed. ``each_pickled``: each value is still a pickle;
    ``pickled``: the chunk ran in another process (its failures are as its answers)."""
    if not failures:
        if not each_pickled:
            return values, False
        try:
            return list(map(pickle.loads, values)), False
        except BaseException as exc:
            _reraise_interrupt(exc)  # then one by one: only the culprit fails
    outcomes: list[Any] = []
    for index, value in enumerate(values):
        failure = failures.get(index)
        if failure is not None:
            try:
                _raise(failure, pickled, name)
            except BaseException as exc:
                _reraise_interrupt(exc)
                outcomes.append(Failed(detached(exc)))
        elif not each_pickled:
            outcomes.append(value)
        else:
            try:
                outcomes.append(unpickle(value, f"the result of {name}"))
            except SerializationError as exc:
                outcomes.append(Failed(exc.with_traceback(None)))
    # A thread's exceptions: the frames they came through (the worker thread's) hold
    # this dict, which must not hold them any longer (see ``detached``).
    failures.clear()
    return outcomes, any(type(outcome) is Failed for outcome in outcomes)


def _raise(failure: tuple[int, Any], pickled: bool, name: str) -> None:
    status, value = failure
    if not pickled:
        assert status == RAISED_HERE
        try:
            if not isinstance(value, Exception):
                raise CallAborted(
                    f"{name} raised {type(value).__qualname__}; it is not re-raised as "
                    "such, which would end this program"
                ) from value
            raise value
        finally:
            del value  # its traceback holds this frame
    from ._pools.process.call_encoding import outcome

    outcome(cast("Call", _Named(name)), failure)


def _reraise_interrupt(exc: BaseException) -> None:
    # The user's pickling hooks may raise anything, down to SystemExit: it fails the
    # item. Not a Ctrl-C, which is meant for this process.
    if isinstance(exc, KeyboardInterrupt):
        raise exc
