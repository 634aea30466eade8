"""The thread pool: own limiter, deadlines that abandon threads, check_cancelled, overload."""

from __future__ import annotations

import os
import threading
import traceback
from collections.abc import AsyncIterator
from functools import partial
from typing import Any

import anyio
import anyio.to_thread
import pytest

from offload import (
    CallCancelled,
    Executor,
    Offloader,
    OffloadSettings,
    OffloadTimeout,
    PoolClosed,
    PoolOverloaded,
    PoolSettings,
    check_cancelled,
)

from .. import funcs

#: one tick of the loop's clock: uvloop's counts whole milliseconds
TICK = 0.001


def make_settings(**thread: Any) -> OffloadSettings:
    shutdown_timeout = thread.pop("shutdown_timeout", 5)
    return OffloadSettings(
        default_pool="thread",
        thread=PoolSettings(**thread),
        process={"max_workers": 1},
        shutdown_timeout=shutdown_timeout,
    )


@pytest.fixture
async def one() -> AsyncIterator[Executor]:
    """A thread pool with a single worker."""
    async with Offloader(make_settings(max_workers=1)) as ex:
        yield ex


async def wait_thread_event(event: threading.Event, timeout: float = 5) -> bool:
    """Wait for a threading.Event without blocking the loop (or any shared limiter)."""
    return await anyio.to_thread.run_sync(event.wait, timeout, limiter=anyio.CapacityLimiter(1))


async def wait_until(predicate: Any, timeout: float = 5) -> None:
    """Poll ``predicate`` at each loop turn until it holds; fail after ``timeout``."""
    with anyio.fail_after(timeout):
        while not predicate():
            await anyio.sleep(0.005)


# -- where calls run ---------------------------------------------------------------------


async def test_runs_in_another_thread_of_this_process(one: Executor) -> None:
    ident = await one.run(funcs.thread_ident)
    assert ident != threading.get_ident()
    assert await one.run(funcs.getpid) == os.getpid()
    assert await one.run(funcs.add, 2, 3) == 5


async def test_uses_its_own_limiter_not_anyios_default() -> None:
    default = anyio.to_thread.current_default_thread_limiter()
    old_tokens = default.total_tokens
    default.total_tokens = 1
    hog_release = threading.Event()
    hog_started = threading.Event()
    try:
        async with Offloader(make_settings(max_workers=2)) as ex:
            async with anyio.create_task_group() as tg:
                # Take anyio's only default token, as a busy sync route would.
                tg.start_soon(
                    partial(anyio.to_thread.run_sync, funcs.block_on, hog_release, hog_started)
                )
                assert await wait_thread_event(hog_started)
                assert default.borrowed_tokens == 1

                barrier = threading.Barrier(2, timeout=5)
                arrivals: list[int] = []

                async def meet() -> None:
                    arrivals.append(await ex.run(funcs.barrier_wait, barrier))

                with anyio.fail_after(8):
                    async with anyio.create_task_group() as calls:
                        calls.start_soon(meet)
                        calls.start_soon(meet)
                # both met at the barrier: they ran at the same time, on two threads
                assert sorted(arrivals) == [0, 1]
                assert default.borrowed_tokens == 1  # offloaded calls took none
                hog_release.set()
            assert ex.stats().completed == 2
    finally:
        hog_release.set()
        default.total_tokens = old_tokens


async def test_max_workers_bounds_concurrency() -> None:
    release = threading.Event()
    started = [threading.Event() for _ in range(3)]
    try:
        async with Offloader(make_settings(max_workers=2)) as ex:
            async with anyio.create_task_group() as tg:
                for ev in started:
                    tg.start_soon(ex.run, funcs.block_on, release, ev)
                await wait_until(lambda: ex.stats().busy == 2 and ex.stats().queued == 1)
                assert sum(ev.is_set() for ev in started) <= 2
                assert not all(ev.is_set() for ev in started)
                release.set()
            assert all(ev.is_set() for ev in started)
            assert ex.stats().completed == 3
    finally:
        release.set()


# -- deadlines abandon the thread -------------------------------------------------------


