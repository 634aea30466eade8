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

import asyncio
import itertools
import logging
import math
import operator
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from types import AsyncGeneratorType, GeneratorType, TracebackType
from typing import TYPE_CHECKING, Any, Generic, NoReturn, TypeVar, cast

import anyio
import anyio.lowlevel

from ._call import describe
from ._chunking import ChunkSizer, Failed, detached, looks_large, run_chunk
from ._errors import PoolClosed
from ._pools.chunks import ChunkRunner

if TYPE_CHECKING:
    from typing_extensions import Self

    from ._executor import Executor

__all__ = ("MapResults", "default_max_in_flight")

logger = logging.getLogger("offload")

T = TypeVar("T")

_NOTHING: Any = object()

#: results a consumer may take, once it checked for its cancellation, before it checks
#: again (it always does when it waits for one)
_UNCHECKED = 31

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


def _threadsafe_scheduler() -> Callable[[Callable[[], object]], object]:
    """How to run a callback on this event loop from any thread, reentrantly: for a
    finalizer, which may run in another thread, or in the middle of the loop's code."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        import trio

        return trio.lowlevel.current_trio_token().run_sync_soon
    return loop.call_soon_threadsafe


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
        they have not come. Each counts as delivered once the consumer has it
        (:meth:`delivered_one`)."""
        if self.over:
            return None
        if self.ordered:
            run = self.outcomes.pop(self.next_position, None)
            if run is not None:
                self.next_position += len(run)
            return run
        return self.finished.popleft() if self.finished else None

    def delivered_one(self) -> None:
        self.delivered += 1
        self._free_room()

    def _free_room(self) -> None:
        if self.room is not None:
            self.room.set()
            self.room = None

    def cancel(self) -> None:
        """Stop every call and take no more items; the consumer gets nothing more."""
        self.stopping = True
        self.over = True
        self.scope.cancel()

    async def wait_done(self) -> None:
        """Until the feeder and every call have ended, even if the caller is cancelled:
        a cancelled call ends at once (a process worker is killed, a thread abandoned)."""
        if not self.done.is_set():
            with anyio.CancelScope(shield=True):
                await self.done.wait()


