"""The dask pool on its embedded cluster: one cluster (one Offloader) for the module.

Dask's client runs on asyncio only, so these tests run on asyncio alone, except the
one that checks the clear error under trio. The module-scoped Offloader owns a
LocalCluster of two single-threaded worker processes; every wait is a bounded poll.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import psutil
import pytest

pytest.importorskip("distributed")

from offload import (
    Executor,
    Offloader,
    OffloadError,
    OffloadSettings,
    OffloadTimeout,
    PoolOverloaded,
    RemoteTraceback,
    SerializationError,
    WorkerCrashed,
)
from offload._pools._dask import SCATTER_THRESHOLD, DaskPool, version_mismatches

from .. import funcs
from ..conftest import children
from .test_process_faults import gone, script_env, wait_until

WORKERS = 2
PENDING = 2
#: seconds a fault may take to be reported, or the cluster to heal
BOUND = 15.0


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
async def dask_ex() -> AsyncIterator[Executor]:
    settings = OffloadSettings(
        process={"max_workers": 1},
        thread={"max_workers": 1},
        pools={"dask": {"kind": "dask", "max_workers": WORKERS, "max_pending": PENDING}},
        shutdown_timeout=5,
    )
    before = {p.pid for p in children()}
    async with Offloader(settings) as ex:
        yield ex.pool("dask")
    leftover = [p for p in children() if p.pid not in before]
    assert not leftover, f"the embedded cluster left processes behind: {leftover}"


def pool_of(ex: Executor) -> DaskPool:
    pool = ex.offloader.get_pool(ex.pool_name)
    assert isinstance(pool, DaskPool)
    return pool


def scheduler_of(ex: Executor) -> Any:
    cluster = pool_of(ex)._cluster
    assert cluster is not None
    return cluster.scheduler


def worker_pids(ex: Executor) -> set[int]:
    cluster = pool_of(ex)._cluster
    return {nanny.pid for nanny in cluster.workers.values() if nanny.pid}


@pytest.fixture(autouse=True)
def no_leftover_children(dask_ex: Executor) -> Iterator[None]:
    """The module's cluster outlives each test: only its current workers may remain."""
    before = {p.pid for p in children()}
    yield
    allowed = before | worker_pids(dask_ex)
    leftover = [p for p in children() if p.pid not in allowed]
    for p in leftover:
        p.kill()
    assert not leftover, f"child processes left behind: {[p.pid for p in leftover]}"


async def healed(ex: Executor) -> None:
    """Wait until the cluster has its workers back and nothing of ours is in flight."""
    scheduler = scheduler_of(ex)
    await wait_until(
        lambda: len(scheduler.workers) == WORKERS and not pool_of(ex)._calls,
        BOUND,
        lambda: f"workers={list(scheduler.workers)} in flight={len(pool_of(ex)._calls)}",
    )


def keys_named(ex: Executor, prefix: str) -> list[str]:
    return [str(k) for k in scheduler_of(ex).tasks if str(k).startswith(prefix)]


# -- calls --------------------------------------------------------------------------


async def test_calls_return_results(dask_ex: Executor) -> None:
    assert await dask_ex.run(funcs.add, 1, 2) == 3
    assert await dask_ex.run(funcs.double, 21) == 42  # decorated: runs the original
    # keywords that are also Client.submit's own reach the function untouched
    assert await dask_ex.run(funcs.kw, key=1, pure=2, workers=3, retries=4) == {
        "key": 1,
        "pure": 2,
        "workers": 3,
        "retries": 4,
    }
    stats = dask_ex.stats()
    assert stats.kind == "dask"
    assert stats.workers == WORKERS
    assert stats.completed >= 3


async def test_lambdas_and_closures_travel_by_value(dask_ex: Executor) -> None:
    offset = 5

    def local(x: int) -> int:
        return x + offset

    assert await dask_ex.run(lambda x: x * 3, 4) == 12
    assert await dask_ex.run(local, 1) == 6
    assert await dask_ex.run(funcs.echo, lambda: 1) is not None  # a lambda argument


async def test_calls_run_in_the_cluster_workers(dask_ex: Executor) -> None:
    pid = await dask_ex.run(funcs.getpid)
    assert pid != os.getpid()
    assert pid in worker_pids(dask_ex)


async def test_user_exception_keeps_its_type_with_the_remote_traceback(
    dask_ex: Executor,
) -> None:
    with pytest.raises(funcs.Boom, match="kaboom") as info:
        await dask_ex.run(funcs.boom, "kaboom")
    cause = info.value.__cause__
    assert isinstance(cause, RemoteTraceback)
    assert "raise Boom(message)" in cause.tb
    assert await dask_ex.run(funcs.add, 2, 2) == 4


