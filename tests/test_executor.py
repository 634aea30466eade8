"""``Executor`` and ``Offloader``: pools, options, keyword pass-through, lifecycle."""

from __future__ import annotations

import functools
import inspect
import math
import os
import threading
from collections.abc import AsyncIterator, Coroutine, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from offload import (
    Executor,
    Offloader,
    OffloadError,
    OffloadSettings,
    OffloadTimeout,
    PoolClosed,
    PoolStats,
    SerializationError,
)

from . import funcs
from .conftest import Backend, loop_name
from .processes import run_script

# the contract every event loop keeps (see tests/conftest.py)
pytestmark = pytest.mark.all_loops
MAIN_PID = os.getpid()
#: one tick of the loop's clock: uvloop's counts whole milliseconds
TICK = 0.001


def small(**kwargs: object) -> OffloadSettings:
    base: dict[str, object] = {
        "process": {"max_workers": 1},
        "thread": {"max_workers": 2},
        "shutdown_timeout": 5,
    }
    base.update(kwargs)
    return OffloadSettings(**base)  # type: ignore[arg-type]


# -- pools ------------------------------------------------------------------------------


async def test_run_uses_default_pool(ex: Executor) -> None:
    assert ex.pool_name == "process"
    before = ex.offloader.stats()
    pid = await ex.run(funcs.getpid)
    after = ex.offloader.stats()
    assert pid != MAIN_PID
    assert after["process"].completed == before["process"].completed + 1
    assert after["thread"].completed == before["thread"].completed
    assert ex.stats().completed == after["process"].completed


async def test_run_uses_configured_default_pool() -> None:
    async with Offloader(small(default_pool="thread")) as ex:
        assert ex.pool_name == "thread"
        assert await ex.run(funcs.getpid) == MAIN_PID
        assert ex.offloader.stats()["thread"].completed == 1
        assert ex.offloader.stats()["process"].completed == 0


async def test_thread_pool(ex: Executor) -> None:
    tex = ex.pool("thread")
    assert tex.pool_name == "thread"
    assert ex.pool_name == "process"  # executors are immutable views
    assert await tex.run(funcs.getpid) == MAIN_PID
    assert await tex.run(funcs.thread_ident) != threading.get_ident()
    assert tex.stats().completed == 2
    assert ex.offloader.stats()["process"].completed == 0


async def test_named_pool() -> None:
    settings = small(pools={"io": {"kind": "thread", "max_workers": 2}})
    async with Offloader(settings) as ex:
        io = ex.pool("io")
        assert io.pool_name == "io"
        assert await io.run(funcs.add, 2, 3) == 5
        assert await io.run(funcs.getpid) == MAIN_PID
        stats = ex.offloader.stats()
        assert set(stats) == {"thread", "process", "io"}
        assert stats["io"].kind == "thread"
        assert stats["io"].name == "io"
        assert stats["io"].workers == 2
        assert stats["io"].completed == 2
        assert stats["thread"].completed == 0


async def test_named_process_pool() -> None:
    settings = small(pools={"ml": {"kind": "process", "max_workers": 1}})
    async with Offloader(settings) as ex:
        pid = await ex.pool("ml").run(funcs.getpid)
        assert pid != MAIN_PID
        assert pid != await ex.pool("process").run(funcs.getpid)
        assert ex.offloader.stats()["ml"].completed == 1
        assert ex.offloader.stats()["process"].completed == 1


async def test_unknown_pool_lists_pools(ex: Executor) -> None:
    with pytest.raises(LookupError) as info:
        ex.pool("nope")
    message = str(info.value)
    assert "nope" in message
    assert "thread" in message
    assert "process" in message


async def test_unknown_pool_lists_named_pools() -> None:
    async with Offloader(small(pools={"io": {"kind": "thread"}})) as ex:
        with pytest.raises(LookupError, match="io"):
            ex.pool("nope")


# -- options ------------------------------------------------------------------------------


async def test_timeout_on_thread_call(ex: Executor) -> None:
    release = threading.Event()
    started = threading.Event()
    try:
        start = anyio.current_time()
        with anyio.fail_after(5):
            with pytest.raises(OffloadTimeout) as info:
                await ex.pool("thread").options(timeout=0.2).run(funcs.block_on, release, started)
        elapsed = anyio.current_time() - start
    finally:
        release.set()
    assert started.is_set()
    assert isinstance(info.value, TimeoutError)
    assert isinstance(info.value, OffloadError)
    # Not before the deadline; the function returns only after the release, so a
    # caller that waited for it would have hit fail_after.
    assert elapsed >= 0.2 - TICK
    assert ex.pool("thread").stats().timed_out == 1


