"""``Executor.map``: one function over many items, in calls of the pool.

Who does what::

    consumer (async for / async with)        feeder task (the Offloader's task group)
    ─────────────────────────────────        ───────────────────────────────────────
    __anext__: the next outcome  <────────   takes items while there is room, and
    (ordered: by position; unordered:        queues a call for them (a chunk, or one
    as the calls end), taking a call's       item alone; see _chunking.py); callers,
    run of outcomes at once; each            tasks of its own, at most max_in_flight,
    delivered frees room  ──────────────>    make the queued calls in order and store
                                             each call's outcomes by position

Room: at most ``max_in_flight`` calls running, and their worth of items taken and not
yet delivered, so that a slow consumer, or a slow item ahead of finished ones, stops
the feeder. The feeder runs in the Offloader's task group, not the consumer's, so
that a bare ``async for`` enters no task group in one task to leave it in another
(which anyio and trio forbid); it owns a task group of its own, entered and left in
its own task, holding the callers. Cancelling the map is cancelling the feeder's
scope.
"""

from __future__ import annotations

import itertools
import logging
import math
import operator
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from types import AsyncGeneratorType, GeneratorType
from typing import TYPE_CHECKING, Any, TypeVar, cast

import anyio
import anyio.lowlevel

from ._call import describe
from ._chunking import ChunkSizer, Failed, detached, looks_large, run_chunk
from ._pools.chunks import ChunkRunner

if TYPE_CHECKING:
    from ._executor import Executor

__all__ = ("check_count", "default_max_in_flight", "length_of", "source_of")

logger = logging.getLogger("offload")

T = TypeVar("T")

_NOTHING: Any = object()


#: items never large: not worth asking
_SMALL = frozenset({int, float, bool, type(None), complex})