async def test_identical_calls_are_separate_calls(dask_ex: Executor) -> None:
    async def one(results: list[str]) -> None:
        results.append(await dask_ex.run(funcs.random_token))

    results: list[str] = []
    async with anyio.create_task_group() as tg:
        for _ in range(4):
            tg.start_soon(one, results)
    results.append(await dask_ex.run(funcs.random_token))
    assert len(set(results)) == 5  # never deduplicated as Dask's pure calls would be


async def test_unpicklable_argument_and_result(dask_ex: Executor) -> None:
    with pytest.raises(SerializationError, match="echo"):
        await dask_ex.run(funcs.echo, threading.Lock())
    with pytest.raises(SerializationError, match="return_lock"):
        await dask_ex.run(funcs.return_lock)
    assert await dask_ex.run(funcs.add, 1, 1) == 2


async def test_large_arguments_are_scattered(
    dask_ex: Executor, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = pool_of(dask_ex)._client
    scattered: list[int] = []
    original = client.scatter

    async def spy(data: list[Any], **kwargs: Any) -> Any:
        scattered.append(len(data))
        return await original(data, **kwargs)

    monkeypatch.setattr(client, "scatter", spy)
    big = b"x" * (SCATTER_THRESHOLD + 1)
    small = [1, 2, 3]
    assert await dask_ex.run(funcs.echo, small) == small
    assert scattered == []
    # a large positional and a large keyword argument, in one scatter
    result = await dask_ex.run(funcs.kw, a=big, b=small, c=bytearray(big))
    assert result == {"a": big, "b": small, "c": bytearray(big)}
    assert scattered == [2]
    assert await dask_ex.run(len, big) == len(big)
    assert scattered == [2, 1]


# -- deadline, cancellation, crash --------------------------------------------------


async def test_deadline_gives_offload_timeout_and_cancels_the_task(
    dask_ex: Executor, tmp_path: Path
) -> None:
    marker = tmp_path / "ran"
    before = dask_ex.stats().timed_out
    started = anyio.current_time()
    with pytest.raises(OffloadTimeout, match="sleep_then_touch"):
        await dask_ex.options(timeout=0.5).run(funcs.sleep_then_touch, 1.5, str(marker))
    assert anyio.current_time() - started < 1.4  # the caller did not wait for the task
    assert dask_ex.stats().timed_out == before + 1
    # the future is cancelled: the scheduler forgets the task...
    await wait_until(lambda: not keys_named(dask_ex, "sleep_then_touch"), BOUND, "forgotten")
    # ...but Dask cannot interrupt a running task: without hard_cancel it runs on.
    await wait_until(marker.exists, BOUND, "the abandoned task finished on its worker")
    await healed(dask_ex)
    assert await dask_ex.run(funcs.add, 1, 2) == 3


async def test_hard_cancel_restarts_the_worker_running_the_call(
    dask_ex: Executor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pool = pool_of(dask_ex)
    monkeypatch.setattr(pool, "settings", pool.settings.model_copy(update={"hard_cancel": True}))
    marker = tmp_path / "ran"
    pids = worker_pids(dask_ex)
    with pytest.raises(OffloadTimeout):
        await dask_ex.options(timeout=1.0).run(funcs.sleep_then_touch, 3, str(marker))
    await wait_until(lambda: worker_pids(dask_ex) != pids, BOUND, "a worker was restarted")
    await healed(dask_ex)
    await anyio.sleep(2.5)  # past the moment the task would have finished
    assert not marker.exists(), "the task ran to its end: its worker was not stopped"
    assert dask_ex.stats().recycled >= 1
    assert await dask_ex.run(funcs.add, 1, 2) == 3


async def test_caller_cancellation_cancels_the_task(dask_ex: Executor, tmp_path: Path) -> None:
    before = dask_ex.stats().cancelled
    async with anyio.create_task_group() as tg:
        tg.start_soon(dask_ex.run, funcs.wait_for_file, str(tmp_path / "never"))
        await wait_until(lambda: bool(keys_named(dask_ex, "wait_for_file")), BOUND, "submitted")
        tg.cancel_scope.cancel()
    assert dask_ex.stats().cancelled == before + 1
    await wait_until(lambda: not keys_named(dask_ex, "wait_for_file"), BOUND, "forgotten")
    (tmp_path / "never").write_text("")  # let the abandoned task end
    await healed(dask_ex)


async def test_crash_is_reported_at_once_and_the_cluster_recovers(dask_ex: Executor) -> None:
    before = dask_ex.stats().crashed
    started = anyio.current_time()
    with pytest.raises(WorkerCrashed, match="exit_now"):
        await dask_ex.run(funcs.exit_now, 3)
    # never retried on another worker: one crash, reported within seconds
    assert anyio.current_time() - started < 5
    assert dask_ex.stats().crashed == before + 1
    await healed(dask_ex)
    results = [await dask_ex.run(funcs.add, i, i) for i in range(4)]
    assert results == [0, 2, 4, 6]


async def test_backpressure_refuses_past_workers_plus_pending(
    dask_ex: Executor, tmp_path: Path
) -> None:
    release = tmp_path / "release"
    capacity = WORKERS + PENDING
    results: list[Any] = []

    async def hold(i: int) -> None:
        results.append(await dask_ex.run(funcs.wait_for_file, str(release), i))

    async with anyio.create_task_group() as tg:
        for i in range(capacity):
            tg.start_soon(hold, i)
        await wait_until(lambda: len(pool_of(dask_ex)._calls) == capacity, BOUND, "all in flight")
        stats = dask_ex.stats()
        assert (stats.busy, stats.queued) == (WORKERS, PENDING)
        with pytest.raises(PoolOverloaded, match="max_pending"):
            await dask_ex.run(funcs.add, 1, 1)
        release.write_text("")
    assert sorted(results) == list(range(capacity))
    assert await dask_ex.run(funcs.add, 1, 1) == 2


# -- outside the cluster ------------------------------------------------------------


def test_under_trio_the_pool_fails_at_start_with_a_clear_message() -> None:
    import trio

    settings = OffloadSettings(
        process={"max_workers": 1}, thread={"max_workers": 1}, pools={"d": {"kind": "dask"}}
    )

    async def main() -> None:
        async with Offloader(settings):
            pytest.fail("the body must not run")

    with pytest.raises(OffloadError, match="asyncio only"):
        trio.run(main)


def _versions(client: dict[str, str], *workers: dict[str, str]) -> dict[str, Any]:
    return {
        "client": {"packages": client},
        "scheduler": {"packages": client},
        "workers": {f"tcp://w{i}": {"packages": w} for i, w in enumerate(workers)},
    }


def test_version_check() -> None:
    same = {"python": "3.11.7.final.0", "distributed": "2024.8.0", "numpy": "2.0"}
    assert version_mismatches(_versions(same, same)) == ([], [])
    # a python patch release differs: fine
    assert version_mismatches(_versions(same, {**same, "python": "3.11.9.final.0"})) == ([], [])
    fatal, other = version_mismatches(
        _versions(same, {**same, "distributed": "2025.1.0", "numpy": "1.26"})
    )
    assert fatal == ["distributed: client 2024.8.0, scheduler 2024.8.0, worker tcp://w0 2025.1.0"]
    assert other == ["numpy: client 2.0, scheduler 2.0, worker tcp://w0 1.26"]
    fatal, _ = version_mismatches(_versions({**same, "offload": "0.1"}, same))
    assert fatal == ["offload: client 0.1, scheduler 0.1, worker tcp://w0 MISSING"]


DASK_PARENT_SCRIPT = """
import asyncio

import psutil

from offload import Offloader, OffloadSettings


async def main():
    settings = OffloadSettings(
        process={"max_workers": 1},
        thread={"max_workers": 1},
        pools={"dask": {"kind": "dask", "max_workers": 2}},
    )
    async with Offloader(settings) as ex:
        await ex.pool("dask").run(abs, -1)
        pids = [p.pid for p in psutil.Process().children(recursive=True)]
        print(" ".join(map(str, pids)), flush=True)
        await asyncio.sleep(60)


if __name__ == "__main__":
    asyncio.run(main())
"""


async def test_embedded_cluster_dies_with_killed_parent(tmp_path: Path) -> None:
    script = tmp_path / "parent.py"
    script.write_text(DASK_PARENT_SCRIPT)
    with subprocess.Popen(
        [sys.executable, str(script)], cwd=tmp_path, env=script_env(), stdout=subprocess.PIPE
    ) as parent:
        try:
            assert parent.stdout is not None
            with anyio.fail_after(60):
                line = await anyio.to_thread.run_sync(parent.stdout.readline)
            pids = [int(p) for p in line.split()]
            cmdlines = [" ".join(psutil.Process(pid).cmdline()) for pid in pids]
            assert sum("multiprocessing" in c for c in cmdlines) >= WORKERS, cmdlines
        finally:
            parent.kill()
            parent.wait(5)
    assert parent.returncode == -signal.SIGKILL
    await wait_until(
        lambda: all(gone(pid) for pid in pids),
        BOUND,
        lambda: f"{[p for p in pids if not gone(p)]} outlived their killed parent",
    )
