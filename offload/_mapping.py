"""``Executor.map``: one function over many items, each item a call of the pool.

Who does what::

    consumer (async for / async with)          feeder task (the Offloader's task group)
    ─────────────────────────────────          ───────────────────────────────────────
    __anext__: take the next outcome  <──────  takes an item when a slot is free,
    (ordered: the item's position;             starts its call as a child task;
    unordered: the first to finish);           each call stores its outcome
    delivering one frees a slot ──────────>    (value or exception) by position

A slot is taken when an item is taken from the iterable and freed when its outcome is
delivered, so calls in flight plus results waiting for the consumer never exceed
``max_in_flight``: a slow consumer, or a slow item ahead of finished ones, stops the
feeder. The feeder runs in the Offloader's task group, not the consumer's, so that a
bare ``async for`` enters no task group in one task to leave it in another (which
anyio and trio forbid); it owns a task group of its own, entered and left in its own
task, holding the calls. Cancelling the map is cancelling the feeder's scope.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from types import AsyncGeneratorType, GeneratorType, TracebackType
from typing import TYPE_CHECKING, Any, Generic, TypeVar, cast

import anyio
import anyio.lowlevel

from ._errors import PoolClosed

if TYPE_CHECKING:
    from typing_extensions import Self

    from ._executor import Executor

__all__ = ("MapResults", "default_max_in_flight")

logger = logging.getLogger("offload")

T = TypeVar("T")

_NOTHING: Any = object()


class _Failed:
    """An item's call raised: its exception, to raise at its position."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error


