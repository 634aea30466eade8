"""``Executor.map`` and ``OffloadedFunction.map``: many items, the guarantees of ``run``."""

from __future__ import annotations

import functools
import gc
import itertools
import math
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from offload import (
    Executor,
    MapResults,
    OffloadedFunction,
    Offloader,
    OffloadSettings,
    OffloadTimeout,
    PoolClosed,
)

from .funcs import double, finish_after, hold_after, identity, slow_at
from .processes import gone, wait_until

KINDS = ["thread", "process"]


async def collect(results: AsyncIterator[Any], into: list[Any]) -> None:
    async for r in results:
        into.append(r)


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    kind: str = request.param
    return kind


async def idle(ex: Executor, kind: str) -> None:
    """No call of the map is left running: every worker of the pool idle."""
    pool = ex.pool(kind)
    await wait_until(lambda: pool.stats().busy == 0, 10, lambda: f"{pool.stats()}")


async def test_ordered_results(ex: Executor, kind: str) -> None:
    results = ex.pool(kind).map(abs, range(-10, 10))
    assert isinstance(results, MapResults)
    assert [r async for r in results] == [abs(i) for i in range(-10, 10)]
    before = ex.pool(kind).stats().completed
    async with ex.pool(kind).map(math.factorial, range(12), chunksize=1) as results:
        assert [r async for r in results] == [math.factorial(i) for i in range(12)]
    # Each item is a call of the pool, with chunksize=1.
    assert ex.pool(kind).stats().completed - before == 12


async def test_unordered_results_come_as_they_finish(
    ex: Executor, kind: str, tmp_path: Path
) -> None:
    # "a" finishes only once "b" has reached the consumer (finishing in the worker is
    # not enough: two results back at once reach the loop in an order of its own).
    a, b, release = str(tmp_path / "a"), str(tmp_path / "b"), tmp_path / "release"
    async with ex.pool(kind).map(
        finish_after, [(str(release), a, "a"), (None, b, "b")], ordered=False
    ) as results:
        first = await anext(results)
        release.touch()
        rest = [r async for r in results]
    assert [first, *rest] == ["b", "a"]
    # Ordered, "a" comes first all the same, though it finishes only once "b" has.
    Path(a).unlink()
    Path(b).unlink()
    items = [(b, a, "a"), (None, b, "b")]
    assert [r async for r in ex.pool(kind).map(finish_after, items)] == ["a", "b"]


@pytest.mark.parametrize("ordered", [True, False])
async def test_first_error_after_the_results_before_it_and_the_rest_stop(
    ex: Executor, kind: str, tmp_path: Path, ordered: bool
) -> None:
    items = [(i, 13, str(tmp_path)) for i in range(20)]
    got: list[int] = []
    with pytest.raises(ValueError, match="item 13") as caught:
        await collect(ex.pool(kind).map(hold_after, items, ordered=ordered, chunksize=1), got)
    assert type(caught.value) is ValueError  # itself, not in an ExceptionGroup
    if ordered:
        assert got == list(range(13))
    else:
        # Those that finished before 13 failed: on a busy machine, not every one.
        assert set(got) <= set(range(13))
        assert len(got) == len(set(got))
    # A later item was running when 13 failed: it was stopped, and never finished.
    assert list(tmp_path.glob("started-*")) != []
    await idle(ex, kind)
    assert ex.pool(kind).stats().cancelled >= 1
    if kind == "process":
        for started in tmp_path.glob("started-*"):
            pid = int(started.read_text())
            await wait_until(functools.partial(gone, pid), 10, f"worker {pid} still runs")
        # ... and replaced.
        pool = ex.pool(kind)
        await wait_until(lambda: pool.stats().workers == 2, 10, lambda: f"{pool.stats()}")
    assert list(tmp_path.glob("finished-*")) == []
    assert ex.pool(kind).stats().completed == 13


async def test_leaving_the_block_stops_the_rest(ex: Executor, kind: str) -> None:
    # Item 2 runs until stopped; 3, 4 and 5 finish and wait behind it.
    items = [(i, 2) for i in range(100)]
    got = []
    async with ex.pool(kind).map(slow_at, items, max_in_flight=4, chunksize=1) as results:
        async for r in results:
            got.append(r)
            if r == 1:
                break
        # Still running: the block has not ended.
        assert ex.pool(kind).stats().cancelled == 0
    assert got == [0, 1]
    assert ex.pool(kind).stats().cancelled >= 1
    await idle(ex, kind)
    # Never more than the window beyond the two delivered.
    assert ex.pool(kind).stats().completed <= 5


