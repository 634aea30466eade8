"""The dask pool's start and stop on an embedded cluster, each test with an Offloader
of its own: the host process's life, starts that fail or are refused, what the host
trusts, and a task that cannot report its start. (The calls, on one cluster for the
module, are in ``test_dask.py``.) Every wait is a bounded poll.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import cloudpickle
import psutil
import pytest

pytest.importorskip("distributed")

from offload import ClusterUnavailable, Offloader, OffloadError, OffloadSettings, PoolStartError
from offload._pools.dask import embedded
from offload._pools.dask.embedded import EmbeddedCluster
from offload._pools.dask.pool import DaskPool
from offload._pools.dask.task import CannotReportStart, invoke
from offload._pools.dask.versions import version_mismatches
from offload._pools.process.scheduling import LONG_SLICE_NS, time_slice
from offload._where import in_worker

from .. import funcs
from ..processes import gone, script_env, wait_until
from .test_dask import (
    BOOT,
    BOUND,
    WORKERS,
    dask_settings,
    host_of,
    host_popen,
    pool_of,
    worker_pids,
)
from .test_process_confinement import SHADOW


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


# -- refused at start -----------------------------------------------------------------


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


# -- the host's life ----------------------------------------------------------------


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
        ours = os.sched_getscheduler(0)
        below = os.SCHED_BATCH if ours == os.SCHED_OTHER else ours
        assert {os.sched_getscheduler(p.pid) for p in tree} == {below}
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

open({held!r}, "w").close()
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
    held = tmp_path / "held"
    preload = tmp_path / "hold_worker.py"
    preload.write_text(HOLD_WORKER.format(release=str(release), held=str(held)))
    monkeypatch.setenv("DASK_DISTRIBUTED__WORKER__PRELOAD", repr([str(preload)]))
    hosts = spy_on_hosts(monkeypatch)
    offloader = Offloader(dask_settings(max_workers=1))
    tree: list[psutil.Process] = []

    def holding() -> bool:
        # In its preload, a worker process is past its imports (seconds of CPU) and
        # watches its parent: it ends as soon as the host does, however loaded the
        # machine is. Before that, only once its imports are done.
        if not hosts or not held.exists():
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
                tg.cancel_scope.cancel()
        # The worker is held until the release, which comes after the cancellation
        # ended: the pool did not wait for the cluster.
    finally:
        release.write_text("")  # were a worker left, let it go on and be caught below
    (host,) = hosts
    assert host.returncode == -signal.SIGKILL  # killed by the pool: it had not reported
    await wait_until(
        lambda: all(gone(p.pid) for p in tree),
        BOUND,
        lambda: f"{[p for p in tree if not gone(p.pid)]} outlived the cancelled start",
    )


# -- trust ----------------------------------------------------------------------------


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


# -- the cluster gone, or refused --------------------------------------------------


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


# -- the task's start ------------------------------------------------------------------


async def test_a_task_that_cannot_report_its_start_does_not_run(tmp_path: Path) -> None:
    # Outside a worker, as on one that cannot reach its scheduler: the call must not
    # run, since a crash of it would then pass for a task that never started.
    marker = tmp_path / "ran"
    blob = cloudpickle.dumps((funcs.touch_then, 1, (), [str(marker)], ()))
    with pytest.raises(CannotReportStart):
        invoke("topic", "key", blob)
    assert not marker.exists()
    # The thread is Dask's: it is a worker's only while the task runs.
    assert not in_worker()


# -- log records -----------------------------------------------------------------------


async def test_without_forward_logs_records_stay_in_the_workers() -> None:
    async with Offloader(dask_settings(forward_logs=False)) as ex:
        handlers, pool, call = await ex.pool("dask").run(funcs.worker_logging)
    assert "_ForwardingLogHandler" not in handlers
    assert (pool, call) == (None, None)
