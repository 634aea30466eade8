"""Worker lifecycle: initializer, recycling by call count and by memory."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import anyio
import psutil
import pytest

from offload import (
    Executor,
    Offloader,
    OffloadSettings,
    OffloadTimeout,
    PoolSettings,
    PoolStartError,
    WorkerCrashed,
)
from offload._pools.process import scheduling as _scheduling
from offload._pools.process.scheduling import LONG_SLICE_NS, time_slice
from offload._pools.process.supervision import FIRST_RETRY, retry_delay

from .. import funcs
from ..conftest import Backend, children, loop_name
from ..processes import run_script


async def test_initializer_runs_once_per_worker() -> None:
    settings = OffloadSettings(
        process={
            "max_workers": 2,
            "initializer": "tests.funcs:remember",
            "initializer_args": ("model",),
        }
    )
    async with Offloader(settings) as ex:
        seen = {}
        for _ in range(6):
            pid, tags = await ex.pool("process").run(funcs.initialized)
            seen[pid] = tags
        assert all(tags == ["model"] for tags in seen.values())


async def test_max_tasks_per_worker_recycles_without_failing_calls() -> None:
    settings = OffloadSettings(process={"max_workers": 1, "max_tasks_per_worker": 3})
    async with Offloader(settings) as ex:
        pool = ex.pool("process")
        pids = [await pool.run(funcs.getpid) for _ in range(7)]
        assert pids[0] == pids[1] == pids[2]
        assert pids[3] == pids[4] == pids[5] != pids[0]
        assert pids[6] not in pids[:6]
        stats = pool.stats()
        assert stats.recycled == 2
        assert stats.completed == 7
        assert stats.failed == stats.crashed == 0
        with anyio.fail_after(10):
            while len(children()) != 1:  # the retired workers are gone
                await anyio.sleep(0.02)


async def test_max_memory_per_worker_recycles_a_bloated_worker() -> None:
    settings = OffloadSettings(process={"max_workers": 1, "max_memory_per_worker": "150MB"})
    async with Offloader(settings) as ex:
        pool = ex.pool("process")
        first = await pool.run(funcs.grow, 10)
        assert await pool.run(funcs.grow, 10) == first  # still under the limit
        assert await pool.run(funcs.grow, 200) == first  # this call completes...
        assert await pool.run(funcs.getpid) != first  # ...then the worker is replaced
        assert pool.stats().recycled == 1


def broken_settings(flag: Path, start_timeout: float = 60) -> OffloadSettings:
    return OffloadSettings(
        process={
            "max_workers": 1,
            "initializer": "tests.funcs:fail_if_exists",
            "initializer_args": (str(flag),),
            "start_timeout": start_timeout,
        }
    )


async def lose_the_only_worker(pool: Executor, flag: Path) -> int:
    """Make the pool's replacements fail, kill its one worker; its pid."""
    pid: int = await pool.run(funcs.getpid)
    flag.write_text("")
    os.kill(pid, signal.SIGKILL)
    with anyio.fail_after(10):
        while psutil.pid_exists(pid):  # until the pool has reaped it
            await anyio.sleep(0.01)
    return pid


async def test_calls_wait_while_a_replacement_fails_to_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="offload")
    flag = tmp_path / "broken"
    async with Offloader(broken_settings(flag)) as ex:
        pool = ex.pool("process")
        pid = await lose_the_only_worker(pool, flag)
        async with anyio.create_task_group() as tg:
            results: list[int] = []

            async def call() -> None:
                results.append(await pool.run(funcs.getpid))

            tg.start_soon(call)
            with anyio.fail_after(10):  # until a replacement has failed to start
                while not any("could not start" in r.getMessage() for r in caplog.records):
                    await anyio.sleep(0.01)
            assert pool.stats().queued == 1  # the call waits: no PoolClosed
            flag.unlink()  # the back-off retries, and the pool heals
            with anyio.fail_after(20):
                while not results:
                    await anyio.sleep(0.01)
        assert results[0] != pid
        assert pool.stats().closed == 0


