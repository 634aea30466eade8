"""Fault tests of the process pool, with real worker processes.

Every wait is a bounded poll on a condition (``wait_until``); no test sleeps and hopes.
"""

from __future__ import annotations

import os
import signal
import sys
import textwrap
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import psutil
import pytest

from offload import (
    Executor,
    Offloader,
    OffloadSettings,
    OffloadTimeout,
    PoolClosed,
    PoolOverloaded,
    PoolSettings,
    RemoteTraceback,
    SerializationError,
    WorkerCrashed,
)

from .. import funcs
from ..conftest import Backend, loop_name

PROJECT_ROOT = Path(__file__).resolve().parents[2]
#: appears in the command line of every worker process (see ``launch._BOOT``)
WORKER_MARK = "offload._pools.process.worker"


# -- helpers ---------------------------------------------------------------------------


def worker_procs(parent: psutil.Process | None = None) -> list[psutil.Process]:
    """Live (non-zombie) worker processes that are direct children of ``parent``."""
    parent = parent or psutil.Process()
    found = []
    for child in parent.children():
        try:
            if child.status() == psutil.STATUS_ZOMBIE:
                continue
            if WORKER_MARK in " ".join(child.cmdline()):
                found.append(child)
        except psutil.NoSuchProcess:
            pass
    return found


def worker_pids() -> set[int]:
    return {p.pid for p in worker_procs()}


def zombie_children() -> list[int]:
    zombies = []
    for child in psutil.Process().children():
        try:
            if child.status() == psutil.STATUS_ZOMBIE:
                zombies.append(child.pid)
        except psutil.NoSuchProcess:
            pass
    return zombies


def gone(pid: int) -> bool:
    """The process has exited. A zombie counts: it runs nothing, and once its parent
    is dead, reaping it is up to init (which here reaps only periodically)."""
    try:
        return bool(psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


async def wait_until(
    cond: Callable[[], bool], timeout: float, what: str | Callable[[], str]
) -> None:
    """Poll ``cond`` every 10 ms; fail the test if it is not true within ``timeout`` s."""
    deadline = anyio.current_time() + timeout
    while not cond():
        if anyio.current_time() > deadline:
            detail = what() if callable(what) else what
            pytest.fail(f"not true within {timeout} s: {detail}")
        await anyio.sleep(0.01)


async def wait_until_async(
    cond: Callable[[], Awaitable[bool]], timeout: float, what: str | Callable[[], str]
) -> None:
    """``wait_until`` for a condition that must be awaited (asks another process)."""
    deadline = anyio.current_time() + timeout
    while not await cond():
        if anyio.current_time() > deadline:
            detail = what() if callable(what) else what
            pytest.fail(f"not true within {timeout} s: {detail}")
        await anyio.sleep(0.01)


def cpu_seconds(proc: psutil.Process) -> float | None:
    try:
        t = proc.cpu_times()
    except psutil.NoSuchProcess:
        return None
    return float(t.user + t.system)


def script_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OFFLOAD_")}
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(PROJECT_ROOT), env.get("PYTHONPATH", "")) if p
    )
    return env


def settings(**process: Any) -> OffloadSettings:
    return OffloadSettings(
        process=PoolSettings(**process),
        thread=PoolSettings(max_workers=4),
        shutdown_timeout=5,
    )


# -- 1. deadline -----------------------------------------------------------------------


