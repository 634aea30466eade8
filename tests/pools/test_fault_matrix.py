"""A failure at each stage of a process call fails that call only, and clearly.

The stages: pickling the arguments (parent), unpickling them (worker), running,
pickling the result (worker), unpickling it (parent), plus deadlines, a worker killed
while idle, exceptions that will not travel, and initializers that fail.

After every case the pool must be sound: a normal call succeeds, ``stats()`` counts
both calls where they belong, and the live worker processes are back to
``max_workers`` within a bounded wait. Every wait is a bounded poll (``wait_until``).
"""

from __future__ import annotations

import logging
import os
import re
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
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
    PoolSettings,
    PoolStartError,
    RemoteTraceback,
    SerializationError,
    WorkerCrashed,
)

from .. import funcs
from .test_process_faults import gone, wait_until, worker_pids, worker_procs

# the contract every event loop keeps (see tests/conftest.py)
pytestmark = pytest.mark.all_loops
MAX_WORKERS = 2
#: seconds the pool gets to be back at MAX_WORKERS live workers after a fault
RECOVERY = 5.0
#: seconds any single faulty call may take before the test gives up on it
CALL_BOUND = 15.0
COUNTERS = ("completed", "failed", "timed_out", "cancelled", "crashed", "rejected")


# -- helpers ---------------------------------------------------------------------------


def matrix_settings(**process: Any) -> OffloadSettings:
    return OffloadSettings(
        process=PoolSettings(max_workers=MAX_WORKERS, **process),
        thread=PoolSettings(max_workers=2),
        shutdown_timeout=5,
    )


def counters(pool: Executor) -> dict[str, int]:
    stats = pool.stats()
    return {name: getattr(stats, name) for name in COUNTERS}


def expected_counters(**counts: int) -> dict[str, int]:
    return {name: counts.get(name, 0) for name in COUNTERS}


async def settled(pool: Executor) -> set[int]:
    """Wait until the pool has MAX_WORKERS live, idle workers; their pids."""
    await wait_until(
        lambda: (
            pool.stats().workers == MAX_WORKERS
            and pool.stats().busy == 0
            and len(worker_procs()) == MAX_WORKERS
        ),
        RECOVERY,
        lambda: f"{MAX_WORKERS} live workers: stats={pool.stats()} live={worker_pids()}",
    )
    return worker_pids()


async def error_of(pool: Executor, fn: Callable[..., Any], *args: Any) -> Exception:
    """The exception ``pool.run(fn, *args)`` raises; fail if it returns or hangs."""
    with anyio.fail_after(CALL_BOUND):
        try:
            result = await pool.run(fn, *args)
        except Exception as exc:
            return exc
    pytest.fail(f"{fn.__name__}{args} returned {result!r} instead of failing")


async def serving_pids(pool: Executor) -> set[int]:
    """The pids of the workers that serve MAX_WORKERS concurrent calls: one each, since
    every call holds its worker for 0.2 s."""
    pids: list[int] = []

    async def one() -> None:
        pids.append(await pool.run(funcs.sleep_getpid, 0.2))

    with anyio.fail_after(CALL_BOUND):
        async with anyio.create_task_group() as tg:
            for _ in range(MAX_WORKERS):
                tg.start_soon(one)
    assert len(pids) == MAX_WORKERS
    return set(pids)


async def assert_pool_recovers(pool: Executor, before: dict[str, int], **counts: int) -> None:
    """After a fault: back to MAX_WORKERS live workers; a normal call succeeds; the
    counters moved by ``counts`` (the faulty call) plus one completed call."""
    await settled(pool)
    assert await pool.run(funcs.add, 40, 2) == 42
    delta = {name: counters(pool)[name] - before[name] for name in COUNTERS}
    counts["completed"] = counts.get("completed", 0) + 1
    assert delta == expected_counters(**counts), pool.stats()
    stats = pool.stats()
    assert (stats.busy, stats.queued) == (0, 0), stats


