"""What a process call can carry: functions pickled by value (lambdas, closures,
``__main__`` functions of a script) and large payloads.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from offload import (
    Executor,
    OffloadSettings,
)

from .. import funcs
from ..conftest import Backend, loop_name
from ..processes import (
    gone,
    run_script,
    wait_until,
    worker_pids,
)

# -- 9. functions pickled by value -----------------------------------------------------


async def test_lambda_and_closure(ex: Executor) -> None:
    pool = ex.pool("process")
    here = os.getpid()

    pid = await pool.run(lambda: os.getpid())
    assert pid != here
    assert pid in worker_pids()
    assert await pool.run(lambda x, y=1: x * 10 + y, 4, y=2) == 42  # type: ignore[misc]

    offset = 100

    def shifted(x: int) -> tuple[int, int]:
        return x + offset, os.getpid()

    value, pid = await pool.run(shifted, 5)
    assert value == 105
    assert pid != here


MAIN_WITH_OFFLOADER = """
import os
import sys

from offload import Offloader, OffloadSettings


def square(x):
    return x * x, os.getpid()


async def main():
    settings = OffloadSettings(process={"max_workers": 1}, shutdown_timeout=5)
    async with Offloader(settings) as ex:
        value, pid = await ex.pool("process").run(square, 7)
    print(value, pid != os.getpid(), flush=True)


if sys.argv[1] == "trio":
    import trio

    trio.run(main)
elif sys.argv[1] == "uvloop":
    import uvloop

    uvloop.run(main())
else:
    import asyncio

    asyncio.run(main())
"""

MAIN_DECORATED_DEFAULT = """
import os
import sys

from offload import offload


@offload(kind="process")
def square(x):
    return x * x, os.getpid()


async def main():
    value, pid = await square(9)
    value2, pid2 = await square(10)
    print(value, value2, pid, pid2, os.getpid(), flush=True)


if sys.argv[1] == "trio":
    import trio

    trio.run(main)
elif sys.argv[1] == "uvloop":
    import uvloop

    uvloop.run(main())
else:
    import asyncio

    asyncio.run(main())
"""


async def test_main_function_in_script(tmp_path: Path, anyio_backend: Backend) -> None:
    done = await run_script(tmp_path, MAIN_WITH_OFFLOADER, loop_name(anyio_backend))
    stdout, stderr = done.stdout.decode(), done.stderr.decode()
    assert done.returncode == 0, stderr
    assert stdout.split() == ["49", "True"], (stdout, stderr)


async def test_decorated_main_function_default_offloader(
    tmp_path: Path, anyio_backend: Backend
) -> None:
    # The exit must not wait out the default Offloader's shutdown timeout: half of it
    # is the bound, whatever the machine's speed (a healthy script takes seconds).
    bound = OffloadSettings.model_fields["shutdown_timeout"].default / 2
    started = time.perf_counter()
    done = await run_script(
        tmp_path, MAIN_DECORATED_DEFAULT, loop_name(anyio_backend), timeout=bound
    )
    elapsed = time.perf_counter() - started
    stdout, stderr = done.stdout.decode(), done.stderr.decode()
    assert done.returncode == 0, stderr
    value, value2, pid, pid2, script_pid = stdout.split()
    assert (value, value2) == ("81", "100"), stdout
    assert pid != script_pid
    assert pid2 != script_pid
    assert "Traceback" not in stderr, stderr
    assert "Task was destroyed" not in stderr, stderr
    assert elapsed < bound
    worker_pids_seen = {int(pid), int(pid2)}
    await wait_until(
        lambda: all(gone(p) for p in worker_pids_seen),
        5,
        lambda: f"workers {worker_pids_seen} of the finished script gone",
    )


# -- 10. big payloads ------------------------------------------------------------------


async def test_large_payloads_round_trip(ex: Executor) -> None:
    pool = ex.pool("process")
    array = np.arange(8 * 2**20, dtype=np.float64)
    assert array.nbytes == 64 * 2**20
    back = await pool.run(funcs.echo, array)
    assert isinstance(back, np.ndarray)
    assert back.dtype == np.float64
    assert back.shape == array.shape
    assert np.array_equal(back, array)

    blob = os.urandom(16 * 2**20)
    echoed = await pool.run(funcs.echo, blob)
    assert type(echoed) is bytes
    assert echoed == blob