async def test_deadline_stops_cpu_bound_call_and_kills_its_worker(ex: Executor) -> None:
    pool = ex.pool("process")
    original = {p.pid: p for p in worker_procs()}
    assert len(original) == 2

    # What each worker had used before the call: its share of the call is the rest.
    cpu = {pid: cpu_seconds(proc) or 0.0 for pid, proc in original.items()}
    start_cpu = dict(cpu)
    outcome: dict[str, Any] = {}
    done = anyio.Event()
    spin = 30  # seconds the call would compute, were it not stopped

    async def call() -> None:
        started = time.perf_counter()
        try:
            outcome["result"] = await pool.options(timeout=0.5).run(funcs.spin, spin)
        except BaseException as exc:
            outcome["error"] = exc
        finally:
            outcome["elapsed"] = time.perf_counter() - started
            done.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(call)
        # Sample the workers' CPU time while the call runs, to tell which one spun.
        while not done.is_set():
            for pid, proc in original.items():
                seconds = cpu_seconds(proc)
                if seconds is not None:
                    cpu[pid] = seconds
            await anyio.sleep(0.02)

    assert isinstance(outcome.get("error"), OffloadTimeout), outcome
    # Not before the deadline (less a tick: uvloop's clock counts whole ms), and far
    # sooner than the call would have ended.
    assert 0.5 - 0.001 <= outcome["elapsed"] < spin / 4, outcome
    used = {pid: cpu[pid] - start_cpu[pid] for pid in original}
    busy = max(used, key=lambda pid: used[pid])
    (idle,) = set(original) - {busy}
    # One worker computed while the other idled: how much depends on the CPUs' load,
    # their ratio does not. The computing one was stopped far short of the call's end.
    assert used[busy] > 2 * used[idle], used
    assert used[busy] < spin / 4, used

    # The spinning worker is killed; the idle one is left alone.
    await wait_until(lambda: gone(busy), 3, f"worker {busy} that ran the timed-out call exited")
    assert not gone(idle)

    # A replacement joins, and both workers serve calls.
    await wait_until(
        lambda: pool.stats().workers == 2 and len(worker_procs()) == 2,
        5,
        lambda: f"pool back to 2 workers: {pool.stats()}, {worker_pids()}",
    )
    pids: list[int] = []

    async def getpid() -> None:
        pids.append(await pool.run(funcs.sleep_getpid, 0.2))

    async with anyio.create_task_group() as tg:
        tg.start_soon(getpid)
        tg.start_soon(getpid)
    assert len(set(pids)) == 2
    assert busy not in pids
    assert set(pids) == worker_pids()
    stats = pool.stats()
    assert stats.timed_out == 1
    assert stats.cancelled == 0


# -- 2. cancellation -------------------------------------------------------------------


async def test_cancel_scope_stops_running_call_and_kills_its_worker(ex: Executor) -> None:
    pool = ex.pool("process")
    original = worker_pids()
    assert len(original) == 2
    returned = False

    async def call() -> None:
        nonlocal returned
        await pool.run(funcs.spin, 30)
        returned = True

    # Cancelled once the call runs on a worker, however long it took to get there.
    async with anyio.create_task_group() as tg:
        tg.start_soon(call)
        await wait_until(lambda: pool.stats().busy == 1, 5, "the call reached a worker")
        tg.cancel_scope.cancel()
    assert not returned

    # Exactly one worker, the one that was spinning, is killed.
    await wait_until(
        lambda: sum(gone(pid) for pid in original) == 1,
        3,
        lambda: f"one of {original} killed; alive: {worker_pids()}",
    )
    stats = pool.stats()
    assert stats.cancelled == 1
    assert stats.timed_out == 0
    assert stats.failed == 0

    assert await pool.run(funcs.add, 2, 3) == 5
    await wait_until(
        lambda: pool.stats().workers == 2 and len(worker_procs()) == 2,
        5,
        lambda: f"pool back to 2 workers: {pool.stats()}",
    )
    assert await pool.run(funcs.add, 3, 4) == 7


