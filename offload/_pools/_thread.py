"""The thread pool: calls run in worker threads under the pool's own limit.

It never uses anyio's default thread limiter, which FastAPI's sync routes and
dependencies share: offloaded work cannot starve them, nor they it.

Cancellation: a thread cannot be killed. When a call's deadline passes or its
caller is cancelled, the caller gets control back at once and the thread is
*abandoned*: it runs on, its slot stays taken until it really ends, and the
function can stop early by calling :func:`check_cancelled`.
"""

from __future__ import annotations

import threading
from functools import partial
from typing import TYPE_CHECKING, Any

import anyio
import anyio.from_thread
import anyio.lowlevel
import anyio.to_thread

from .._errors import CallCancelled
from ._base import Pool
from ._slots import SlotQueue

if TYPE_CHECKING:
    from anyio.abc import TaskGroup

    from .._call import Call
    from .._settings import PoolSettings

__all__ = ("ThreadPool", "check_cancelled")

_local = threading.local()


def check_cancelled() -> None:
    """Stop an offloaded thread call early if its caller has given up on it.

    Call it now and then from a long function running in a thread pool; when the
    call's deadline has passed or its caller was cancelled, it raises
    :class:`~offload.CallCancelled`, which should be left to propagate. Anywhere
    else (a process worker, plain code) it does nothing.

    :raises CallCancelled: if the call running in this thread was abandoned
    """
    job: _ThreadJob | None = getattr(_local, "job", None)
    if job is not None and job.abandoned:
        raise CallCancelled(f"{job.call.name} was abandoned by its caller")


class _ThreadJob:
    """A call as the worker thread sees it; the lock orders finish against abandon."""

    __slots__ = ("abandoned", "call", "finished", "lock", "on_finish")

    def __init__(self, call: Call) -> None:
        self.call = call
        self.lock = threading.Lock()
        self.finished = False
        self.abandoned = False
        self.on_finish: partial[None] | None = None

    def run(self) -> Any:
        _local.job = self
        try:
            return self.call.target(*self.call.args, **self.call.kwargs)
        finally:
            _local.job = None
            with self.lock:
                self.finished = True
                on_finish = self.on_finish
            if on_finish is not None:
                on_finish()

    def abandon(self, on_finish: partial[None]) -> bool:
        """Mark the job abandoned; ``False`` if it has already finished."""
        with self.lock:
            if self.finished:
                return False
            self.abandoned = True
            self.on_finish = on_finish
            return True


class ThreadPool(Pool):
    kind = "thread"

    def __init__(self, name: str, settings: PoolSettings, task_group: TaskGroup) -> None:
        super().__init__(name, settings, task_group)
        self._slots: SlotQueue[int] = SlotQueue(settings.max_pending, name)
        # anyio's own limiter is released when a thread is abandoned; our slots are
        # the real bound, this one only keeps anyio from using its default limiter.
        self._limiter = anyio.CapacityLimiter(self.max_workers)
        self._running = 0
        self._abandoned = 0

    async def start(self) -> None:
        for slot in range(self.max_workers):
            self._slots.put(slot)
        await anyio.lowlevel.checkpoint()

    async def _execute(self, call: Call) -> Any:
        slot = await self._slots.get()
        job = _ThreadJob(call)
        self._running += 1
        try:
            return await anyio.to_thread.run_sync(
                job.run, limiter=self._limiter, abandon_on_cancel=True
            )
        finally:
            self._running -= 1
            if job.finished or not job.abandon(
                partial(self._release_abandoned, slot, anyio.lowlevel.current_token())
            ):
                self._slots.put(slot)
            else:
                self._abandoned += 1

    def _release_abandoned(self, slot: int, token: anyio.lowlevel.EventLoopToken) -> None:
        # Runs in the abandoned thread once the function has returned.
        def release() -> None:
            self._abandoned -= 1
            self._slots.put(slot)

        try:
            anyio.from_thread.run_sync(release, token=token)
        except Exception:  # the event loop is gone: so is everyone who could wait
            pass

    async def _stop(self) -> None:
        # Abandoned threads cannot be stopped; shutdown does not wait for them.
        await anyio.lowlevel.checkpoint()

    def _occupancy(self) -> tuple[int, int, int]:
        return self.max_workers, self._running + self._abandoned, self._slots.queued