async def test_deadline_returns_at_once_and_slot_stays_taken(one: Executor) -> None:
    release = threading.Event()
    started = threading.Event()
    finished = threading.Event()
    queued_started = threading.Event()
    try:
        t0 = anyio.current_time()
        with anyio.fail_after(5):
            with pytest.raises(OffloadTimeout):
                await one.options(timeout=0.3).run(funcs.block_on, release, started, finished)
        # Not before the deadline; and the function never returns before the release:
        # a caller that waited for it would have hit fail_after.
        assert anyio.current_time() - t0 >= 0.3 - TICK
        # the thread runs on
        assert started.is_set()
        assert not finished.is_set()
        stats = one.stats()
        assert stats.busy == 1
        assert stats.timed_out == 1

        # its slot is still taken: a new call waits in the queue and times out there
        t0 = anyio.current_time()
        with anyio.fail_after(5):
            with pytest.raises(OffloadTimeout):
                await one.options(timeout=0.2).run(funcs.block_on, release, queued_started)
        assert anyio.current_time() - t0 >= 0.2 - TICK
        assert not queued_started.is_set()
        assert one.stats().queued == 0
        assert one.stats().busy == 1
        assert not finished.is_set()
    finally:
        release.set()

    # once the abandoned function returns, the slot comes back
    assert await wait_thread_event(finished)
    with anyio.fail_after(5):
        assert await one.run(funcs.add, 1, 2) == 3
    await wait_until(lambda: one.stats().busy == 0)
    stats = one.stats()
    assert stats.timed_out == 2
    assert stats.completed == 1


async def test_caller_cancel_abandons_thread(one: Executor) -> None:
    release = threading.Event()
    started = threading.Event()
    finished = threading.Event()
    try:
        with anyio.fail_after(5):
            with anyio.CancelScope() as scope:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(one.run, funcs.block_on, release, started, finished)
                    assert await wait_thread_event(started)
                    scope.cancel()
        assert scope.cancelled_caught
        assert not finished.is_set()
        assert one.stats().busy == 1
        assert one.stats().cancelled == 1
    finally:
        release.set()
    assert await wait_thread_event(finished)
    with anyio.fail_after(5):
        assert await one.run(funcs.add, 2, 2) == 4


# -- check_cancelled ----------------------------------------------------------------------


async def test_check_cancelled_raises_in_abandoned_thread(one: Executor) -> None:
    started = threading.Event()
    saw_cancel = threading.Event()
    release = threading.Event()
    try:
        with anyio.fail_after(5):
            with pytest.raises(OffloadTimeout):
                await one.options(timeout=0.2).run(
                    funcs.loop_until_cancelled, started, saw_cancel, release
                )
        assert started.is_set()
        assert await wait_thread_event(saw_cancel), "check_cancelled() never raised"
    finally:
        release.set()
    # the function ended (by CallCancelled): the slot comes back
    with anyio.fail_after(5):
        assert await one.run(funcs.add, 1, 1) == 2


async def test_check_cancelled_raises_after_caller_cancel(one: Executor) -> None:
    started = threading.Event()
    saw_cancel = threading.Event()
    release = threading.Event()
    try:
        with anyio.move_on_after(5) as outer:
            async with anyio.create_task_group() as tg:
                tg.start_soon(one.run, funcs.loop_until_cancelled, started, saw_cancel, release)
                assert await wait_thread_event(started)
                tg.cancel_scope.cancel()
        assert not outer.cancelled_caught
        assert await wait_thread_event(saw_cancel), "check_cancelled() never raised"
    finally:
        release.set()


async def test_check_cancelled_is_a_no_op_elsewhere(one: Executor) -> None:
    check_cancelled()  # the event loop's thread, no call: must not raise
    await anyio.to_thread.run_sync(check_cancelled)  # some other thread: must not raise
    # a thread call nobody gave up on
    assert await one.run(funcs.check_cancelled_once) == "ok"
    # a process worker
    assert await one.pool("process").run(funcs.check_cancelled_once) == "ok"
    # a thread that previously ran an abandoned call does not carry it over
    started = threading.Event()
    saw_cancel = threading.Event()
    release = threading.Event()
    try:
        with pytest.raises(OffloadTimeout):
            await one.options(timeout=0.1).run(
                funcs.loop_until_cancelled, started, saw_cancel, release
            )
        assert await wait_thread_event(saw_cancel)
    finally:
        release.set()
    with anyio.fail_after(5):
        assert await one.run(funcs.check_cancelled_once) == "ok"


def test_call_cancelled_is_an_offload_error() -> None:
    from offload import OffloadError

    assert issubclass(CallCancelled, OffloadError)


