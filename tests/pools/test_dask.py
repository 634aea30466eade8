"""The dask pool on its embedded cluster: one cluster (one Offloader) for the module.

Dask's client runs on asyncio only, so these tests run on asyncio alone, except the
one that checks the clear error under trio. The module-scoped Offloader owns a
LocalCluster of two single-threaded worker processes, which runs in a host process of
its own: the tests ask it about its scheduler and workers through the client. Every
wait is a bounded poll. How one call fails at each stage (its exceptions, pickling,
crashes) is tested with every kind in ``test_fault_matrix.py``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import cloudpickle
import psutil
import pytest

pytest.importorskip("distributed")

from offload import (
    ClusterUnavailable,
    Executor,
    Offloader,
    OffloadError,
    OffloadSettings,
    OffloadTimeout,
    PoolOverloaded,
    PoolSettings,
    PoolStartError,
    SerializationError,
    WorkerCrashed,
)
from offload._pools.dask import embedded
from offload._pools.dask.embedded import EmbeddedCluster
from offload._pools.dask.pool import SCATTER_THRESHOLD, DaskPool
from offload._pools.dask.task import CannotReportStart, invoke
from offload._pools.dask.versions import version_mismatches
from offload._pools.process.sched import LONG_SLICE_NS, time_slice
from offload._where import in_worker

from .. import funcs
from ..conftest import children
from .test_process_confinement import SHADOW
from .test_process_faults import gone, script_env, wait_until, wait_until_async

WORKERS = 2
PENDING = 2
#: seconds a fault may take to be reported, or the cluster to heal
BOUND = 15.0
#: seconds an embedded cluster may take to start (interpreters, imports, on 2 busy CPUs)
BOOT = 60.0


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


def dask_settings(**pool: Any) -> OffloadSettings:
    return OffloadSettings(
        process={"max_workers": 1},
        thread={"max_workers": 1},
        pools={"dask": PoolSettings(kind="dask", **{"max_workers": WORKERS, **pool})},
        shutdown_timeout=5,
    )


@pytest.fixture(scope="module")
async def dask_ex() -> AsyncIterator[Executor]:
    before = {p.pid for p in children()}
    async with Offloader(dask_settings(max_pending=PENDING)) as ex:
        executor = ex.pool("dask")
        host = host_of(executor)
        cluster = [host, *host.children(recursive=True)]
        yield executor
    leftover = [p for p in children() if p.pid not in before]
    assert not leftover, f"the embedded cluster left processes behind: {leftover}"
    # the host, its workers and whatever else it started: all gone, not orphaned
    await wait_until(
        lambda: all(gone(p.pid) for p in cluster),
        BOUND,
        lambda: f"{[p for p in cluster if not gone(p.pid)]} outlived the pool",
    )


def pool_of(ex: Executor) -> DaskPool:
    pool = ex.offloader.get_pool(ex.pool_name)
    assert isinstance(pool, DaskPool)
    return pool


def client_of(ex: Executor) -> Any:
    client = pool_of(ex)._client
    assert client is not None
    return client


def host_popen(pool: DaskPool) -> subprocess.Popen[bytes] | None:
    """The pool's embedded cluster's host process, if it has one."""
    return None if pool._embedded is None else pool._embedded.process


def host_of(ex: Executor) -> psutil.Process:
    """The embedded cluster's host process: its scheduler and nannies run there."""
    host = host_popen(pool_of(ex))
    assert host is not None
    return psutil.Process(host.pid)


def cluster_pids(host: psutil.Process) -> set[int]:
    """The host and every process under it (workers, multiprocessing's helpers)."""
    try:
        return {host.pid} | {p.pid for p in host.children(recursive=True)}
    except psutil.NoSuchProcess:
        return set()


