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
    Executor,
    Offloader,
    OffloadError,
    OffloadSettings,
    PoolSettings,
    SerializationError,
)
from offload._pools.process import exchange as _exchange

from .. import funcs
from ..conftest import Backend, loop_name
from ..processes import gone, run_script, wait_until, worker_pids

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

    from offload._pools.process import sending as _sending

    monkeypatch.setattr(_sending, "MAX_PARTS", 1 << 16)
    arrays = [np.full(4, i) for i in range(3000)]
    async with Offloader(one_worker()) as ex:
        pool = ex.pool("process")
        with anyio.fail_after(CALL_BOUND):
            with pytest.raises(OffloadError, match="channel") as caught:
                await pool.run(funcs.sum_arrays, arrays)
            assert isinstance(caught.value.__cause__, OSError)
            assert await pool.run(funcs.add, 1, 2) == 3
        assert pool.stats().failed == 1


# -- callables with state ---------------------------------------------------------------


async def test_callables_with_state_start_afresh_and_are_freed() -> None:
    async with Offloader(one_worker()) as ex:
        pool = ex.pool("process")
        counter = funcs.Counter()
        counts = [await pool.run(counter) for _ in range(3)]
        assert counts == [1, 1, 1]  # each call gets the state the caller sent
        assert counter.count == 0
        # Neither a callable object nor a partial stays in the worker after its call.
        for size in (1, 2, 3):
            assert await pool.run(funcs.Tracked(b"x" * size)) == size
            assert await pool.run(functools.partial(funcs.Tracked(b"y"))) == 1
        assert await pool.run(funcs.live_tracked) == 0
        assert await pool.run(funcs.add, 2, 3) == 5  # plain functions: cached, still work


# -- exceptions and hooks that fight back ------------------------------------------------


async def test_hostile_exceptions_and_results_fail_alone() -> None:
    async with Offloader(one_worker()) as ex:
        pool = ex.pool("process")
        pid = await pool.run(funcs.getpid)
        with anyio.fail_after(CALL_BOUND):
            # Rebuilt by offload's fallback (from its attributes) it arrives as
            # itself; otherwise as an OffloadError naming it.
            with pytest.raises((OffloadError, funcs.HostileError)) as caught:
                await pool.run(funcs.raise_hostile, "hostile")
            if isinstance(caught.value, OffloadError):
                assert "HostileError" in str(caught.value)
                assert "str() failed" in str(caught.value)
            with pytest.raises((OffloadError, funcs.ExitingError)) as exiting:
                await pool.run(funcs.raise_hostile, "exiting")
            if isinstance(exiting.value, OffloadError):
                assert "ExitingError" in str(exiting.value)
            del exiting  # its str() calls sys.exit: not for pytest to show
            with pytest.raises(SerializationError, match="SystemExit") as result:
                await pool.run(funcs.return_hostile)
            assert "return_hostile" in str(result.value)
            assert await pool.run(funcs.ExitsOnDelElsewhere()) == "called"
            assert await pool.run(funcs.getpid) == pid  # the same worker carries on
        assert worker_pids() == {pid}


async def test_result_pickling_error_says_why(ex: Executor) -> None:
    with pytest.raises(SerializationError) as caught:
        await ex.pool("process").run(funcs.return_lock)
    assert "cannot pickle '_thread.lock' object" in str(caught.value)


# -- a function that forks --------------------------------------------------------------


async def test_a_forked_child_that_returns_never_answers() -> None:
    async with Offloader(one_worker()) as ex:
        pool = ex.pool("process")
        pid = await pool.run(funcs.getpid)
        with anyio.fail_after(CALL_BOUND):
            # Were the child to answer too, its -n would be read as the next call's
            # result.
            children = []
            for n in range(1, 4):
                value, child = await pool.run(funcs.fork_and_return, n)
                assert value == n
                children.append(child)
                assert await pool.run(funcs.add, n, 100) == n + 100
            assert await pool.run(funcs.getpid) == pid
        # Each child left when it came back to the worker's loop.
        await wait_until(lambda: all(map(gone, children)), 5, f"children {children} gone")


async def test_a_forked_child_does_not_hold_the_channel() -> None:
    async with Offloader(one_worker()) as ex:
        pool = ex.pool("process")
        with anyio.fail_after(CALL_BOUND):
            links = await pool.run(funcs.channel_of_forked_child)
    assert links  # /proc was read
    assert not [link for link in links if link.startswith("socket:")], links


# -- base exceptions ---------------------------------------------------------------------