@pytest.mark.parametrize("form", ["async with", "async for"])
async def test_cancelling_the_consumer_stops_the_rest(ex: Executor, kind: str, form: str) -> None:
    items = [(i, 2) for i in range(100)]
    got = []
    with anyio.CancelScope() as scope:
        if form == "async with":
            async with ex.pool(kind).map(slow_at, items, max_in_flight=4) as results:
                async for r in results:
                    got.append(r)
                    if r == 1:
                        scope.cancel()
        else:
            async for r in ex.pool(kind).map(slow_at, items, max_in_flight=4):
                got.append(r)
                if r == 1:
                    scope.cancel()
    assert scope.cancelled_caught
    assert got == [0, 1]
    # Item 2's call was cancelled before the block (or the await) returned.
    assert ex.pool(kind).stats().cancelled >= 1
    await idle(ex, kind)


async def test_cancelled_while_waiting_for_a_result(ex: Executor, kind: str) -> None:
    items = [(i, 0) for i in range(10)]
    with anyio.move_on_after(0.5) as scope:
        async for _ in ex.pool(kind).map(slow_at, items):
            pytest.fail("item 0 never finishes")
    assert scope.cancelled_caught
    assert ex.pool(kind).stats().cancelled >= 1
    await idle(ex, kind)


async def test_a_dropped_iterator_stops_its_calls(ex: Executor, kind: str) -> None:
    # A bare ``async for`` left by ``break``: the iterator, dropped, stops the rest.
    items = [(i, 2) for i in range(100)]
    async for r in ex.pool(kind).map(slow_at, items, max_in_flight=4):
        if r == 1:
            break
    gc.collect()  # what refcounting did not free (a traceback's frames) goes now
    await wait_until(lambda: ex.pool(kind).stats().cancelled >= 1, 10, "item 2 not stopped")
    await idle(ex, kind)


async def test_aclose_stops_the_rest(ex: Executor, kind: str) -> None:
    results = ex.pool(kind).map(slow_at, [(i, 1) for i in range(10)])
    assert await results.__anext__() == 0
    await results.aclose()
    assert ex.pool(kind).stats().cancelled >= 1
    await results.aclose()  # again: nothing
    with pytest.raises(StopAsyncIteration):
        await results.__anext__()
    await idle(ex, kind)


async def test_per_item_timeout(ex: Executor, kind: str) -> None:
    got: list[int] = []
    with pytest.raises(OffloadTimeout):
        await collect(ex.pool(kind).map(slow_at, [(i, 3) for i in range(8)], timeout=1), got)
    assert got == [0, 1, 2]
    assert ex.pool(kind).stats().timed_out == 1
    await idle(ex, kind)


class Taken:
    """Items 0, 1, 2, ... and how many were taken."""

    def __init__(self) -> None:
        self.count = 0

    def sync(self) -> Iterator[int]:
        for i in itertools.count():
            self.count = i + 1
            yield i

    async def asynchronous(self) -> AsyncIterator[int]:
        for i in itertools.count():
            self.count = i + 1
            yield i
            await anyio.lowlevel.checkpoint()


@pytest.mark.parametrize("source", ["sync", "async"])
@pytest.mark.parametrize("ordered", [True, False])
async def test_items_are_taken_lazily(ex: Executor, kind: str, source: str, ordered: bool) -> None:
    taken = Taken()
    items = taken.sync() if source == "sync" else taken.asynchronous()
    delivered = 0
    async with ex.pool(kind).map(
        identity, items, max_in_flight=3, ordered=ordered, chunksize=1
    ) as results:
        async for _ in results:
            delivered += 1
            assert taken.count <= delivered + 3
            if delivered == 30:
                break
    assert taken.count <= 33


async def test_a_slow_consumer_stops_the_items(ex: Executor) -> None:
    taken = Taken()
    async with ex.pool("thread").map(
        identity, taken.sync(), max_in_flight=5, chunksize=1
    ) as results:
        assert await results.__anext__() == 0
        # Every slot taken: 5 results wait for the consumer, none is in flight.
        await wait_until(lambda: ex.pool("thread").stats().completed == 6, 10, "6 calls")
        for _ in range(20):
            await anyio.lowlevel.checkpoint()
        assert taken.count == 6
        assert ex.pool("thread").stats().completed == 6


async def test_an_error_of_the_items_comes_at_its_position(ex: Executor, kind: str) -> None:
    def items() -> Iterator[int]:
        yield from range(5)
        raise KeyError("no more")

    got: list[int] = []
    with pytest.raises(KeyError, match="no more"):
        await collect(ex.pool(kind).map(abs, items()), got)
    assert got == list(range(5))


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_empty_items(ex: Executor, kind: str) -> None:
    empty: list[int] = []
    assert [r async for r in ex.pool(kind).map(abs, empty)] == []