async def worker_pids(ex: Executor) -> set[int]:
    """The pids of the workers the scheduler knows now. Asked of the scheduler, not of
    the workers: ``client.run`` would also try a worker that has just died and that
    the scheduler still lists, and wait for it up to Dask's 30 s connect timeout."""
    pids: list[int] = await client_of(ex).run_on_scheduler(funcs.scheduler_worker_pids)
    return set(pids)


async def keys_named(ex: Executor, prefix: str) -> list[str]:
    """The keys of the scheduler's tasks that start with ``prefix``."""
    keys = await client_of(ex).run_on_scheduler(funcs.scheduler_task_keys)
    return [k for k in keys if k.startswith(prefix)]


async def no_task_named(ex: Executor, prefix: str) -> None:
    """Wait until the scheduler has forgotten every task named ``prefix``..."""

    async def forgotten() -> bool:
        return not await keys_named(ex, prefix)

    await wait_until_async(forgotten, BOUND, f"the scheduler forgot {prefix}")


@pytest.fixture(autouse=True)
def no_leftover_children(dask_ex: Executor) -> Iterator[None]:
    """The module's cluster outlives each test: only its host and whatever runs under
    it (its current workers) may remain, among all the processes under this one."""
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    yield
    allowed = before | cluster_pids(host_of(dask_ex))
    leftover = [p for p in children() if p.pid not in allowed]
    for p in psutil.Process().children(recursive=True):
        if p.pid not in allowed and p not in leftover and not gone(p.pid):
            leftover.append(p)
    for p in leftover:
        p.kill()
    assert not leftover, f"processes left behind: {[p.pid for p in leftover]}"


async def healed(ex: Executor) -> None:
    """Wait until the cluster has its workers back, the pool sees them (its client's
    view of the scheduler is refreshed every 2 s), and nothing of ours is in flight."""
    workers: list[str] = []

    async def whole() -> bool:
        workers[:] = await client_of(ex).run_on_scheduler(funcs.scheduler_workers)
        return len(workers) == WORKERS == ex.stats().workers and not pool_of(ex)._calls

    await wait_until_async(
        whole,
        BOUND,
        lambda: f"workers={workers} seen={ex.stats().workers} in flight={len(pool_of(ex)._calls)}",
    )


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
    assert pid in await worker_pids(dask_ex)
    # the workers are the host's children, not ours
    assert psutil.Process(pid).ppid() == host_of(dask_ex).pid


async def test_a_decorated_function_calls_itself_in_a_dask_worker(dask_ex: Executor) -> None:
    assert await dask_ex.run(funcs.fib, 12) == 144


async def test_identical_calls_are_separate_calls(dask_ex: Executor) -> None:
    async def one(results: list[str]) -> None:
        results.append(await dask_ex.run(funcs.random_token))

    results: list[str] = []
    async with anyio.create_task_group() as tg:
        for _ in range(4):
            tg.start_soon(one, results)
    results.append(await dask_ex.run(funcs.random_token))
    assert len(set(results)) == 5  # never deduplicated as Dask's pure calls would be


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
    await no_task_named(dask_ex, "sleep_then_touch")
    # ...but Dask cannot interrupt a running task: without hard_cancel it runs on.
    await wait_until(marker.exists, BOUND, "the abandoned task finished on its worker")
    await healed(dask_ex)
    assert await dask_ex.run(funcs.add, 1, 2) == 3


