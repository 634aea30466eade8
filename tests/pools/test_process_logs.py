"""Log records made in a process worker reach the parent's logging, as if the call
had run there: its handlers, its levels at call time, with the pool and the call
named on each record."""

from __future__ import annotations

import contextvars
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from offload import Executor, Offloader, OffloadSettings, PoolSettings, WorkerCrashed
from offload._pools.process import cross_memory as _cross_memory
from offload._pools.process import exchange as _exchange
from offload._pools.process import logs as _logs
from offload._pools.process import pool as _pool
from offload.prometheus import OffloadCollector

from .. import funcs, log_funcs
from ..conftest import Backend, loop_name
from ..processes import run_script, wait_until

#: seconds any single call of these tests may take before the test gives up on it
CALL_BOUND = 60.0


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def messages(self) -> list[str]:
        return [record.getMessage() for record in self.records]


@pytest.fixture
def app_logger() -> Iterator[logging.Logger]:
    """The logger the worker functions use, at INFO here, left as it was found."""
    logger = logging.getLogger("app")
    logger.setLevel(logging.INFO)
    try:
        yield logger
    finally:
        logger.setLevel(logging.NOTSET)


@pytest.fixture
def collected(app_logger: logging.Logger) -> Iterator[Collect]:
    handler = Collect()
    app_logger.addHandler(handler)
    try:
        yield handler
    finally:
        app_logger.removeHandler(handler)


def one_worker(**process: Any) -> OffloadSettings:
    return OffloadSettings(
        process=PoolSettings(max_workers=1, **process),
        thread=PoolSettings(max_workers=1),
        shutdown_timeout=5,
        lag_probe=False,
    )


@pytest.fixture
async def pex() -> AsyncIterator[Executor]:
    """A process pool of one worker, forwarding logs (the default)."""
    async with Offloader(one_worker()) as ex:
        yield ex.pool("process")


