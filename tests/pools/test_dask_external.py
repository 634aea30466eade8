"""The dask pool on an existing cluster: ``dask scheduler`` and ``dask worker`` run
as subprocesses on 127.0.0.1, once for the module, and pools connect by address."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

pytest.importorskip("distributed")

from offload import (
    ClusterUnavailable,
    Offloader,
    OffloadSettings,
    OffloadTimeout,
    PoolClosed,
    PoolSettings,
    PoolStartError,
    SerializationError,
    WorkerCrashed,
)
from offload._pools.dask.pool import DaskPool

from .. import funcs
from ..conftest import children
from ..processes import BackgroundScript, gone
from .test_dask import crash_fails_only_its_own_call

ROOT = Path(__file__).resolve().parents[2]
#: a folder on the external scheduler's path, not on its workers'
SCHEDULER_ONLY = Path(tempfile.gettempdir()) / f"offload-scheduler-only-{os.getpid()}"
#: seconds the scheduler and workers get to come up
BOOT = 60.0


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


def start_scheduler(tmp: Path, env: dict[str, str]) -> tuple[subprocess.Popen[bytes], str]:
    """A ``dask scheduler`` on a free loopback port, and its address once it runs."""
    scheduler_file = tmp / "scheduler.json"
    scheduler = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dask",
            "scheduler",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--dashboard-address",
            "127.0.0.1:0",
            "--scheduler-file",
            str(scheduler_file),
        ],
        env=env,
        cwd=tmp,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + BOOT
        while not scheduler_file.exists():
            assert scheduler.poll() is None, "dask scheduler exited"
            assert time.monotonic() < deadline, "dask scheduler did not start"
            time.sleep(0.05)
        return scheduler, str(json.loads(scheduler_file.read_text())["address"])
    except BaseException:
        _stop(scheduler)
        raise


@pytest.fixture(scope="module")
def scheduler_address(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A scheduler and two single-threaded workers (with nannies), as subprocesses."""
    tmp = tmp_path_factory.mktemp("dask")
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),  # user modules must be importable everywhere
        "DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": "0",
    }
    # ...but one, which only the scheduler (and this process) can import
    SCHEDULER_ONLY.mkdir(exist_ok=True)
    (SCHEDULER_ONLY / "scheduler_only_mod.py").write_text("def inc(x):\n    return x + 1\n")
    command = [sys.executable, "-m", "dask"]
    scheduler, address = start_scheduler(
        tmp, {**env, "PYTHONPATH": os.pathsep.join([str(ROOT), str(SCHEDULER_ONLY)])}
    )
    procs = [scheduler]
    try:
        procs.append(
            subprocess.Popen(
                [
                    *command,
                    "worker",
                    address,
                    "--host",
                    "127.0.0.1",
                    "--nworkers",
                    "2",
                    "--nthreads",
                    "1",
                    "--dashboard-address",
                    "127.0.0.1:0",
                ],
                env=env,
                cwd=tmp,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        yield address
    finally:
        for proc in reversed(procs):
            _stop(proc)
        shutil.rmtree(SCHEDULER_ONLY, ignore_errors=True)


@pytest.fixture(autouse=True)
def no_leftover_children(scheduler_address: str) -> Iterator[None]:
    """The cluster's two processes outlive each test; nothing else may."""
    before = {p.pid for p in children()}
    yield
    leftover = [p for p in children() if p.pid not in before]
    for p in leftover:
        p.kill()
    assert not leftover, f"child processes left behind: {[p.pid for p in leftover]}"


def settings(address: str | None, *, hard_cancel: bool = False) -> OffloadSettings:
    return OffloadSettings(
        process={"max_workers": 1},
        thread={"max_workers": 1},
        pools={"remote": PoolSettings(kind="dask", address=address, hard_cancel=hard_cancel)},
        shutdown_timeout=5,
    )


async def test_connects_by_address_and_runs_calls(scheduler_address: str) -> None:
    async with Offloader(settings(scheduler_address)) as ex:
        remote = ex.pool("remote")
        pool = ex.offloader.get_pool("remote")
        assert isinstance(pool, DaskPool)
        assert pool._embedded is None  # nothing embedded
        with anyio.fail_after(BOOT):
            await pool._client.wait_for_workers(2)
        assert await remote.run(funcs.add, 2, 3) == 5
        assert await remote.run(lambda: "by value") == "by value"
        pids = {await remote.run(funcs.sleep_getpid, 0.2) for _ in range(4)}
        assert os.getpid() not in pids
        with pytest.raises(funcs.Boom):
            await remote.run(funcs.boom, "remote")
        with pytest.raises(WorkerCrashed):
            await remote.run(funcs.exit_now, 3)
        assert remote.stats().workers == 2  # max_workers: the cluster's threads
        with anyio.fail_after(BOOT):
            await pool._client.wait_for_workers(2)
        assert await remote.run(funcs.add, 1, 1) == 2


async def test_honours_dask_scheduler_address(
    scheduler_address: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DASK_SCHEDULER_ADDRESS", scheduler_address)
    async with Offloader(settings(None)) as ex:
        pool = ex.offloader.get_pool("remote")
        assert isinstance(pool, DaskPool)
        assert pool._embedded is None
        assert await ex.pool("remote").run(funcs.add, 1, 2) == 3


async def test_hard_cancel_restarts_the_remote_worker(
    scheduler_address: str, tmp_path: Path
) -> None:
    pidfile = tmp_path / "pid"
    async with Offloader(settings(scheduler_address, hard_cancel=True)) as ex:
        remote = ex.pool("remote")
        pool = ex.offloader.get_pool("remote")
        assert isinstance(pool, DaskPool)
        with anyio.fail_after(BOOT):
            await pool._client.wait_for_workers(2)
        with pytest.raises(OffloadTimeout):
            await remote.options(timeout=1.0).run(funcs.write_pid_then_sleep, str(pidfile), 60)
        running = int(pidfile.read_text())  # the worker process that ran the task
        with anyio.fail_after(BOOT):
            while not gone(running):  # it must not run to its end, 60 s later
                await anyio.sleep(0.05)
            while not remote.stats().recycled:
                await anyio.sleep(0.05)
            await pool._client.wait_for_workers(2)
        assert await remote.run(funcs.add, 1, 2) == 3


async def test_forced_shutdown_ends_calls_with_pool_closed(
    scheduler_address: str, tmp_path: Path
) -> None:
    release = tmp_path / "release"
    outcome: list[BaseException] = []
    offloader = Offloader(
        OffloadSettings(
            process={"max_workers": 1},
            thread={"max_workers": 1},
            pools={"remote": {"kind": "dask", "address": scheduler_address}},
            shutdown_timeout=0.5,
        )
    )

    async def call() -> None:
        try:
            await offloader.executor.pool("remote").run(funcs.wait_for_file, str(release))
        except BaseException as exc:
            outcome.append(exc)

    started = anyio.current_time()
    async with anyio.create_task_group() as tg, offloader:
        tg.start_soon(call)
        with anyio.fail_after(BOOT):
            while not offloader.stats()["remote"].busy:
                await anyio.sleep(0.01)
        # leaving drained for 0.5 s, then ended the call
    release.write_text("")  # let the abandoned task end on its worker
    assert len(outcome) == 1
    assert isinstance(outcome[0], PoolClosed)
    assert anyio.current_time() - started < 20


async def test_a_crash_fails_its_own_call_only(scheduler_address: str, tmp_path: Path) -> None:
    async with Offloader(settings(scheduler_address)) as ex:
        pool = ex.offloader.get_pool("remote")
        assert isinstance(pool, DaskPool)
        with anyio.fail_after(BOOT):
            await pool._client.wait_for_workers(2)
        await crash_fails_only_its_own_call(ex.pool("remote"), pool._client, tmp_path)
        with anyio.fail_after(BOOT):
            await pool._client.wait_for_workers(2)
        assert await ex.pool("remote").run(funcs.add, 1, 2) == 3


async def test_a_function_the_workers_cannot_import_is_a_serialization_error(
    scheduler_address: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(SCHEDULER_ONLY))
    import scheduler_only_mod  # type: ignore[import-not-found]

    async with Offloader(settings(scheduler_address)) as ex:
        remote = ex.pool("remote")
        with anyio.fail_after(BOOT):
            with pytest.raises(SerializationError, match="scheduler_only_mod"):
                await remote.run(scheduler_only_mod.inc, 1)
            assert await remote.run(funcs.add, 1, 2) == 3


async def test_a_tls_address_without_tls_settings_fails_the_start() -> None:
    with pytest.raises(PoolStartError, match=r"tls://.*DASK_DISTRIBUTED__COMM__TLS"):
        async with Offloader(settings("tls://127.0.0.1:9")):
            pytest.fail("the body must not run")


OUTAGE = """
import ctypes
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time

import anyio
import dask.config

from offload import ClusterUnavailable, Offloader, OffloadSettings
from tests import funcs

# Dask's reconnect window is the client's connect timeout: 2 s here instead of 30 s;
# a scheduler that does not answer is gone after its TCP timeout: 11 s (distributed's
# least) instead of 30 s.
dask.config.set({"distributed.comm.timeouts.connect": "2s", "distributed.comm.timeouts.tcp": "11s"})

with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    PORT = s.getsockname()[1]
ADDRESS = f"tcp://127.0.0.1:{PORT}"
DASK = [sys.executable, "-m", "dask"]


def cluster():
    env = {**os.environ, "DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": "0"}
    quiet = {
        "env": env,
        "stdout": subprocess.DEVNULL,
        "stderr": subprocess.DEVNULL,
        # killed with this script, should it hang and be killed
        "preexec_fn": lambda: ctypes.CDLL(None).prctl(1, signal.SIGKILL),
    }
    scheduler = subprocess.Popen(
        [*DASK, "scheduler", "--host", "127.0.0.1", "--port", str(PORT),
         "--dashboard-address", "127.0.0.1:0"], **quiet
    )
    worker = subprocess.Popen(
        [*DASK, "worker", ADDRESS, "--host", "127.0.0.1", "--nworkers", "1",
         "--nthreads", "1", "--dashboard-address", "127.0.0.1:0", "--no-nanny"], **quiet
    )
    return [scheduler, worker]


def wait_listening(seconds=60):
    # Until the scheduler accepts connections: the client's first connection must
    # not spend its short window (2 s) on the scheduler's start on a loaded machine.
    end = time.monotonic() + seconds
    while True:
        try:
            socket.create_connection(("127.0.0.1", PORT), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > end:
                raise
            time.sleep(0.05)


def kill(procs):
    for p in procs:
        p.kill()
        p.wait()


def outcome(exc):
    return f"{type(exc).__name__}: {exc}"


class Kept(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


KEPT = Kept()
logging.getLogger("app.remote").addHandler(KEPT)


async def logged(remote, message):
    # What reaches this process's logger of a record a call logs on the cluster.
    await remote.run(funcs.log_on_worker, "app.remote", logging.WARNING, message)
    with anyio.move_on_after(15):
        while message not in KEPT.messages:
            await anyio.sleep(0.01)
    return message in KEPT.messages


async def main():
    procs = cluster()
    wait_listening()
    report = {}
    settings = OffloadSettings(
        process={"max_workers": 1},
        thread={"max_workers": 1},
        pools={"remote": {"kind": "dask", "address": ADDRESS}},
        shutdown_timeout=5,
    )
    try:
        async with Offloader(settings) as ex:
            remote = ex.pool("remote")
            pool = ex.offloader.get_pool("remote")
            await pool._client.wait_for_workers(1)
            report["before"] = await remote.run(funcs.add, 1, 2)
            report["logged before"] = await logged(remote, "before")
            first = pool._client

            async def hold(name, release):
                try:
                    report[name] = await remote.run(funcs.wait_for_file, release, 1)
                except Exception as exc:
                    report[name] = outcome(exc)

            async def on_its_worker():
                while "wait_for_file" not in str(
                    await pool._client.run_on_scheduler(funcs.scheduler_processing)
                ):
                    await anyio.sleep(0.01)

            # The scheduler freezes: its connections stay open, it answers nothing.
            release = os.path.join(os.getcwd(), "release-frozen")
            async with anyio.create_task_group() as tg:
                tg.start_soon(hold, "frozen in flight", release)
                await on_its_worker()
                os.kill(procs[0].pid, signal.SIGSTOP)
            open(release, "w").close()  # let the task end once the scheduler thaws
            started = time.monotonic()
            try:
                await remote.run(funcs.add, 1, 2)
            except Exception as exc:
                report["frozen"] = outcome(exc)
            report["frozen refusal"] = time.monotonic() - started
            os.kill(procs[0].pid, signal.SIGCONT)
            while True:
                try:
                    report["thawed"] = await remote.run(funcs.add, 3, 4)
                    break
                except ClusterUnavailable:
                    await anyio.sleep(0.1)

            # The scheduler dies.
            release = os.path.join(os.getcwd(), "release")
            async with anyio.create_task_group() as tg:
                tg.start_soon(hold, "in flight", release)
                await on_its_worker()
                kill(procs)
            # the first client gives up past its reconnect window (2 s here)
            while first.status != "closed":
                try:
                    await remote.run(funcs.add, 1, 2)
                except Exception as exc:
                    report.setdefault("while reconnecting", outcome(exc))
                await anyio.sleep(0.1)
            outage = []
            for _ in range(3):
                started = time.monotonic()
                try:
                    await remote.run(funcs.add, 1, 2)
                except Exception as exc:
                    outage.append(outcome(exc))
                report["longest refusal"] = max(
                    report.get("longest refusal", 0), time.monotonic() - started
                )
            report["outage"] = outage
            procs = cluster()
            while True:
                try:
                    report["after"] = await remote.run(funcs.add, 2, 3)
                    break
                except ClusterUnavailable:
                    await anyio.sleep(0.1)
            # A new scheduler: the pool asked it to forward the logs again.
            report["logged after"] = await logged(remote, "after")
    finally:
        kill(procs)
    print(json.dumps(report), flush=True)


anyio.run(main, backend="asyncio")
"""


async def test_a_cluster_without_workers_is_unavailable(tmp_path: Path) -> None:
    # The scheduler's operator bounds how long a task may wait for a worker; past
    # that, Dask fails it with its own error, which is no error of the function's.
    env = {**os.environ, "DASK_DISTRIBUTED__SCHEDULER__NO_WORKERS_TIMEOUT": "1s"}
    scheduler, address = await anyio.to_thread.run_sync(start_scheduler, tmp_path, env)
    try:
        async with Offloader(settings(address)) as ex:
            with anyio.fail_after(BOOT), pytest.raises(ClusterUnavailable, match="no worker"):
                await ex.pool("remote").run(funcs.add, 1, 2)
    finally:
        await anyio.to_thread.run_sync(_stop, scheduler)


@pytest.fixture(scope="module", autouse=True)
def outage(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[BackgroundScript | None]:
    """The outage script, started with the module when its test is to run: it spends
    most of its 20 s waiting on Dask's timeouts (11 s of them for the frozen
    scheduler, distributed's least TCP timeout), meanwhile the module's other tests
    run. Its own cluster, on a port of its own, is not the module's."""
    test = test_an_outage_is_a_connection_error_and_the_pool_reconnects
    if not any(getattr(item, "function", None) is test for item in request.session.items):
        yield None
        return
    # within the suite's 120 s per test, so that a hang kills the script, not the test
    script = BackgroundScript(tmp_path_factory.mktemp("outage"), OUTAGE, timeout=90)
    try:
        yield script
    finally:
        script.kill()


async def test_an_outage_is_a_connection_error_and_the_pool_reconnects(
    outage: BackgroundScript | None,
) -> None:
    assert outage is not None  # started with the module (see ``outage``)
    done = await outage.result()
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    report = json.loads(done.stdout.decode().splitlines()[-1])
    assert report["before"] == 3
    assert report["frozen in flight"].startswith("ClusterUnavailable"), report
    assert report["frozen"].startswith("ClusterUnavailable"), report
    assert report["frozen refusal"] < 5, report  # refused at once, not after a wait
    assert report["thawed"] == 7, report
    assert report["in flight"].startswith("ClusterUnavailable"), report
    if "while reconnecting" in report:
        assert report["while reconnecting"].startswith("ClusterUnavailable"), report
    assert len(report["outage"]) == 3, report
    assert all(o.startswith("ClusterUnavailable") for o in report["outage"]), report
    assert report["longest refusal"] < 5, report  # refused at once, not after a wait
    assert report["after"] == 5, report
    assert report["logged before"] is True, report
    assert report["logged after"] is True, report
