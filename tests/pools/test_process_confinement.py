"""How worker processes are started and confined: what they import at start, what
they may use, and what becomes of the processes they start themselves."""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest
from pydantic import ValidationError

from offload import (
    Offloader,
    OffloadSettings,
    OffloadTimeout,
    PoolClosed,
    PoolSettings,
    WorkerCrashed,
)
from offload._pools.process import cross_memory as _cross_memory
from offload._pools.process import scheduling as _scheduling
from offload._pools.process.worker_lifetime import GUARD_NAME
from offload._settings import usable_cpus

from .. import funcs
from ..conftest import Backend, loop_name
from ..processes import (
    IDLE_WORKERS_DEAD_WITH_SIGPIPE_DEFAULT,
    gone,
    run_script,
    script_env,
    wait_until,
    worker_pids,
    worker_procs,
)

# A module named like one the worker imports at start, in the directory the
# application runs in: if it is ever imported, it leaves a mark (the command line of
# the process that imported it), then stands aside for the real module so that the
# worker still works and the test fails on the mark.
SHADOW = """
import json, os, sys
with open({mark!r}, "a") as f:
    f.write(json.dumps(sys.argv) + "\\n")
del sys.modules[__name__]
sys.path[:] = [p for p in sys.path if p not in ("", ".", os.getcwd())]
import {name} as _real
globals().update(vars(_real))
"""


async def test_a_worker_is_ready_once_its_guard_runs() -> None:
    # A worker forks its guard, which then runs /bin/sh: until that exec, the guard is
    # a copy of the worker, which whatever counts workers by command line counts too.
    settings = OffloadSettings(process={"max_workers": 2}, thread={"max_workers": 1})
    for _ in range(10):
        async with Offloader(settings):
            below = [child for worker in worker_procs() for child in worker.children()]
            assert [child.cmdline()[-1] for child in below] == [GUARD_NAME] * len(below)


@pytest.mark.parametrize("limit", [None, "256MiB"])
async def test_a_worker_never_imports_pydantic_or_anyio(limit: str | None) -> None:
    # The settings a worker gets at its start (sizes are pydantic's ByteSize in the
    # parent) reach it as plain values: importing pydantic would double its start.
    settings = OffloadSettings(process={"max_workers": 1, "hard_memory_limit": limit})
    async with Offloader(settings) as ex:
        heavy = ["pydantic", "pydantic_core", "pydantic_settings", "anyio"]
        assert await ex.pool("process").run(funcs.loaded, heavy) == []


