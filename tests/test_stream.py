"""``Executor.stream`` and decorated generator functions: a generator run in a worker,
its items as produced."""

from __future__ import annotations

import contextvars
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from offload import (
    Executor,
    OffloadedGenerator,
    Offloader,
    OffloadSettings,
    OffloadTimeout,
    PoolClosed,
    RemoteTraceback,
    SerializationError,
    Stream,
    WorkerCrashed,
    check_cancelled,
    offload,
)

from . import funcs, stream_funcs

#: how long a test waits for a thread to reach a state before it fails
WAIT = 10.0

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")


class Probe:
    """What a generator did, seen from the test: produced items, where its ``finally``
    ran, and a gate it may wait on."""

    def __init__(self) -> None:
        self.produced: list[int] = []
        self.closed_in: list[str] = []
        self.closed = threading.Event()
        self.gate = threading.Event()

    def numbers(self, n: int, *, hold_at: int | None = None) -> Iterator[int]:
        try:
            for i in range(n):
                if i == hold_at:
                    assert self.gate.wait(WAIT)
                self.produced.append(i)
                yield i
        finally:
            self.closed_in.append(threading.current_thread().name)
            self.closed.set()

    def fails_at(self, n: int) -> Iterator[int]:
        try:
            yield from range(n)
            raise ValueError(f"no item {n}")
        finally:
            self.closed.set()

    def until_cancelled(self) -> Iterator[int]:
        try:
            yield 0
            while True:
                check_cancelled()
                time.sleep(0.005)
        finally:
            self.closed_in.append(threading.current_thread().name)
            self.closed.set()


@pytest.fixture
async def tex() -> AsyncIterator[Executor]:
    settings = OffloadSettings(thread={"max_workers": 1}, process={"max_workers": 1})
    async with Offloader(settings) as executor:
        yield executor.pool("thread")


async def wait_for(condition: Any) -> None:
    """Wait until ``condition()`` holds, giving the worker thread the time it takes."""
    with anyio.fail_after(WAIT):
        while not condition():
            await anyio.sleep(0.001)


def parked(items: Stream[Any], full: int) -> bool:
    """Whether the stream's thread waits for room, its buffer holding ``full`` items."""
    source: Any = items._source
    with source.lock:
        return source.finished or (not source.producing and len(source.items) == full)


async def test_items_arrive_in_order(tex: Executor) -> None:
    probe = Probe()
    got = [item async for item in tex.stream(probe.numbers, 40)]
    assert got == list(range(40))
    assert probe.closed.is_set()
    assert tex.stats().completed == 1


async def test_generator_runs_at_most_buffer_items_ahead(tex: Executor) -> None:
    probe = Probe()
    buffer = 3
    async with tex.options(buffer=buffer).stream(probe.numbers, 10) as items:
        for taken in range(10):
            ahead = min(buffer, 10 - taken)
            await wait_for(lambda ahead=ahead: parked(items, ahead))
            # Parked with a full buffer: it produced exactly what the buffer holds.
            assert probe.produced == list(range(taken + ahead))
            assert await items.__anext__() == taken
        with pytest.raises(StopAsyncIteration):
            await items.__anext__()


async def test_leaving_async_with_closes_the_generator_in_its_thread(tex: Executor) -> None:
    probe = Probe()
    async with tex.stream(probe.numbers, 100) as items:
        async for item in items:
            if item == 2:
                break
    # Suspended at a yield: closed before the block was left, in the worker thread.
    assert probe.closed_in == ["offload-thread-0"]
    assert probe.produced[:3] == [0, 1, 2]
    assert len(probe.produced) <= 3 + 16
    assert await tex.run(funcs.add, 1, 2) == 3  # the one thread serves the next call
    assert tex.stats().completed == 2


async def test_aclose_closes_the_generator(tex: Executor) -> None:
    probe = Probe()
    items = tex.stream(probe.numbers, 100)
    assert [await items.__anext__() for _ in range(3)] == [0, 1, 2]
    await items.aclose()
    assert probe.closed_in == ["offload-thread-0"]
    with pytest.raises(StopAsyncIteration):
        await items.__anext__()
    await items.aclose()  # again: nothing
    assert await tex.run(funcs.add, 1, 2) == 3


