"""What the process tests use to watch processes: worker processes by their command
line, waits on conditions with deadlines, scripts run in a fresh interpreter."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import psutil
import pytest

from offload import OffloadSettings, PoolSettings

PROJECT_ROOT = Path(__file__).resolve().parents[1]
#: appears in the command line of every worker process (see ``launch._BOOT``)
WORKER_MARK = "offload._pools.process.worker"


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


class BackgroundScript:
    """A script in a fresh interpreter that runs while the test process does other
    things (a script that mostly waits on timeouts, beside other tests); its outcome
    once it exits, as ``run_script``'s. Its output goes to files: no pipe fills up
    while nobody reads it."""

    def __init__(self, tmp_path: Path, source: str, *args: str, timeout: float = 30) -> None:
        script = tmp_path / "script.py"
        script.write_text(textwrap.dedent(source))
        self._stdout = tmp_path / "stdout"
        self._stderr = tmp_path / "stderr"
        self._timeout = timeout
        self._deadline = time.monotonic() + timeout
        with self._stdout.open("wb") as out, self._stderr.open("wb") as err:
            self._proc = subprocess.Popen(
                [sys.executable, str(script), *args],
                cwd=tmp_path,
                env=script_env(),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
            )

    async def result(self) -> subprocess.CompletedProcess[bytes]:
        """Once it exits; killed, and the test failed, ``timeout`` s after its start."""
        while self._proc.poll() is None:
            if time.monotonic() > self._deadline:
                self.kill()
                pytest.fail(f"the script did not exit within {self._timeout} s (killed)")
            await anyio.sleep(0.05)
        return subprocess.CompletedProcess(
            self._proc.args,
            self._proc.returncode,
            self._stdout.read_bytes(),
            self._stderr.read_bytes(),
        )

    def kill(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()


# A script: an application that restores SIGPIPE's default, whose idle workers die
# unseen; prints the next call's result and the crash count.
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


async def pids_of_concurrent_calls(pool: Any, count: int) -> list[int]:
    """The pids that ``count`` calls made at once report: each holds its worker for
    0.2 s, so on a process pool of ``count`` idle workers, one call lands on each."""
    from . import funcs

    pids: list[int] = []

    async def one() -> None:
        pids.append(await pool.run(funcs.sleep_getpid, 0.2))

    async with anyio.create_task_group() as tg:
        for _ in range(count):
            tg.start_soon(one)
    return pids