async def test_call_started_on_hand_off_then_cancelled_kills_its_worker(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A waiting call's frame is sent by whoever frees a worker (``_send_on_handoff``);
    cancelled before its own task runs, the call is stopped like a running one."""
    async with Offloader(settings(max_workers=1)) as ex:
        pool = ex.pool("process")
        impl = ex.offloader.get_pool("process")
        first = await pool.run(funcs.getpid)
        scope = anyio.CancelScope()
        handoff = impl._handoff  # type: ignore[attr-defined]
        real = handoff._send_early

        def start_then_cancel(worker: Any, job: Any) -> bool:
            started: bool = real(worker, job)
            scope.cancel()  # the waiting caller, before it runs again
            return started

        monkeypatch.setattr(handoff, "_send_early", start_then_cancel)
        async with anyio.create_task_group() as tg:
            tg.start_soon(pool.run, funcs.sleep_getpid, 0.2)  # holds the only worker
            await wait_until(lambda: pool.stats().busy == 1, 5, "the worker busy")

            async def waiter() -> None:
                with scope:
                    await pool.run(funcs.spin, 30)  # would burn 30 s of CPU

            tg.start_soon(waiter)
        assert scope.cancelled_caught
        await wait_until(lambda: gone(first), 5, f"worker {first} stopped")
        assert await pool.run(funcs.getpid) != first  # a new worker serves
        stats = pool.stats()
    assert (stats.cancelled, stats.completed, stats.crashed) == (1, 3, 0)


# -- 3. a queued call past its deadline ------------------------------------------------


async def test_queued_call_past_deadline_never_runs(ex: Executor, tmp_path: Path) -> None:
    pool = ex.pool("process")
    marker = tmp_path / "f"
    release = tmp_path / "release"
    results: list[str] = []

    async def occupy(i: int) -> None:
        results.append(await pool.run(funcs.wait_for_file, str(release), f"busy{i}"))

    async with anyio.create_task_group() as tg:
        try:
            tg.start_soon(occupy, 0)
            tg.start_soon(occupy, 1)
            await wait_until(lambda: pool.stats().busy == 2, 5, "both workers busy")
            with pytest.raises(OffloadTimeout):
                await pool.options(timeout=0.3).run(funcs.touch_then, str(marker))
            # Both workers are held until the release: it timed out in the queue, not
            # after a worker freed up.
            assert results == []
            assert pool.stats().busy == 2
            assert pool.stats().queued == 0
        finally:
            release.write_text("")
    assert sorted(results) == ["busy0", "busy1"]

    # Had the call reached a worker after all, it would run before any later call
    # on that worker: one call on each worker is a barrier.
    pids: list[int] = []

    async def getpid() -> None:
        pids.append(await pool.run(funcs.sleep_getpid, 0.2))

    async with anyio.create_task_group() as tg:
        tg.start_soon(getpid)
        tg.start_soon(getpid)
    assert len(set(pids)) == 2
    assert not marker.exists()
    assert pool.stats().timed_out == 1


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
    pids: list[int] = []

    async def getpid() -> None:
        pids.append(await pool.run(funcs.sleep_getpid, 0.2))

    async with anyio.create_task_group() as tg:
        tg.start_soon(getpid)
        tg.start_soon(getpid)
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


# -- 9. functions pickled by value -----------------------------------------------------


async def test_lambda_and_closure(ex: Executor) -> None:
    pool = ex.pool("process")
    here = os.getpid()

    pid = await pool.run(lambda: os.getpid())
    assert pid != here
    assert pid in worker_pids()
    assert await pool.run(lambda x, y=1: x * 10 + y, 4, y=2) == 42  # type: ignore[misc]

    offset = 100

    def shifted(x: int) -> tuple[int, int]:
        return x + offset, os.getpid()

    value, pid = await pool.run(shifted, 5)
    assert value == 105
    assert pid != here


MAIN_WITH_OFFLOADER = """
import os
import sys

from offload import Offloader, OffloadSettings


def square(x):
    return x * x, os.getpid()


async def main():
    settings = OffloadSettings(process={"max_workers": 1}, shutdown_timeout=5)
    async with Offloader(settings) as ex:
        value, pid = await ex.pool("process").run(square, 7)
    print(value, pid != os.getpid(), flush=True)


if sys.argv[1] == "trio":
    import trio

    trio.run(main)
elif sys.argv[1] == "uvloop":
    import uvloop

    uvloop.run(main())
else:
    import asyncio

    asyncio.run(main())
"""

MAIN_DECORATED_DEFAULT = """
import os
import sys

from offload import offload


@offload(kind="process")
def square(x):
    return x * x, os.getpid()


async def main():
    value, pid = await square(9)
    value2, pid2 = await square(10)
    print(value, value2, pid, pid2, os.getpid(), flush=True)


if sys.argv[1] == "trio":
    import trio

    trio.run(main)
elif sys.argv[1] == "uvloop":
    import uvloop

    uvloop.run(main())
else:
    import asyncio

    asyncio.run(main())
"""


async def run_script(tmp_path: Path, source: str, *args: str, timeout: float = 30) -> Any:
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(source))
    with anyio.move_on_after(timeout):
        return await anyio.run_process(
            [sys.executable, str(script), *args],
            cwd=tmp_path,
            env=script_env(),
            check=False,
        )
    pytest.fail(f"the script did not exit within {timeout} s (killed)")


IDLE_WORKERS_DEAD_WITH_SIGPIPE_DEFAULT = """
import os
import signal
import sys

import anyio
import psutil

from offload import Offloader, OffloadSettings

# What an application may do; Python itself ignores SIGPIPE.
signal.signal(signal.SIGPIPE, signal.SIG_DFL)


async def main():
    settings = OffloadSettings(process={"max_workers": 2}, lag_probe=False)
    async with Offloader(settings) as ex:
        pool = ex.pool("process")
        workers = psutil.Process().children()
        assert len(workers) == 2, workers
        for worker in workers:
            os.kill(worker.pid, signal.SIGKILL)
        for worker in workers:
            # Dead, left unreaped, and the loop never ran meanwhile: the pool still
            # offers both to the next call, whose sends meet closed channels.
            os.waitid(os.P_PID, worker.pid, os.WEXITED | os.WNOWAIT)
        print(await pool.run(abs, -7), pool.stats().crashed, flush=True)


anyio.run(main, backend=sys.argv[1] if sys.argv[1] != "uvloop" else "asyncio")
"""


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


async def test_main_function_in_script(tmp_path: Path, anyio_backend: Backend) -> None:
    done = await run_script(tmp_path, MAIN_WITH_OFFLOADER, loop_name(anyio_backend))
    stdout, stderr = done.stdout.decode(), done.stderr.decode()
    assert done.returncode == 0, stderr
    assert stdout.split() == ["49", "True"], (stdout, stderr)


async def test_decorated_main_function_default_offloader(
    tmp_path: Path, anyio_backend: Backend
) -> None:
    # The exit must not wait out the default Offloader's shutdown timeout: half of it
    # is the bound, whatever the machine's speed (a healthy script takes seconds).
    bound = OffloadSettings.model_fields["shutdown_timeout"].default / 2
    started = time.perf_counter()
    done = await run_script(
        tmp_path, MAIN_DECORATED_DEFAULT, loop_name(anyio_backend), timeout=bound
    )
    elapsed = time.perf_counter() - started
    stdout, stderr = done.stdout.decode(), done.stderr.decode()
    assert done.returncode == 0, stderr
    value, value2, pid, pid2, script_pid = stdout.split()
    assert (value, value2) == ("81", "100"), stdout
    assert pid != script_pid
    assert pid2 != script_pid
    assert "Traceback" not in stderr, stderr
    assert "Task was destroyed" not in stderr, stderr
    assert elapsed < bound
    worker_pids_seen = {int(pid), int(pid2)}
    await wait_until(
        lambda: all(gone(p) for p in worker_pids_seen),
        5,
        lambda: f"workers {worker_pids_seen} of the finished script gone",
    )


# -- 10. big payloads ------------------------------------------------------------------


async def test_large_payloads_round_trip(ex: Executor) -> None:
    pool = ex.pool("process")
    array = np.arange(8 * 2**20, dtype=np.float64)
    assert array.nbytes == 64 * 2**20
    back = await pool.run(funcs.echo, array)
    assert isinstance(back, np.ndarray)
    assert back.dtype == np.float64
    assert back.shape == array.shape
    assert np.array_equal(back, array)

    blob = os.urandom(16 * 2**20)
    echoed = await pool.run(funcs.echo, blob)
    assert type(echoed) is bytes
    assert echoed == blob


# -- 11, 12. shutdown ------------------------------------------------------------------


async def test_exit_drains_running_call() -> None:
    outcome: dict[str, Any] = {}
    async with anyio.create_task_group() as tg:
        async with Offloader(settings(max_workers=2)) as ex:
            pool = ex.pool("process")

            async def call() -> None:
                try:
                    outcome["result"] = await pool.run(funcs.sleep_then, 0.5, "done")
                except BaseException as exc:
                    outcome["error"] = exc
                    raise

            tg.start_soon(call)
            await wait_until(lambda: pool.stats().busy == 1, 5, "the call is running")
            assert worker_procs()
        # __aexit__ has drained the pool and stopped every worker.
        assert worker_procs() == [], worker_pids()
    assert outcome == {"result": "done"}
    assert ex.offloader.stats()["process"].completed == 1
    assert worker_procs() == []


async def test_calls_during_and_after_exit_raise_pool_closed() -> None:
    during: dict[str, Any] = {}
    async with anyio.create_task_group() as tg:
        offloader = Offloader(settings(max_workers=1))
        async with offloader as ex:
            pool = ex.pool("process")

            async def slow() -> None:
                during["slow"] = await pool.run(funcs.sleep_then, 0.3, "done")

            async def late() -> None:
                await wait_until(lambda: not offloader.running, 5, "the Offloader is exiting")
                try:
                    during["late"] = await ex.pool("process").run(funcs.add, 1, 1)
                except Exception as exc:
                    during["late"] = exc

            tg.start_soon(slow)
            await wait_until(lambda: pool.stats().busy == 1, 5, "the slow call is running")
            tg.start_soon(late)
    assert during["slow"] == "done"
    assert isinstance(during["late"], PoolClosed), during

    with pytest.raises(PoolClosed):
        await ex.pool("process").run(funcs.add, 1, 2)
    with pytest.raises(PoolClosed):
        await ex.run(funcs.add, 1, 2)
    with pytest.raises(PoolClosed):
        await ex.pool("thread").run(funcs.add, 1, 2)


@pytest.mark.parametrize("limit", ["crash", "max_tasks_per_worker"])
async def test_exit_drains_queued_call_whose_worker_was_lost(limit: str) -> None:
    # The only worker goes while the pool drains (killed with a cancelled call, or
    # recycled): the queued call still runs, on a worker started for it, rather
    # than wait for the whole shutdown_timeout and fail.
    outcome: dict[str, Any] = {}
    extra = {"max_tasks_per_worker": 1} if limit == "max_tasks_per_worker" else {}
    async with anyio.create_task_group() as tg:
        async with Offloader(settings(max_workers=1, **extra)) as ex:
            pool = ex.pool("process")
            process_pool = ex.offloader.get_pool("process")
            first_scope = anyio.CancelScope()

            async def first() -> None:
                with first_scope:
                    outcome["first"] = await pool.run(funcs.sleep_then, 0.3, os.getpid())
                    await anyio.sleep_forever()

            async def queued() -> None:
                try:
                    outcome["queued"] = await pool.run(funcs.getpid)
                except Exception as exc:
                    outcome["queued"] = exc

            async def lose_the_worker_while_closing() -> None:
                await wait_until(lambda: process_pool.closing, 5, "the pool is closing")
                if limit == "crash":
                    first_scope.cancel()  # its worker is killed mid-call

            tg.start_soon(first)
            await wait_until(lambda: pool.stats().busy == 1, 5, "the first call runs")
            (worker,) = worker_pids()
            tg.start_soon(queued)
            await wait_until(lambda: pool.stats().queued == 1, 5, "the second call waits")
            tg.start_soon(lose_the_worker_while_closing)
        first_scope.cancel()
    assert isinstance(outcome["queued"], int), outcome
    assert outcome["queued"] != worker
    assert worker_procs() == []


# -- 13. parent killed -----------------------------------------------------------------


PARENT_SCRIPT = """
import sys

import anyio
import psutil

from offload import Offloader, OffloadSettings


async def main():
    settings = OffloadSettings(process={"max_workers": 2}, shutdown_timeout=5)
    async with Offloader(settings):
        pids = [p.pid for p in psutil.Process().children()]
        print(" ".join(map(str, pids)), flush=True)
        await anyio.sleep(60)


if sys.argv[1] == "trio":
    anyio.run(main, backend="trio")
else:
    anyio.run(main, backend="asyncio", backend_options={"use_uvloop": sys.argv[1] == "uvloop"})
"""


async def test_workers_die_with_killed_parent(tmp_path: Path, anyio_backend: Backend) -> None:
    script = tmp_path / "parent.py"
    script.write_text(PARENT_SCRIPT)
    process = await anyio.open_process(
        [sys.executable, str(script), loop_name(anyio_backend)],
        cwd=tmp_path,
        env=script_env(),
        stdin=None,
        stderr=None,
    )
    async with process:
        try:
            assert process.stdout is not None
            line = b""
            with anyio.fail_after(30):
                while not line.endswith(b"\n"):
                    line += await process.stdout.receive()
            pids = [int(p) for p in line.split()]
            assert len(pids) == 2, line
            for pid in pids:
                assert WORKER_MARK in " ".join(psutil.Process(pid).cmdline())
        finally:
            process.kill()
            with anyio.fail_after(5):
                await process.wait()
    assert process.returncode == -signal.SIGKILL
    await wait_until(
        lambda: all(gone(pid) for pid in pids),
        5,
        lambda: f"workers {[p for p in pids if not gone(p)]} outlived their killed parent",
    )


# -- 14. warm start --------------------------------------------------------------------


async def test_workers_are_warm_at_start() -> None:
    async with Offloader(settings(max_workers=3)) as ex:
        stats = ex.pool("process").stats()
        procs = worker_procs()
        assert stats.workers == 3
        assert stats.busy == 0
        assert len(procs) == 3
        assert all(p.is_running() for p in procs)