@pytest.mark.parametrize("name", ["socket", "pickle", "threading", "offload"])
async def test_workers_never_import_from_the_current_directory(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mark = tmp_path / "imported"
    here = tmp_path / "cwd"
    here.mkdir()
    (here / f"{name}.py").write_text(SHADOW.format(mark=str(mark), name=name))
    monkeypatch.chdir(here)
    settings = OffloadSettings(process={"max_workers": 1}, shutdown_timeout=5)
    async with Offloader(settings) as ex:
        assert await ex.pool("process").run(funcs.add, 2, 3) == 5
    assert not mark.exists(), mark.read_text()


FLAGS_SCRIPT = """
import sys

import anyio

from offload import Offloader, OffloadSettings


def flags():
    return sys.flags.optimize, sys.flags.no_user_site, sys.flags.dont_write_bytecode


async def main():
    async with Offloader(OffloadSettings(process={"max_workers": 1})) as ex:
        print(await ex.pool("process").run(flags) == flags(), flags(), flush=True)


anyio.run(main)
"""


def test_workers_run_with_the_interpreter_options_of_the_parent(tmp_path: Path) -> None:
    # -s: a worker must not run the user site's .pth files that the parent refused.
    script = tmp_path / "flags.py"
    script.write_text(FLAGS_SCRIPT)
    done = subprocess.run(
        [sys.executable, "-O", "-s", "-B", str(script)],
        env=script_env(),
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert done.stdout.decode().split()[:1] == ["True"], done


# -- features a system may lack ----------------------------------------------------------

#: what each pool may use where the system has it, and lives without
OPTIONAL_OS_FEATURES = [
    "getpriority",
    "setpriority",
    "sched_setscheduler",
    "sched_getscheduler",
    "sched_param",
    "SCHED_IDLE",
    "SCHED_BATCH",
    "pidfd_open",
    "sched_getaffinity",
    "memfd_create",
    "killpg",
    "WNOHANG",
]


@pytest.mark.parametrize("name", OPTIONAL_OS_FEATURES)
async def test_pool_runs_without_optional_os_feature(
    name: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delattr(os, name)
    monkeypatch.setattr(_scheduling, "_nice_command", lambda: None)  # the parent lowers workers
    usable_cpus.cache_clear()
    caplog.set_level(logging.DEBUG, logger="offload")
    settings = OffloadSettings(
        process={
            "max_workers": 1,
            "idle_priority": name not in ("SCHED_IDLE", "SCHED_BATCH"),
            "cross_memory": False,
        },
        shutdown_timeout=5,
    )
    try:
        async with Offloader(settings) as ex:
            pool = ex.pool("process")
            assert await pool.run(funcs.add, 2, 3) == 5
            # 5 MiB answers are received into a memfd's mapping where there is one
            assert len(await pool.run(funcs.make_bytes, 5 << 20)) == 5 << 20
            if name == "killpg":  # a deadline still stops the call: its worker is killed
                with pytest.raises(OffloadTimeout):
                    await pool.options(timeout=0.5).run(funcs.spin, 30)
                assert await pool.run(funcs.add, 1, 1) == 2
    finally:
        usable_cpus.cache_clear()
    if name in ("getpriority", "setpriority", "sched_setscheduler", "sched_param"):
        assert any(name in r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG)


async def test_pool_runs_where_memfd_create_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    # A seccomp profile may refuse a call that os has (EPERM, or ENOSYS under gVisor).
    def refused(*args: object) -> int:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "memfd_create", refused)
    settings = OffloadSettings(process={"max_workers": 1, "cross_memory": False})
    async with Offloader(settings) as ex:
        assert len(await ex.pool("process").run(funcs.make_bytes, 5 << 20)) == 5 << 20


async def test_pool_runs_without_cross_memory_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_libc() -> None:
        raise AttributeError("process_vm_readv")

    monkeypatch.setattr(_cross_memory, "_libc", no_libc)
    _cross_memory.available.cache_clear()
    try:
        async with Offloader(OffloadSettings(process={"max_workers": 1})) as ex:
            data = await ex.pool("process").run(funcs.make_bytes, 5 << 20)
            assert len(data) == 5 << 20
    finally:
        _cross_memory.available.cache_clear()


POLICY_SCRIPT = """
import os
import sys

import anyio

from offload import Offloader, OffloadSettings

policy = getattr(os, sys.argv[1])
os.sched_setscheduler(0, policy, os.sched_param(0))


async def main():
    pool = {"max_workers": 1, "niceness": int(sys.argv[2])}
    async with Offloader(OffloadSettings(process=pool, lag_probe=False)) as ex:
        pid = await ex.pool("process").run(os.getpid)
        print(os.sched_getscheduler(pid) == policy, os.sched_getscheduler(pid), flush=True)


anyio.run(main)
"""


@pytest.mark.parametrize(
    ("policy", "niceness"), [("SCHED_BATCH", 10), ("SCHED_BATCH", 0), ("SCHED_IDLE", 10)]
)
def test_workers_keep_the_scheduling_policy_of_the_parent(
    policy: str, niceness: int, tmp_path: Path
) -> None:
    # A server run under SCHED_BATCH or SCHED_IDLE (chrt -b, chrt -i) must not get
    # workers that compete as SCHED_OTHER.
    script = tmp_path / "policy.py"
    script.write_text(POLICY_SCRIPT)
    done = subprocess.run(
        [sys.executable, str(script), policy, str(niceness)],
        env=script_env(),
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert done.stdout.decode().split()[:1] == ["True"], done


NO_SIGNAL_FLAG = """
import offload._pools.process.worker_handle

# As on macOS: sends cannot ask for no SIGPIPE.
offload._pools.process.worker_handle.NO_SIGNAL = 0
"""


async def test_dead_worker_cannot_kill_the_parent_with_sigpipe_without_msg_nosignal(
    tmp_path: Path, anyio_backend: Backend
) -> None:
    done = await run_script(
        tmp_path, NO_SIGNAL_FLAG + IDLE_WORKERS_DEAD_WITH_SIGPIPE_DEFAULT, loop_name(anyio_backend)
    )
    stdout, stderr = done.stdout.decode(), done.stderr.decode()
    assert done.returncode == 0, (done.returncode, stderr)
    assert stdout.split() == ["7", "0"], (stdout, stderr)


# -- hard memory limit -----------------------------------------------------------------


async def test_hard_memory_limit_fails_the_runaway_call_alone(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="offload")
    settings = OffloadSettings(
        process={"max_workers": 2, "hard_memory_limit": "256MiB"}, shutdown_timeout=5
    )
    ours = resource.getrlimit(resource.RLIMIT_DATA)
    async with Offloader(settings) as ex:
        pool = ex.pool("process")
        other: list[str] = []

        async def run_other() -> None:
            other.append(await pool.run(funcs.sleep_then, 1.0, "other"))

        async with anyio.create_task_group() as tg:
            tg.start_soon(run_other)  # on the other worker meanwhile: untouched
            with pytest.raises(MemoryError) as info:
                await pool.run(funcs.runaway, 4096)  # 4 GiB, were nothing to stop it
        assert other == ["other"]
        notes = "\n".join(getattr(info.value, "__notes__", ()))
        assert "hard_memory_limit of 268435456 bytes (256 MiB" in notes, notes
        # Its worker is replaced: its heap may be fragmented, or held by what the call
        # left behind. The pool carries on, with as many workers as before.
        await wait_until(lambda: len(worker_pids()) == 2, 10, "a replacement worker")
        assert await pool.run(funcs.runaway, 16) == 16
        assert pool.stats().crashed == 0
    assert resource.getrlimit(resource.RLIMIT_DATA) == ours
    assert any("ran out of its hard_memory_limit" in r.getMessage() for r in caplog.records)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_calls_queued_behind_a_runaway_call_run_on_its_replacement() -> None:
    settings = OffloadSettings(
        process={"max_workers": 1, "hard_memory_limit": "256MiB"}, shutdown_timeout=5
    )
    async with Offloader(settings) as ex:
        pool = ex.pool("process")
        first = await pool.run(funcs.getpid)
        results: list[int] = []

        async def queued(i: int) -> None:
            results.append(await pool.run(funcs.add, i, 0))

        async with anyio.create_task_group() as tg:
            for i in range(4):
                tg.start_soon(queued, i)  # the first may take the worker first: fine too
            with pytest.raises(MemoryError):
                await pool.run(funcs.runaway, 4096)
        assert sorted(results) == [0, 1, 2, 3]
        assert await pool.run(funcs.getpid) != first
        assert pool.stats().crashed == 0


@pytest.mark.parametrize("pools", [{"thread": {}}, {"pools": {"d": {"kind": "dask"}}}])
def test_hard_memory_limit_is_refused_where_it_cannot_hold(pools: dict[str, Any]) -> None:
    [(name, pool)] = pools.items()
    if name == "thread":
        pool["hard_memory_limit"] = "1GB"
    else:
        pool["d"]["hard_memory_limit"] = "1GB"
    with pytest.raises(ValidationError, match="hard_memory_limit"):
        OffloadSettings(**pools)


def test_hard_memory_limit_takes_sizes() -> None:
    settings = PoolSettings.model_validate({"hard_memory_limit": "512MiB"})
    assert settings.hard_memory_limit == 512 << 20
    assert PoolSettings().hard_memory_limit is None


# -- what a function starts ends with its worker ---------------------------------------


async def program_pid(path: Path) -> int:
    """The pid a call of ``funcs.start_program`` wrote to ``path``, once written."""
    await wait_until(path.exists, 30, f"{path} written by the call")
    return int(path.read_text())


def kill_if_alive(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("how", ["deadline", "cancel", "crash", "shutdown", "left running"])
async def test_a_program_the_call_started_ends_with_its_worker(how: str, tmp_path: Path) -> None:
    path = tmp_path / "pid"
    programs: list[int] = []
    settings = OffloadSettings(process={"max_workers": 1}, shutdown_timeout=0.5)
    try:
        async with anyio.create_task_group() as tg, Offloader(settings) as ex:
            pool = ex.pool("process")
            worker = await pool.run(funcs.getpid)
            if how == "deadline":
                with pytest.raises(OffloadTimeout):
                    await pool.options(timeout=3).run(funcs.start_program, str(path), True)
                assert path.exists(), "the program did not start within the deadline"
                programs.append(int(path.read_text()))
            elif how == "left running":
                # the call returns; the program it left behind goes with the pool
                programs.append(await pool.run(funcs.start_program, str(path), False))
                assert not gone(programs[0])
            else:
                scope = anyio.CancelScope()

                async def call() -> None:
                    with scope, contextlib.suppress(WorkerCrashed, PoolClosed):
                        await pool.run(funcs.start_program, str(path), True)

                tg.start_soon(call)
                programs.append(await program_pid(path))
                if how == "cancel":
                    scope.cancel()
                elif how == "crash":
                    os.kill(worker, signal.SIGKILL)
                # shutdown: the Offloader is left while the call runs
        await wait_until(lambda: gone(programs[0]), 10, f"program {programs} ended")
    finally:
        for pid in programs:
            kill_if_alive(pid)


KILLED_PARENT = """
import sys

import anyio

from offload import Offloader, OffloadSettings
from tests import funcs


async def main():
    async with Offloader(OffloadSettings(process={"max_workers": 1})) as ex:
        async with anyio.create_task_group() as tg:
            tg.start_soon(ex.pool("process").run, funcs.start_program, sys.argv[1], True)
            await anyio.sleep(60)  # SIGKILLed meanwhile


anyio.run(main)
"""


async def test_a_program_the_call_started_ends_when_the_parent_is_killed(tmp_path: Path) -> None:
    # The worker dies of its parent's death (PR_SET_PDEATHSIG); what it started must
    # not outlive it, adopted by init.
    path = tmp_path / "pid"
    script = tmp_path / "parent.py"
    script.write_text(KILLED_PARENT)
    program = None
    parent = await anyio.open_process(
        [sys.executable, str(script), str(path)], env=script_env(), stdout=None, stderr=None
    )
    try:
        async with parent:
            program = await program_pid(path)
            parent.kill()
            with anyio.fail_after(10):
                await parent.wait()
        await wait_until(lambda: gone(program), 10, f"program {program} ended")
    finally:
        if program is not None:
            kill_if_alive(program)


ADOPTING_PARENT = """
import ctypes
import sys

import anyio
import psutil

from offload import Offloader, OffloadSettings, OffloadTimeout
from tests import funcs

# Like a server run as a container's PID 1: orphans are adopted by this process.
PR_SET_CHILD_SUBREAPER = 36
assert ctypes.CDLL(None).prctl(PR_SET_CHILD_SUBREAPER, 1) == 0


def strays():
    found = []
    for child in psutil.Process().children():
        try:
            if "offload._pools.process.worker" in " ".join(child.cmdline()):
                continue
        except psutil.Error:  # a zombie
            pass
        found.append(child.pid)
    return found


async def main():
    async with Offloader(OffloadSettings(process={"max_workers": 1})) as ex:
        pool = ex.pool("process")
        try:
            await pool.options(timeout=3).run(funcs.start_program, sys.argv[1], True)
        except OffloadTimeout:
            pass
        # The deadline answers the caller at once and the worker is killed right
        # after: wait for the program to be gone (reaped, not only dead) too.
        with open(sys.argv[1]) as pid_file:
            program = int(pid_file.read())
        with anyio.move_on_after(30):
            while psutil.pid_exists(program) or strays():
                await anyio.sleep(0.05)
        print(psutil.pid_exists(program), strays(), flush=True)


anyio.run(main)
"""


def test_a_parent_that_adopts_orphans_reaps_what_a_killed_worker_started(
    tmp_path: Path,
) -> None:
    # The program and the worker's guard, orphaned, are this process's: it must
    # reap them, or each killed worker leaves zombies for the life of the server.
    script = tmp_path / "reaper.py"
    script.write_text(ADOPTING_PARENT)
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "pid")],
        env=script_env(),
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert done.stdout.decode().split() == ["False", "[]"], done