def assert_remote_cause(exc: BaseException, *needles: str) -> None:
    cause = exc.__cause__
    assert isinstance(cause, RemoteTraceback), repr(cause)
    for needle in needles:
        assert needle in cause.tb, (needle, cause.tb)


# -- the stages of one call, as a table ------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One way a call can fail.

    ``call`` builds ``(fn, args)`` from a scratch directory; ``check`` inspects the
    error; ``counter`` is where stats must count it; ``worker`` says what becomes of
    the worker that ran it: ``"reused"`` (the same processes serve on) or
    ``"replaced"`` (it died: a new process takes its place).
    """

    id: str
    call: Callable[[Path], tuple[Callable[..., Any], tuple[Any, ...]]]
    check: Callable[[Exception], None]
    counter: str
    worker: str
    kill_from_outside: bool = False
    #: reads, from the error, the pid of the worker that handled the call
    worker_pid: Callable[[Exception], int] | None = None


def pid_unpickling_args(exc: Exception) -> int:
    """The worker that refused the arguments names itself in its traceback."""
    assert isinstance(exc.__cause__, RemoteTraceback)
    found = re.search(r"refusing to unpickle in process (\d+)", exc.__cause__.tb)
    assert found, exc.__cause__.tb
    return int(found[1])


def pid_pickling_result(exc: Exception) -> int:
    """The result names the worker that pickled it; the parent's refusal quotes it."""
    found = re.search(r"pickled in process (\d+)", str(exc))
    assert found, str(exc)
    return int(found[1])


def check_unpickle_args(exc: Exception) -> None:
    assert type(exc) is SerializationError, repr(exc)
    assert "tests.funcs.echo" in str(exc), str(exc)
    assert "unpickle" in str(exc), str(exc)
    assert_remote_cause(exc, "UnpickleRefused", "refusing to unpickle")


def check_crash(exitcode: int, words: str) -> Callable[[Exception], None]:
    def check(exc: Exception) -> None:
        assert type(exc) is WorkerCrashed, repr(exc)
        assert exc.exitcode == exitcode, (exc.exitcode, str(exc))
        assert words in str(exc), str(exc)
        assert exc.pid is not None
        assert str(exc.pid) in str(exc)

    return check


def check_boom(exc: Exception) -> None:
    assert type(exc) is funcs.Boom, repr(exc)
    assert str(exc) == "kaboom"
    assert_remote_cause(exc, "Boom", "kaboom")


def check_memory_error(exc: Exception) -> None:
    assert type(exc) is MemoryError, repr(exc)
    assert str(exc) == "pretend the heap is full"
    assert_remote_cause(exc, "MemoryError")


def check_result_pickling(exc: Exception) -> None:
    assert type(exc) is SerializationError, repr(exc)
    assert "tests.funcs.return_lock" in str(exc), str(exc)
    assert_remote_cause(exc, "lock")


def check_result_unpickling(exc: Exception) -> None:
    assert type(exc) is SerializationError, repr(exc)
    message = str(exc)
    assert "tests.funcs.return_refusing" in message, message
    assert "refusing to unpickle" in message, message
    assert isinstance(exc.__cause__, funcs.UnpickleRefused), repr(exc.__cause__)


def check_unpicklable_exception(exc: Exception) -> None:
    assert isinstance(exc, OffloadError), repr(exc)
    assert not isinstance(exc, funcs.LockedError)
    message = str(exc)
    assert "tests.funcs.LockedError" in message, message
    assert "the lock would not travel" in message, message
    assert_remote_cause(exc, "LockedError", "the lock would not travel")


def check_unrebuildable_exception(exc: Exception) -> None:
    # The worker round-trips the exception through pickle before sending it, so it
    # finds out that it cannot be rebuilt and sends its name and message instead.
    assert isinstance(exc, OffloadError), repr(exc)
    message = str(exc)
    assert "tests.funcs.TwoArgError" in message, message
    assert "first half" in message, message
    assert_remote_cause(exc, "TwoArgError", "first half")