async def test_an_async_for_left_early_closes_the_generator(tex: Executor) -> None:
    probe = Probe()
    async for item in tex.stream(probe.numbers, 100):
        if item == 1:
            break
    # The stream object was dropped with the loop: the generator is closed after it.
    await wait_for(probe.closed.is_set)
    assert probe.closed_in == ["offload-thread-0"]
    assert await tex.run(funcs.add, 1, 2) == 3


async def test_a_stream_never_started_runs_nothing(tex: Executor) -> None:
    probe = Probe()
    items = tex.stream(probe.numbers, 5)
    await items.aclose()
    assert probe.produced == []
    assert not probe.closed.is_set()
    assert tex.stats().completed == 0


async def test_cancelled_consumer_closes_the_generator(tex: Executor) -> None:
    probe = Probe()
    got: list[int] = []
    with anyio.CancelScope() as scope:
        async for item in tex.stream(probe.numbers, 10, hold_at=2):
            got.append(item)
            if item == 1:
                # Cancelled while the generator computes item 2 (held at the gate).
                await wait_for(lambda: probe.gate is not None and len(probe.produced) == 2)
                scope.cancel()
    assert scope.cancelled_caught
    assert got == [0, 1]
    probe.gate.set()  # the item's computation ends; the generator is closed then
    await wait_for(probe.closed.is_set)
    assert probe.closed_in == ["offload-thread-0"]
    assert tex.stats().cancelled == 1
    assert await tex.run(funcs.add, 1, 2) == 3


async def test_deadline_stops_the_stream(tex: Executor) -> None:
    probe = Probe()
    got: list[int] = []
    with pytest.raises(OffloadTimeout):  # noqa: PT012 (the items before it are counted)
        async for item in tex.options(timeout=0.2).stream(probe.until_cancelled):
            got.append(item)
    assert got == [0]
    # In the item's computation: check_cancelled raises there, and finally runs.
    await wait_for(probe.closed.is_set)
    assert probe.closed_in == ["offload-thread-0"]
    assert tex.stats().timed_out == 1
    assert await tex.run(funcs.add, 1, 2) == 3


async def test_an_exception_reaches_the_consumer_at_its_position(tex: Executor) -> None:
    probe = Probe()
    got: list[int] = []
    with pytest.raises(ValueError, match="no item 5"):  # noqa: PT012 (as above)
        async for item in tex.stream(probe.fails_at, 5):
            got.append(item)
    assert got == [0, 1, 2, 3, 4]
    assert probe.closed.is_set()
    assert tex.stats().failed == 1


async def test_the_generator_sees_the_callers_context(tex: Executor) -> None:
    def read() -> Iterator[str]:
        yield request_id.get()
        request_id.set("changed in the worker")
        yield request_id.get()

    request_id.set("r-1")
    assert [x async for x in tex.stream(read)] == ["r-1", "changed in the worker"]
    assert request_id.get() == "r-1"


async def test_a_function_returning_an_iterable_streams_it(tex: Executor) -> None:
    assert [x async for x in tex.stream(list, "abc")] == ["a", "b", "c"]


async def test_async_functions_are_refused_at_once(tex: Executor) -> None:
    async def agen() -> AsyncIterator[int]:
        yield 1

    with pytest.raises(TypeError, match="async generator function"):
        tex.stream(agen)  # type: ignore[arg-type]


def test_buffer_option_is_checked() -> None:
    ex = Offloader(OffloadSettings()).executor
    with pytest.raises(ValueError, match="buffer"):
        ex.options(buffer=0)
    with pytest.raises(TypeError, match="buffer"):
        ex.options(buffer=True)
    assert "buffer=4" in repr(ex.options(buffer=4))


async def test_shutdown_ends_a_stream_left_open() -> None:
    probe = Probe()
    settings = OffloadSettings(thread={"max_workers": 1}, shutdown_timeout=0.2)
    items: Stream[int] | None = None
    with anyio.fail_after(WAIT / 2):  # the drain does not wait for a consumer that is gone
        async with Offloader(settings) as ex:
            items = ex.pool("thread").stream(probe.numbers, 100)
            assert await items.__anext__() == 0
            pool = ex.offloader.get_pool("thread")
    assert pool.stats().closed == 1
    await wait_for(probe.closed.is_set)
    with pytest.raises(PoolClosed):
        await items.__anext__()


