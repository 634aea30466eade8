"""User code that works against the process pool's channel: thousands of buffers,
callables with state, base exceptions, hostile hooks, a function that forks.

Each must fail (or succeed) for its own call only; the worker carries on. A case that
could hang or end the caller's program runs in a script with a deadline.
"""

from __future__ import annotations

import functools
import json
import logging
import pickle
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from offload import (
    CallAborted,
    Executor,
    Offloader,
    OffloadError,
    OffloadSettings,
    PoolSettings,
    SerializationError,
)
from offload._pools import _process

from .. import funcs
from ..conftest import Backend, loop_name
from .test_process_faults import gone, run_script, wait_until, worker_pids

#: seconds any single call of these tests may take before the test gives up on it
CALL_BOUND = 20.0


def one_worker(**process: Any) -> OffloadSettings:
    return OffloadSettings(
        process=PoolSettings(max_workers=1, **process),
        thread=PoolSettings(max_workers=2),
        shutdown_timeout=5,
        lag_probe=False,
    )


async def script_result(tmp_path: Path, source: str, backend: Backend) -> Any:
    """Run ``source`` with the loop's name as argument; the JSON of its last line."""
    done = await run_script(tmp_path, source, loop_name(backend), timeout=60)
    stdout, stderr = done.stdout.decode(), done.stderr.decode()
    assert done.returncode == 0, (done.returncode, stdout, stderr)
    return json.loads(stdout.strip().splitlines()[-1])


RUN_ON_LOOP = """
if sys.argv[1] == "trio":
    anyio.run(main, backend="trio")
elif sys.argv[1] == "uvloop":
    import uvloop

    uvloop.run(main())
else:
    asyncio.run(main())
print(json.dumps(outcome), flush=True)
"""

# -- thousands of out-of-band buffers ---------------------------------------------------

MANY_BUFFERS = """
import asyncio
import json
import sys

import anyio

from offload import Offloader, OffloadSettings
from tests import funcs

outcome = {}


async def main():
    for cross_memory in (True, False):
        settings = OffloadSettings(
            process={"max_workers": 1, "cross_memory": cross_memory}, lag_probe=False
        )
        async with Offloader(settings) as ex:
            pool = ex.pool("process")
            with anyio.fail_after(30):
                # More buffers than one sendmsg takes (IOV_MAX, 1024), and more
                # entries than a reader's scratch buffer holds (4095).
                arrays = await pool.run(funcs.many_arrays, 5000)
                total = await pool.run(funcs.sum_arrays, arrays)
                after = await pool.run(funcs.add, 1, 2)
            outcome[str(cross_memory)] = [len(arrays), int(arrays[4999][0]), total, after]
"""


async def test_thousands_of_buffers_travel_both_ways(
    tmp_path: Path, anyio_backend: Backend
) -> None:
    outcome = await script_result(tmp_path, MANY_BUFFERS + RUN_ON_LOOP, anyio_backend)
    total = 4 * sum(range(5000))
    assert outcome == {"True": [5000, 4999, total, 3], "False": [5000, 4999, total, 3]}


async def test_a_failed_send_fails_its_call_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    # Past IOV_MAX parts sendmsg fails with EMSGSIZE: an error of the channel, not of
    # the worker. The call fails, and the one worker is not lost to the pool.
    import numpy as np

    from offload._pools import _wire

    monkeypatch.setattr(_wire, "MAX_PARTS", 1 << 16)
    arrays = [np.full(4, i) for i in range(3000)]
    async with Offloader(one_worker()) as ex:
        pool = ex.pool("process")
        with anyio.fail_after(CALL_BOUND):
            with pytest.raises(OffloadError, match="channel") as caught:
                await pool.run(funcs.sum_arrays, arrays)
            assert isinstance(caught.value.__cause__, OSError)
            assert await pool.run(funcs.add, 1, 2) == 3
        assert pool.stats().failed == 1