async def test_timeout_on_process_call(ex: Executor) -> None:
    start = anyio.current_time()
    with anyio.fail_after(5):
        with pytest.raises(TimeoutError):
            await ex.options(timeout=0.3).run(funcs.sleep_then, 30, "late")
    # not before the deadline, nor at the sleep's end (fail_after stands for that)
    assert anyio.current_time() - start >= 0.3 - TICK
    assert ex.stats().timed_out == 1
    # the pool is still usable
    assert await ex.run(funcs.add, 1, 1) == 2


async def test_options_keep_pool_and_pool_keeps_options(ex: Executor) -> None:
    release = threading.Event()
    try:
        opt = ex.options(timeout=0.2).pool("thread")
        assert opt.pool_name == "thread"
        with anyio.fail_after(5):
            with pytest.raises(OffloadTimeout):
                await opt.run(funcs.block_on, release)
    finally:
        release.set()


async def test_options_none_means_no_deadline() -> None:
    async with Offloader(small(thread={"timeout": 0.1})) as ex:
        tex = ex.pool("thread")
        with anyio.fail_after(5):
            release = threading.Event()
            try:
                with pytest.raises(OffloadTimeout):
                    await tex.run(funcs.block_on, release)  # the pool's own timeout
            finally:
                release.set()
            assert await tex.options(timeout=None).run(funcs.sleep_then, 0.2, "x") == "x"


def test_options_bad_timeout() -> None:
    executor = Offloader(small()).executor  # options() needs no running pools
    for timeout in (0, -1, -0.1, math.nan):
        with pytest.raises(ValueError, match="timeout must be a positive number"):
            executor.options(timeout=timeout)
    for wrong in ("x", "10", True, False, [1], b"1"):
        with pytest.raises(TypeError, match="timeout must be a positive number"):
            executor.options(timeout=wrong)  # type: ignore[arg-type]
    assert executor.options(timeout=None).pool_name == "process"
    assert executor.options(timeout=2).pool_name == "process"


def test_offloader_refuses_what_is_not_settings() -> None:
    with pytest.raises(TypeError, match="OffloadSettings"):
        Offloader({"process": {"max_workers": 1}})  # type: ignore[arg-type]


async def test_keywords_named_like_options_reach_fn(ex: Executor) -> None:
    for pool in ("thread", "process"):
        got = await ex.pool(pool).run(funcs.kw, timeout=0.001, kind="nope", fn="x", pool="y")
        assert got == {"timeout": 0.001, "kind": "nope", "fn": "x", "pool": "y"}
        got = await ex.pool(pool).options(timeout=5).run(funcs.kw, timeout=0, options=1)
        assert got == {"timeout": 0, "options": 1}


# -- what can run ----------------------------------------------------------------------------


async def _coro() -> None:
    pass


async def _agen() -> AsyncIterator[int]:
    yield 1


async def test_async_function_rejected(ex: Executor) -> None:
    for pool in ("thread", "process"):
        with pytest.raises(TypeError, match="async"):
            await ex.pool(pool).run(_coro)  # type: ignore[unused-coroutine]
        with pytest.raises(TypeError, match="async"):
            await ex.pool(pool).run(_agen)
        with pytest.raises(TypeError):
            await ex.pool(pool).run(3)  # type: ignore[call-overload]
        assert ex.pool(pool).stats().completed == 0


def _numbers(ran: list[int]) -> Iterator[int]:
    ran.append(1)
    yield 1


class _Numbers:
    def __call__(self, ran: list[int]) -> Iterator[int]:
        ran.append(1)
        yield 1


async def test_generator_function_refused(ex: Executor) -> None:
    ran: list[int] = []
    for pool in ("thread", "process"):
        for target in (_numbers, functools.partial(_numbers), _Numbers()):
            with pytest.raises(TypeError, match="generator") as info:
                await ex.pool(pool).run(target, ran)
            assert "Executor.stream" in str(info.value)
    assert ran == []
    assert ex.pool("thread").stats().completed == ex.pool("process").stats().completed == 0


class _Sync:
    def __call__(self, x: int) -> int:
        return x + 1


class _Async:
    async def __call__(self) -> None:
        pass