def default_max_in_flight(max_workers: int, max_pending: int) -> int:
    """Every worker busy, and a few calls queued behind them so that a worker that
    finishes finds its next item waiting; never more than the pool would queue, so
    that a map alone never meets :class:`~offload.PoolOverloaded`."""
    return max_workers + min(max_pending, max(2, max_workers // 2))


def check_count(name: str, value: object) -> None:
    """For ``max_in_flight`` and ``chunksize``: None, or an int >= 1."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= 1 or None, not {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be an int >= 1 or None, not {value!r}")


def length_of(items: object) -> int | None:
    """How many items there are, if the iterable says (a list, a range); else None."""
    if hasattr(type(items), "__aiter__"):
        return None
    try:
        length = operator.length_hint(items, -1)
    except Exception:  # a __length_hint__ of the user's that fails
        return None
    return length if length >= 0 else None


def source_of(items: object) -> Iterator[Any] | AsyncIterator[Any]:
    """The iterator ``map`` takes items from; ``aiter`` first, as ``async for`` would.

    :raises TypeError: ``items`` is neither iterable nor async iterable
    """
    if hasattr(type(items), "__aiter__"):
        return aiter(items)  # type: ignore[arg-type]
    try:
        return iter(items)  # type: ignore[call-overload,no-any-return]
    except TypeError:
        raise TypeError(
            f"items must be an iterable or an async iterable, not {type(items).__name__}"
        ) from None


class _Mapping:
    """The state the feeder, the calls and the consumer share. Never refers to the
    :class:`MapResults` the consumer holds, so that dropping that one can end this."""

    def __init__(
        self,
        executor: Executor,
        fn: Callable[[Any], Any],
        source: Iterator[Any] | AsyncIterator[Any],
        ordered: bool,
        max_in_flight: int,
        sizer: ChunkSizer,
        pickled: bool = False,
        timeout: float | None = None,
    ) -> None:
        self.executor = executor
        self.fn = fn
        self.source: Iterator[Any] | AsyncIterator[Any] | None = source
        self.ordered = ordered
        self.max_in_flight = max_in_flight  # calls; a chunk is one
        self.sizer = sizer
        self.runner = ChunkRunner(fn, pickled)
        self.probes = min(sizer.workers, max_in_flight)
        self.timeout = timeout  # per item, for a chunk's deadline
        self.name = describe(fn)
        self.is_async = isinstance(source, AsyncIterator)
        # Outcomes (values or Failed) in runs: a call's outcomes come together, and
        # are stored and taken as one list, not one by one (a failed one alone).
        self.outcomes: dict[int, list[Any]] = {}  # ordered: first position -> run
        self.finished: deque[list[Any]] = deque()  # unordered: in the order they came
        self.next_position = 0  # ordered: the next to deliver
        self.taken = 0  # items taken from the source
        self.running = 0  # calls started and not yet over
        self.delivered = 0  # outcomes handed to the consumer
        self.failed_at = math.inf  # position of the first error (ordered), if any
        self.stopping = False  # take no more items
        self.over = False  # the consumer has had the last outcome it will get (an error)
        self.broken: Exception | None = None  # the feeder itself failed
        self.exhausted = False  # the source has no more items
        self.done = anyio.Event()  # the feeder and every call have ended
        self.ready: anyio.Event | None = None  # the consumer waits for an outcome
        self.room: anyio.Event | None = None  # the feeder waits for a slot
        self.scope = anyio.CancelScope()
        self.calls: dict[int, anyio.CancelScope] = {}  # running, by first position
        # Calls queued for the callers: (first position, items or item, alone).
        self.queue: deque[tuple[int, Any, bool]] = deque()
        self.callers = 0  # tasks making the calls (at most max_in_flight)
        self.idle = 0  # of them, waiting for a call
        self.work: anyio.Event | None = None  # the idle callers wait for one
        self.fed = False  # the feeder takes no more items

    # -- the feeder and its calls, in the Offloader's task group -----------------

    async def feed(self) -> None:
        try:
            with self.scope:
                async with anyio.create_task_group() as tg:
                    try:
                        await self._take_items(tg)
                    finally:
                        self.fed = True  # the callers leave once the queue is empty
                        self._wake_callers()
        except Exception as exc:
            # A fault of offload's own: it goes to the consumer, never into the
            # Offloader's task group, which it would bring down with every pool.
            logger.exception("map: the feeder failed")
            self.broken = exc
        finally:
            self.stopping = True
            await self._close_source()
            self.done.set()
            self._wake_consumer()

    async def _take_items(self, tg: anyio.abc.TaskGroup) -> None:
        source = self.source
        assert source is not None
        sizer = self.sizer
        checked = 0  # items taken by the last checkpoint
        position = 0  # of the next item taken
        while not self.stopping:
            size = sizer.size()
            # At most max_in_flight calls running, and their worth of items out (taken,
            # not yet delivered): a slow consumer stops the items too.
            # Until the first chunk is measured, a call of one item per worker: more
            # of them would only hold slots the measured chunks could have.
            if (
                self.running >= (self.probes if sizer.unmeasured else self.max_in_flight)
                or self.taken - self.delivered + size > self.max_in_flight * size
            ):
                self.room = room = anyio.Event()
                await room.wait()
                continue
            chunk, failure = await self._take(source, size)
            self.taken += len(chunk) + (failure is not None)
            for first, work, alone in self._calls_for(chunk, position, size):
                self._start(tg, first, work, alone)
            position += len(chunk)
            if failure is not None:
                # The iterable itself failed: an error at the position it did not
                # fill, which counts as taken.
                self._store(position, Failed(failure))
                return
            if self.exhausted:
                return
            if self.taken - checked >= 64:
                # A source that never blocks, with calls that finish at once: let
                # the rest of the loop run now and then.
                checked = self.taken
                await anyio.lowlevel.checkpoint()

    async def _take(
        self, source: Iterator[Any] | AsyncIterator[Any], size: int
    ) -> tuple[list[Any], BaseException | None]:
        """Up to ``size`` items, and the error of the iterable's, if it raised."""
        chunk: list[Any] = []
        if not self.is_async:
            try:
                # ``extend`` keeps what it took before an error of the iterable's.
                chunk.extend(itertools.islice(cast("Iterator[Any]", source), size))
            except BaseException as exc:
                return chunk, detached(exc)
            if len(chunk) < size:
                self.exhausted = True
            return chunk, None
        while len(chunk) < size:
            try:
                chunk.append(await anext(cast("AsyncIterator[Any]", source)))
            except StopAsyncIteration:
                self.exhausted = True
                break
            except anyio.get_cancelled_exc_class():
                raise
            except BaseException as exc:
                return chunk, detached(exc)
        return chunk, None

    def _calls_for(
        self, chunk: list[Any], first: int, size: int
    ) -> Iterator[tuple[int, Any, bool]]:
        """The calls for items taken together: ``(position, items or item, alone)``.
        An item alone is a plain call, as ``run`` makes it: with ``chunksize=1``, and
        when chosen automatically, an item of a pool that pickles that is (or whose
        results are) large."""
        sizer = self.sizer
        if not chunk:
            return
        if not sizer.auto and size == 1:
            yield first, chunk[0], True
            return
        if not self.runner.pickled or not sizer.auto:
            yield first, chunk, False
            return
        if sizer.large:
            for position, item in enumerate(chunk, first):
                yield position, item, True
            return
        start = 0
        for index, item in enumerate(chunk):
            if type(item) not in _SMALL and looks_large(item):
                if index > start:
                    yield first + start, chunk[start:index], False
                yield first + index, item, True
                start = index + 1
        if start < len(chunk):
            yield first + start, chunk[start:] if start else chunk, False

    def _start(self, tg: anyio.abc.TaskGroup, first: int, work: Any, alone: bool) -> None:
        """Queue a call for the callers; one more caller if none is idle. Calls reach
        the pool in the items' order: a caller takes the queue's first and puts it in
        the pool's queue (first come, first served) before it next suspends."""
        self.running += 1
        self.queue.append((first, work, alone))
        if self.idle:
            self._wake_callers()
        elif self.callers < self.max_in_flight:
            self.callers += 1
            tg.start_soon(self._caller)

    def _wake_callers(self) -> None:
        if self.work is not None:
            self.work.set()
            self.work = None

    async def _caller(self) -> None:
        """Makes the queued calls one after the other: a task for many calls, rather
        than one per call (a task costs more than the rest of a call's bookkeeping)."""
        queue = self.queue
        while True:
            if queue:
                await self._call(*queue.popleft())
            elif self.fed:
                return
            else:
                if self.work is None:
                    self.work = anyio.Event()
                work = self.work
                self.idle += 1
                try:
                    await work.wait()
                finally:
                    self.idle -= 1

    async def _call(self, first: int, work: Any, alone: bool) -> None:
        with anyio.CancelScope() as scope:
            self.calls[first] = scope
            try:
                if alone:
                    outcomes, failed = [await self.executor.run(self.fn, work)], False
                else:
                    outcomes, failed = await run_chunk(
                        self.executor,
                        self.runner,
                        work,
                        first,
                        self.timeout,
                        self.sizer,
                        self.name,
                    )
            except anyio.get_cancelled_exc_class():
                raise
            except BaseException as exc:
                outcomes, failed = [Failed(detached(exc))] * (1 if alone else len(work)), True
            finally:
                del self.calls[first]
                self.running -= 1
                self._free_room()
            del work
            if failed:
                for position, outcome in enumerate(outcomes, first):
                    self._store(position, outcome)
            else:
                self._store_all(first, outcomes)

    def _store_all(self, first: int, outcomes: list[Any]) -> None:
        """:meth:`_store` for a call's outcomes, none of them failed: at once."""
        if self.ordered:
            if first > self.failed_at:
                return
            self.outcomes[first] = outcomes
            if first == self.next_position:
                self._wake_consumer()
        else:
            self.finished.append(outcomes)
            self._wake_consumer()

    def _store(self, position: int, outcome: Any) -> None:
        failed = type(outcome) is Failed
        if self.ordered:
            if position > self.failed_at:
                return  # after the first error: never delivered
            self.outcomes[position] = [outcome]
            if failed:
                # Items after it will never be delivered: stop them, take no more.
                self.failed_at = position
                self._stop(lambda p: p > position)
            if position == self.next_position:
                self._wake_consumer()
        else:
            if self.stopping and failed:
                return  # a second error, or one of a call being stopped
            self.finished.append([outcome])
            if failed:
                self._stop(lambda p: True)
            self._wake_consumer()

    def _stop(self, which: Callable[[int], bool]) -> None:
        self.stopping = True
        for position, scope in list(self.calls.items()):
            if which(position):
                scope.cancel()
        # Queued calls of those positions never start.
        kept = [call for call in self.queue if not which(call[0])]
        self.running -= len(self.queue) - len(kept)
        self.queue.clear()
        self.queue.extend(kept)
        if self.room is not None:
            self.room.set()

    async def _close_source(self) -> None:
        """Close a generator the map stopped taking items from before its end, as a
        ``for`` loop's ``aclosing`` would: its ``finally`` runs now, in this task."""
        source, self.source = self.source, None
        if self.exhausted or source is None:
            return
        # Generators only: another iterator's close() may end more than the iteration
        # (a file's closes the file).
        try:
            if isinstance(source, AsyncGeneratorType):
                with anyio.CancelScope(shield=True):
                    await source.aclose()
            elif isinstance(source, GeneratorType):
                source.close()
        except Exception:
            logger.warning("map: closing the items' iterator failed", exc_info=True)

    def _wake_consumer(self) -> None:
        if self.ready is not None:
            self.ready.set()
            self.ready = None

    # -- the consumer --------------------------------------------------------------

    def take_run(self) -> list[Any] | None:
        """The next outcomes to deliver, in order (a failed one alone), or None if
        they have not come. They count as delivered once the consumer has them
        (:meth:`delivered_some`)."""
        if self.over:
            return None
        if self.ordered:
            run = self.outcomes.pop(self.next_position, None)
            if run is not None:
                self.next_position += len(run)
            return run
        return self.finished.popleft() if self.finished else None

    def delivered_some(self, count: int) -> None:
        self.delivered += count
        self._free_room()

    def _free_room(self) -> None:
        if self.room is not None:
            self.room.set()
            self.room = None

    def cancel(self) -> None:
        """Stop every call and take no more items; the consumer gets nothing more."""
        self.stopping = True
        self.over = True
        if not self.done.is_set():
            # Not once it is all over: anyio's cancel() formats the current task's
            # repr (asyncio), most of what ending a finished map cost.
            self.scope.cancel()

    async def wait_done(self) -> None:
        """Until the feeder and every call have ended, even if the caller is cancelled:
        a cancelled call ends at once (a process worker is killed, a thread abandoned)."""
        if not self.done.is_set():
            with anyio.CancelScope(shield=True):
                await self.done.wait()
