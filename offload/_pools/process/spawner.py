"""The one thread that starts every process of offload, and how the event loop
waits for it without a thread of its own.

Linux sends a child its parent-death signal (``PR_SET_PDEATHSIG``) when the *thread*
that forked it ends, and anyio's worker threads end after 10 idle seconds: so every
worker process and every embedded Dask cluster is started from one long-lived thread.
``Popen`` blocks until the child has exec'd, which the loop must not wait for either.

That thread is offload's own, not a ``ThreadPoolExecutor``'s: concurrent.futures
ends its threads, and refuses new work, as soon as the main thread ends
(``threading._register_atexit``), while an event loop in another thread may run on
for hours; its workers would die with the thread, and no replacement could start.
A process forked after using it gets a new one: the fork copies the thread's state,
not the thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

import anyio

__all__ = ("Spawner", "spawner", "wait_future")

T = TypeVar("T")


class Spawner:
    """One daemon thread that runs the functions submitted to it, in order, and lives
    as long as the process (a daemon: it never holds up the interpreter's exit)."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[tuple[Future[Any], Callable[..., Any], tuple[Any, ...]]] = (
            queue.SimpleQueue()
        )
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def submit(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        """Run ``fn(*args)`` on the thread (started by the first call, which waits
        for it to run: not on the event loop); its outcome, as a future."""
        future: Future[T] = Future()
        self._jobs.put((future, fn, args))
        if self._thread is None:
            with self._lock:
                if self._thread is None:
                    thread = threading.Thread(target=self._run, name="offload-spawner", daemon=True)
                    thread.start()
                    self._thread = thread
        return future

    def _run(self) -> None:
        while True:
            future, fn, args = self._jobs.get()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result = fn(*args)
            except BaseException as exc:
                future.set_exception(exc)
            else:
                future.set_result(result)
            del future, fn, args  # a started process belongs to its pool, not to us


@functools.cache
def spawner() -> Spawner:
    """The thread that starts every process (started by the pools' ``prepare``)."""
    return Spawner()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=spawner.cache_clear)


async def wait_future(future: Future[T]) -> T:
    """The outcome of ``future``, awaited on the event loop.

    Not ``anyio.to_thread.run_sync(future.result)``: that ties up one of anyio's
    worker threads per wait, and each new one is started by the loop's thread, which
    waits until the thread runs (milliseconds while processes start). Shielded from
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
