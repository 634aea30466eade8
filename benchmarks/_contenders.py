"""The suite's contenders: offload's pools and the usual ways to offload from asyncio.

Every contender is opened by a factory into an ``AsyncExitStack`` (which closes it)
and offers one coroutine function, ``run(fn, *args)``, that awaits ``fn(*args)`` in a
worker. Two families: threads (``asyncio.to_thread``, ``anyio.to_thread``,
``run_in_executor`` on a ``ThreadPoolExecutor`` of 8, offload's thread pool of 8) and
processes (``run_in_executor`` on a ``ProcessPoolExecutor``, ``anyio.to_process``,
loky's reusable executor, ``pebble.ProcessPool``, offload's process pool), each pool
with ``PROCESS_WORKERS`` workers. Peers keep their default start method: what users
get.

Libraries are imported inside the factories, so a cold-start child (see
``_cold.py``) imports only the one it measures.
"""

from __future__ import annotations

import asyncio
import functools
import os
import sys
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
#: worker processes of every process pool: one per CPU, as the scaling scenario needs
PROCESS_WORKERS = os.cpu_count() or 2
#: threads of offload's thread pool and of the explicit ThreadPoolExecutor
THREAD_WORKERS = 8


def setup_paths() -> None:
    """Make ``_funcs`` and the offload checkout importable here and in children."""
    paths = [str(BENCH_DIR), str(REPO_ROOT)]
    sys.path[:0] = [p for p in paths if p not in sys.path]
    env = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    os.environ["PYTHONPATH"] = os.pathsep.join([p for p in paths if p not in env] + env)


Run = Callable[..., Awaitable[Any]]


@dataclass
class Contender:
    name: str
    family: str  # "thread" or "process"
    run: Run  # run(fn, *args): await fn(*args) in a worker
    note: str  # workers and start method, for the JSON
    peer: bool = True  # False for offload's own pools


Factory = Callable[[AsyncExitStack], Awaitable[list[Contender]]]


def _mp_default() -> str:
    import multiprocessing

    return f"{PROCESS_WORKERS} workers, {multiprocessing.get_start_method()} (default)"


async def stdlib_process(stack: AsyncExitStack) -> list[Contender]:
    from concurrent.futures import ProcessPoolExecutor

    ppe = ProcessPoolExecutor(PROCESS_WORKERS)  # default context: what users get
    stack.callback(ppe.shutdown, wait=True)
    loop = asyncio.get_running_loop()

    def run(fn: Callable[..., Any], *args: Any) -> Awaitable[Any]:
        return loop.run_in_executor(ppe, fn, *args)

    return [Contender("run_in_executor(ProcessPool)", "process", run, _mp_default())]


async def pebble_process(stack: AsyncExitStack) -> list[Contender]:
    import pebble

    pool = pebble.ProcessPool(max_workers=PROCESS_WORKERS)
    stack.callback(pool.join)
    stack.callback(pool.close)  # callbacks run last-in first-out: close, then join

    def run(fn: Callable[..., Any], *args: Any) -> Awaitable[Any]:
        return asyncio.wrap_future(pool.schedule(fn, args=args))

    return [Contender("pebble.ProcessPool", "process", run, _mp_default())]


async def loky_process(stack: AsyncExitStack) -> list[Contender]:
    import loky

    ex = loky.get_reusable_executor(max_workers=PROCESS_WORKERS)
    stack.callback(ex.shutdown, wait=True)
    method = loky.backend.context.get_context().get_start_method()

    def run(fn: Callable[..., Any], *args: Any) -> Awaitable[Any]:
        return asyncio.wrap_future(ex.submit(fn, *args))

    note = f"{PROCESS_WORKERS} workers, {method}"
    return [Contender("loky reusable executor", "process", run, note)]


async def anyio_process(stack: AsyncExitStack) -> list[Contender]:
    import anyio
    import anyio.to_process

    limiter = anyio.CapacityLimiter(PROCESS_WORKERS)

    def run(fn: Callable[..., Any], *args: Any) -> Awaitable[Any]:
        return anyio.to_process.run_sync(fn, *args, limiter=limiter)

    note = f"{PROCESS_WORKERS} workers (limiter), subprocess: python -m anyio.to_process"
    return [Contender("anyio.to_process", "process", run, note)]


