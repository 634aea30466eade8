"""The process pool's end: draining at exit, calls refused once it closes, workers
that die with a killed parent; and its warm start.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any

import anyio
import psutil
import pytest

from offload import (
    Offloader,
    PoolClosed,
)

from .. import funcs
from ..conftest import Backend, loop_name
from ..processes import (
    WORKER_MARK,
    gone,
    script_env,
    settings,
    wait_until,
    worker_pids,
    worker_procs,
)

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