CASES = [
    Case(
        "unpickle-args-in-worker-reduce",
        lambda _: (funcs.echo, (funcs.RefusesForeignReduce(),)),
        check_unpickle_args,
        "failed",
        "reused",
        worker_pid=pid_unpickling_args,
    ),
    Case(
        "unpickle-args-in-worker-setstate",
        lambda _: (funcs.echo, (funcs.RefusesForeignSetstate(),)),
        check_unpickle_args,
        "failed",
        "reused",
        worker_pid=pid_unpickling_args,
    ),
    Case(
        "unpickle-args-in-worker-segfault",
        lambda _: (funcs.echo, (funcs.SegfaultsForeignUnpickle(),)),
        check_crash(-signal.SIGSEGV, "killed by SIGSEGV"),
        "crashed",
        "replaced",
    ),
    Case("run-raises", lambda _: (funcs.boom, ("kaboom",)), check_boom, "failed", "reused"),
    Case(
        "run-os-exit",
        lambda _: (funcs.exit_now, (3,)),
        check_crash(3, "exited with code 3"),
        "crashed",
        "replaced",
    ),
    Case(
        "run-segfault",
        lambda _: (funcs.segfault, ()),
        check_crash(-signal.SIGSEGV, "killed by SIGSEGV"),
        "crashed",
        "replaced",
    ),
    Case(
        "run-sigkill-from-outside",
        lambda tmp: (funcs.write_pid_then_spin, (str(tmp / "pid"), 30)),
        check_crash(-signal.SIGKILL, "killed by SIGKILL"),
        "crashed",
        "replaced",
        kill_from_outside=True,
    ),
    Case(
        "run-memory-error",
        lambda _: (funcs.raise_memory_error, ("pretend the heap is full",)),
        check_memory_error,
        "failed",
        "reused",
    ),
    Case(
        "pickle-result-in-worker",
        lambda _: (funcs.return_lock, ()),
        check_result_pickling,
        "failed",
        "reused",
    ),
    Case(
        "unpickle-result-in-parent",
        lambda _: (funcs.return_refusing, ()),
        check_result_unpickling,
        "failed",
        "reused",
        worker_pid=pid_pickling_result,
    ),
    Case(
        "exception-unpicklable",
        lambda _: (funcs.raise_locked, ("the lock would not travel",)),
        check_unpicklable_exception,
        "failed",
        "reused",
    ),
    Case(
        "exception-unrebuildable",
        lambda _: (funcs.raise_two_arg, ("first half", "second half")),
        check_unrebuildable_exception,
        "failed",
        "reused",
    ),
]


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES])
async def test_stage_fault_fails_only_its_call(case: Case, tmp_path: Path) -> None:
    async with Offloader(matrix_settings()) as ex:
        pool = ex.pool("process")
        original = await settled(pool)
        before = counters(pool)
        fn, args = case.call(tmp_path)

        async with anyio.create_task_group() as tg:
            if case.kill_from_outside:
                pidfile = tmp_path / "pid"

                async def killer() -> None:
                    await wait_until(pidfile.exists, 5, "the spinning worker wrote its pid")
                    os.kill(int(pidfile.read_text()), signal.SIGKILL)

                tg.start_soon(killer)
            error = await error_of(pool, fn, *args)
        case.check(error)

        if case.worker == "reused":
            # No process died or was started: the same two serve the next calls,
            # among them the one that handled the faulty call.
            assert worker_pids() == original
            assert await serving_pids(pool) == original
            assert worker_pids() == original
            if case.worker_pid is not None:
                assert case.worker_pid(error) in original
        else:
            assert isinstance(error, WorkerCrashed)
            dead = error.pid
            assert dead in original
            await wait_until(lambda: gone(dead), 3, f"crashed worker {dead} gone")
            now = await settled(pool)
            assert dead not in now
            assert len(now - original) == 1, (original, now)
            assert await serving_pids(pool) == now
        # serving_pids made MAX_WORKERS completed calls of its own
        await assert_pool_recovers(pool, before, **{case.counter: 1, "completed": MAX_WORKERS})


