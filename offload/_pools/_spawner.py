"""The one thread that starts every process of offload, and how the event loop
waits for it without a thread of its own.

Linux sends a child its parent-death signal (``PR_SET_PDEATHSIG``) when the *thread*
that forked it ends, and anyio's worker threads end after 10 idle seconds: so every
worker process and every embedded Dask cluster is started from one long-lived thread.
``Popen`` blocks until the child has exec'd, which the loop must not wait for either.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

import anyio

__all__ = ("spawner", "wait_future")

T = TypeVar("T")


@functools.cache
def spawner() -> ThreadPoolExecutor:
    """The thread that starts every process (started by the pools' ``prepare``)."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="offload-spawner")


async def wait_future(future: Future[T]) -> T:
    """The outcome of ``future``, awaited on the event loop.

    Not ``anyio.to_thread.run_sync(future.result)``: that ties up one of anyio's
    worker threads per wait, and each new one is started by the loop's thread, which
    waits until the thread runs (0.1-4 ms here while processes start). Shielded from
    cancellation, as ``to_thread.run_sync`` is: what the future stands for (a started
    process) must reach its caller, who then sees the cancellation at its next
    checkpoint.
    """
    if not future.done():
        done = anyio.Event()
        call_soon = _call_soon_threadsafe()

        def wake(_: Future[T]) -> None:
            with contextlib.suppress(RuntimeError):  # the loop has closed meanwhile
                call_soon(done.set)

        future.add_done_callback(wake)
        with anyio.CancelScope(shield=True):
            await done.wait()
    return future.result()


def _call_soon_threadsafe() -> Callable[[Callable[[], object]], object]:
    """``call(fn)``, from any thread: runs ``fn`` soon on the running event loop."""
    try:
        return asyncio.get_running_loop().call_soon_threadsafe
    except RuntimeError:  # trio
        import trio

        return trio.lowlevel.current_trio_token().run_sync_soon