async def test_calls_fail_with_pool_start_error_if_the_pool_does_not_recover(
    tmp_path: Path,
) -> None:
    flag = tmp_path / "broken"
    async with Offloader(broken_settings(flag, start_timeout=3)) as ex:
        pool = ex.pool("process")
        pid = await lose_the_only_worker(pool, flag)
        with anyio.fail_after(30), pytest.raises(PoolStartError) as info:
            await pool.run(funcs.getpid)  # no deadline of its own: start_timeout ends it
        assert "exists" in str(info.value), info.value  # the initializer's error
        with anyio.fail_after(5), pytest.raises(PoolStartError):
            await pool.run(funcs.getpid)  # still broken: refused at once
        assert pool.stats().rejected == 2
        flag.unlink()
        with anyio.fail_after(20):  # the back-off retries, and the pool heals
            while True:
                try:
                    assert await pool.run(funcs.getpid) != pid
                    break
                except PoolStartError:
                    await anyio.sleep(0.05)


@pytest.mark.parametrize(("start_timeout", "longest"), [(60, 5.0), (8, 2.0), (3, 1.0), (0.5, 1.0)])
def test_start_retries_back_off_to_a_share_of_start_timeout(
    start_timeout: float, longest: float
) -> None:
    # A pool that gave up 4 s into a start_timeout of 3 s, and healed only 3 s after
    # its cause was gone, would say less than it does.
    delays = [FIRST_RETRY]
    while len(delays) < 20:
        delays.append(retry_delay(delays[-1], start_timeout))
    assert delays[:3] == [0.1, 0.2, 0.4]
    assert max(delays) == delays[-1] == longest


async def test_logs_name_the_pool_worker_and_function(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="offload")
    async with Offloader(OffloadSettings(process={"max_workers": 1})) as ex:
        pool = ex.pool("process")
        with pytest.raises(OffloadTimeout):
            await pool.options(timeout=0.3).run(funcs.spin, 10)
        with pytest.raises(WorkerCrashed):
            await pool.run(funcs.exit_now, 3)
    messages = [r.getMessage() for r in caplog.records]
    assert any("worker" in m and "started" in m and "'process'" in m for m in messages)
    assert any(
        "killing worker" in m and "tests.funcs.spin" in m and "deadline" in m for m in messages
    )
    assert any("exited with code 3" in m and "tests.funcs.exit_now" in m for m in messages)


@pytest.mark.parametrize("niceness", [0, 10])
@pytest.mark.parametrize("idle_priority", [False, True])
async def test_workers_run_at_lower_priority(niceness: int, idle_priority: bool) -> None:
    settings = OffloadSettings(
        process={"max_workers": 1, "niceness": niceness, "idle_priority": idle_priority}
    )
    async with Offloader(settings) as ex:
        pid = await ex.pool("process").run(funcs.getpid)
        assert psutil.Process(pid).nice() == min(19, psutil.Process().nice() + niceness)
        ours = os.sched_getscheduler(0)
        # Below the loop, a waking worker never preempts it (_pools/process/scheduling.py).
        below = os.SCHED_BATCH if niceness and ours == os.SCHED_OTHER else ours
        policy = os.SCHED_IDLE if idle_priority else below
        assert os.sched_getscheduler(pid) == policy
        our_slice = time_slice(os.getpid())
        if our_slice is None:
            return  # a kernel that does not say (before Linux 6.12): nothing asked of it
        # Below the loop, a worker asks for the longest slice, so that the loop's
        # thread, waking with the default one, preempts it at once (_pools/process/scheduling.py).
        long = niceness and not idle_priority
        assert time_slice(pid) == (LONG_SLICE_NS if long else our_slice)