async def thread_peers(stack: AsyncExitStack) -> list[Contender]:
    from concurrent.futures import ThreadPoolExecutor

    import anyio.to_thread

    tpe = ThreadPoolExecutor(max_workers=THREAD_WORKERS)
    stack.callback(tpe.shutdown, wait=True)
    loop = asyncio.get_running_loop()

    def tpe_run(fn: Callable[..., Any], *args: Any) -> Awaitable[Any]:
        return loop.run_in_executor(tpe, fn, *args)

    def anyio_run(fn: Callable[..., Any], *args: Any) -> Awaitable[Any]:
        return anyio.to_thread.run_sync(fn, *args)

    n_default = f"{min(32, (os.cpu_count() or 1) + 4)} workers (default executor)"
    return [
        Contender("asyncio.to_thread", "thread", asyncio.to_thread, n_default),
        Contender("anyio.to_thread", "thread", anyio_run, "40 workers (limiter)"),
        Contender("run_in_executor(ThreadPool)", "thread", tpe_run, f"{THREAD_WORKERS} workers"),
    ]


@functools.cache
def offload_settings() -> Any:
    """The suite's settings for offload; made once (cold starts make them untimed)."""
    from offload import OffloadSettings, PoolSettings

    return OffloadSettings(
        process=PoolSettings(max_workers=PROCESS_WORKERS),
        thread=PoolSettings(max_workers=THREAD_WORKERS),
        default_pool="process",
    )


async def offload_pools(stack: AsyncExitStack) -> list[Contender]:
    from offload import Offloader

    ex = await stack.enter_async_context(Offloader(offload_settings()))
    note = "{} workers; the Offloader starts both pools"
    return [
        Contender(
            "offload process pool",
            "process",
            ex.pool("process").run,
            note.format(PROCESS_WORKERS),
            peer=False,
        ),
        Contender(
            "offload thread pool",
            "thread",
            ex.pool("thread").run,
            note.format(THREAD_WORKERS),
            peer=False,
        ),
    ]


# Fork-based pools first, before the other contenders start their threads.
FACTORIES: list[Factory] = [
    *(stdlib_process, pebble_process, loky_process, anyio_process),
    *(thread_peers, offload_pools),
]
#: modules each factory imports: a cold start imports them before its clock starts
IMPORTS: dict[Factory, tuple[str, ...]] = {
    stdlib_process: ("concurrent.futures.process",),
    pebble_process: ("pebble",),
    loky_process: ("loky",),
    anyio_process: ("anyio", "anyio.to_process"),
    thread_peers: ("concurrent.futures.thread", "anyio", "anyio.to_thread"),
    offload_pools: ("offload._offloader", "offload._settings"),
}
#: contender name -> the factory that opens it (cold starts open one at a time)
NAMES: dict[str, Factory] = {
    "run_in_executor(ProcessPool)": stdlib_process,
    "pebble.ProcessPool": pebble_process,
    "loky reusable executor": loky_process,
    "anyio.to_process": anyio_process,
    "asyncio.to_thread": thread_peers,
    "anyio.to_thread": thread_peers,
    "run_in_executor(ThreadPool)": thread_peers,
    "offload process pool": offload_pools,
    "offload thread pool": offload_pools,
}


async def calls(run: Run, fn: Callable[..., Any], n: int, concurrency: int = 1) -> None:
    """``n`` calls of ``fn()``, by ``concurrency`` callers each awaiting in a loop."""

    async def caller(k: int) -> None:
        for _ in range(k):
            await run(fn)

    await asyncio.gather(*(caller(n // concurrency) for _ in range(concurrency)))


async def start_every_worker(c: Contender) -> None:
    """A few bursts wider than the pool, so that lazily started workers exist."""
    from _funcs import noop

    for _ in range(3):
        await calls(c.run, noop, 16, concurrency=16)