async def test_unpicklable_argument_is_refused_before_dispatch(tmp_path: Path) -> None:
    """Pickling the arguments fails in the parent: SerializationError, nothing sent.

    Both workers are busy while the call is made: a call that got as far as a worker
    would wait in line, so an error at once (and no call queued) shows it never did.
    """
    async with Offloader(matrix_settings()) as ex:
        pool = ex.pool("process")
        original = await settled(pool)
        before = counters(pool)
        marker = tmp_path / "ran"
        occupied: list[str] = []

        async def occupy() -> None:
            occupied.append(await pool.run(funcs.sleep_then, 0.5, "ok"))

        async with anyio.create_task_group() as tg:
            for _ in range(MAX_WORKERS):
                tg.start_soon(occupy)
            await wait_until(lambda: pool.stats().busy == MAX_WORKERS, 5, "all workers busy")
            started = time.perf_counter()
            error = await error_of(pool, funcs.touch_then, str(marker), threading.Lock())
            elapsed = time.perf_counter() - started
            assert pool.stats().queued == 0
        assert occupied == ["ok"] * MAX_WORKERS

        assert type(error) is SerializationError, repr(error)
        assert "tests.funcs.touch_then" in str(error), str(error)
        assert "lock" in str(error), str(error)
        assert elapsed < 0.3, elapsed
        assert not marker.exists()
        assert worker_pids() == original
        assert await serving_pids(pool) == original
        assert not marker.exists()
        await assert_pool_recovers(pool, before, failed=1, completed=MAX_WORKERS * 2)


async def test_deadline_on_call_stuck_in_c_kills_its_worker(tmp_path: Path) -> None:
    """``time.sleep(60)`` under a 0.5 s deadline: OffloadTimeout within 1.5 s, the
    sleeping worker is killed, and its replacement serves the next calls."""
    async with Offloader(matrix_settings()) as ex:
        pool = ex.pool("process")
        original = await settled(pool)
        before = counters(pool)
        pidfile = tmp_path / "pid"

        started = time.perf_counter()
        error = await error_of(
            pool.options(timeout=0.5), funcs.write_pid_then_sleep, str(pidfile), 60
        )
        elapsed = time.perf_counter() - started
        assert type(error) is OffloadTimeout, repr(error)
        assert isinstance(error, TimeoutError)
        assert "write_pid_then_sleep" in str(error), str(error)
        assert 0.5 <= elapsed < 1.5, elapsed

        sleeper = int(pidfile.read_text())
        assert sleeper in original
        await wait_until(lambda: gone(sleeper), 3, f"the sleeping worker {sleeper} killed")
        now = await settled(pool)
        assert sleeper not in now
        assert len(now - original) == 1, (original, now)
        assert await serving_pids(pool) == now  # the replacement serves calls
        await assert_pool_recovers(pool, before, timed_out=1, completed=MAX_WORKERS)


async def test_worker_killed_while_idle_fails_no_call() -> None:
    """SIGKILL to an idle worker: no call fails, a new worker takes its place."""
    async with Offloader(matrix_settings()) as ex:
        pool = ex.pool("process")
        original = await settled(pool)
        before = counters(pool)
        victim = min(original)
        os.kill(victim, signal.SIGKILL)
        await wait_until(lambda: gone(victim), 3, f"worker {victim} dead")

        # Calls made at once, before the replacement can be ready: the dead worker's
        # channel must not take any of them down.
        results: list[int] = []

        async def call(i: int) -> None:
            results.append(await pool.run(funcs.add, i, 1000))

        with anyio.fail_after(CALL_BOUND):
            async with anyio.create_task_group() as tg:
                for i in range(8):
                    tg.start_soon(call, i)
        assert sorted(results) == [1000 + i for i in range(8)]

        now = await settled(pool)
        assert victim not in now
        assert len(now - original) == 1, (original, now)
        assert await serving_pids(pool) == now
        assert pool.stats().crashed == 0
        await assert_pool_recovers(pool, before, completed=8 + MAX_WORKERS)