class MapResults(AsyncIterator[T], Generic[T]):
    """The results of :meth:`Executor.map() <offload.Executor.map>`: an async iterator,
    and an async context manager that stops what is left on exit.

    ::

        async with ex.map(fn, items) as results:
            async for result in results:
                ...

    Nothing starts until the first ``__anext__`` (or ``async with``). See the guide,
    "Many items", for the exact semantics.
    """

    __slots__ = (
        "_ahead",
        "_chunksize",
        "_executor",
        "_fn",
        "_length",
        "_max_in_flight",
        "_ordered",
        "_schedule",
        "_source",
        "_state",
        "_unchecked",
    )

    def __init__(
        self,
        executor: Callable[[], Awaitable[Executor]],
        fn: Callable[[Any], T],
        source: Iterator[Any] | AsyncIterator[Any],
        *,
        ordered: bool,
        max_in_flight: int | None,
        chunksize: int | None = None,
        length: int | None = None,
    ) -> None:
        self._executor = executor
        self._fn = fn
        self._source = source
        self._ordered = ordered
        self._max_in_flight = max_in_flight
        self._chunksize = chunksize
        self._length = length
        self._state: _Mapping | None = None
        self._schedule: Callable[[Callable[[], object]], object] | None = None
        #: outcomes taken from the map's state, not yet delivered
        self._ahead: deque[Any] = deque()
        #: of those, how many may be delivered before the next check (_UNCHECKED)
        self._unchecked = 0

    def __repr__(self) -> str:
        state = self._state
        what = "new" if state is None else "done" if state.done.is_set() else "running"
        return f"<MapResults {what} ordered={self._ordered}>"

    async def _start(self) -> _Mapping:
        executor = await self._executor()
        offloader = executor.offloader
        pool = offloader.get_pool(executor.pool_name)  # PoolClosed before anything starts
        max_in_flight = self._max_in_flight or default_max_in_flight(
            pool.max_workers, pool.settings.max_pending
        )
        timeout = pool.settings.timeout if executor._timeout is ... else executor._timeout
        state = _Mapping(
            executor,
            self._fn,
            self._source,
            self._ordered,
            max_in_flight,
            ChunkSizer(self._chunksize, pool.max_workers, self._length),
            pickled=pool.kind != "thread",
            timeout=timeout,
        )
        task_group = offloader._task_group
        assert task_group is not None
        self._schedule = _threadsafe_scheduler()
        self._state = state
        task_group.start_soon(state.feed, name="offload-map")
        return state

    async def __anext__(self) -> T:
        ahead = self._ahead
        if ahead and self._unchecked:
            # Taken with the last result that checked for the consumer's cancellation:
            # that check costs more than all the rest of a result.
            self._unchecked -= 1
            outcome = ahead.popleft()
            state = self._state
            assert state is not None
            state.delivered += 1  # delivered_one(), inlined: this is the hot path
            if state.room is not None:
                state.delivered -= 1
                state.delivered_one()
        else:
            state = self._state
            if state is None:
                await anyio.lowlevel.checkpoint_if_cancelled()
                try:
                    state = await self._start()
                except BaseException as exc:
                    if not isinstance(exc, anyio.get_cancelled_exc_class()):
                        await anyio.lowlevel.checkpoint()
                    raise
            if state.ready is not None:
                raise RuntimeError("another task is already waiting for this map's next result")
            outcome = await self._checked_next(state)
        if type(outcome) is Failed:
            try:
                await self._fail(state, outcome)
            finally:
                del outcome  # the error's traceback holds this frame
        return outcome  # type: ignore[no-any-return]

    async def _fail(self, state: _Mapping, failed: Failed) -> NoReturn:
        """Raise the item's error, once the rest is stopped."""
        state.over = True
        self._ahead.clear()
        state.cancel()
        await state.wait_done()
        error = failed.error
        try:
            raise error
        finally:
            del error, failed

    async def _checked_next(self, state: _Mapping) -> Any:
        """The next outcome, after a check for the consumer's cancellation, waiting
        for it if it has not come."""
        ahead = self._ahead
        try:
            # As every await of anyio and trio: a consumer cancelled between results
            # stops the map here, whether results are ready or not.
            await anyio.lowlevel.checkpoint_if_cancelled()
            while not ahead:
                run = state.take_run()
                if run is not None:
                    ahead.extend(run)
                    break
                if state.done.is_set():
                    if state.over or (state.exhausted and state.delivered == state.taken):
                        raise StopAsyncIteration
                    state.over = True  # said once
                    if state.broken is not None:
                        raise state.broken
                    # The feeder was cancelled from outside: the Offloader stopped.
                    raise PoolClosed(
                        f"pool {state.executor.pool_name!r}: the Offloader stopped "
                        "before the map had its results"
                    )
                state.ready = ready = anyio.Event()
                await ready.wait()
        except StopAsyncIteration:
            raise
        except BaseException:
            ahead.clear()
            state.cancel()
            await state.wait_done()
            raise
        self._unchecked = _UNCHECKED
        state.delivered_one()
        return ahead.popleft()

    async def aclose(self) -> None:
        """Stop what is left: calls in flight are cancelled (as a cancelled
        :meth:`~offload.Executor.run` is), no more items are taken; returns once every
        call has ended. Idempotent."""
        state = self._state
        if state is None:
            # Never started: nothing runs, and nothing ever will.
            self._state = state = _Mapping(
                cast("Executor", None), self._fn, iter(()), self._ordered, 1, ChunkSizer(1, 1, 0)
            )
            state.over = True
            state.done.set()
            await anyio.lowlevel.checkpoint()
            return
        self._ahead.clear()
        state.cancel()
        await state.wait_done()

    async def __aenter__(self) -> Self:
        if self._state is None:
            await anyio.lowlevel.checkpoint_if_cancelled()
            try:
                await self._start()
            except BaseException as exc:
                if not isinstance(exc, anyio.get_cancelled_exc_class()):
                    await anyio.lowlevel.checkpoint()
                raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __del__(self) -> None:
        # Dropped while its calls run (a bare ``async for`` left by ``break``): stop
        # them. A finalizer may run in any thread, or in the middle of the loop's own
        # code: it only asks the loop to cancel, through its thread-safe entry.
        state = getattr(self, "_state", None)
        schedule = getattr(self, "_schedule", None)
        if state is None or schedule is None or state.done.is_set():
            return
        try:
            schedule(state.cancel)
        except Exception:  # the loop has closed: nothing of it runs any more
            pass