async def test_bad_input(ex: Executor) -> None:
    with pytest.raises(TypeError, match="iterable"):
        ex.map(abs, 3)  # type: ignore[call-overload]
    with pytest.raises(ValueError, match="max_in_flight"):
        ex.map(abs, [1], max_in_flight=0)
    with pytest.raises(TypeError, match="max_in_flight"):
        ex.map(abs, [1], max_in_flight=2.5)  # type: ignore[call-overload]
    with pytest.raises(ValueError, match="timeout"):
        ex.map(abs, [1], timeout=-1)

    async def coroutine_function(x: int) -> int:
        return x

    def generator_function(x: int) -> Iterator[int]:
        yield x

    with pytest.raises(TypeError, match="async function"):
        ex.map(coroutine_function, [1])
    with pytest.raises(TypeError, match="generator function"):
        ex.map(generator_function, [1])


async def test_map_on_a_stopped_offloader() -> None:
    offloader = Offloader(OffloadSettings(thread={"max_workers": 1}, default_pool="thread"))
    async with offloader as ex:
        pass
    with pytest.raises(PoolClosed):
        async for _ in ex.map(abs, [1, 2]):
            pass
    with pytest.raises(PoolClosed):
        async with ex.map(abs, [1, 2]):
            pass


async def test_offloader_stopping_under_a_map() -> None:
    settings = OffloadSettings(thread={"max_workers": 2}, default_pool="thread", shutdown_timeout=5)
    async with Offloader(settings) as ex:
        results = ex.map(abs, itertools.count())
        assert await results.__anext__() == 0
    # Its calls were refused from the start of the shutdown: an error, not the end.
    with pytest.raises(PoolClosed):
        await collect(results, [])


async def test_decorated_function_map(ex: Executor) -> None:
    assert isinstance(double, OffloadedFunction)
    assert [r async for r in double.map(range(5))] == [0, 2, 4, 6, 8]
    assert ex.pool("process").stats().completed == 5
    async with double.map(range(5), ordered=False, max_in_flight=2) as results:
        assert sorted([r async for r in results]) == [0, 2, 4, 6, 8]


async def test_the_context_travels_with_thread_calls(ex: Executor) -> None:
    import contextvars

    var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="unset")
    var.set("set")
    assert [r async for r in ex.pool("thread").map(lambda _: var.get(), range(3))] == ["set"] * 3


async def test_one_consumer_at_a_time(ex: Executor) -> None:
    results = ex.pool("thread").map(slow_at, [(i, 0) for i in range(3)])
    async with results, anyio.create_task_group() as tg:
        tg.start_soon(results.__anext__)
        await wait_until(lambda: ex.pool("thread").stats().busy == 1, 10, "item 0 running")
        with pytest.raises(RuntimeError, match="another task"):
            await results.__anext__()
        tg.cancel_scope.cancel()
    await idle(ex, "thread")


async def test_a_fault_of_the_feeder_reaches_the_consumer(
    ex: Executor, monkeypatch: pytest.MonkeyPatch
) -> None:
    from offload import _mapping

    def broken(self: Any, position: int, outcome: Any) -> None:
        raise AssertionError("a bug")

    monkeypatch.setattr(_mapping._Mapping, "_store", broken)
    monkeypatch.setattr(_mapping._Mapping, "_store_all", broken)
    with pytest.raises(Exception) as caught:
        await collect(ex.pool("thread").map(abs, range(3)), [])
    assert "a bug" in repr(caught.value) + repr(getattr(caught.value, "exceptions", ""))
    # The Offloader is unharmed.
    assert await ex.pool("thread").run(abs, -1) == 1


async def test_calls_reach_the_pool_in_the_items_order() -> None:
    # One thread: the calls run in the order they reached the pool's queue, which
    # must be the items' on trio too (it starts new tasks in an order of its own).
    settings = OffloadSettings(thread={"max_workers": 1}, default_pool="thread")
    async with Offloader(settings) as ex:
        for _ in range(5):  # trio reverses a batch of new tasks half the time
            order: list[int] = []
            results = ex.map(order.append, range(50), ordered=False, max_in_flight=50)
            assert [r async for r in results] == [None] * 50
            assert order == list(range(50))


@pytest.mark.parametrize("source", ["sync", "async"])
async def test_items_left_unfinished_are_closed(ex: Executor, source: str) -> None:
    closed = anyio.Event()

    def sync_items() -> Iterator[int]:
        try:
            yield from itertools.count()
        finally:
            closed.set()

    async def async_items() -> AsyncIterator[int]:
        try:
            for i in itertools.count():
                yield i
        finally:
            closed.set()

    items = sync_items() if source == "sync" else async_items()
    async with ex.pool("thread").map(abs, items) as results:
        async for r in results:
            if r == 3:
                break
    assert closed.is_set()


async def test_other_iterators_are_left_open(ex: Executor) -> None:
    # A file is its own iterator: stopping the map must not close it.
    class Lines:
        closed = False

        def __iter__(self) -> Lines:
            return self

        def __next__(self) -> int:
            return 1

        def close(self) -> None:
            self.closed = True

    lines = Lines()
    async with ex.pool("thread").map(abs, lines) as results:
        async for _ in results:
            break
    assert not lines.closed
