from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import anyio
import pytest

from offload import Offloader, OffloadSettings, PoolClosed, PoolStartError

from . import funcs
from .conftest import children

ROOT = Path(__file__).resolve().parent.parent


class Oops(Exception):
    pass


async def test_body_exception_propagates_unwrapped(settings: OffloadSettings) -> None:
    offloader = Offloader(settings)

    async def body() -> None:
        async with offloader as ex:
            assert await ex.run(funcs.add, 1, 1) == 2
            raise Oops

    with pytest.raises(Oops):
        await body()
    assert not children()


async def test_cancelled_body_stops_pools_without_waiting(
    settings: OffloadSettings, tmp_path: Path
) -> None:
    assert settings.shutdown_timeout == 5  # what a cancelled body must not wait for
    offloader = Offloader(settings)
    pidfile = tmp_path / "pid"

    async def body() -> None:
        async with offloader as ex:
            await ex.run(funcs.write_pid_then_sleep, str(pidfile), 30)

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(body)
            while not pidfile.exists():  # the call has reached its worker
                await anyio.sleep(0.01)
            cancelled = anyio.current_time()
            tg.cancel_scope.cancel()
    # The bound that matters is the one the cancelled body must not wait out.
    assert anyio.current_time() - cancelled < settings.shutdown_timeout
    assert not offloader.running
    assert not children()
    with pytest.raises(PoolClosed):
        await offloader.executor.run(funcs.add, 1, 2)


async def test_start_failure_leaves_nothing_behind() -> None:
    settings = OffloadSettings(
        process={"max_workers": 2, "initializer": "tests.funcs:does_not_exist"}
    )
    with pytest.raises(PoolStartError, match="initializer"):
        async with Offloader(settings):
            pytest.fail("the body must not run")
    assert not children()


FIRST_START = """
import sys

import anyio

from offload import Offloader, OffloadSettings

SETTINGS = OffloadSettings(process={"max_workers": 1}, thread={"max_workers": 1})


async def main() -> None:
    before = set(sys.modules)
    async with Offloader(SETTINGS) as ex:
        await ex.run(abs, -1)
        await ex.pool("thread").run(abs, -1)
        ex.stats()
    print(sorted(set(sys.modules) - before))


anyio.run(anyio.sleep, 0, backend=sys.argv[1])  # the backend's own modules
anyio.run(main, backend=sys.argv[1])
"""


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_a_first_start_imports_nothing(backend: str, tmp_path: Path) -> None:
    # An import holds the GIL: made in a thread while the loop runs, it stalls the
    # loop (a first start used to import loky and the pools' modules: a 1 ms sleeper
    # woke up to 4 ms late at p99). So in a fresh process, nothing is imported from
    # the Offloader's entry to its exit, calls and stats included.
    script = tmp_path / "first_start.py"
    script.write_text(FIRST_START)
    env = {k: v for k, v in os.environ.items() if not k.startswith("OFFLOAD_")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    done = subprocess.run(
        [sys.executable, str(script), backend],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
