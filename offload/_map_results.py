"""What ``Executor.map`` returns: the consumer's side of a map (see ``_mapping.py``).

It holds the map's state (``_Mapping``) and starts its feeder on the first result;
the state never refers back to it, so that dropping it can end the map
(``__del__``).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from time import perf_counter
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, NoReturn, TypeVar, cast

import anyio
import anyio.lowlevel

from ._chunking import ChunkSizer, Failed
from ._errors import PoolClosed
from ._mapping import _Mapping, check_count, default_max_in_flight, length_of, source_of

if TYPE_CHECKING:
    from typing_extensions import Self

    from ._executor import Executor

__all__ = ("MapResults", "map_results")

T = TypeVar("T")

# A consumer checks for its cancellation whenever it waits for a result, and between
# ready results, about this often (seconds of its own time)...
_CHECK_EVERY = 0.001
# ...taking at most this many results between two checks, and this many at first,
# before it has been timed.
_MOST_UNCHECKED = 1024
_FIRST_UNCHECKED = 32


def _threadsafe_scheduler() -> Callable[[Callable[[], object]], object]:
    """How to run a callback on this event loop from any thread, reentrantly: for a
    finalizer, which may run in another thread, or in the middle of the loop's code."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        import trio

        return trio.lowlevel.current_trio_token().run_sync_soon
    return loop.call_soon_threadsafe


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
        "_checked_at",
        "_chunksize",
        "_executor",
        "_fn",
        "_grant",
        "_granted",
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
        #: of those, how many the hot path may deliver before the next check; never
        #: a failed one
        self._unchecked = 0
        #: how many it was given at the last check: delivered by the next one, and
        #: counted then
        self._granted = 0
        #: how many results, the checked one included, a check gives at most
        self._grant = _FIRST_UNCHECKED
        #: when the last check gave its result (perf_counter)
        self._checked_at: float | None = None

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
        if self._unchecked:
            # Taken with the last result that checked for the consumer's cancellation:
            # that check, and the map's accounting, cost more than all the rest of a
            # result; this is the hot path.
            self._unchecked -= 1
            return self._ahead.popleft()  # type: ignore[no-any-return]
        outcome = await self._next()
        if type(outcome) is not Failed:
            return outcome  # type: ignore[no-any-return]
        state = self._state
        assert state is not None
        try:
            await self._fail(state, outcome)
        finally:
            del outcome  # the error's traceback holds this frame

    async def _next(self) -> Any:
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
        return await self._checked_next(state)

    async def _fail(self, state: _Mapping, failed: Failed) -> NoReturn:
        """Raise the item's error, once the rest is stopped."""
        state.over = True
        self._drop_ahead()
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
        if self._granted:
            # The hot path delivered them: room for the feeder, before this waits.
            state.delivered_some(self._granted)
        if self._checked_at is not None:
            # The consumer's time per result sets how many the next check gives: a
            # check costs more than the rest of a result, and a consumer slow to
            # take them should still see its cancellation within about _CHECK_EVERY.
            each = (perf_counter() - self._checked_at) / (self._granted + 1)
            fits = int(_CHECK_EVERY / each) if each > 0 else _MOST_UNCHECKED
            self._grant = max(1, min(fits, 2 * self._grant, _MOST_UNCHECKED))
        self._granted = 0
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
            self._drop_ahead()
            state.cancel()
            await state.wait_done()
            raise
        # A run is all values, or one failed outcome alone (see _Mapping): the
        # hot path never meets a failure.
        self._unchecked = self._granted = min(len(ahead), self._grant) - 1
        state.delivered_some(1)
        self._checked_at = perf_counter()
        return ahead.popleft()

    def _drop_ahead(self) -> None:
        self._unchecked = self._granted = 0
        self._ahead.clear()

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
        self._drop_ahead()
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


def map_results(
    executor: Callable[[], Awaitable[Executor]],
    fn: Callable[[Any], T],
    items: object,
    *,
    ordered: object,
    max_in_flight: int | None,
    chunksize: int | None,
) -> MapResults[T]:
    """What ``map`` returns, its options checked at once (``Executor.map``'s and
    ``OffloadedFunction.map``'s raises); ``executor`` gives the executor to run
    the calls with, on the first result.

    :raises TypeError: ``items`` is not iterable; an option has the wrong type
    :raises ValueError: ``max_in_flight`` or ``chunksize`` is below 1
    """
    check_count("max_in_flight", max_in_flight)
    check_count("chunksize", chunksize)
    if not isinstance(ordered, bool):
        raise TypeError(f"ordered must be a bool, not {ordered!r}")
    length = length_of(items)
    return MapResults(
        executor,
        fn,
        source_of(items),
        ordered=ordered,
        max_in_flight=max_in_flight,
        chunksize=chunksize,
        length=length,
    )