# -- overload ------------------------------------------------------------------------------


async def test_overload_raises_at_once() -> None:
    release = threading.Event()
    started = threading.Event()
    results: list[Any] = []

    async def call(*args: Any) -> None:
        results.append(await ex.run(*args))

    try:
        async with Offloader(make_settings(max_workers=1, max_pending=1)) as ex:
            async with anyio.create_task_group() as tg:
                tg.start_soon(call, funcs.block_on, release, started, None, "first")
                assert await wait_thread_event(started)
                tg.start_soon(call, funcs.add, 1, 1)
                await wait_until(lambda: ex.stats().queued == 1)

                # Refused while the line cannot move (the first call holds the only
                # thread until the release): it waited for no place in line.
                with anyio.fail_after(5), pytest.raises(PoolOverloaded, match="max_pending"):
                    await ex.run(funcs.add, 2, 2)
                assert results == []
                assert ex.stats().queued == 1
                release.set()
            assert sorted(map(str, results)) == ["2", "first"]
            # with the queue drained, calls are accepted again
            assert await ex.run(funcs.add, 3, 3) == 6
    finally:
        release.set()


async def test_max_pending_zero_refuses_when_busy() -> None:
    release = threading.Event()
    started = threading.Event()
    try:
        async with Offloader(make_settings(max_workers=1, max_pending=0)) as ex:
            async with anyio.create_task_group() as tg:
                tg.start_soon(ex.run, funcs.block_on, release, started)
                assert await wait_thread_event(started)
                with pytest.raises(PoolOverloaded):
                    await ex.run(funcs.add, 1, 1)
                release.set()
            assert await ex.run(funcs.add, 1, 1) == 2
    finally:
        release.set()


# -- errors ----------------------------------------------------------------------------------


async def test_user_exception_keeps_type_and_traceback(one: Executor) -> None:
    with pytest.raises(funcs.Boom) as info:
        await one.run(funcs.boom, "kaput")
    assert info.type is funcs.Boom
    assert str(info.value) == "kaput"
    frames = traceback.extract_tb(info.value.__traceback__)
    assert any(f.name == "boom" and f.filename == funcs.__file__ for f in frames), [
        (f.filename, f.name) for f in frames
    ]
    assert one.stats().failed == 1
    # the worker thread is fine afterwards
    assert await one.run(funcs.add, 1, 2) == 3


# -- shutdown ---------------------------------------------------------------------------------


async def test_shutdown_does_not_wait_for_abandoned_thread() -> None:
    release = threading.Event()
    started = threading.Event()
    finished = threading.Event()
    shutdown_timeout = 0.5
    try:
        off = Offloader(make_settings(max_workers=1, shutdown_timeout=shutdown_timeout))
        # The thread returns only after the release, which comes after the exit: an
        # exit that waited for it would hit fail_after, however fast the machine.
        with anyio.fail_after(10):
            async with off as ex:
                with pytest.raises(OffloadTimeout):
                    await ex.options(timeout=0.1).run(funcs.block_on, release, started, finished)
                assert ex.stats().busy == 1
        assert not finished.is_set()  # it really was still running
    finally:
        release.set()
    assert await wait_thread_event(finished)


async def test_shutdown_cancels_call_in_flight_after_shutdown_timeout() -> None:
    release = threading.Event()
    started = threading.Event()
    finished = threading.Event()
    shutdown_timeout = 0.5
    errors: list[BaseException] = []
    off = Offloader(make_settings(max_workers=1, shutdown_timeout=shutdown_timeout))

    async def caller() -> None:
        try:
            await off.executor.run(funcs.block_on, release, started, finished)
        except PoolClosed as exc:
            errors.append(exc)

    try:
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                async with off:
                    tg.start_soon(caller)
                    assert await wait_thread_event(started)
                    t0 = anyio.current_time()
                exit_time = anyio.current_time() - t0
            assert not finished.is_set()  # the exit did not wait for the call
    finally:
        release.set()
    # The call returns only after the release, which came after the exit: fail_after
    # stands for "did not wait for the call", whatever the machine's speed.
    assert len(errors) == 1
    assert isinstance(errors[0], PoolClosed), repr(errors[0])
    assert exit_time >= shutdown_timeout * 0.8  # it did give the call its drain time
    assert await wait_thread_event(finished)