BASE_EXCEPTIONS = """
import asyncio
import json
import sys

import anyio

from offload import CallAborted, Offloader, OffloadSettings, SerializationError
from tests import funcs

outcome = {}


async def main():
    settings = OffloadSettings(
        process={"max_workers": 1}, thread={"max_workers": 1}, lag_probe=False
    )
    async with Offloader(settings) as ex:
        for kind in ("process", "thread"):
            pool = ex.pool(kind)
            seen = []
            with anyio.fail_after(30):
                for what in ("exit", "interrupt", "generator-exit", "locked"):
                    try:
                        await pool.run(funcs.raise_base, what)
                    except CallAborted as exc:
                        seen.append(
                            [type(exc.__cause__).__name__, "raise_base" in str(exc)]
                        )
                for fn, args in (
                    (funcs.echo, (funcs.ExitsWhenPickled(),)),
                    (funcs.return_exits_when_unpickled, ()),
                    (funcs.return_exits_when_pickled, ()),
                ):
                    try:
                        await pool.run(fn, *args)
                    except SerializationError as exc:
                        seen.append([type(exc.__cause__).__name__, fn.__name__ in str(exc)])
                    except BaseException as exc:
                        seen.append(["unexpected", repr(exc)])
                    else:
                        seen.append(["returned", fn.__name__])
                seen.append(await pool.run(funcs.add, 1, 2))
            outcome[kind] = seen
"""


async def test_base_exceptions_never_reach_the_caller_as_themselves(
    tmp_path: Path, anyio_backend: Backend
) -> None:
    outcome = await script_result(tmp_path, BASE_EXCEPTIONS + RUN_ON_LOOP, anyio_backend)
    aborted = [["SystemExit", True], ["KeyboardInterrupt", True], ["GeneratorExit", True]]
    assert outcome["process"] == [
        *aborted,
        ["RemoteTraceback", True],  # it did not pickle: its traceback is the cause
        ["SystemExit", True],  # pickling the argument, in the caller
        ["SystemExit", True],  # unpickling the result, in the caller
        ["RemoteTraceback", True],  # pickling the result, in the worker
        3,
    ]
    # A thread call pickles nothing: its argument and results travel as they are.
    assert outcome["thread"] == [
        *aborted,
        ["LockedExit", True],
        ["returned", "echo"],
        ["returned", "return_exits_when_unpickled"],
        ["returned", "return_exits_when_pickled"],
        3,
    ]


# -- pickling --------------------------------------------------------------------------

MAIN_MODULE_CALLABLES = """
import asyncio
import functools
import json
import sys

import anyio

from offload import Offloader, OffloadSettings


def scale(factor, value):
    return factor * value


class Point:
    def __init__(self, x):
        self.x = x

    def norm(self):
        return abs(self.x)


def norm_of(point):
    return point.norm()


def make_adder(n):
    return lambda x: x + n


def mirror(point):
    return Point(-point.x)


outcome = {}


async def main():
    settings = OffloadSettings(process={"max_workers": 1}, lag_probe=False)
    async with Offloader(settings) as ex:
        pool = ex.pool("process")
        with anyio.fail_after(30):
            outcome["partial"] = await pool.run(functools.partial(scale, 3), 5)
            outcome["method"] = await pool.run(Point(-4).norm)
            outcome["argument"] = await pool.run(norm_of, Point(-6))
            back = await pool.run(mirror, Point(-7))
            outcome["result"] = [type(back) is Point, back.x]
            outcome["lambda"] = (await pool.run(make_adder, 2))(3)
"""


async def test_main_module_partials_methods_and_arguments(
    tmp_path: Path, anyio_backend: Backend
) -> None:
    outcome = await script_result(tmp_path, MAIN_MODULE_CALLABLES + RUN_ON_LOOP, anyio_backend)
    assert outcome == {
        "partial": 15,
        "method": 4,
        "argument": 6,
        "result": [True, 7],
        "lambda": 5,
    }


# -- results that hold the loop ----------------------------------------------------------


async def test_results_whose_decoding_holds_the_loop_are_counted_and_named(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # The threshold is a tenth of what unpickling this very result takes here: the
    # least of three, since a pause of this process (a busy machine) only lengthens one.
    count = 100_000
    blob = pickle.dumps(funcs.python_objects(count), protocol=5)
    timings = []
    for _ in range(3):
        started = time.perf_counter()
        pickle.loads(blob)
        timings.append(time.perf_counter() - started)
    baseline = min(timings)
    monkeypatch.setattr(_exchange, "SLOW_DECODE", baseline / 10)
    async with Offloader(one_worker()) as ex:
        pool = ex.pool("process")
        assert await pool.run(funcs.add, 1, 2) == 3
        assert pool.stats().slow_decodes == 0
        with caplog.at_level(logging.WARNING, logger="offload"):
            for _ in range(2):
                assert len(await pool.run(funcs.python_objects, count)) == count
        assert pool.stats().slow_decodes == 2
    warned = [r.getMessage() for r in caplog.records if "python_objects" in r.getMessage()]
    assert len(warned) == 1, warned  # at most one a minute
    assert "held the event loop" in warned[0]


@pytest.mark.parametrize("kind", ["hostile", "exiting"])
async def test_an_initializer_raising_a_hostile_exception_is_described(kind: str) -> None:
    settings = one_worker(initializer="tests.funcs:raise_hostile", initializer_args=(kind,))
    with anyio.fail_after(CALL_BOUND), pytest.raises(OffloadError) as caught:
        async with Offloader(settings):
            pytest.fail("the block ran though the pool could not start")
    name = "HostileError" if kind == "hostile" else "ExitingError"
    assert f"tests.funcs.{name}" in str(caught.value)
    assert "str() failed" in str(caught.value)