def test_callable_instances_are_told_apart_by_their_call() -> None:
    from offload._types import check_sync_callable

    check_sync_callable(_Sync())
    with pytest.raises(TypeError, match="async"):
        check_sync_callable(_Async())
    with pytest.raises(TypeError, match="generator"):
        check_sync_callable(_Numbers())
    mark = getattr(inspect, "markcoroutinefunction", None)  # Python 3.12+
    if mark is not None:
        marked = _Sync()
        mark(marked)
        with pytest.raises(TypeError, match="async"):
            check_sync_callable(marked)


def _numbers_in_disguise(ran: list[int]) -> Iterator[int]:
    return _numbers(ran)  # a plain function that returns a generator


async def test_generator_returned_to_a_thread_call_is_refused(ex: Executor) -> None:
    ran: list[int] = []
    with pytest.raises(TypeError, match="generator"):
        await ex.pool("thread").run(_numbers_in_disguise, ran)
    assert ran == []  # its body never ran, on the loop or anywhere


def _coroutine_in_disguise() -> Coroutine[Any, Any, None]:
    return _coro()  # a plain function that returns a coroutine


async def test_coroutine_returned_to_a_thread_call_is_refused(ex: Executor) -> None:
    with pytest.raises(TypeError, match="coroutine"):
        await ex.pool("thread").run(_coroutine_in_disguise)  # type: ignore[unused-coroutine]


async def test_run_decorated_function(ex: Executor) -> None:
    assert await ex.run(funcs.double, 3) == 6
    for pool in ("thread", "process"):
        assert await ex.pool(pool).run(funcs.double, 3) == 6
        assert await ex.pool(pool).run(funcs.thread_double, 4) == 8  # its own kind is ignored
    assert ex.pool("thread").stats().completed == 2
    assert ex.pool("process").stats().completed == 3


async def test_run_lambda_in_process_pool(ex: Executor) -> None:
    assert await ex.run(lambda x: x + 1, 1) == 2


async def test_user_exception_thread_and_process(ex: Executor) -> None:
    for pool in ("thread", "process"):
        with pytest.raises(funcs.Boom, match="bad"):
            await ex.pool(pool).run(funcs.boom, "bad")
        assert ex.pool(pool).stats().failed == 1


# -- lifecycle -----------------------------------------------------------------------------


async def test_run_before_enter_raises_pool_closed() -> None:
    off = Offloader(small())
    with pytest.raises(PoolClosed, match="not started"):
        await off.executor.run(funcs.add, 1, 2)
    with pytest.raises(PoolClosed):
        await off.executor.pool("thread").run(funcs.add, 1, 2)
    with pytest.raises(LookupError):
        off.executor.pool("nope")


async def test_run_after_exit_raises_pool_closed() -> None:
    off = Offloader(small())
    async with off as ex:
        assert await ex.run(funcs.add, 1, 2) == 3
    for executor in (ex, ex.pool("thread"), off.executor):
        with pytest.raises(PoolClosed, match="stopped"):
            await executor.run(funcs.add, 1, 2)


async def test_pool_closed_outcomes_are_counted() -> None:
    release = threading.Event()
    started = threading.Event()
    off = Offloader(small(shutdown_timeout=0.1))

    async def held(tex: Executor) -> None:
        with pytest.raises(PoolClosed):  # ended by the shutdown
            await tex.run(funcs.block_on, release, started)

    try:
        async with anyio.create_task_group() as tg, off as ex:
            tg.start_soon(held, ex.pool("thread"))
            await anyio.to_thread.run_sync(started.wait, 10)
    finally:
        release.set()
    with pytest.raises(PoolClosed):  # refused: the pool has stopped
        await ex.run(funcs.add, 1, 2)
    stats = off.stats()
    assert stats["thread"].closed == 1
    assert stats["process"].closed == 1
    assert ex.stats() == stats["process"]  # the final snapshot, read after the stop
    assert ex.pool("thread").stats() == stats["thread"]
    assert stats["thread"].failed == stats["process"].failed == 0


async def test_enter_twice_raises_runtime_error() -> None:
    off = Offloader(small())
    async with off:
        with pytest.raises(RuntimeError):
            async with off:
                pass  # pragma: no cover
        assert off.running  # the failed re-entry left it alone
        assert await off.executor.run(funcs.add, 1, 2) == 3
    with pytest.raises(RuntimeError):
        async with off:
            pass  # pragma: no cover
    assert not off.running


