"""The process pool's workers: started, watched, replaced, recycled, stopped.

:class:`WorkerSupervisor` keeps ``max_workers`` workers running (started by
``launch.py``), watches each one's exit, replaces the dead and the recycled, and
stops them all at shutdown; :class:`~.pool.ProcessPool`, its subclass, runs the
calls on them. The data flow is drawn in ``__init__.py``.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import os
import signal
import socket
import subprocess
import weakref
from abc import abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING

import anyio
import anyio.lowlevel

from ..._errors import (
    PoolClosed,
    PoolStartError,
    describe_exit,
)
from ..._where import in_worker_process
from ..base import Pool
from . import cross_memory, launch
from .exchange import LoopDecoder, WaitingCall
from .handoff import Handoff
from .logs import LogSink
from .nested_pools import refusal
from .spawner import spawner
from .worker import EXIT_OUT_OF_MEMORY

if TYPE_CHECKING:
    from anyio.abc import TaskGroup

    from ..._settings import PoolSettings
    from .streams import ProcessStream
    from .worker_handle import WorkerHandle

__all__ = ("KILL_GRACE", "WorkerSupervisor", "report_suffix", "retry_delay")

logger = logging.getLogger("offload")

#: seconds between SIGTERM and SIGKILL for a worker being stopped
KILL_GRACE = 1.0
#: seconds before a failed start of a replacement is tried again; doubled at each failure
FIRST_RETRY = 0.1
#: seconds between two attempts, at most (see ``retry_delay``)
MAX_RETRY = 5.0
#: ...and at most a quarter of ``start_timeout``, but never below this
MIN_RETRY_CAP = 1.0
_live_pools: weakref.WeakSet[WorkerSupervisor] = weakref.WeakSet()


class WorkerSupervisor(Pool):
    """The process pool's workers: started, watched, replaced, recycled, stopped.
    :class:`~.pool.ProcessPool` runs the calls on them."""

    def __init__(self, name: str, settings: PoolSettings, task_group: TaskGroup) -> None:
        super().__init__(name, settings, task_group)
        self._handoff: Handoff[WorkerHandle] = Handoff(
            settings.max_pending, name, self._send_on_handoff, self._abandon_sent_call
        )
        self._ready: set[WorkerHandle] = set()  # started, not retired: the pool's capacity
        self._unreaped: set[WorkerHandle] = set()  # every process not yet reaped
        self._busy = 0
        # While the pool has no worker and cannot start one (see _replace): the latest
        # start error, since when, and whether start_timeout has passed since.
        self._start_failure: Exception | None = None
        self._failing_since: float | None = None
        self._given_up = False
        # Set once the workers are being stopped. Not ``_closing``: while the pool
        # drains, its queued calls still need workers, new ones included.
        self._stopping = False
        self._death_pipe_read = -1
        self._death_pipe_write = -1
        self._cross_memory = settings.cross_memory and cross_memory.available()
        self._decoder = LoopDecoder(name, self.counters)
        self._streams: weakref.WeakSet[ProcessStream] = weakref.WeakSet()  # not ended
        self._log_sink = (
            LogSink(name, settings.initializer, self.counters) if settings.forward_logs else None
        )

    # -- lifecycle -------------------------------------------------------------

    @property
    def stopping(self) -> bool:
        """Whether the workers are being stopped (after the drain, if any)."""
        return self._stopping

    @classmethod
    def prepare(cls) -> None:
        if in_worker_process():
            return  # it will not start (see start)
        # Thread.start() waits for the new thread to run: not on the loop.
        spawner().submit(int).result()
        cross_memory.available()  # cached: reads /proc

    async def start(self) -> None:
        # Not raised: an Offloader in a worker may use its thread pools.
        if (reason := refusal(self.name)) is not None:
            self._refuse_to_start(reason)
            return
        # Every worker holds the read end; only this process holds the write end.
        # When this process dies, however it dies, the workers read EOF and exit.
        try:
            self._loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:  # trio
            self._loop = None
        self._handoff.loop = self._loop
        self._death_pipe_read, self._death_pipe_write = os.pipe()
        _live_pools.add(self)
        errors: list[BaseException] = []

        async def add() -> None:
            try:
                await self._add_worker()
            except Exception as exc:
                errors.append(exc)

        async with anyio.create_task_group() as tg:
            for _ in range(self.max_workers):
                tg.start_soon(add)
        if errors:
            await self._stop()
            raise errors[0]

    async def _spawn(self) -> WorkerHandle:
        worker = await launch.spawn(self._death_pipe_read, self.settings, self._loop)
        worker.log_sink = self._log_sink
        self._unreaped.add(worker)
        self._task_group.start_soon(self._watch, worker, name=f"offload-watch-{worker.pid}")
        return worker

    async def _add_worker(self) -> None:
        """Start one worker and, once it says it is ready, offer it to callers."""
        worker = await self._spawn()
        probe = await launch.boot(worker, self.settings, self._cross_memory, self.name, self._kill)
        if self._cross_memory and not cross_memory.readable(worker.pid, probe):
            # A security module may refuse what the kernel otherwise allows: this
            # worker expects copies between memories, so it goes; the next one won't.
            logger.info(
                "pool %r: cannot read worker memory (process_vm_readv refused); "
                "large buffers will go through the channel",
                self.name,
            )
            self._cross_memory = False
            self._kill(worker)
            await self._add_worker()
            return
        if self._stopping:
            self._retire(worker)
            return
        logger.info("pool %r: worker %d started", self.name, worker.pid)
        worker.ready = True
        self._ready.add(worker)
        self._handoff.put(worker)

    async def _replace(self) -> None:
        """Start a worker in place of one that is gone, backing off while that fails.

        While the pool has no worker and cannot start one, calls wait in the queue as
        usual (bounded by ``max_pending`` and their own deadlines) and the starts go on.
        Once it has been so for ``start_timeout`` seconds, the waiting calls fail with
        :class:`PoolStartError` (from the start error), and new calls fail at once,
        until a start succeeds: a call without a deadline does not wait for ever.
        """
        delay = FIRST_RETRY
        while not self._stopping:
            attempt = anyio.current_time()
            try:
                await self._add_worker()
            except Exception as exc:
                if self.stopping:
                    return  # stopped by the shutdown itself: no failure to report
                logger.error(
                    "pool %r: could not start a replacement worker (retrying in %g s): %s",
                    self.name,
                    delay,
                    exc,
                )
                if not self._ready:
                    self._start_failure = exc
                    if self._failing_since is None:
                        self._failing_since = attempt
                    if anyio.current_time() - self._failing_since >= self.settings.start_timeout:
                        self._given_up = True
                        self._handoff.fail_waiters(self._no_worker_error())
            else:
                self._start_failure = self._failing_since = None
                self._given_up = False
                return
            await anyio.sleep(delay)
            delay = retry_delay(delay, self.settings.start_timeout)

    def _no_worker_error(self) -> PoolStartError:
        assert self._start_failure is not None
        assert self._failing_since is not None
        error = PoolStartError(
            f"pool {self.name!r} has had no worker for "
            f"{anyio.current_time() - self._failing_since:.1f} s (start_timeout "
            f"{self.settings.start_timeout:g} s) and cannot start one: {self._start_failure}"
        )
        error.__cause__ = self._start_failure
        return error

    async def _watch(self, worker: WorkerHandle) -> None:
        """Notice the worker's exit, whenever and however it happens."""
        try:
            with anyio.CancelScope(shield=True):
                await worker.wait_exit()
        except anyio.ClosedResourceError:
            return  # _stop reaped it first
        self._on_exit(worker)

    def _on_exit(self, worker: WorkerHandle) -> None:
        if worker.exited.is_set():
            return
        worker.proc.poll()
        if worker.end_group():
            self._task_group.start_soon(worker.reap_group)
        self._unreaped.discard(worker)
        worker.exited.set()
        report = worker.crash_report()  # before close() closes its file
        if not worker.in_use:
            worker.close()  # else the caller holding it closes it, once done reading
        else:
            # Its end of the channel may outlive it, in a process it forked: the
            # caller reads what it wrote, then EOF, rather than wait for that process.
            with contextlib.suppress(OSError):
                worker.sock.shutdown(socket.SHUT_RD)
        unexpected = worker in self._ready
        self._ready.discard(worker)
        self._handoff.remove_idle(worker)
        if worker.returncode == EXIT_OUT_OF_MEMORY:
            logger.info(
                "pool %r: worker %d left after a call ran out of its hard_memory_limit",
                self.name,
                worker.pid,
            )
        elif worker.crash_told:  # its caller could not say how it ended: now we can
            logger.error(
                "pool %r: worker %d, whose call to %s failed with WorkerCrashed before "
                "its exit status came, and which the pool then stopped, %s%s",
                self.name,
                worker.pid,
                worker.last_call_name(),
                worker.ending(report),
                report_suffix(report),
            )
        elif unexpected and worker.call is None:  # a crash mid-call is logged by its caller
            logger.warning(
                "pool %r: idle worker %d %s; %s%s",
                self.name,
                worker.pid,
                worker.ending(report),
                worker.last_call(),
                report_suffix(report),
            )
        else:
            logger.debug(
                "pool %r: worker %d %s", self.name, worker.pid, describe_exit(worker.returncode)
            )
        if worker.ready and not (worker.retiring or worker.replacement_started or self._stopping):
            # Draining too: a queued call must run, not wait for the drain's end.
            self._task_group.start_soon(self._replace)

    def _kill(self, worker: WorkerHandle) -> None:
        """Stop ``worker`` now: SIGTERM, and SIGKILL if it is still there after a grace."""
        self._ready.discard(worker)
        worker.signal(signal.SIGTERM)
        self._task_group.start_soon(
            self._unless_gone, worker, lambda: worker.signal(signal.SIGKILL)
        )

    def _retire(self, worker: WorkerHandle) -> None:
        """Let an idle worker finish cleanly: closing its channel makes it exit."""
        self._ready.discard(worker)
        worker.retiring = True
        with contextlib.suppress(OSError):
            worker.sock.shutdown(socket.SHUT_RDWR)
        self._task_group.start_soon(self._unless_gone, worker, lambda: self._kill(worker))

    async def _unless_gone(self, worker: WorkerHandle, escalate: Callable[[], None]) -> None:
        """Call ``escalate`` if ``worker`` is still alive after the grace period."""
        with anyio.CancelScope(shield=True), anyio.move_on_after(KILL_GRACE):
            await worker.exited.wait()
            return
        escalate()

    async def _stop(self) -> None:
        self._stopping = True
        self._handoff.fail_waiters(PoolClosed(f"pool {self.name!r} is closed"))
        for worker in self._handoff.take_all_idle():
            self._retire(worker)
        for worker in list(self._unreaped):
            if not worker.retiring:  # busy, or still starting: no reason to wait
                self._kill(worker)
        if self._death_pipe_write >= 0:
            os.close(self._death_pipe_write)  # any worker left exits on its own now
            os.close(self._death_pipe_read)
            self._death_pipe_write = self._death_pipe_read = -1
        # Poll rather than wait for the watchers: at the end of asyncio.run they
        # may already have been cancelled, natively, shield or not.
        with anyio.CancelScope(shield=True):
            with anyio.move_on_after(KILL_GRACE * 3):
                while any(w.proc.poll() is None for w in self._unreaped):  # noqa: ASYNC110
                    await anyio.sleep(0.005)
            for worker in list(self._unreaped):
                worker.signal(signal.SIGKILL)
                with anyio.move_on_after(5):
                    while worker.proc.poll() is None:  # noqa: ASYNC110
                        await anyio.sleep(0.005)
                self._on_exit(worker)
        _live_pools.discard(self)

    def _forget(self) -> None:
        # The parent's workers: never signalled nor reaped here (nor by this process's
        # exit, _kill_leftover_workers). Its copies of their channels and of the death
        # pipe's write end close, so that they still die with the parent alone.
        _live_pools.discard(self)
        fds = [self._death_pipe_read, self._death_pipe_write]
        for worker in self._unreaped:
            worker.sock.close()  # not worker.close(): the event loop is the parent's
            worker.close_crash_report()
            fds.append(-1 if worker.pidfd is None else worker.pidfd)
            worker.pidfd = None
        for fd in fds:
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._unreaped.clear()
        self._ready.clear()
        self._handoff.take_all_idle()
        self._death_pipe_read = self._death_pipe_write = -1

    def _abort(self) -> None:
        self._stopping = True
        self._handoff.fail_waiters(self._closed_error())
        for worker in list(self._ready):
            if worker.in_use:
                self._kill(worker)
        for stream in list(self._streams):
            # Over for the drain now: its consumer may never ask for an item again
            # (and gets PoolClosed if it does).
            self.end_stream(stream, self._closed_error())

    def kill_now(self) -> None:
        """Last resort at interpreter exit: SIGKILL every worker and reap it."""
        for worker in list(self._unreaped):
            worker.signal(signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                worker.proc.wait(timeout=5)

    def _occupancy(self) -> tuple[int, int, int]:
        return len(self._ready), self._busy, self._handoff.queued

    @abstractmethod
    def _send_on_handoff(self, worker: WorkerHandle, waiting: WaitingCall) -> bool:
        """Send a waiting call's frame to the worker it is handed (``handoff.py``)."""

    @abstractmethod
    def _abandon_sent_call(self, worker: WorkerHandle) -> None:
        """A call sent on hand-off was cancelled before its task ran."""


def retry_delay(previous: float, start_timeout: float) -> float:
    """The wait before the next attempt to start a replacement, after ``previous``:
    doubled, up to ``MAX_RETRY`` and to a quarter of ``start_timeout`` (not below
    ``MIN_RETRY_CAP``). Bound by ``start_timeout``, the pool gives up about when it
    says it does, and heals soon after the cause of the failures is gone, however
    short ``start_timeout`` is; with the default (60 s), the waits reach 5 s."""
    return min(previous * 2, MAX_RETRY, max(start_timeout / 4, MIN_RETRY_CAP))


def report_suffix(report: str | None) -> str:
    """A fault handler's report, to end a log message."""
    return "" if report is None else f"; its fault handler's report:\n{report.rstrip()}"


@atexit.register
def _kill_leftover_workers() -> None:
    for pool in list(_live_pools):
        pool.kill_now()