# -- the decorator ----------------------------------------------------------------------


@offload(kind="thread")
def countdown(n: int) -> Iterator[int]:
    while n > 0:
        yield n
        n -= 1


async def test_decorated_generator_function_streams() -> None:
    async with Offloader(OffloadSettings(thread={"max_workers": 1})):
        assert isinstance(countdown, OffloadedGenerator)
        assert [x async for x in countdown(3)] == [3, 2, 1]
        async with countdown(5) as items:
            assert await items.__anext__() == 5
    assert list(countdown.__wrapped__(2)) == [2, 1]


def test_decorating_an_async_generator_function_is_refused() -> None:
    async def agen() -> AsyncIterator[int]:
        yield 1

    with pytest.raises(TypeError, match="async generator function"):
        offload(agen)


# -- process pools -----------------------------------------------------------------------


@pytest.fixture
async def pex() -> AsyncIterator[Executor]:
    settings = OffloadSettings(process={"max_workers": 1}, thread={"max_workers": 1})
    async with Offloader(settings) as executor:
        yield executor.pool("process")


class Files:
    def __init__(self, tmp_path: Path) -> None:
        self.progress = str(tmp_path / "progress")
        self.marker = tmp_path / "marker"

    def produced(self) -> int:
        return stream_funcs.produced(self.progress)

    def numbers(self, ex: Executor, n: int = 100) -> Stream[int]:
        """``stream_funcs.numbers`` streamed by ``ex``, counting its items in
        ``progress`` and writing its pid to ``marker`` once closed."""
        return ex.stream(stream_funcs.numbers, n, self.progress, str(self.marker))


async def test_process_items_arrive_in_order_bounded(pex: Executor, tmp_path: Path) -> None:
    files = Files(tmp_path)
    buffer = 2
    pid = await pex.run(os.getpid)
    items = files.numbers(pex.options(buffer=buffer), 8)
    async with items:
        for taken in range(8):
            ahead = min(buffer, 8 - taken)
            await wait_for(lambda ahead=ahead, taken=taken: files.produced() >= taken + ahead)
            # Given credit for `buffer` items past those taken: no more.
            assert files.produced() == taken + ahead
            assert await items.__anext__() == taken
        with pytest.raises(StopAsyncIteration):
            await items.__anext__()
    assert files.marker.read_text() == str(pid)
    assert await pex.run(os.getpid) == pid


async def test_process_leaving_early_closes_in_the_worker(pex: Executor, tmp_path: Path) -> None:
    files = Files(tmp_path)
    pid = await pex.run(os.getpid)
    async with files.numbers(pex.options(buffer=2)) as items:
        async for item in items:
            if item == 2:
                await wait_for(lambda: files.produced() == 5)  # parked at a yield
                break
    # Closed at its yield in the worker, which then serves the next call.
    assert files.marker.read_text() == str(pid)
    assert await pex.run(os.getpid) == pid
    assert pex.stats().completed == 3


async def test_process_cancelled_between_items_closes_in_the_worker(
    pex: Executor, tmp_path: Path
) -> None:
    files = Files(tmp_path)
    pid = await pex.run(os.getpid)
    with anyio.CancelScope() as scope:
        async with files.numbers(pex.options(buffer=2)) as items:
            assert await items.__anext__() == 0
            await wait_for(lambda: files.produced() == 3)
            scope.cancel()
            await anyio.sleep(1)
    assert scope.cancelled_caught
    await wait_for(files.marker.exists)
    assert files.marker.read_text() == str(pid)
    assert await pex.run(os.getpid) == pid


async def test_process_deadline_inside_an_item_kills_the_worker(
    pex: Executor, tmp_path: Path
) -> None:
    marker = tmp_path / "marker"
    pid = await pex.run(os.getpid)
    got: list[int] = []
    with pytest.raises(OffloadTimeout):  # noqa: PT012 (the items before it are counted)
        async for item in pex.options(timeout=1).stream(stream_funcs.stuck_after_one, str(marker)):
            got.append(item)
    assert got == [0]
    assert await pex.run(os.getpid) != pid  # killed and replaced
    assert not marker.exists()  # killed inside the body: its finally could not run
    assert pex.stats().timed_out == 1