async def test_offloader_stats_returns_both_pools(ex: Executor) -> None:
    stats = ex.offloader.stats()
    assert set(stats) == {"thread", "process"}
    for name, snapshot in stats.items():
        assert isinstance(snapshot, PoolStats)
        assert snapshot.name == name
        assert snapshot.kind == name
        assert snapshot.completed == 0
        assert snapshot.busy == 0
        assert snapshot.queued == 0
    assert stats["process"].workers == 2  # the fixture's max_workers
    assert stats["thread"].workers == 4


async def test_enter_returns_bound_executor() -> None:
    off = Offloader(small())
    async with off as ex:
        assert ex is off.executor
        assert ex.offloader is off
        assert off.running
    assert not off.running


# -- checkpoints and cancellation ------------------------------------------------------------


async def test_call_in_a_cancelled_scope_sends_nothing(ex: Executor, tmp_path: Path) -> None:
    pid = await ex.run(funcs.getpid)
    flag = tmp_path / "ran"
    for pool in (ex, ex.pool("thread")):
        with anyio.CancelScope() as scope:
            scope.cancel()
            await pool.run(funcs.touch_then, str(flag))
            pytest.fail("the call returned in a cancelled scope")  # pragma: no cover
        with anyio.CancelScope() as scope:
            scope.cancel()
            await funcs.triple(2)  # a decorated function
            pytest.fail("the call returned in a cancelled scope")  # pragma: no cover
    assert not flag.exists()
    assert await ex.run(funcs.getpid) == pid  # the idle worker was not touched
    assert ex.stats().crashed == 0


RETRY_LOOPS = """
import sys
import threading

import anyio

from offload import Offloader, OffloadSettings, PoolClosed, PoolOverloaded
from tests import funcs


async def retry(run, error):
    while True:
        try:
            return await run()
        except error:
            pass  # a loop with no await of its own: the call's await must yield


async def busy(pool):
    with anyio.fail_after(20):
        while pool.stats().busy < 1:
            await anyio.sleep(0.01)


async def main():
    full = {"max_workers": 1, "max_pending": 0}
    settings = OffloadSettings(process=full, thread=full, lag_probe=False, shutdown_timeout=5)
    async with Offloader(settings) as ex:
        for name in ("process", "thread"):
            pool = ex.pool(name)
            async with anyio.create_task_group() as tg:
                # The busy call's answer is read only if the retry loop lets the loop run.
                tg.start_soon(pool.run, funcs.sleep_then, 0.2, None)
                await busy(pool)
                assert await retry(lambda: pool.run(funcs.add, 1, 2), PoolOverloaded) == 3
            release = threading.Event()
            held = (funcs.block_on, release) if name == "thread" else (funcs.sleep_then, 60, 0)
            async with anyio.create_task_group() as tg:
                tg.start_soon(pool.run, *held)
                await busy(pool)
                with anyio.move_on_after(0.1) as scope:  # a deadline still fires
                    await retry(lambda: pool.run(funcs.add, 1, 2), PoolOverloaded)
                assert scope.cancelled_caught
                release.set()
                tg.cancel_scope.cancel()
    with anyio.move_on_after(0.1) as scope:
        await retry(lambda: ex.run(funcs.add, 1, 2), PoolClosed)
    assert scope.cancelled_caught
    print("ok", flush=True)


anyio.run(main, backend="trio" if sys.argv[1] == "trio" else "asyncio")
"""


async def test_a_retry_loop_on_refusals_lets_the_loop_run(
    anyio_backend: Backend, tmp_path: Path
) -> None:
    proc = await run_script(tmp_path, RETRY_LOOPS, loop_name(anyio_backend), timeout=60)
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout.decode().split() == ["ok"]


async def test_entering_an_offloader_twice_is_a_checkpoint_too() -> None:
    off = Offloader(small())
    async with off:
        with anyio.CancelScope() as scope:
            scope.cancel()
            async with off:
                pytest.fail("entered twice")  # pragma: no cover
        assert scope.cancelled_caught  # cancelled at the checkpoint, before the refusal


async def test_a_callable_whose_repr_fails_gets_offloads_own_error(ex: Executor) -> None:
    # The error names the function; a repr() that raises must not replace the error.
    with pytest.raises(SerializationError, match=r"BadRepr"):
        await ex.pool("process").run(funcs.BadRepr())
    assert await ex.pool("process").run(funcs.add, 1, 2) == 3