# -- initializers ----------------------------------------------------------------------


async def test_initializer_that_raises_fails_start() -> None:
    settings = matrix_settings(
        initializer="tests.funcs:failing_initializer",
        initializer_args=("no model file",),
    )
    offloader = Offloader(settings)
    with anyio.fail_after(CALL_BOUND), pytest.raises(PoolStartError) as info:
        async with offloader:
            pytest.fail("the block ran though the pool could not start")
    message = str(info.value)
    assert "tests.funcs.InitializerFailed" in message, message
    assert "no model file" in message, message
    assert_remote_cause(info.value, "failing_initializer", "no model file")
    assert not offloader.running
    assert worker_procs() == [], worker_pids()


async def test_initializer_that_crashes_fails_start() -> None:
    settings = matrix_settings(
        initializer="tests.funcs:crashing_initializer", initializer_args=(7,)
    )
    offloader = Offloader(settings)
    with anyio.fail_after(CALL_BOUND), pytest.raises(PoolStartError) as info:
        async with offloader:
            pytest.fail("the block ran though the pool could not start")
    message = str(info.value)
    assert "exited with code 7" in message, message
    assert not offloader.running
    assert worker_procs() == [], worker_pids()


async def test_worker_slower_than_start_timeout_fails_start(tmp_path: Path) -> None:
    flag = tmp_path / "slow"
    flag.write_text("")
    settings = matrix_settings(
        initializer="tests.funcs:sleep_if_exists",
        initializer_args=(str(flag), CALL_BOUND * 4),
        start_timeout=0.5,
    )
    offloader = Offloader(settings)
    with anyio.fail_after(CALL_BOUND), pytest.raises(PoolStartError) as info:
        async with offloader:
            pytest.fail("the block ran though the pool could not start")
    assert "0.5 s" in str(info.value), str(info.value)
    assert "start_timeout" in str(info.value), str(info.value)
    assert not offloader.running


# -- shutting down right after a fault -------------------------------------------------


@pytest.mark.parametrize("boot", [0.5, 5.0], ids=["boot-0.5s", "boot-5s"])
async def test_exit_while_replacement_boots_logs_no_error(
    boot: float, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A crash, then the Offloader exits while the crashed worker's replacement is
    still booting: shutdown is bounded and quiet. The replacement is stopped by the
    pool itself; that is no failure to start a worker and must not be logged as one.

    An initializer that sleeps ``boot`` seconds once a flag file exists holds the
    replacement (only) in its boot, so the block exits inside that window for sure.
    5 s outlasts the grace ``_stop`` gives processes before SIGKILL.
    """
    caplog.set_level(logging.INFO, logger="offload")
    flag = tmp_path / "slow"
    settings = matrix_settings(
        initializer="tests.funcs:sleep_if_exists", initializer_args=(str(flag), boot)
    )
    async with Offloader(settings) as ex:
        pool = ex.pool("process")
        original = await settled(pool)
        flag.write_text("")
        error = await error_of(pool, funcs.exit_now, 3)
        assert isinstance(error, WorkerCrashed)
        await wait_until(
            lambda: len(worker_procs()) == MAX_WORKERS and worker_pids() != original,
            RECOVERY,
            lambda: f"a replacement process started: live={worker_pids()}",
        )
        assert pool.stats().workers == MAX_WORKERS - 1  # ...and it is still booting
        started = time.perf_counter()
    elapsed = time.perf_counter() - started
    assert worker_procs() == [], worker_pids()
    assert elapsed < 5.0, elapsed
    stray = [
        f"{r.levelname}: {r.getMessage()}"
        for r in caplog.records
        if r.name.startswith("offload")
        and r.levelno >= logging.ERROR
        and "exit_now" not in r.getMessage()  # the crash itself is rightly an error
    ]
    assert stray == []
