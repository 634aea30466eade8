"""A worker process starts no process pool: its workers would import the same code and
start pools of their own, without end (a module that starts an Offloader at import
time, served with ``gunicorn --preload``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anyio
import pytest

from offload import Offloader, OffloadSettings, PoolStartError, _where

from .. import funcs
from ..conftest import Backend, loop_name
from ..processes import run_script

# Starts an Offloader at import time, as a warm-up; its process pool has one worker so
# that, were nesting not refused, the processes would make a chain, not a tree.
WARM_AT_IMPORT = """
import anyio

from offload import Offloader, OffloadSettings

from tests import funcs


def add(a, b):
    return a + b


async def warm_up():
    settings = OffloadSettings(process={{"max_workers": 1}}, lag_probe=False)
    async with Offloader(settings) as ex:
        return await ex.pool({kind!r}).run({function}, 1, 2)


WARM = anyio.run(warm_up)


def plus_one(x):
    return x + WARM
"""

MAIN = """
import json
import sys

import anyio
import psutil

from offload import Offloader, OffloadSettings

from tests import funcs


def describe(exc):
    return {"error": type(exc).__name__, "message": str(exc)}


try:
    import warm_module  # the warm-up runs in this process first, as with --preload
except Exception as exc:
    outcome = {"import": describe(exc)}
else:
    outcome = {"import": warm_module.WARM}


async def main():
    settings = OffloadSettings(process={"max_workers": 1}, lag_probe=False)
    async with Offloader(settings) as ex:
        pool = ex.pool("process")
        if "warm_module" in sys.modules:  # a worker imports it to run this call
            try:
                outcome["call"] = await pool.run(warm_module.plus_one, 1)
            except Exception as exc:
                outcome["call"] = describe(exc)
        me = psutil.Process()
        outcome["nested"] = [  # workers of workers (not a worker's guard: see worker.py)
            p.pid
            for p in me.children(recursive=True)
            if p.ppid() != me.pid and "offload._pools.process.worker" in " ".join(p.cmdline())
        ]
        outcome["after"] = await pool.run(funcs.add, 2, 2)  # the pool carries on
    print(json.dumps(outcome), flush=True)


if sys.argv[1] == "trio":
    anyio.run(main, backend="trio")
else:
    anyio.run(main, backend="asyncio", backend_options={"use_uvloop": sys.argv[1] == "uvloop"})
"""


async def run_main(tmp_path: Path, backend: Backend, kind: str, function: str) -> Any:
    module = WARM_AT_IMPORT.format(kind=kind, function=function)
    (tmp_path / "warm_module.py").write_text(module)
    done = await run_script(tmp_path, MAIN, loop_name(backend), timeout=30)
    stdout, stderr = done.stdout.decode(), done.stderr.decode()
    assert done.returncode == 0, stderr
    return json.loads(stdout.splitlines()[-1])


def check_refusal(failure: Any) -> None:
    """The refusal names the module being imported and says how to fix it."""
    assert failure["error"] == "PoolStartError", failure
    assert "'warm_module'" in failure["message"], failure
    assert "lifespan" in failure["message"], failure


async def test_warm_up_at_import_that_runs_its_own_module_is_refused(
    tmp_path: Path, anyio_backend: Backend
) -> None:
    # gunicorn --preload of a module that warms itself up at import time: the worker
    # that runs the warm-up imports the module, whose warm-up starts a pool, whose
    # worker imports it... The worker refuses, and the import in this process fails.
    outcome = await run_main(tmp_path, anyio_backend, "process", "add")
    check_refusal(outcome["import"])
    assert outcome["nested"] == [], outcome
    assert outcome["after"] == 4


async def test_call_whose_module_starts_a_pool_at_import_fails_with_the_refusal(
    tmp_path: Path, anyio_backend: Backend
) -> None:
    outcome = await run_main(tmp_path, anyio_backend, "process", "funcs.add")
    assert outcome["import"] == 3, outcome
    check_refusal(outcome["call"])
    assert outcome["nested"] == [], outcome
    assert outcome["after"] == 4


async def test_a_worker_may_use_thread_pools(tmp_path: Path, anyio_backend: Backend) -> None:
    outcome = await run_main(tmp_path, anyio_backend, "thread", "add")
    assert outcome == {"import": 3, "call": 4, "nested": [], "after": 4}, outcome


async def test_process_pool_refused_in_a_worker_process(monkeypatch: pytest.MonkeyPatch) -> None:
    # What a function running in a worker meets (not while a module is imported):
    # the Offloader starts, its thread pools work, its process pools refuse calls.
    monkeypatch.setattr(_where, "_in_process", True)
    settings = OffloadSettings(process={"max_workers": 1}, lag_probe=False)
    async with Offloader(settings) as ex:
        assert await ex.pool("thread").run(funcs.add, 1, 2) == 3
        with pytest.raises(PoolStartError, match="worker process") as caught:
            await ex.pool("process").run(funcs.add, 1, 2)
        assert "thread" in str(caught.value)  # what it may use instead
        assert ex.pool("process").stats().workers == 0


INITIALIZER_MODULE = """
import anyio

from offload import Offloader, OffloadSettings


def start_a_pool():
    async def use():
        async with Offloader(OffloadSettings(process={"max_workers": 1})) as ex:
            await ex.pool("process").run(abs, -1)

    anyio.run(use)
"""


async def test_initializer_that_starts_a_process_pool_fails_the_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "init_module.py").write_text(INITIALIZER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))  # workers get this process's sys.path
    settings = OffloadSettings(
        process={"max_workers": 1, "initializer": "init_module:start_a_pool"}, lag_probe=False
    )
    with pytest.raises(PoolStartError, match="cannot start in one of offload's worker processes"):
        async with Offloader(settings):
            pass


async def test_embedded_dask_cluster_refused_in_a_worker_process(
    monkeypatch: pytest.MonkeyPatch, anyio_backend: Backend
) -> None:
    # An embedded cluster is processes too, whose workers import the user's modules.
    if loop_name(anyio_backend) == "trio":
        pytest.skip("the dask kind runs on asyncio only")
    monkeypatch.delenv("DASK_SCHEDULER_ADDRESS", raising=False)
    monkeypatch.setattr(_where, "_in_process", True)
    settings = OffloadSettings(pools={"dask": {"kind": "dask", "max_workers": 1}}, lag_probe=False)
    with anyio.fail_after(30):  # were it started, a cluster would take seconds
        async with Offloader(settings) as ex:
            with pytest.raises(PoolStartError, match="worker process"):
                await ex.pool("dask").run(funcs.add, 1, 2)
