"""What the fault matrix (``test_fault_matrix.py``, ``test_fault_matrix_process.py``)
asks of a pool of any kind: its counters, its live workers, and how it recovers."""

from __future__ import annotations

import re
import traceback
from collections.abc import Callable
from typing import Any

import anyio
import pytest

from offload import Executor, OffloadSettings, PoolSettings, RemoteTraceback

from .. import funcs
from ..processes import pids_of_concurrent_calls, wait_until_async, worker_pids

__all__ = (
    "CALL_BOUND",
    "COUNTERS",
    "KINDS",
    "MAX_WORKERS",
    "RECOVERY",
    "assert_pool_recovers",
    "assert_remote_cause",
    "counters",
    "error_of",
    "expected_counters",
    "live_workers",
    "matrix_settings",
    "pid_pickling_result",
    "pid_unpickling_args",
    "serving_pids",
    "settled",
)

MAX_WORKERS = 2
#: seconds the pool gets to be back at MAX_WORKERS live workers after a fault (a
#: dask worker's nanny, and the client's view of the scheduler, take longer)
RECOVERY = {"thread": 5.0, "process": 5.0, "dask": 15.0}
#: seconds any single faulty call may take before the test gives up on it
CALL_BOUND = 15.0
COUNTERS = ("completed", "failed", "timed_out", "cancelled", "crashed", "rejected")
KINDS = ("thread", "process", "dask")


def matrix_settings(**process: Any) -> OffloadSettings:
    return OffloadSettings(
        process=PoolSettings(max_workers=MAX_WORKERS, **process),
        thread=PoolSettings(max_workers=2),
        shutdown_timeout=5,
    )


def counters(pool: Executor) -> dict[str, int]:
    stats = pool.stats()
    return {name: getattr(stats, name) for name in COUNTERS}


def expected_counters(**counts: int) -> dict[str, int]:
    return {name: counts.get(name, 0) for name in COUNTERS}


async def live_workers(pool: Executor) -> set[int]:
    """The pids of the pool's worker processes; none for threads."""
    kind = pool.stats().kind
    if kind == "process":
        return worker_pids()
    if kind == "dask":  # asked of the scheduler: the workers are its host's children
        client = pool.offloader.get_pool(pool.pool_name)._client  # type: ignore[attr-defined]
        pids: list[int] = await client.run_on_scheduler(funcs.scheduler_worker_pids)
        return set(pids)
    return set()


async def settled(pool: Executor) -> set[int]:
    """Wait until the pool has MAX_WORKERS live, idle workers; their pids."""
    kind = pool.stats().kind
    processes = 0 if kind == "thread" else MAX_WORKERS
    pids: set[int] = set()

    async def whole() -> bool:
        pids.clear()
        pids.update(await live_workers(pool))
        stats = pool.stats()
        return (stats.workers, stats.busy, len(pids)) == (MAX_WORKERS, 0, processes)

    await wait_until_async(
        whole,
        RECOVERY[kind],
        lambda: f"{MAX_WORKERS} live workers: stats={pool.stats()} live={pids}",
    )
    return pids


async def error_of(pool: Executor, fn: Callable[..., Any], *args: Any) -> Exception:
    """The exception ``pool.run(fn, *args)`` raises; fail if it returns or hangs."""
    with anyio.fail_after(CALL_BOUND):
        try:
            result = await pool.run(fn, *args)
        except Exception as exc:
            return exc
    pytest.fail(f"{fn.__name__}{args} returned {result!r} instead of failing")


async def serving_pids(pool: Executor) -> set[int]:
    """The pids of the workers that serve MAX_WORKERS concurrent calls: one each, since
    every call holds its worker for 0.2 s. (Process pools only: a dask scheduler
    places tasks as it sees fit.)"""
    with anyio.fail_after(CALL_BOUND):
        pids = await pids_of_concurrent_calls(pool, MAX_WORKERS)
    assert len(pids) == MAX_WORKERS
    return set(pids)


async def assert_pool_recovers(pool: Executor, before: dict[str, int], **counts: int) -> None:
    """After a fault: back to MAX_WORKERS live workers; a normal call succeeds; the
    counters moved by ``counts`` (the faulty call) plus one completed call."""
    await settled(pool)
    assert await pool.run(funcs.add, 40, 2) == 42
    delta = {name: counters(pool)[name] - before[name] for name in COUNTERS}
    counts["completed"] = counts.get("completed", 0) + 1
    assert delta == expected_counters(**counts), pool.stats()
    stats = pool.stats()
    assert (stats.busy, stats.queued) == (0, 0), stats


def assert_remote_cause(exc: BaseException, kind: str, *needles: str) -> None:
    """A worker process's traceback is the cause; a thread's is the exception's own."""
    if kind == "thread":
        frames = "".join(traceback.format_tb(exc.__traceback__))
        for needle in needles:
            assert needle in frames + repr(exc), (needle, frames)
        return
    cause = exc.__cause__
    assert isinstance(cause, RemoteTraceback), repr(cause)
    for needle in needles:
        assert needle in cause.tb, (needle, cause.tb)


def pid_named(pattern: str) -> Callable[[Exception], int]:
    """Reads the worker's pid from the error, or from its remote traceback."""

    def pid(exc: Exception) -> int:
        cause = exc.__cause__
        text = str(exc) + (cause.tb if isinstance(cause, RemoteTraceback) else "")
        found = re.search(pattern, text)
        assert found, text
        return int(found[1])

    return pid


#: the worker that refused the arguments names itself
pid_unpickling_args = pid_named(r"refusing to unpickle in process (\d+)")
#: the result names the worker that pickled it; the parent's refusal quotes it
pid_pickling_result = pid_named(r"pickled in process (\d+)")
