"""Faults in the process pool, with real worker processes: a crash fails only its own
call, overload refuses at once, what will not pickle fails with a clear error, a
user's exception keeps its type.

Every wait is a bounded poll on a condition (``wait_until``); no test sleeps and hopes.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from offload import (
    Executor,
    Offloader,
    PoolOverloaded,
    RemoteTraceback,
    SerializationError,
    WorkerCrashed,
)

from .. import funcs
from ..conftest import Backend, loop_name
from ..processes import (
    IDLE_WORKERS_DEAD_WITH_SIGPIPE_DEFAULT,
    gone,
    pids_of_concurrent_calls,
    run_script,
    settings,
    wait_until,
    worker_pids,
    worker_procs,
    zombie_children,
)

# -- 4. a crash fails only its own call ------------------------------------------------


@pytest.mark.parametrize("crash", ["exit3", "segfault", "sigkill"])
async def test_crash_fails_only_its_call(crash: str, tmp_path: Path) -> None:
    async with Offloader(settings(max_workers=3)) as ex:
        pool = ex.pool("process")
        original = worker_pids()
        assert len(original) == 3
        results: list[str] = []

        async def innocent() -> None:
            results.append(await pool.run(funcs.sleep_then, 0.5, "ok"))

        async with anyio.create_task_group() as tg:
            tg.start_soon(innocent)
            tg.start_soon(innocent)
            await wait_until(lambda: pool.stats().busy == 2, 5, "both innocent calls running")

            fn: Callable[..., Any]
            args: tuple[Any, ...]
            if crash == "exit3":
                fn, args = funcs.exit_now, (3,)
            elif crash == "segfault":
                fn, args = funcs.segfault, ()
            else:
                pidfile = tmp_path / "pid"
                fn, args = funcs.write_pid_then_spin, (str(pidfile), 30)

                async def killer() -> None:
                    await wait_until(pidfile.exists, 5, "the spinning worker wrote its pid")
                    os.kill(int(pidfile.read_text()), signal.SIGKILL)

                tg.start_soon(killer)
            with pytest.raises(WorkerCrashed) as info:
                await pool.run(fn, *args)

        assert results == ["ok", "ok"]
        exc = info.value
        message = str(exc)
        if crash == "exit3":
            assert exc.exitcode == 3
            assert "exited with code 3" in message
        elif crash == "segfault":
            assert exc.exitcode == -signal.SIGSEGV
            assert "SIGSEGV" in message
        else:
            assert exc.exitcode == -signal.SIGKILL
            assert "SIGKILL" in message
        crashed_pid = exc.pid
        assert crashed_pid is not None
        assert crashed_pid in original
        assert str(crashed_pid) in message

        stats = pool.stats()
        assert stats.crashed == 1
        assert stats.completed == 2
        assert stats.failed == 0

        await wait_until(lambda: gone(crashed_pid), 3, f"crashed worker {crashed_pid} gone")
        await wait_until(
            lambda: pool.stats().workers == 3 and len(worker_procs()) == 3,
            5,
            lambda: f"pool back to 3 workers: {pool.stats()}",
        )
        assert await pool.run(funcs.add, 1, 1) == 2


async def test_crash_is_reported_while_a_forked_child_holds_the_channel(
    ex: Executor, tmp_path: Path
) -> None:
    # The child keeps the worker's end of the channel open: the caller must not wait
    # for it to go, but learn of the crash from the worker's own exit.
    release = tmp_path / "release"
    pool = ex.pool("process")
    try:
        with anyio.fail_after(5):
            with pytest.raises(WorkerCrashed) as info:
                await pool.run(funcs.fork_then_exit, str(release), 5)
        assert info.value.exitcode == 5
        assert await pool.run(funcs.add, 2, 3) == 5
    finally:
        release.touch()


# -- 5. repeated crashes ---------------------------------------------------------------


async def test_repeated_crashes_leave_no_extra_processes(ex: Executor) -> None:
    pool = ex.pool("process")
    crashed: list[int] = []
    for _ in range(6):
        with pytest.raises(WorkerCrashed) as info:
            await pool.run(funcs.exit_now, 3)
        assert info.value.exitcode == 3
        assert info.value.pid is not None
        crashed.append(info.value.pid)
    assert len(set(crashed)) == 6  # each crash took down a different process

    await wait_until(
        lambda: len(worker_procs()) == 2 and pool.stats().workers == 2 and not zombie_children(),
        5,
        lambda: (
            f"2 live workers, no zombies: live={worker_pids()} "
            f"zombies={zombie_children()} stats={pool.stats()}"
        ),
    )
    assert not worker_pids() & set(crashed)
    assert all(gone(pid) for pid in crashed)
    assert await pool.run(funcs.add, 20, 22) == 42
    assert pool.stats().crashed == 6


# -- 6. overload -----------------------------------------------------------------------


async def test_overload_refuses_at_once(tmp_path: Path) -> None:
    release = tmp_path / "release"
    async with Offloader(settings(max_workers=1, max_pending=2)) as ex:
        pool = ex.pool("process")
        results: dict[str, Any] = {}

        async def call(key: str, fn: Callable[..., Any], *args: Any) -> None:
            results[key] = await pool.run(fn, *args)

        async with anyio.create_task_group() as tg:
            try:
                tg.start_soon(call, "running", funcs.wait_for_file, str(release), "first")
                await wait_until(lambda: pool.stats().busy == 1, 5, "one call running")
                tg.start_soon(call, "queued1", funcs.add, 1, 1)
                tg.start_soon(call, "queued2", funcs.add, 2, 2)
                await wait_until(lambda: pool.stats().queued == 2, 5, "two calls queued")

                with pytest.raises(PoolOverloaded):
                    await pool.run(funcs.add, 3, 3)
                # Refused while the line could not move (the running call holds its
                # worker until the release): it waited for no place in line.
                assert results == {}
                assert pool.stats().busy == 1
                assert pool.stats().queued == 2  # the refused call took no place in line
            finally:
                release.write_text("")

        assert results == {"running": "first", "queued1": 2, "queued2": 4}
        assert pool.stats().completed == 3


# -- 7. serialization errors -----------------------------------------------------------


async def test_unpicklable_argument_and_result(ex: Executor, tmp_path: Path) -> None:
    pool = ex.pool("process")
    original = worker_pids()
    assert len(original) == 2

    results: list[str] = []
    release = tmp_path / "release"

    async def occupy() -> None:
        results.append(await pool.run(funcs.wait_for_file, str(release), "ok"))

    async with anyio.create_task_group() as tg:
        try:
            tg.start_soon(occupy)
            tg.start_soon(occupy)
            await wait_until(lambda: pool.stats().busy == 2, 5, "both workers busy")
            # With every worker held until the release, a call that got as far as
            # dispatch would wait in line: refused while they are still held, it was
            # refused before.
            with pytest.raises(SerializationError) as info:
                await pool.run(funcs.echo, threading.Lock())
            assert results == []
            assert "echo" in str(info.value)
            assert pool.stats().queued == 0
            assert pool.stats().busy == 2
        finally:
            release.write_text("")
    assert results == ["ok", "ok"]

    with pytest.raises(SerializationError) as info:
        await pool.run(funcs.return_lock)
    assert "return_lock" in str(info.value)

    # The same two workers still serve calls.
    pids = await pids_of_concurrent_calls(pool, 2)
    assert set(pids) == original
    assert worker_pids() == original
    assert pool.stats().crashed == 0


# -- 8. user exceptions ----------------------------------------------------------------


async def test_user_exception_keeps_its_type(ex: Executor) -> None:
    with pytest.raises(funcs.Boom) as info:
        await ex.pool("process").run(funcs.boom, "x")
    assert type(info.value) is funcs.Boom
    assert str(info.value) == "x"
    cause = info.value.__cause__
    assert isinstance(cause, RemoteTraceback)
    assert "boom" in cause.tb
    assert "boom" in str(cause)
    assert ex.pool("process").stats().failed == 1


async def test_calls_skip_idle_workers_that_died_unseen(
    tmp_path: Path, anyio_backend: Backend
) -> None:
    # A send to a dead worker fails with EPIPE, not SIGPIPE, even with SIGPIPE's
    # default action restored: the call moves on and no call is failed.
    done = await run_script(
        tmp_path, IDLE_WORKERS_DEAD_WITH_SIGPIPE_DEFAULT, loop_name(anyio_backend)
    )
    stdout, stderr = done.stdout.decode(), done.stderr.decode()
    assert done.returncode == 0, (done.returncode, stderr)
    assert stdout.split() == ["7", "0"], (stdout, stderr)