async def test_hard_cancel_restarts_the_worker_running_the_call(
    dask_ex: Executor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pool = pool_of(dask_ex)
    monkeypatch.setattr(pool, "settings", pool.settings.model_copy(update={"hard_cancel": True}))
    pidfile = tmp_path / "pid"
    pids = await worker_pids(dask_ex)
    assert len(pids) == WORKERS
    with pytest.raises(OffloadTimeout):
        await dask_ex.options(timeout=1.0).run(funcs.write_pid_then_sleep, str(pidfile), 60)
    timed_out = anyio.current_time()
    running = int(pidfile.read_text())  # the worker process that ran the task
    assert running in pids
    await wait_until(lambda: gone(running), BOUND, "the worker running the call was killed")
    # killed through the scheduler, from its own event loop: long before the task's end
    assert anyio.current_time() - timed_out < 1.5

    async def replaced() -> bool:
        now = await worker_pids(dask_ex)
        return len(now) == WORKERS and len(now - pids) == 1

    await wait_until_async(replaced, BOUND, "its nanny started a new worker")
    await healed(dask_ex)
    assert dask_ex.stats().recycled >= 1
    assert await dask_ex.run(funcs.add, 1, 2) == 3


async def test_caller_cancellation_cancels_the_task(dask_ex: Executor, tmp_path: Path) -> None:
    before = dask_ex.stats().cancelled
    async with anyio.create_task_group() as tg:
        tg.start_soon(dask_ex.run, funcs.wait_for_file, str(tmp_path / "never"))

        async def submitted() -> bool:
            return bool(await keys_named(dask_ex, "wait_for_file"))

        await wait_until_async(submitted, BOUND, "submitted")
        tg.cancel_scope.cancel()
    assert dask_ex.stats().cancelled == before + 1
    await no_task_named(dask_ex, "wait_for_file")
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

import cloudpickle
import psutil

from offload import Offloader, OffloadSettings


async def main():
    settings = OffloadSettings(
        process={"max_workers": 1},
        thread={"max_workers": 1},
        pools={"dask": {"kind": "dask", "max_workers": 2}},
    )
    async with Offloader(settings) as ex:
        # more than a pipe holds (64 KiB): it must reach our stdout, not stall
        await ex.pool("dask").run(print, "from a worker " + "x" * 100_000, flush=True)
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
            with anyio.fail_after(BOOT):  # abandoned on timeout; EOF once all are dead
                printed = await anyio.to_thread.run_sync(
                    parent.stdout.readline, abandon_on_cancel=True
                )
                line = await anyio.to_thread.run_sync(
                    parent.stdout.readline, abandon_on_cancel=True
                )
            # a worker's stdout is the application's, as when the cluster lived there
            assert printed == b"from a worker " + b"x" * 100_000 + b"\n"
            pids = [int(p) for p in line.split()]
            procs = {pid: psutil.Process(pid) for pid in pids}
            cmdlines = {pid: " ".join(p.cmdline()) for pid, p in procs.items()}
            hosts = [pid for pid, c in cmdlines.items() if "offload._pools.dask.host" in c]
            assert len(hosts) == 1, cmdlines
            assert procs[hosts[0]].ppid() == parent.pid
            workers = [pid for pid, c in cmdlines.items() if "multiprocessing.spawn" in c]
            assert len(workers) >= WORKERS, cmdlines
            assert all(procs[pid].ppid() == hosts[0] for pid in workers)
        finally:
            parent.kill()
            parent.wait(5)
    assert parent.returncode == -signal.SIGKILL
    await wait_until(
        lambda: all(gone(pid) for pid in pids),
        BOUND,
        lambda: f"{[p for p in pids if not gone(p)]} outlived their killed parent",
    )


# -- the host's life ----------------------------------------------------------------


async def test_the_host_exits_and_leaves_nothing_when_the_pool_stops() -> None:
    async with Offloader(dask_settings(max_workers=1)) as ex:
        executor = ex.pool("dask")
        assert await executor.run(funcs.add, 1, 2) == 3
        pool = pool_of(executor)
        host = host_popen(pool)
        assert host is not None
        proc = psutil.Process(host.pid)
        assert proc.ppid() == os.getpid()
        tree = [proc, *proc.children(recursive=True)]
        workers = await worker_pids(executor)
        assert len(workers) == 1
        assert workers <= {p.pid for p in tree}
        # the host, and all it starts, at the pool's lower priority (niceness 10)
        nice = min(19, os.getpriority(os.PRIO_PROCESS, 0) + 10)
        assert {p.nice() for p in tree} == {nice}
        if time_slice(os.getpid()) is not None:  # Linux 6.12+: and the long slice
            assert {time_slice(p.pid) for p in tree} == {LONG_SLICE_NS}
    assert pool._embedded is None
    # it closed its cluster and exited by itself when the pool closed its stdin
    assert host.returncode == 0
    await wait_until(
        lambda: all(gone(p.pid) for p in tree),
        BOUND,
        lambda: f"{[p for p in tree if not gone(p.pid)]} outlived the pool",
    )


def spy_on_hosts(monkeypatch: pytest.MonkeyPatch) -> list[subprocess.Popen[bytes]]:
    """Every host process the pools start from now on, in a list."""
    hosts: list[subprocess.Popen[bytes]] = []
    spawn = embedded.spawn_host

    def spy(*args: Any) -> subprocess.Popen[bytes]:
        hosts.append(spawn(*args))
        return hosts[-1]

    monkeypatch.setattr(embedded, "spawn_host", spy)
    return hosts


async def test_a_host_that_exits_at_start_fails_the_start_with_its_status(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    hosts = spy_on_hosts(monkeypatch)
    monkeypatch.setattr(
        embedded, "host_command", lambda config: [sys.executable, "-c", "import sys; sys.exit(3)"]
    )
    with pytest.raises(OffloadError, match=r"its host process \d+ exited with status 3"):
        async with Offloader(dask_settings()):
            pytest.fail("the body must not run")
    (host,) = hosts
    assert host.returncode == 3  # reaped: nothing left (the fixture checks the rest)


async def test_a_cluster_that_cannot_start_fails_the_start(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The host's own failure path: distributed refuses to start the workers.
    hosts = spy_on_hosts(monkeypatch)
    monkeypatch.setenv("DASK_DISTRIBUTED__WORKER__MULTIPROCESSING_METHOD", "no-such-method")
    with pytest.raises(OffloadError, match="exited with status 1"):
        async with Offloader(dask_settings()):
            pytest.fail("the body must not run")
    (host,) = hosts
    assert host.returncode == 1


HOLD_WORKER = """
import os
import time

while not os.path.exists({release!r}):
    time.sleep(0.02)
"""


async def test_cancelled_start_leaves_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every worker of the new cluster waits in its preload until `release` exists: the
    # cluster cannot finish starting, so the cancellation lands while the pool waits
    # for the host's address, with a worker process running under the host.
    release = tmp_path / "release"
    preload = tmp_path / "hold_worker.py"
    preload.write_text(HOLD_WORKER.format(release=str(release)))
    monkeypatch.setenv("DASK_DISTRIBUTED__WORKER__PRELOAD", repr([str(preload)]))
    hosts = spy_on_hosts(monkeypatch)
    offloader = Offloader(dask_settings(max_workers=1))
    tree: list[psutil.Process] = []

    def holding() -> bool:
        if not hosts:
            return False
        try:
            host = psutil.Process(hosts[0].pid)
            tree[:] = [host, *host.children(recursive=True)]
            return any("multiprocessing.spawn" in " ".join(p.cmdline()) for p in tree[1:])
        except psutil.NoSuchProcess:
            return False

    async def enter() -> None:
        async with offloader:
            pytest.fail("the start must not end")

    try:
        with anyio.fail_after(BOOT):
            async with anyio.create_task_group() as tg:
                tg.start_soon(enter)
                await wait_until(holding, BOOT, "the host started a worker")
                started = anyio.current_time()
                tg.cancel_scope.cancel()
        assert anyio.current_time() - started < 5  # the pool did not wait for the cluster
    finally:
        release.write_text("")  # were a worker left, let it go on and be caught below
    (host,) = hosts
    assert host.returncode == -signal.SIGKILL  # killed by the pool: it had not reported
    await wait_until(
        lambda: all(gone(p.pid) for p in tree),
        BOUND,
        lambda: f"{[p for p in tree if not gone(p.pid)]} outlived the cancelled start",
    )


# -- a crash fails its own call only -----------------------------------------------


def decide(folder: Path, pid: int, verdict: str) -> None:
    """Tell the held call on worker ``pid`` what to do (see funcs.wait_for_verdict)."""
    part = folder / f"{pid}.part"
    part.write_text(verdict)
    os.replace(part, folder / str(pid))


async def crash_fails_only_its_own_call(ex: Executor, client: Any, folder: Path) -> None:
    """Each worker runs a held call and has a second call waiting behind it, on the
    worker (Dask hands a worker more tasks than it has threads); one held call
    crashes: it alone fails, the call waiting behind it on its worker runs."""
    n = len(await client.run_on_scheduler(funcs.scheduler_workers))
    assert n >= 1
    processing: dict[int, list[str]] = {}

    async def placed(prefix: str, count: int) -> bool:
        processing.update(await client.run_on_scheduler(funcs.scheduler_processing))
        keys = [k for ks in processing.values() for k in ks if k.startswith(prefix)]
        return len(keys) == count

    held: dict[int, Any] = {}
    after: dict[int, Any] = {}

    async def hold(i: int) -> None:
        try:
            held[i] = await ex.run(funcs.wait_for_verdict, str(folder))
        except Exception as exc:
            held[i] = exc

    async def follow(i: int) -> None:
        try:
            after[i] = await ex.run(funcs.add, i, i)
        except Exception as exc:
            after[i] = exc

    with anyio.fail_after(BOOT):
        async with anyio.create_task_group() as tg:
            for i in range(n):
                tg.start_soon(hold, i)
            await wait_until_async(lambda: placed("wait_for_verdict", n), BOUND, "held")
            assert all(
                sum(k.startswith("wait_for_verdict") for k in keys) == 1
                for keys in processing.values()
            ), processing
            for i in range(n):
                tg.start_soon(follow, i)
            await wait_until_async(lambda: placed("add", n), BOUND, lambda: f"{processing}")
            # a worker with a call waiting behind its held one: that held one crashes
            doomed = next(
                pid for pid, keys in processing.items() if any(k.startswith("add") for k in keys)
            )
            for pid in processing:
                decide(folder, pid, "crash" if pid == doomed else "ok")
    crashed = [r for r in held.values() if isinstance(r, WorkerCrashed)]
    assert len(crashed) == 1, held
    assert sorted(r for r in held.values() if r == "ok") == ["ok"] * (n - 1), held
    assert after == {i: 2 * i for i in range(n)}


async def test_a_crash_fails_its_own_call_only(dask_ex: Executor, tmp_path: Path) -> None:
    await crash_fails_only_its_own_call(dask_ex, client_of(dask_ex), tmp_path)
    await healed(dask_ex)


# -- trust ----------------------------------------------------------------------------


async def outsider_runs(address: str, **client: Any) -> int:
    """Connect an outside client to ``address`` and run a task with it."""
    from distributed import Client

    outsider = await Client(address, asynchronous=True, set_as_default=False, timeout=3, **client)
    try:
        pid: int = await outsider.submit(os.getpid, pure=False)
        return pid
    finally:
        await outsider.close()


async def raw_identity(address: str) -> Any:
    """Ask ``address`` who it is over a plain connection speaking Dask's protocol."""
    from distributed.comm.core import connect

    comm = await connect(address, timeout=3)
    try:
        await comm.write({"op": "identity", "reply": True})
        with anyio.fail_after(BOUND):
            return await comm.read()
    finally:
        comm.abort()


async def test_an_outside_client_is_refused(dask_ex: Executor) -> None:
    from distributed.security import Security

    client = client_of(dask_ex)
    scheduler = client.scheduler.address
    workers = await client.run_on_scheduler(funcs.scheduler_workers)
    here = scheduler.split("://", 1)[1]
    # a client without the cluster's certificate (plain, or with a certificate of its
    # own) is refused, or gets no handshake before its timeout
    with pytest.raises(OSError):
        await outsider_runs(f"tcp://{here}")
    with pytest.raises(OSError):
        await outsider_runs(f"tls://{here}", security=Security.temporary())
    # a raw connection gets no answer, from the scheduler nor from any worker
    for address in [scheduler, *workers]:
        with pytest.raises(OSError):
            await raw_identity(f"tcp://{address.split('://', 1)[1]}")
    assert await dask_ex.run(funcs.add, 1, 2) == 3  # the pool's own client still works


@pytest.mark.parametrize("name", ["socket", "json"])
async def test_the_cluster_never_imports_from_the_current_directory(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mark = tmp_path / "imported"
    here = tmp_path / "cwd"
    here.mkdir()
    (here / f"{name}.py").write_text(SHADOW.format(mark=str(mark), name=name))
    monkeypatch.chdir(here)
    async with Offloader(dask_settings(max_workers=1)) as ex:
        assert await ex.pool("dask").run(funcs.add, 2, 3) == 5
    # The host (its argument is its configuration) and its workers (multiprocessing's
    # spawn). The process pool's workers are tested with the process pool.
    lines = mark.read_text().splitlines() if mark.exists() else []
    cluster = [line for line in lines if "report_fd" in line or "--multiprocessing-fork" in line]
    assert not cluster, cluster


# -- code the cluster cannot import --------------------------------------------------


async def test_a_function_the_cluster_cannot_import_is_a_serialization_error(
    dask_ex: Executor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A module only this process can import: the cluster started before it existed.
    (tmp_path / "only_here_mod.py").write_text("def inc(x):\n    return x + 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import only_here_mod  # type: ignore[import-not-found]

    with anyio.fail_after(BOUND):
        with pytest.raises(SerializationError, match="only_here_mod"):
            await dask_ex.run(only_here_mod.inc, 1)
        with pytest.raises(SerializationError, match="only_here_mod"):
            await dask_ex.run(funcs.echo, only_here_mod.inc)  # as an argument too
    assert await dask_ex.run(funcs.add, 1, 2) == 3


async def test_calls_fail_fast_once_the_embedded_cluster_is_gone() -> None:
    async with Offloader(dask_settings(max_workers=1)) as ex:
        executor = ex.pool("dask")
        host = host_of(executor)
        tree = [host, *host.children(recursive=True)]
        host.kill()  # its workers die with it
        await wait_until(lambda: all(gone(p.pid) for p in tree), BOUND, "the cluster died")
        for _ in range(2):
            # no deadline of its own: it must not wait for a cluster that is gone
            with anyio.fail_after(BOUND), pytest.raises(ClusterUnavailable, match="embedded"):
                await executor.run(funcs.add, 1, 2)


async def test_without_cryptography_the_embedded_cluster_does_not_start(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(DaskPool, "prepare", classmethod(lambda cls: None))
    # what prepare finds without it
    monkeypatch.setattr(EmbeddedCluster, "can_make_certificate", False)
    hosts = spy_on_hosts(monkeypatch)
    with pytest.raises(PoolStartError, match=r"cryptography.*offload\[dask\]"):
        async with Offloader(dask_settings()):
            pytest.fail("the body must not run")
    assert hosts == []  # refused before any process started


async def test_a_task_that_cannot_say_it_starts_does_not_run(tmp_path: Path) -> None:
    # Outside a worker, as on one that cannot reach its scheduler: the call must not
    # run, since a crash of it would then pass for a task that never started.
    marker = tmp_path / "ran"
    blob = cloudpickle.dumps((funcs.touch_then, 1, (), [str(marker)], ()))
    with pytest.raises(CannotReportStart):
        invoke("topic", "key", blob)
    assert not marker.exists()
    # The thread is Dask's: it is a worker's only while the task runs.
    assert not in_worker()