# What a process started by start_at_lower_priority says of itself at its first instruction, and
# again once told to (by then start_at_lower_priority has returned).
PRIORITY_NOW = (
    "import os, sys; sys.path[:0] = [sys.argv[1]];"
    "from offload._pools.process.scheduling import time_slice;"
    "say = lambda: print(os.getpriority(os.PRIO_PROCESS, 0), time_slice(0),"
    " os.sched_getscheduler(0), flush=True);"
    "say(); sys.stdin.readline(); say()"
)


@pytest.mark.parametrize("nice_command", [True, False])
def test_a_process_starts_below_the_loop(
    nice_command: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An interpreter's start is tens of ms of CPU: it must not run at the loop's
    # priority until the parent gets to lower it (_pools/process/scheduling.py). Where there is no
    # `nice` command, the parent lowers it once Popen returns.
    if not nice_command:
        monkeypatch.setattr(_scheduling, "_nice_command", lambda: None)
    long = time_slice(0) is not None  # Linux 6.12+: the long slice too
    nice = min(19, os.getpriority(os.PRIO_PROCESS, 0) + 7)
    ours = os.sched_getscheduler(0)
    batch = os.SCHED_BATCH if ours == os.SCHED_OTHER else ours
    below = f"{nice} {LONG_SLICE_NS if long else None}"
    root = str(Path(__file__).resolve().parent.parent.parent)
    with ThreadPoolExecutor(1) as spawner:  # start_at_lower_priority sets its caller's own slice
        proc = spawner.submit(
            _scheduling.start_at_lower_priority,
            [sys.executable, "-c", PRIORITY_NOW, root],
            PoolSettings(niceness=7),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        ).result()
    out, _ = proc.communicate(b"go\n", timeout=30)
    first, later = out.decode().splitlines()
    assert later == f"{below} {batch}"
    if nice_command:
        # Niceness and slice from the first instruction; the policy once Popen returned.
        assert first.rsplit(" ", 1)[0] == below
    assert time_slice(0) != LONG_SLICE_NS  # this thread kept its own


def test_priority_defaults() -> None:
    settings = PoolSettings()
    assert (settings.niceness, settings.idle_priority) == (10, False)


LOOP_OUTLIVES_MAIN_THREAD = """
import json
import os
import sys
import threading

import anyio

from offload import Offloader, OffloadSettings, OffloadTimeout

from tests import funcs

started = threading.Event()


async def main():
    settings = OffloadSettings(process={"max_workers": 1}, lag_probe=False)
    async with Offloader(settings) as ex:
        pool = ex.pool("process")
        before = await pool.run(funcs.getpid)
        started.set()
        while threading.main_thread().is_alive():  # the interpreter's shutdown begins
            await anyio.sleep(0.01)
        after = await pool.run(funcs.getpid)
        try:
            await pool.options(timeout=0.5).run(funcs.sleep_then, 30, None)
        except OffloadTimeout:
            pass  # its worker was killed: the next call needs a replacement
        replaced = await pool.run(funcs.getpid)
    print(json.dumps({"before": before, "after": after, "replaced": replaced}), flush=True)


if sys.argv[1] == "trio":
    run = lambda: anyio.run(main, backend="trio")
else:
    options = {"use_uvloop": sys.argv[1] == "uvloop"}
    run = lambda: anyio.run(main, backend="asyncio", backend_options=options)
threading.Thread(target=run, name="loop").start()
started.wait(30)
"""


async def test_pools_outlive_the_main_thread(tmp_path: Path, anyio_backend: Backend) -> None:
    # The event loop runs in another thread, and the main thread returns: the pool
    # keeps its workers, and still starts new ones.
    done = await run_script(tmp_path, LOOP_OUTLIVES_MAIN_THREAD, loop_name(anyio_backend))
    stdout, stderr = done.stdout.decode(), done.stderr.decode()
    assert done.returncode == 0, stderr
    assert stdout, stderr  # an error in the loop's thread leaves no output
    pids = json.loads(stdout.splitlines()[-1])
    assert pids["after"] == pids["before"], stderr  # the idle worker lived on
    assert pids["replaced"] not in (pids["before"], 0), stderr
