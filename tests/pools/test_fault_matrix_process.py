"""The fault matrix's cases that only the process kind meets: a deadline that kills
the worker stuck in C, initializers that fail, a start past ``start_timeout``, and
shutdown while a crashed worker's replacement boots. (Threads cannot be stopped, and
run no initializer; a dask task runs on past its deadline unless ``hard_cancel``
restarts its worker, see ``test_dask.py``.)"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import anyio
import pytest

from offload import Offloader, OffloadTimeout, PoolStartError, WorkerCrashed

from .. import funcs
from ..processes import gone, wait_until, worker_pids, worker_procs
from .matrix import (
    CALL_BOUND,
    MAX_WORKERS,
    RECOVERY,
    assert_pool_recovers,
    assert_remote_cause,
    counters,
    error_of,
    matrix_settings,
    serving_pids,
    settled,
)

# the contract every event loop keeps (see tests/conftest.py)
pytestmark = pytest.mark.all_loops


async def test_deadline_on_call_stuck_in_c_kills_its_worker(tmp_path: Path) -> None:
    """``time.sleep(60)`` under a 0.5 s deadline: OffloadTimeout long before the sleep
    ends, the sleeping worker is killed, and its replacement serves the next calls.

    The process kind's alone: a thread cannot be stopped (``test_thread.py``), and a
    dask task runs on unless ``hard_cancel`` restarts its worker (``test_dask.py``)."""
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
        # Not before the deadline (less a tick: uvloop's clock counts whole ms), and
        # far sooner than the sleep (60 s) would end.
        assert 0.5 - 0.001 <= elapsed < 60 / 4, elapsed

        sleeper = int(pidfile.read_text())
        assert sleeper in original
        await wait_until(lambda: gone(sleeper), 3, f"the sleeping worker {sleeper} killed")
        now = await settled(pool)
        assert sleeper not in now
        assert len(now - original) == 1, (original, now)
        assert await serving_pids(pool) == now  # the replacement serves calls
        await assert_pool_recovers(pool, before, timed_out=1, completed=MAX_WORKERS)


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


# With a child: the worker's exit is seen while its channel is still open (the child
# holds it); the start must still fail with PoolStartError, not with the channel's
# closing.
@pytest.mark.parametrize("initializer", ["crashing_initializer", "crashing_initializer_with_child"])
async def test_initializer_that_crashes_fails_start(initializer: str) -> None:
    settings = matrix_settings(initializer=f"tests.funcs:{initializer}", initializer_args=(7,))
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
            RECOVERY["process"],
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
