"""Worker lifecycle: initializer, recycling by call count and by memory."""

from __future__ import annotations

import anyio

from offload import Offloader, OffloadSettings

from .. import funcs
from ..conftest import children


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