def default_max_in_flight(max_workers: int, max_pending: int) -> int:
    """Every worker busy, and a few calls queued behind them so that a worker that
    finishes finds its next item waiting; never more than the pool would queue, so
    that a map alone never meets :class:`~offload.PoolOverloaded`."""
    return max_workers + min(max_pending, max(2, max_workers // 2))


def check_max_in_flight(max_in_flight: object) -> None:
    if max_in_flight is None:
        return
    if isinstance(max_in_flight, bool) or not isinstance(max_in_flight, int):
        raise TypeError(f"max_in_flight must be an int >= 1 or None, not {max_in_flight!r}")
    if max_in_flight < 1:
        raise ValueError(f"max_in_flight must be an int >= 1 or None, not {max_in_flight!r}")


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
    ) -> None:
        self.executor = executor
        self.fn = fn
        self.source: Iterator[Any] | AsyncIterator[Any] | None = source
        self.ordered = ordered
        self.max_in_flight = max_in_flight
        self.outcomes: dict[int, Any] = {}  # ordered: position -> value or _Failed
        self.finished: deque[Any] = deque()  # unordered: in the order they finished
        self.next_position = 0  # ordered: the next to deliver
        self.taken = 0  # items taken from the source
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
        self.calls: dict[int, anyio.CancelScope] = {}

    # -- the feeder and its calls, in the Offloader's task group -----------------

    async def feed(self) -> None:
        try:
            with self.scope:
                async with anyio.create_task_group() as tg:
                    await self._take_items(tg)
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
        position = 0
        previous: anyio.Event | None = None
        while not self.stopping:
            if self.taken - self.delivered >= self.max_in_flight:
                self.room = room = anyio.Event()
                await room.wait()
                continue
            try:
                if isinstance(source, AsyncIterator):
                    item = await anext(source)
                else:
                    item = next(source)
            except (StopIteration, StopAsyncIteration):
                self.exhausted = True
                return
            except anyio.get_cancelled_exc_class():
                raise
            except BaseException as exc:
                # The iterable itself failed: an error at the position it did not fill.
                self.taken += 1
                self._store(position, _Failed(exc))
                return
            self.taken += 1
            turn = anyio.Event()
            tg.start_soon(self._call, position, item, previous, turn)
            previous = turn
            position += 1
            if position % 64 == 0:
                # A source that never blocks, with calls that finish at once: let
                # the rest of the loop run now and then.
                await anyio.lowlevel.checkpoint()

    async def _call(
        self, position: int, item: Any, previous: anyio.Event | None, turn: anyio.Event
    ) -> None:
        with anyio.CancelScope() as scope:
            self.calls[position] = scope
            try:
                # Calls reach the pool in the items' order, though trio starts new
                # tasks in an order of its own: a pool's queue is first come, first
                # served, and an item must not wait behind those after it. The call
                # is in the pool's queue by its first suspension, so the next item's
                # task, woken now, runs only once it is.
                if previous is not None and not previous.is_set():
                    await previous.wait()
                turn.set()
                outcome = await self.executor.run(self.fn, item)
            except anyio.get_cancelled_exc_class():
                raise
            except BaseException as exc:
                outcome = _Failed(exc)
            finally:
                turn.set()  # cancelled while waiting: the next item's turn all the same
                del self.calls[position]
            self._store(position, outcome)

    def _store(self, position: int, outcome: Any) -> None:
        failed = type(outcome) is _Failed
        if self.ordered:
            if position > self.failed_at:
                return  # after the first error: never delivered
            self.outcomes[position] = outcome
            if failed:
                # Items after it will never be delivered: stop them, take no more.
                self.failed_at = position
                self._stop(lambda p: p > position)
            if position == self.next_position:
                self._wake_consumer()
        else:
            if self.stopping and failed:
                return  # a second error, or one of a call being stopped
            self.finished.append(outcome)
            if failed:
                self._stop(lambda p: True)
            self._wake_consumer()

    def _stop(self, which: Callable[[int], bool]) -> None:
        self.stopping = True
        for position, scope in list(self.calls.items()):
            if which(position):
                scope.cancel()
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

    def take(self) -> Any:
        """The next outcome to deliver, or ``_NOTHING`` if it has not come yet."""
        if self.over:
            return _NOTHING
        if self.ordered:
            outcome = self.outcomes.pop(self.next_position, _NOTHING)
            if outcome is _NOTHING:
                return _NOTHING
            self.next_position += 1
        else:
            if not self.finished:
                return _NOTHING
            outcome = self.finished.popleft()
        self.delivered += 1
        if self.room is not None:
            self.room.set()
            self.room = None
        return outcome

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

    __slots__ = ("_executor", "_fn", "_max_in_flight", "_ordered", "_schedule", "_source", "_state")

    def __init__(
        self,
        executor: Callable[[], Awaitable[Executor]],
        fn: Callable[[Any], T],
        source: Iterator[Any] | AsyncIterator[Any],
        *,
        ordered: bool,
        max_in_flight: int | None,
    ) -> None:
        self._executor = executor
        self._fn = fn
        self._source = source
        self._ordered = ordered
        self._max_in_flight = max_in_flight
        self._state: _Mapping | None = None
        self._schedule: Callable[[Callable[[], object]], object] | None = None

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
        state = _Mapping(executor, self._fn, self._source, self._ordered, max_in_flight)
        task_group = offloader._task_group
        assert task_group is not None
        self._schedule = _threadsafe_scheduler()
        self._state = state
        task_group.start_soon(state.feed, name="offload-map")
        return state

    async def __anext__(self) -> T:
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
        try:
            # A checkpoint, as every await of anyio and trio: a consumer cancelled
            # between results stops the map here, whether results are ready or not.
            await anyio.lowlevel.checkpoint_if_cancelled()
            while (outcome := state.take()) is _NOTHING:
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
            state.cancel()
            await state.wait_done()
            raise
        if type(outcome) is _Failed:
            state.over = True
            state.cancel()
            await state.wait_done()
            error = outcome.error
            try:
                raise error
            finally:
                del error, outcome
        return outcome  # type: ignore[no-any-return]

    async def aclose(self) -> None:
        """Stop what is left: calls in flight are cancelled (as a cancelled
        :meth:`~offload.Executor.run` is), no more items are taken; returns once every
        call has ended. Idempotent."""
        state = self._state
        if state is None:
            # Never started: nothing runs, and nothing ever will.
            self._state = state = _Mapping(
                cast("Executor", None), self._fn, iter(()), self._ordered, 1
            )
            state.over = True
            state.done.set()
            await anyio.lowlevel.checkpoint()
            return
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
