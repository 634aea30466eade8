"""``Executor.stream`` on a dask pool: one embedded cluster for the module.

Dask's client runs on asyncio only, so these tests run on asyncio alone (a dask pool
under trio fails at start: ``test_dask_embedded.py``). The generators run in the
cluster's worker processes; what they did is seen through files they write. After
each test, nothing of its streams may stay on the scheduler.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

pytest.importorskip("distributed")

from offload import (
    CallAborted,
    Executor,
    Offloader,
    OffloadTimeout,
    PoolClosed,
    PoolOverloaded,
    RemoteTraceback,
    SerializationError,
    WorkerCrashed,
    offload,
)

from .. import funcs, funcs_context, stream_funcs
from ..processes import wait_until_async
from ..test_stream import Files, wait_for
from .test_dask import BOUND, client_of, dask_settings, healed, pool_of

#: a deadline that lets item 0 arrive (its task starts, and reports, on busy CPUs)
#: but not item 1, which waits for a file the test makes after the deadline
ITEM_0 = 3.0


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
async def dask_ex() -> AsyncIterator[Executor]:
    async with Offloader(dask_settings(max_pending=2)) as ex:
        yield ex.pool("dask")


@pytest.fixture(autouse=True)
async def nothing_left_on_the_scheduler(dask_ex: Executor) -> AsyncIterator[None]:
    yield
    await no_stream_left(dask_ex)


async def stream_state(ex: Executor) -> list[str]:
    names: list[str] = await client_of(ex).run_on_scheduler(stream_funcs.scheduler_streams)
    return names


async def no_stream_left(ex: Executor) -> None:
    """Wait until the scheduler holds no queue or event of a stream, and the pool no
    stream."""
    left: list[str] = []

    async def gone() -> bool:
        left[:] = await stream_state(ex)
        return not left and not pool_of(ex)._streams and not pool_of(ex)._calls

    await wait_until_async(gone, BOUND, lambda: f"left on the scheduler: {left}")


async def test_items_arrive_in_order_at_most_buffer_ahead(
    dask_ex: Executor, tmp_path: Path
) -> None:
    files = Files(tmp_path)
    buffer = 2
    items = files.numbers(dask_ex.options(buffer=buffer), 6)
    async with items:
        for taken in range(6):
            ahead = min(buffer, 6 - taken)
            await wait_for(lambda ahead=ahead, taken=taken: files.produced() >= taken + ahead)
            # Waiting for room, with `buffer` items in the queue: no more.
            with anyio.fail_after(BOUND):
                await stream_state(dask_ex)  # a round trip to the scheduler, at least
            assert files.produced() == taken + ahead
            assert await items.__anext__() == taken
        with pytest.raises(StopAsyncIteration):
            await items.__anext__()
    # Finished, then closed in the worker, before the consumer heard of its end.
    assert files.marker.read_text() in {str(pid) for pid in await worker_pids(dask_ex)}
    assert [x async for x in dask_ex.stream(range, 40)] == list(range(40))
    assert dask_ex.stats().completed >= 2


async def worker_pids(ex: Executor) -> set[int]:
    pids: list[int] = await client_of(ex).run_on_scheduler(funcs.scheduler_worker_pids)
    return set(pids)


async def items_before(
    error: type[BaseException], items: AsyncIterator[Any], match: str | None = None
) -> tuple[list[Any], BaseException]:
    """The items a stream gave before it raised ``error`` (which must come), and the
    error."""
    got: list[Any] = []
    with pytest.raises(error, match=match) as info:  # noqa: PT012 (the items before count)
        async for item in items:
            got.append(item)
    return got, info.value


async def test_leaving_early_closes_the_generator_in_its_worker(
    dask_ex: Executor, tmp_path: Path
) -> None:
    files = Files(tmp_path)
    async with files.numbers(dask_ex.options(buffer=2)) as items:
        async for item in items:
            if item == 2:
                await wait_for(lambda: files.produced() == 5)  # waits at a yield
                break
    # Closed at its yield in the worker, its finally run there, soon after.
    await wait_for(files.marker.exists)
    assert files.produced() == 5
    pid = int(files.marker.read_text())
    assert pid in await worker_pids(dask_ex)
    # Its thread serves the next calls.
    for _ in range(2):
        assert await dask_ex.options(timeout=BOUND).run(funcs.add, 1, 2) == 3


async def test_an_async_for_left_early_closes_the_generator(
    dask_ex: Executor, tmp_path: Path
) -> None:
    files = Files(tmp_path)
    async for item in dask_ex.stream(
        stream_funcs.numbers, 10_000, files.progress, str(files.marker)
    ):
        if item == 1:
            break
    await wait_for(files.marker.exists)
    assert files.produced() < 10_000


async def test_an_exception_reaches_the_consumer_at_its_position(dask_ex: Executor) -> None:
    got, error = await items_before(
        ValueError, dask_ex.stream(stream_funcs.fails_at, 5), match="no item 5"
    )
    assert got == [0, 1, 2, 3, 4]
    assert isinstance(error.__cause__, RemoteTraceback)
    assert dask_ex.stats().failed >= 1


async def test_system_exit_and_hostile_items_fail_only_their_stream(dask_ex: Executor) -> None:
    stream = dask_ex.stream(stream_funcs.then, [1, SystemExit])
    got, _ = await items_before(CallAborted, stream, match="SystemExit")
    assert got == [1]
    for kind, error in (("pickled", "cannot be pickled"), ("unpickled", "cannot be unpickled")):
        stream = dask_ex.stream(stream_funcs.hostile_at_1, kind)
        got, _ = await items_before(SerializationError, stream, match=f"an item of .* {error}")
        assert got == [0]
    assert await dask_ex.run(funcs.add, 1, 2) == 3


async def test_arguments_that_do_not_pickle_fail_the_stream_at_once(dask_ex: Executor) -> None:
    with pytest.raises(SerializationError, match="cannot send"):
        await dask_ex.stream(stream_funcs.echo, threading.Lock()).__anext__()
    assert [x async for x in dask_ex.stream(stream_funcs.echo, "ok")] == ["ok"]


async def test_deadline_covers_the_stream_and_closes_it_after_its_item(
    dask_ex: Executor, tmp_path: Path
) -> None:
    gate, marker = tmp_path / "gate", tmp_path / "marker"
    stream = dask_ex.options(timeout=ITEM_0).stream(stream_funcs.waits_for, str(gate), str(marker))
    got, _ = await items_before(OffloadTimeout, stream)
    assert got == [0]
    assert dask_ex.stats().timed_out >= 1
    # Dask cannot interrupt the item's computation: once it is done, the generator
    # is closed in the worker, without computing another.
    assert not marker.exists()
    gate.touch()
    await wait_for(marker.exists)


async def test_cancelled_consumer_closes_the_generator_after_its_item(
    dask_ex: Executor, tmp_path: Path
) -> None:
    gate, marker = tmp_path / "gate", tmp_path / "marker"
    got: list[int] = []
    cancelled = dask_ex.stats().cancelled
    with anyio.CancelScope() as scope:
        async for item in dask_ex.stream(stream_funcs.waits_for, str(gate), str(marker)):
            got.append(item)
            # Cancelled while it waits for item 1, which waits for the gate.
            scope.deadline = anyio.current_time() + 0.2
    assert scope.cancelled_caught
    assert got == [0]
    assert dask_ex.stats().cancelled == cancelled + 1
    assert not marker.exists()
    gate.touch()
    await wait_for(marker.exists)  # closed in its worker once the item was done
    assert int(marker.read_text()) in await worker_pids(dask_ex)


async def test_aclose_closes_the_generator_without_waiting(
    dask_ex: Executor, tmp_path: Path
) -> None:
    files = Files(tmp_path)
    items = files.numbers(dask_ex.options(buffer=1))
    assert [await items.__anext__() for _ in range(3)] == [0, 1, 2]
    await items.aclose()
    await wait_for(files.marker.exists)
    assert files.produced() <= 4
    with pytest.raises(StopAsyncIteration):
        await items.__anext__()
    assert await dask_ex.run(funcs.add, 1, 2) == 3


async def test_a_task_the_scheduler_released_stops_its_generator(
    dask_ex: Executor, tmp_path: Path
) -> None:
    # As when the application dies with its client: nobody sets the stop event.
    files = Files(tmp_path)
    async with files.numbers(dask_ex.options(buffer=1)) as items:
        assert await items.__anext__() == 0
        await wait_for(lambda: files.produced() == 2)  # waits for room
        source: Any = items._source
        await client_of(dask_ex).cancel([source.future])
        # What wakes it before its wait's timeout: then it reads its task's state.
        await client_of(dask_ex).scheduler.event_set(name=f"{source.queue}-room")
        await wait_for(files.marker.exists)
    assert files.produced() == 2


async def test_hard_cancel_restarts_the_worker_computing_an_item(
    dask_ex: Executor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pool = pool_of(dask_ex)
    monkeypatch.setattr(pool, "settings", pool.settings.model_copy(update={"hard_cancel": True}))
    gate, marker = tmp_path / "gate", tmp_path / "marker"
    pids = await worker_pids(dask_ex)
    stream = dask_ex.options(timeout=ITEM_0).stream(stream_funcs.waits_for, str(gate), str(marker))
    got, _ = await items_before(OffloadTimeout, stream)
    assert got == [0]

    async def replaced() -> bool:
        now = await worker_pids(dask_ex)
        return len(now) == len(pids) and len(now - pids) == 1

    await wait_until_async(replaced, BOUND, "the worker computing the item was restarted")
    assert not marker.exists()  # killed inside the body: its finally could not run
    await healed(dask_ex)
    assert await dask_ex.run(funcs.add, 1, 2) == 3


async def test_a_worker_killed_mid_stream_is_worker_crashed(dask_ex: Executor) -> None:
    crashed = dask_ex.stats().crashed
    stream = dask_ex.options(buffer=1).stream(stream_funcs.exits_at, 3)
    got, _ = await items_before(WorkerCrashed, stream)
    assert got == [0, 1, 2]
    assert dask_ex.stats().crashed == crashed + 1
    await healed(dask_ex)
    assert await dask_ex.run(funcs.add, 1, 2) == 3


async def test_streams_count_against_the_pools_capacity(dask_ex: Executor, tmp_path: Path) -> None:
    capacity = pool_of(dask_ex)._capacity
    async with contextlib.AsyncExitStack() as stack:
        for i in range(capacity):
            files = Files(tmp_path / str(i))
            (tmp_path / str(i)).mkdir()
            await stack.enter_async_context(files.numbers(dask_ex.options(buffer=1)))
        with pytest.raises(PoolOverloaded):
            await dask_ex.stream(range, 3).__anext__()
    # Closed, queued ones too: the pool takes streams and calls again.
    assert [x async for x in dask_ex.stream(range, 3)] == [0, 1, 2]


async def test_the_generator_sees_the_chosen_context(dask_ex: Executor) -> None:
    funcs_context.request_id.set("r-7")
    assert [x async for x in dask_ex.stream(stream_funcs.request_ids, 2)] == ["r-7", "r-7"]


async def test_every_item_runs_in_the_callers_trace(dask_ex: Executor) -> None:
    from opentelemetry.sdk.trace import TracerProvider

    provider = TracerProvider()
    with provider.get_tracer("tests").start_as_current_span("route") as span:
        route = (span.get_span_context().trace_id, span.get_span_context().span_id)
        items = dask_ex.options(buffer=1).stream(funcs_context.spans_per_item, 3, "item")
        async with items:
            seen = [outer async for _, outer in items]
    assert seen == [route] * 3
    # Nor does the trace outlive the stream on its worker.
    assert await dask_ex.run(funcs_context.current_span_ids) is None


async def test_records_logged_between_items_are_forwarded(dask_ex: Executor) -> None:
    seen: list[logging.LogRecord] = []
    arrived = anyio.Event()

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record)
            if len(seen) == 3:
                arrived.set()

    app = logging.getLogger("app")
    handler = Collect()
    app.addHandler(handler)
    try:
        assert [x async for x in dask_ex.stream(stream_funcs.logs_between_items, 3)] == [0, 1, 2]
        with anyio.fail_after(BOUND):
            await arrived.wait()
    finally:
        app.removeHandler(handler)
    assert [r.getMessage() for r in seen] == ["item 0", "item 1", "item 2"]
    assert {r.offload_call for r in seen} == {"tests.stream_funcs.logs_between_items"}  # type: ignore[attr-defined]


@offload(kind="dask")
def countdown(n: int) -> Iterator[int]:
    while n > 0:
        yield n
        n -= 1


async def test_decorated_generator_function_streams(dask_ex: Executor) -> None:
    assert [x async for x in countdown(3)] == [3, 2, 1]


async def test_shutdown_ends_a_stream_left_open(tmp_path: Path) -> None:
    files = Files(tmp_path)
    settings = dask_settings(max_workers=1).model_copy(update={"shutdown_timeout": 0.2})
    async with Offloader(settings) as ex:
        items = files.numbers(ex.pool("dask"))
        assert await items.__anext__() == 0
        pool = ex.offloader.get_pool("dask")
    assert pool.stats().closed == 1
    with pytest.raises(PoolClosed):
        await items.__anext__()