async def test_process_exception_at_its_position(pex: Executor) -> None:
    got: list[int] = []
    with pytest.raises(ValueError, match="no item 5") as info:  # noqa: PT012 (as above)
        async for item in pex.stream(stream_funcs.fails_at, 5):
            got.append(item)
    assert got == [0, 1, 2, 3, 4]
    assert isinstance(info.value.__cause__, RemoteTraceback)
    assert await pex.run(funcs.add, 1, 2) == 3


async def test_process_crash_mid_stream(pex: Executor) -> None:
    got: list[int] = []
    with pytest.raises(WorkerCrashed):  # noqa: PT012 (as above)
        async for item in pex.options(buffer=1).stream(stream_funcs.exits_at, 3):
            got.append(item)
    assert got == [0, 1, 2]
    assert await pex.run(funcs.add, 1, 2) == 3
    assert pex.stats().crashed == 1


async def test_process_unpicklable_item_fails_the_stream(pex: Executor) -> None:
    pid = await pex.run(os.getpid)
    got: list[object] = []
    with pytest.raises(SerializationError):  # noqa: PT012 (as above)
        async for item in pex.stream(stream_funcs.unpicklable_at, 2):
            got.append(item)
    assert got == [0, 1]
    assert await pex.run(os.getpid) == pid  # the worker goes on serving


async def test_process_large_items_arrive_intact(pex: Executor) -> None:
    size = 8 << 20
    got = [item async for item in pex.stream(stream_funcs.big, size)]
    assert got == [b"a" * size, bytes(range(256)) * (size // 256)]


async def test_decorated_generator_in_a_process_pool() -> None:
    async with Offloader(OffloadSettings(process={"max_workers": 1})):
        assert [x async for x in process_countdown(3)] == [3, 2, 1]


@offload(kind="process")
def process_countdown(n: int) -> Iterator[int]:
    while n > 0:
        yield n
        n -= 1


async def test_process_stream_whose_arguments_do_not_unpickle(pex: Executor) -> None:
    pid = await pex.run(os.getpid)
    with pytest.raises(SerializationError):
        await pex.stream(stream_funcs.echo, funcs.RefusesForeignReduce()).__anext__()
    # Its closing frame was not taken for a call: the worker serves the next ones.
    assert await pex.run(os.getpid) == pid
    assert await pex.run(funcs.add, 1, 2) == 3


async def test_process_stream_records_arrive_between_items(pex: Executor) -> None:
    seen: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    app = logging.getLogger("app")
    handler = Collect()
    app.addHandler(handler)
    try:
        async for item in pex.options(buffer=1).stream(stream_funcs.logs_between_items, 4):
            # Made before the item was yielded: handled before it arrives.
            assert f"item {item}" in seen
        assert seen == [f"item {i}" for i in range(4)]
    finally:
        app.removeHandler(handler)
    assert await pex.run(funcs.add, 1, 2) == 3


async def test_process_stream_left_before_its_first_item(pex: Executor, tmp_path: Path) -> None:
    files = Files(tmp_path)
    pid = await pex.run(os.getpid)
    for _ in range(3):
        async with files.numbers(pex):
            pass  # started, and closed before an item was asked for
        assert await pex.run(os.getpid) == pid
    assert files.produced() <= 3 * 16


async def test_process_stream_carries_the_chosen_context() -> None:
    from . import funcs_context

    settings = OffloadSettings(
        process={"max_workers": 1}, context_vars=list(funcs_context.CONTEXT_VARS)
    )
    async with Offloader(settings) as ex:
        funcs_context.request_id.set("r-7")
        assert [x async for x in ex.stream(stream_funcs.request_ids, 2)] == ["r-7", "r-7"]


async def test_process_shutdown_ends_a_stream_left_open(tmp_path: Path) -> None:
    files = Files(tmp_path)
    settings = OffloadSettings(process={"max_workers": 1}, shutdown_timeout=0.2)
    with anyio.fail_after(WAIT / 2):  # the drain does not wait for a consumer that is gone
        async with Offloader(settings) as ex:
            items = files.numbers(ex.pool("process"))
            assert await items.__anext__() == 0
            pool = ex.offloader.get_pool("process")
    assert pool.stats().closed == 1
    with pytest.raises(PoolClosed):
        await items.__anext__()
