"""The thread pool: calls run in the pool's own worker threads.

It never uses anyio's default thread limiter, which FastAPI's sync routes and
dependencies share: offloaded work cannot starve them, nor they it.

A round trip is one queue put, one ``call_soon_threadsafe`` (asyncio) or
``run_sync_soon`` (trio) back to the event loop, and no other hop.

A call runs in a copy of its caller's :mod:`contextvars` context, taken when it is
made, as with ``asyncio.to_thread`` and ``anyio.to_thread.run_sync``.

Cancellation: a thread cannot be killed. When a call's deadline passes or its
caller is cancelled, the caller gets control back at once and the thread is
*abandoned*: it runs on, its slot stays taken until it really ends, and the
function can stop early by calling :func:`check_cancelled`.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import queue
import sys
import threading
import time
from collections.abc import Callable
from types import CoroutineType, GeneratorType
from typing import TYPE_CHECKING, Any

import anyio.lowlevel

from .._errors import CallAborted, CallCancelled, PoolOverloaded
from .._helper_threads import run_in_helper_thread
from .._types import generator_refusal
from .._where import mark_worker_thread
from .base import Pool, StreamSource
from .thread_streams import ThreadStream, current

if TYPE_CHECKING:
    from anyio.abc import TaskGroup

    from .._call import Call
    from .._settings import PoolSettings

__all__ = ("ThreadPool", "check_cancelled")

logger = logging.getLogger("offload")


def check_cancelled() -> None:
    """Stop an offloaded thread call early if its caller has given up on it.

    Call it now and then from a long function running in a thread pool; when the
    call's deadline has passed or its caller was cancelled, it raises
    :class:`~offload.CallCancelled`, which should be left to propagate. Anywhere
    else (a process worker, plain code) it does nothing.

    :raises CallCancelled: if the call running in this thread was abandoned
    """
    job: _ThreadCall | ThreadStream | None = getattr(current, "job", None)
    if job is not None and job.abandoned:
        raise CallCancelled(f"{job.call.name} was abandoned by its caller")


class _ThreadCall:
    """A call as a worker thread sees it. The lock orders "finished" against
    "abandoned", so exactly one of wake() or release() runs."""

    __slots__ = (
        "abandoned",
        "call",
        "context",
        "error",
        "finished",
        "lock",
        "release",
        "result",
        "started",
        "waiting",
        "wake",
    )

    def __init__(self, call: Call, context: contextvars.Context) -> None:
        self.call = call
        self.context = context
        self.lock = threading.Lock()
        self.started = False
        self.finished = False
        self.abandoned = False
        self.waiting = False  # its caller waits for wake(): only the loop's thread reads it
        self.result: Any = None
        self.error: BaseException | None = None
        self.wake: Callable[[], None] = _nothing
        # once an abandoned job is done with; given the job rather than closing over it:
        # a job referring to itself would be a cycle, freed only by the cyclic GC
        self.release: Callable[[_ThreadCall], None] = _ignore

    def run(self) -> None:
        with self.lock:
            if self.abandoned:  # its caller left while it was queued: never start it
                self.finished = True
        if self.finished:
            self.release(self)
            return
        self.started = True
        current.job = self
        call = self.call
        begun = time.perf_counter()
        call.queue_wait = begun - call.started
        try:
            result = self.context.run(call.target, *call.args, **call.kwargs)
            call.ran = time.perf_counter() - begun
            if type(result) is GeneratorType:
                # Its body would run on the event loop's thread as the caller iterates.
                result.close()
                raise TypeError(generator_refusal(self.call.name))
            if type(result) is CoroutineType:
                result.close()  # never awaited, and no warning saying so
                raise TypeError(
                    f"{self.call.name} returned a coroutine: offload runs blocking "
                    "functions; await async functions directly"
                )
            self.result = result
        except BaseException as exc:
            if call.ran is None:
                call.ran = time.perf_counter() - begun
            self.error = exc
        finally:
            current.job = None
        with self.lock:
            self.finished = True
            abandoned = self.abandoned
        if abandoned:
            self.release(self)
        else:
            self.wake()

    def abandon(self) -> bool:
        """Mark the job abandoned; ``False`` if it has already finished."""
        with self.lock:
            if not self.finished:
                self.abandoned = True
            return self.abandoned


def _nothing() -> None:
    pass


def _ignore(job: _ThreadCall) -> None:
    pass


def _start_all(threads: list[threading.Thread]) -> None:
    for thread in threads:
        thread.start()


def _worker(jobs: queue.SimpleQueue[_ThreadCall | ThreadStream | None]) -> None:
    mark_worker_thread()
    while (job := jobs.get()) is not None:
        job.run()
        del job


class _AsyncioBridge:
    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()

    def call_soon_threadsafe(self, fn: Callable[[], None]) -> None:
        try:
            self.loop.call_soon_threadsafe(fn)
        except RuntimeError:  # the loop is closed: nobody is left to tell
            pass

    async def wait(
        self, job: _ThreadCall, jobs: queue.SimpleQueue[_ThreadCall | ThreadStream | None]
    ) -> None:
        future = self.loop.create_future()

        def done() -> None:
            if not future.done():
                future.set_result(None)

        job.wake = lambda: self.call_soon_threadsafe(done)
        jobs.put(job)
        try:
            await future
        except asyncio.CancelledError:
            job.abandon()
            raise


class _TrioBridge:
    def __init__(self) -> None:
        import trio

        self.trio = trio
        self.token = trio.lowlevel.current_trio_token()

    def call_soon_threadsafe(self, fn: Callable[[], None]) -> None:
        try:
            self.token.run_sync_soon(fn)
        except self.trio.RunFinishedError:
            pass

    async def wait(
        self, job: _ThreadCall, jobs: queue.SimpleQueue[_ThreadCall | ThreadStream | None]
    ) -> None:
        lowlevel = self.trio.lowlevel
        task = lowlevel.current_task()
        job.wake = lambda: self.call_soon_threadsafe(lambda: lowlevel.reschedule(task))

        def abort(_: object) -> Any:
            # Finished already: its wake-up is on the way, and must find us waiting.
            return lowlevel.Abort.SUCCEEDED if job.abandon() else lowlevel.Abort.FAILED

        jobs.put(job)
        await lowlevel.wait_task_rescheduled(abort)


class ThreadPool(Pool):
    """``max_workers`` threads taking jobs from one queue.

    The threads are the slots: a job waits in the queue until a thread is free, and
    an abandoned job keeps its thread, hence its slot, until it really ends. At most
    ``max_workers + max_pending`` jobs are in the pool, abandoned ones included; past
    that a call gets :class:`PoolOverloaded` at once.
    """

    kind = "thread"
    #: arguments and results pass by reference: nothing is encoded nor copied
    transfer = False
    carries_context = False

    def __init__(self, name: str, settings: PoolSettings, task_group: TaskGroup) -> None:
        super().__init__(name, settings, task_group)
        self._jobs: queue.SimpleQueue[_ThreadCall | ThreadStream | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._bridge: _AsyncioBridge | _TrioBridge | None = None
        self._capacity = self.max_workers + settings.max_pending
        # queued, running, or abandoned and not done; a stream until its thread is done
        self._in_pool: set[_ThreadCall | ThreadStream] = set()
        sniffio = sys.modules.get("sniffio")  # anyio imports it, where it is installed
        self._sniffio_var: contextvars.ContextVar[str | None] | None = (
            None if sniffio is None else sniffio.current_async_library_cvar
        )

    async def start(self) -> None:
        try:
            self._bridge = _AsyncioBridge()
        except RuntimeError:  # no asyncio loop running: we are under trio
            self._bridge = _TrioBridge()
        threads = [
            threading.Thread(
                target=_worker,
                args=(self._jobs,),
                name=f"offload-{self.name}-{number}",
                daemon=True,  # an abandoned call that never ends must not block exit
            )
            for number in range(self.max_workers)
        ]
        self._threads.extend(threads)
        # Thread.start() waits until the new thread runs: up to milliseconds each
        # while processes start, which the loop's thread must not spend.
        await run_in_helper_thread(_start_all, threads)

    def _check_room(self) -> None:
        if len(self._in_pool) >= self._capacity:
            raise PoolOverloaded(
                f"pool {self.name!r} is full: every thread is busy and "
                f"{self.settings.max_pending} calls are waiting (max_pending)"
            )

    def _context(self) -> contextvars.Context:
        # The caller's context, as asyncio.to_thread and anyio's threads give it: the
        # function sees the caller's context variables; what it sets stays in the copy.
        context = contextvars.copy_context()
        sniffio_var = self._sniffio_var
        if sniffio_var is not None and context.get(sniffio_var) is not None:
            # Not in the thread, which runs no event loop (as anyio and trio do it).
            context.run(sniffio_var.set, None)
        return context

    async def _open_stream(self, call: Call, buffer: int) -> StreamSource:
        self._check_room()
        bridge = self._bridge
        assert bridge is not None
        job = ThreadStream(call, self._context(), buffer, bridge)
        job.release = self._release
        self._in_pool.add(job)
        self._jobs.put(job)
        return job

    async def _execute(self, call: Call) -> Any:
        in_pool = self._in_pool
        self._check_room()
        bridge = self._bridge
        assert bridge is not None
        job = _ThreadCall(call, self._context())
        job.release = self._release
        in_pool.add(job)
        job.waiting = True
        try:
            await bridge.wait(job, self._jobs)
        except BaseException:
            if not job.abandoned:  # it finished as we were cancelled
                in_pool.discard(job)
            raise
        finally:
            job.waiting = False
        if job.abandoned:  # by _abort, which woke us; the thread releases it
            raise self._closed_error()
        in_pool.discard(job)
        if job.error is not None:
            # The error's traceback holds the frames of job.run (whose self is the
            # job) and of this call: neither may hold the error, or only the cyclic
            # GC could free them.
            error, job.error = job.error, None
            try:
                if not isinstance(error, Exception):
                    # SystemExit, KeyboardInterrupt...: as itself it would end the
                    # caller's program (asyncio.run returns when it reaches the task).
                    raise CallAborted(
                        f"{call.name} raised {type(error).__qualname__}; it is not "
                        "re-raised as such, which would end this program"
                    ) from error
                raise error
            finally:
                del error, job
        return job.result

    def _release(self, job: _ThreadCall | ThreadStream) -> None:
        """In the job's thread: an abandoned job is done, its slot free again."""
        assert self._bridge is not None
        self._bridge.call_soon_threadsafe(functools.partial(self._in_pool.discard, job))

    def _abort(self) -> None:
        for job in list(self._in_pool):
            if isinstance(job, ThreadStream):
                error = self._closed_error()
                job.abort(error)
                # Over for the drain now: its consumer may never ask for an item again.
                self.end_stream(job, error)
            elif job.waiting and job.abandon():
                job.wake()  # the thread will not: it was abandoned

    async def _stop(self) -> None:
        # Idle threads exit; an abandoned one exits once its call ends, and
        # shutdown does not wait for it.
        for _ in self._threads:
            self._jobs.put(None)
        await anyio.lowlevel.checkpoint()

    def _occupancy(self) -> tuple[int, int, int]:
        jobs = list(self._in_pool)
        busy = sum(1 for job in jobs if job.started and not job.finished)
        queued = sum(1 for job in jobs if not job.started and not job.abandoned)
        return self.max_workers, busy, queued