@pytest.fixture
def log_frames(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the LOG frames from workers that the parent handles (one entry each)."""
    seen: list[int] = []
    handle = _logs.LogSink.handle

    def counting(self: _logs.LogSink, data: Any, call: Any) -> None:
        seen.append(1)
        handle(self, data, call)

    monkeypatch.setattr(_logs.LogSink, "handle", counting)
    return seen


async def test_a_worker_record_reaches_the_parents_handler(
    pex: Executor, collected: Collect
) -> None:
    with anyio.fail_after(CALL_BOUND):
        pid = await pex.run(log_funcs.log_warning)
    [record] = collected.records
    assert record.name == "app"
    assert record.levelno == logging.WARNING
    assert record.levelname == "WARNING"
    assert record.getMessage() == "x 1"
    assert record.args is None
    assert record.process == pid != os.getpid()
    assert record.funcName == "log_warning"
    assert record.pathname == log_funcs.__file__
    assert record.offload_pool == "process"  # type: ignore[attr-defined]
    assert record.offload_call == "tests.log_funcs.log_warning"  # type: ignore[attr-defined]
    # extra: plain values as they are, others as their repr()
    assert record.request_id == "r-1"  # type: ignore[attr-defined]
    assert record.size == 3  # type: ignore[attr-defined]
    assert record.tags == "['a']"  # type: ignore[attr-defined]


async def test_an_exception_arrives_formatted(pex: Executor, collected: Collect) -> None:
    with anyio.fail_after(CALL_BOUND):
        assert await pex.run(log_funcs.log_exception) == "done"
    [record] = collected.records
    assert record.getMessage() == "failed"
    assert record.levelno == logging.ERROR
    assert record.exc_info is None
    assert record.exc_text is not None
    assert record.exc_text.startswith("Traceback (most recent call last):")
    assert record.exc_text.endswith("ValueError: boom")
    assert "ValueError: boom" in logging.Formatter().format(record)


request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")


class Stamp(logging.Filter):
    """Stamps each record with the request's id (``record.request``), as an
    application's filter does."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request = request_id.get()
        return True


def stamped(logger: logging.Logger) -> Collect:
    """A handler added to ``logger`` that collects its records, stamped."""
    handler = Collect()
    handler.addFilter(Stamp())
    logger.addHandler(handler)
    return handler


async def test_records_are_handled_in_the_callers_context(
    pex: Executor, app_logger: logging.Logger
) -> None:
    # A filter that stamps records with the request's id, from a context variable, as
    # an application does: a worker's records get the id of the call's caller.
    handler = stamped(app_logger)

    async def request(rid: str) -> None:
        request_id.set(rid)
        await pex.run(log_funcs.log_warning)

    try:
        with anyio.fail_after(CALL_BOUND):
            async with anyio.create_task_group() as tg:
                for rid in ("r-a", "r-b", "r-c"):
                    tg.start_soon(request, rid)
    finally:
        app_logger.removeHandler(handler)
    assert sorted(r.request for r in handler.records) == ["r-a", "r-b", "r-c"]  # type: ignore[attr-defined]


async def test_records_arrive_while_the_call_runs(
    pex: Executor, collected: Collect, tmp_path: Path
) -> None:
    flag = tmp_path / "first-arrived"
    results: list[bool] = []

    async def call() -> None:
        # The worker waits for the file, which is written once its first record
        # has been handled here.
        results.append(await pex.run(log_funcs.log_then_wait_for, str(flag)))

    with anyio.fail_after(CALL_BOUND):
        async with anyio.create_task_group() as tg:
            tg.start_soon(call)
            await wait_until(lambda: bool(collected.records), CALL_BOUND, "no record")
            flag.write_text("yes")
    assert results == [True]
    assert collected.messages() == ["first", "second"]


async def test_records_below_the_parents_level_are_never_sent(
    pex: Executor, app_logger: logging.Logger, collected: Collect, log_frames: list[int]
) -> None:
    with anyio.fail_after(CALL_BOUND):
        n, made = await pex.run(log_funcs.log_many, 10_000, logging.DEBUG)
    assert (n, made) == (10_000, False)  # not even made in the worker
    assert log_frames == []
    assert collected.records == []
    # The level is read at call time.
    app_logger.setLevel(logging.DEBUG)
    with anyio.fail_after(CALL_BOUND):
        n, made = await pex.run(log_funcs.log_many, 10_000, logging.DEBUG)
    assert made
    dropped = pex.stats().logs_dropped
    assert len(collected.records) + dropped == 10_000
    assert len(collected.records) > 0
    assert {r.levelno for r in collected.records} == {logging.DEBUG}
    # And back up: a child logger follows its parent's level, as logging does.
    collected.records.clear()
    app_logger.setLevel(logging.ERROR)
    with anyio.fail_after(CALL_BOUND):
        await pex.run(log_funcs.log_many, 100, logging.WARNING, "app.child")
    assert collected.records == []


async def test_a_level_set_in_the_worker_alone_is_held_to_the_parents(
    pex: Executor, collected: Collect, log_frames: list[int]
) -> None:
    with anyio.fail_after(CALL_BOUND):
        # Made in the worker (its logger says DEBUG), not sent: "app" is at INFO here.
        assert await pex.run(log_funcs.log_debug_below_a_worker_level, 1000) is True
    assert log_frames == []
    assert collected.records == []


async def test_logging_disable_in_the_parent_holds_in_the_worker(
    pex: Executor, collected: Collect, log_frames: list[int]
) -> None:
    logging.disable(logging.WARNING)
    try:
        with anyio.fail_after(CALL_BOUND):
            _, made = await pex.run(log_funcs.log_many, 100, logging.WARNING)
    finally:
        logging.disable(logging.NOTSET)
    assert not made
    assert log_frames == []
    with anyio.fail_after(CALL_BOUND):
        await pex.run(log_funcs.log_many, 1, logging.WARNING)
    assert collected.messages() == ["record 0"]


async def test_every_record_arrives_or_is_counted(pex: Executor, collected: Collect) -> None:
    with anyio.fail_after(CALL_BOUND):
        result = await pex.run(log_funcs.log_many, 10_000, logging.INFO)
    assert result == (10_000, True)
    arrived = collected.messages()
    assert len(arrived) + pex.stats().logs_dropped == 10_000
    # In order, none twice, none mangled.
    numbers = [int(message.split()[1]) for message in arrived]
    assert numbers == sorted(set(numbers))


async def test_a_held_loop_makes_the_worker_drop_rather_than_block(
    pex: Executor, collected: Collect, tmp_path: Path
) -> None:
    flag = tmp_path / "logged"
    n = 10_000
    results: list[int] = []

    async def call() -> None:
        results.append(await pex.run(log_funcs.log_many_then_touch, n, str(flag), 1000))

    with anyio.fail_after(CALL_BOUND * 2):
        async with anyio.create_task_group() as tg:
            tg.start_soon(call)
            while not collected.records:  # the worker is logging
                await anyio.sleep(0)
            # Hold the loop: nothing reads the worker's channel until the worker is
            # done logging, which it can be only if it never waits for room there.
            deadline = time.monotonic() + CALL_BOUND
            while not flag.exists() and time.monotonic() < deadline:
                time.sleep(0.01)
            assert flag.exists(), "the worker blocked on a full channel"
    assert results == [n]
    dropped = pex.stats().logs_dropped
    assert dropped > 0
    assert len(collected.records) > 0
    assert len(collected.records) + dropped == n
    # What arrived is whole, in order: a frame sent in part was finished first.
    padding = "." * 1000
    numbers = []
    for message in collected.messages():
        head, _, tail = message.partition(padding)
        assert tail == "", message[:80]
        numbers.append(int(head.split()[1]))
    assert numbers == sorted(set(numbers))
    registry = CollectorRegistry()
    registry.register(OffloadCollector())  # the running Offloader
    text = generate_latest(registry).decode()
    assert f'offload_logs_dropped_total{{pool="process"}} {float(dropped)}' in text
    # The pool carries on.
    with anyio.fail_after(CALL_BOUND):
        assert await pex.run(funcs.add, 1, 2) == 3


async def test_a_record_larger_than_a_read_arrives_whole(pex: Executor, collected: Collect) -> None:
    size = 3 << 20
    with anyio.fail_after(CALL_BOUND):
        assert await pex.run(log_funcs.log_large, size) == size
        assert await pex.run(funcs.add, 1, 1) == 2
    [record] = collected.records
    assert record.getMessage() == "x" * size


async def test_records_beside_buffers_copied_between_memories(
    pex: Executor, collected: Collect, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 8 MiB go REMOTE both ways: the WRITE_TO and GO_AHEAD exchange, and the records
    # before the reply.
    if not _cross_memory.available():
        pytest.skip("no copies between memories here")
    exchanges: list[int] = []
    deliver = _exchange.deliver_then_receive

    async def counting(*args: Any) -> Any:
        exchanges.append(1)
        return await deliver(*args)

    monkeypatch.setattr(_pool, "deliver_then_receive", counting)
    data = os.urandom(8 << 20)
    with anyio.fail_after(CALL_BOUND):
        assert await pex.run(log_funcs.log_and_echo, data) == data
        assert await pex.run(log_funcs.log_and_echo, data) == data
    assert exchanges == [1, 1]
    assert collected.messages() == [f"echoing {len(data)} bytes"] * 2


async def test_a_crashing_workers_last_records_arrive(pex: Executor, collected: Collect) -> None:
    with anyio.fail_after(CALL_BOUND):
        with pytest.raises(WorkerCrashed):
            await pex.run(log_funcs.log_then_exit, 3)
    assert collected.messages() == ["last words"]


async def test_hostile_records_fail_nothing(pex: Executor, collected: Collect) -> None:
    with anyio.fail_after(CALL_BOUND):
        assert await pex.run(log_funcs.log_hostile) == "intact"
    unprintable, lock, extra, wrong = collected.records
    assert unprintable.getMessage().startswith("unprintable %s [offload: the arguments")
    assert "RuntimeError: no str for you" in unprintable.getMessage()
    assert lock.getMessage().startswith("a lock <unlocked _thread.lock object")
    assert extra.thing == "<Unprintable object: repr() failed>"  # type: ignore[attr-defined]
    assert extra.lock.startswith("<unlocked _thread.lock")  # type: ignore[attr-defined]
    assert "TypeError" in wrong.getMessage()
    assert pex.stats().logs_dropped == 0


async def test_a_parent_handler_that_raises_fails_nothing(
    pex: Executor, app_logger: logging.Logger
) -> None:
    class Raising(logging.Handler):
        def handle(self, record: logging.LogRecord) -> bool:
            raise RuntimeError("handler down")

        def emit(self, record: logging.LogRecord) -> None:
            raise AssertionError("not called")

    raising = Raising()
    app_logger.addHandler(raising)
    try:
        with anyio.fail_after(CALL_BOUND):
            n, _ = await pex.run(log_funcs.log_many, 10, logging.WARNING)
            assert n == 10
            assert await pex.run(funcs.add, 2, 3) == 5
    finally:
        app_logger.removeHandler(raising)


async def test_records_from_another_thread_during_a_call(pex: Executor, collected: Collect) -> None:
    with anyio.fail_after(CALL_BOUND):
        assert await pex.run(log_funcs.log_from_a_thread) == "joined"
    assert collected.messages() == ["from a thread"]


BETWEEN_CALLS = """
import contextvars
import json
import logging
import sys
import time
from pathlib import Path

import anyio

from offload import Offloader, OffloadSettings
from tests import funcs, log_funcs

seen = []


class Collect(logging.Handler):
    def emit(self, record):
        seen.append(record.getMessage())


async def main():
    logging.getLogger("app").addHandler(Collect())
    settings = OffloadSettings(process={"max_workers": 1}, lag_probe=False)
    async with Offloader(settings) as ex:
        pool = ex.pool("process")
        await pool.run(log_funcs.log_between_calls, "go", "done")
        Path("go").write_text("go")
        deadline = time.monotonic() + 30
        while not Path("done").exists() and time.monotonic() < deadline:
            await anyio.sleep(0.01)
        await pool.run(funcs.add, 1, 1)
    print(json.dumps(seen), flush=True)


anyio.run(main, backend=sys.argv[1])
"""


async def test_records_between_calls_stay_in_the_worker(
    tmp_path: Path, anyio_backend: Backend
) -> None:
    done = await run_script(tmp_path, BETWEEN_CALLS, loop_name(anyio_backend), timeout=60)
    assert done.returncode == 0, done.stderr.decode()
    assert json.loads(done.stdout.decode().splitlines()[-1]) == []
    assert (tmp_path / "done").exists()
    assert "between calls" in done.stderr.decode().splitlines()  # logging's last resort


async def test_a_forked_child_does_not_write_to_the_channel(
    pex: Executor, collected: Collect
) -> None:
    with anyio.fail_after(CALL_BOUND):
        assert await pex.run(log_funcs.log_in_a_forked_child, 100) == "forked"
        assert await pex.run(funcs.add, 1, 1) == 2
    assert collected.messages() == ["after the fork"]


async def test_nothing_is_forwarded_when_off(collected: Collect, log_frames: list[int]) -> None:
    async with Offloader(one_worker(forward_logs=False)) as ex:
        pex = ex.pool("process")
        with anyio.fail_after(CALL_BOUND):
            await pex.run(log_funcs.log_warning)
            await pex.run(log_funcs.log_many, 100, logging.WARNING)
            assert await pex.run(log_funcs.forwarding_loaded) is False
    assert collected.records == []
    assert log_frames == []


async def test_records_of_the_initializer_reach_the_parent(collected: Collect) -> None:
    initializer = "tests.log_funcs:log_at_start"
    settings = one_worker(initializer=initializer, initializer_args=("hello",))
    async with Offloader(settings) as ex:
        with anyio.fail_after(CALL_BOUND):
            pid = await ex.pool("process").run(funcs.getpid)
    [record] = collected.records
    assert record.getMessage() == "initializer says hello"
    assert record.process == pid
    assert record.offload_call == initializer  # type: ignore[attr-defined]


# -- streams --------------------------------------------------------------------------


async def test_a_level_changed_during_a_stream_holds_in_its_worker(
    pex: Executor, app_logger: logging.Logger, collected: Collect
) -> None:
    seen: list[tuple[bool, bool]] = []
    with anyio.fail_after(CALL_BOUND):
        async with pex.options(buffer=1).stream(log_funcs.log_each_item, 10) as items:
            async for i, debug, info in items:
                seen.append((debug, info))
                if i == 2:
                    app_logger.setLevel(logging.DEBUG)
                elif i == 5:
                    app_logger.setLevel(logging.WARNING)
    # With a buffer of one, the worker makes item i + 1 once item i is taken: a level
    # set after taking item i goes with the credit for item i + 1, and holds from
    # item i + 2 on.
    assert seen == [(False, True)] * 4 + [(True, True)] * 3 + [(False, False)] * 3
    # Those of item 6, made before the worker got WARNING, arrive after this process
    # had it: its level when a record arrives decides here.
    assert collected.messages() == [
        *(f"info {i}" for i in range(4)),
        *(f"{level} {i}" for i in range(4, 6) for level in ("debug", "info")),
    ]


async def test_a_level_changed_at_a_stream_s_end_holds_for_the_next_call(
    pex: Executor, app_logger: logging.Logger, collected: Collect
) -> None:
    with anyio.fail_after(CALL_BOUND):
        async with pex.options(buffer=2).stream(log_funcs.log_each_item, 1) as items:
            # Sent with the credit for the only item, which the worker may read
            # after its last answer.
            app_logger.setLevel(logging.DEBUG)
            assert [item async for item in items] == [(0, False, True)]
        assert await pex.run(log_funcs.log_many, 1, logging.DEBUG) == (1, True)
    assert collected.messages() == ["info 0", "record 0"]


async def test_a_stream_s_records_are_handled_in_the_consumers_context(
    pex: Executor, app_logger: logging.Logger
) -> None:
    handler = stamped(app_logger)
    request_id.set("r-s")
    try:
        with anyio.fail_after(CALL_BOUND):
            async with pex.stream(log_funcs.log_items_then_closing, 100) as items:
                async for item in items:
                    if item == 1:
                        break
            # Left early: its closing is read by the task that drains the stream.
            await wait_until(lambda: "closing" in handler.messages(), CALL_BOUND, "not closed")
    finally:
        app_logger.removeHandler(handler)
    messages = handler.messages()
    assert messages[:2] == ["item 0", "item 1"]
    assert messages[-1] == "closing"
    pid = await pex.run(os.getpid)
    for record in handler.records:
        assert record.process == pid
        assert record.request == "r-s"  # type: ignore[attr-defined]
        assert record.offload_pool == "process"  # type: ignore[attr-defined]
        assert record.offload_call == "tests.log_funcs.log_items_then_closing"  # type: ignore[attr-defined]


def test_the_levels_change_only_when_a_level_does(app_logger: logging.Logger) -> None:
    # A worker is sent the levels when the object changes: not on every call.
    levels = _logs.current_levels()
    assert _logs.current_levels() is levels
    logging.getLogger("app.some.new.logger")  # a new logger changes no level
    assert _logs.current_levels() is levels
    app_logger.setLevel(logging.DEBUG)
    changed = _logs.current_levels()
    assert changed is not levels
    assert changed.state[2]["app"] == logging.DEBUG
    app_logger.setLevel(logging.DEBUG)  # the same again: a new read, the same levels
    assert _logs.current_levels() is changed
    logging.disable(logging.INFO)
    try:
        assert _logs.current_levels().state[1] == logging.INFO
    finally:
        logging.disable(logging.NOTSET)
    assert _logs.current_levels().state[1] == logging.NOTSET
