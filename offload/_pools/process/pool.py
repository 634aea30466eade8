"""The process pool: supervised worker processes, one socket each.

::

    caller task ──encode──> SlotQueue.get() ──> WorkerHandle.send ──┐
        ^                                                      │ socketpair
        └── decode <── WorkerHandle.recv <──────────────────────────┘ worker: worker.py
    watcher task (one per worker): pidfd readable ─> exited ─> replacement

Unlike ``ProcessPoolExecutor`` and loky, the parent knows which call each worker
runs, because a worker takes one call at a time from the task that holds it. So:

- a call past its deadline, or cancelled, kills only its own worker (SIGTERM, then
  SIGKILL after a grace period) and a replacement starts in the background;
- a worker that dies fails only the call it was running (:class:`WorkerCrashed`);
- the caller's task does the socket I/O itself, waiting on the event loop, so a
  round trip costs no thread hop.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import functools
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import weakref
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
import anyio.lowlevel

from ..._errors import (
    OffloadError,
    PoolClosed,
    PoolStartError,
    RemoteTraceback,
    WorkerCrashed,
    describe_exit,
)
from ..._helper_threads import run_in_helper_thread
from ..._where import in_worker_process
from ..base import Pool
from . import cma, wire
from .codec import decode_reply, encode_request
from .handle import WorkerHandle, quiet_channel
from .nesting import refusal
from .sched import start_below
from .slots import SlotQueue
from .spawner import spawner, wait_future
from .worker import EXIT_OUT_OF_MEMORY

if TYPE_CHECKING:
    from anyio.abc import TaskGroup

    from ..._call import Call
    from ..._settings import PoolSettings

__all__ = ("ProcessPool",)

logger = logging.getLogger("offload")

# The parent's sys.path, from the command line, is the worker's before it imports
# anything: ``-c`` puts the current directory first on the path, where a
# ``socket.py`` would run in every worker (and offload itself may be importable only
# from a directory of the parent's path). ``sys`` is built in: importing it reads no
# directory.
_BOOT = (
    "import sys; sys.path[:] = sys.argv[4:]; from offload._pools.process.worker import main; main()"
)


def _worker_command(*args: str) -> list[str]:
    """The command line of a worker: this interpreter with the options it runs with
    (``-E``, ``-s``, ``-O``, ``-X ...``, as multiprocessing passes them on), the boot,
    ``args``, then the parent's ``sys.path``."""
    # Private, but what multiprocessing's spawn uses for the same purpose.
    flags: Callable[[], list[str]] = getattr(subprocess, "_args_from_interpreter_flags", list)
    return [sys.executable, *flags(), "-c", _BOOT, *args, *sys.path]


def _start_worker(
    args: list[str], fds: tuple[int, ...], settings: PoolSettings
) -> subprocess.Popen[bytes]:
    """Start a worker process, below the event loop from its start (``sched.py``).

    In a session of its own, so that the programs its calls start share its process
    group, and end with it (:meth:`WorkerHandle.end_group`).
    """
    return start_below(
        args, settings, pass_fds=fds, stdin=subprocess.DEVNULL, start_new_session=True
    )


#: seconds between SIGTERM and SIGKILL for a worker being stopped
KILL_GRACE = 1.0
#: seconds a caller waits for a dead worker's exit status before reporting without it
EXIT_STATUS_WAIT = 2.0
#: seconds of unpickling a result on the event loop past which the call is counted
#: (``PoolStats.slow_decodes``) and named in a warning: a stall the lag probe, which
#: wakes every 100 ms by default, sees every other time
SLOW_DECODE = 0.05
#: seconds between two such warnings of a pool, at least
SLOW_DECODE_LOG_EVERY = 60.0

_live_pools: weakref.WeakSet[ProcessPool] = weakref.WeakSet()

T = TypeVar("T")


class ProcessPool(Pool):
    kind = "process"

    def __init__(self, name: str, settings: PoolSettings, task_group: TaskGroup) -> None:
        super().__init__(name, settings, task_group)
        self._slots: SlotQueue[WorkerHandle] = SlotQueue(
            settings.max_pending, name, self._start_job, self._abandon_job
        )
        self._ready: set[WorkerHandle] = set()  # started, not retired: the pool's capacity
        self._procs: set[WorkerHandle] = set()  # every process not yet reaped
        self._busy = 0
        # While the pool has no worker and cannot start one (see _replace): the latest
        # start error, since when, and whether start_timeout has passed since.
        self._start_failure: Exception | None = None
        self._failing_since: float | None = None
        self._given_up = False
        # Set once the workers are being stopped. Not ``_closing``: while the pool
        # drains, its queued calls still need workers, new ones included.
        self._stopping = False
        self._death_r = -1
        self._death_w = -1
        self._cross_memory = settings.cross_memory and cma.available()
        self._quiet_until = 0.0  # no warning about slow results before then

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
        cma.available()  # cached: reads /proc

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
        self._slots.loop = self._loop
        self._death_r, self._death_w = os.pipe()
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
        parent, child = socket.socketpair()
        args = _worker_command(str(child.fileno()), str(self._death_r), str(os.getpid()))
        try:
            # On the spawner thread (see spawner.py); waited for even when
            # cancelled, so that a started process always reaches the pool.
            future = spawner().submit(
                _start_worker, args, (child.fileno(), self._death_r), self.settings
            )
            proc = await wait_future(future)
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()
        parent = quiet_channel(parent)
        parent.setblocking(False)
        worker = WorkerHandle(proc, parent, self._loop)
        self._procs.add(worker)
        self._task_group.start_soon(self._watch, worker, name=f"offload-watch-{worker.pid}")
        return worker

    async def _add_worker(self) -> None:
        """Start one worker and, once it says it is ready, offer it to callers."""
        worker = await self._spawn()
        start_timeout = self.settings.start_timeout
        try:
            with anyio.fail_after(start_timeout):
                settings = self.settings
                boot = (
                    settings.max_payload,
                    self._cross_memory,
                    settings.hard_memory_limit,
                    settings.initializer,
                    settings.initializer_args,
                )
                await worker.send(wire.encode(boot))
                data, received = await worker.recv()
                status, value = wire.decode(data, wire.local(received))
        except BaseException as exc:
            self._kill(worker)
            if isinstance(exc, TimeoutError):
                raise PoolStartError(
                    f"a worker of pool {self.name!r} did not start within "
                    f"{start_timeout:g} s (start_timeout)"
                ) from exc
            if isinstance(exc, (EOFError, OSError)):
                with anyio.move_on_after(EXIT_STATUS_WAIT, shield=True):
                    await worker.exited.wait()
                raise PoolStartError(
                    f"a worker of pool {self.name!r} failed to start "
                    f"({describe_exit(worker.returncode)})"
                ) from exc
            raise
        if status != wire.OK:
            self._kill(worker)
            type_name, message, tb = value
            raise PoolStartError(
                f"the initializer of pool {self.name!r} raised {type_name}: {message}"
            ) from RemoteTraceback(tb)
        if self._cross_memory and not cma.readable(worker.pid, value[1]):
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
        self._slots.put(worker)

    async def _replace(self) -> None:
        """Start a worker in place of one that is gone, backing off while that fails.

        While the pool has no worker and cannot start one, calls wait in the queue as
        usual (bounded by ``max_pending`` and their own deadlines) and the starts go on.
        Once it has been so for ``start_timeout`` seconds, the waiting calls fail with
        :class:`PoolStartError` (from the start error), and new calls fail at once,
        until a start succeeds: a call without a deadline does not wait for ever.
        """
        delay = 0.1
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
                        self._slots.fail_waiters(self._no_worker_error())
            else:
                self._start_failure = self._failing_since = None
                self._given_up = False
                return
            await anyio.sleep(delay)
            delay = min(delay * 2, 5.0)

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
        self._procs.discard(worker)
        worker.exited.set()
        if not worker.held:
            worker.close()  # else the caller holding it closes it, once done reading
        else:
            # Its end of the channel may outlive it, in a process it forked: the
            # caller reads what it wrote, then EOF, rather than wait for that process.
            with contextlib.suppress(OSError):
                worker.sock.shutdown(socket.SHUT_RD)
        unexpected = worker in self._ready
        self._ready.discard(worker)
        self._slots.remove_idle(worker)
        if worker.returncode == EXIT_OUT_OF_MEMORY:
            logger.info(
                "pool %r: worker %d left after a call ran out of its hard_memory_limit",
                self.name,
                worker.pid,
            )
        elif unexpected and worker.call is None:  # a crash mid-call is logged by its caller
            logger.warning(
                "pool %r: idle worker %d %s",
                self.name,
                worker.pid,
                describe_exit(worker.returncode),
            )
        else:
            logger.debug(
                "pool %r: worker %d %s", self.name, worker.pid, describe_exit(worker.returncode)
            )
        if worker.ready and not (worker.retiring or worker.successor or self._stopping):
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
        self._slots.fail_waiters(PoolClosed(f"pool {self.name!r} is closed"))
        for worker in self._slots.take_all_idle():
            self._retire(worker)
        for worker in list(self._procs):
            if not worker.retiring:  # busy, or still starting: no reason to wait
                self._kill(worker)
        if self._death_w >= 0:
            os.close(self._death_w)  # any worker left exits on its own now
            os.close(self._death_r)
            self._death_w = self._death_r = -1
        # Poll rather than wait for the watchers: at the end of asyncio.run they
        # may already have been cancelled, natively, shield or not.
        with anyio.CancelScope(shield=True):
            with anyio.move_on_after(KILL_GRACE * 3):
                while any(w.proc.poll() is None for w in self._procs):  # noqa: ASYNC110
                    await anyio.sleep(0.005)
            for worker in list(self._procs):
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
        fds = [self._death_r, self._death_w]
        for worker in self._procs:
            worker.sock.close()  # not worker.close(): the event loop is the parent's
            fds.append(-1 if worker.pidfd is None else worker.pidfd)
            worker.pidfd = None
        for fd in fds:
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._procs.clear()
        self._ready.clear()
        self._slots.take_all_idle()
        self._death_r = self._death_w = -1

    def _abort(self) -> None:
        self._stopping = True
        self._slots.fail_waiters(self._closed_error())
        for worker in list(self._ready):
            if worker.held:
                self._kill(worker)

    def _worn_out(self, worker: WorkerHandle) -> bool:
        """Whether ``worker`` is due for replacement after its latest call."""
        settings = self.settings
        limit = settings.max_tasks_per_worker
        if limit is not None and worker.calls >= limit:
            logger.info("pool %r: recycling worker %d after %d calls", self.name, worker.pid, limit)
            return True
        memory = settings.max_memory_per_worker
        if memory is not None and (rss := worker.rss()) > memory:
            logger.info(
                "pool %r: recycling worker %d: %d bytes resident, limit %d",
                self.name,
                worker.pid,
                rss,
                memory,
            )
            return True
        return False

    def kill_now(self) -> None:
        """Last resort at interpreter exit: SIGKILL every worker and reap it."""
        for worker in list(self._procs):
            worker.signal(signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                worker.proc.wait(timeout=5)

    # -- calls -----------------------------------------------------------------

    def _occupancy(self) -> tuple[int, int, int]:
        return len(self._ready), self._busy, self._slots.queued

    async def _execute(self, call: Call) -> Any:
        if self._not_here is not None:
            # Refused to start after run() looked (a pool started by its first call):
            # with no worker to come, the call would wait for ever.
            raise self._refusal()
        request = encode_request(call, self.settings.max_payload, self._cross_memory)
        job = None
        if not self._slots.idle and not request.remote and request.size <= wire.SCRATCH:
            job = _Job(call, request)  # it will wait: whoever frees a worker may send it
        while True:
            if self._forced:
                raise self._closed_error()
            if self._given_up and not self._ready:
                raise self._no_worker_error()
            worker = self._slots.take()
            started = False
            if worker is None:
                worker, started = await self._slots.get(job)
            if not started:
                if worker.exited.is_set():
                    # Handed over, then seen dead (and its channel closed) before this
                    # task ran: the call never reached it, so it waits for another.
                    continue
                self._claim(worker, call)
            try:
                try:
                    if not started:
                        if unsent := worker.send_some(request):
                            await worker.send(unsent)
                    elif job is not None and job.unsent:
                        await worker.send(job.unsent)
                except (BrokenPipeError, ConnectionResetError):
                    # It died while idle (its end of the channel is closed), before
                    # reading this call, and its watcher has not run yet: try another.
                    continue
                if request.remote:
                    data, buffers = await self._exchange(worker, request)
                else:
                    data, received = await worker.recv()
                    if wire.has_remote(received):
                        data, buffers = await self._fetch(worker, data, received)
                    else:
                        buffers = wire.local(received)
            except (EOFError, OSError, ValueError, anyio.ClosedResourceError) as exc:
                if self._forced:  # killed by _abort
                    raise self._closed_error() from None
                if (
                    isinstance(exc, (OSError, ValueError))
                    and not isinstance(exc, ConnectionError)
                    and worker in self._ready
                    and worker.proc.poll() is None
                ):
                    # The channel failed (or carried a frame that makes no sense), not
                    # the worker, which may hold half a frame: it goes, and only this
                    # call fails.
                    logger.error(
                        "pool %r: the channel to worker %d failed while running %s (%s): "
                        "stopping it",
                        self.name,
                        worker.pid,
                        call.name,
                        exc,
                    )
                    self._kill(worker)
                    raise OffloadError(
                        f"the channel to worker {worker.pid} failed while running "
                        f"{call.name}: {exc}"
                    ) from exc
                with anyio.move_on_after(EXIT_STATUS_WAIT):
                    await worker.exited.wait()
                logger.error(
                    "pool %r: worker %d %s while running %s",
                    self.name,
                    worker.pid,
                    describe_exit(worker.returncode),
                    call.name,
                )
                raise WorkerCrashed(
                    f"the worker process {worker.pid} running {call.name} "
                    f"{describe_exit(worker.returncode)}",
                    pid=worker.pid,
                    exitcode=worker.returncode,
                ) from None
            except BaseException:
                # Cancelled mid-call (deadline, caller, shutdown): the worker is
                # somewhere in the call, so it cannot be reused.
                logger.info(
                    "pool %r: killing worker %d running %s (%s)",
                    self.name,
                    worker.pid,
                    call.name,
                    "deadline passed" if anyio.current_time() >= call.deadline else "cancelled",
                )
                self._kill(worker)
                raise
            finally:
                self._unclaim(worker)
            self._release(worker)
            if buffers and wire.big((data, *buffers)):
                # A large ``bytes`` is one copy, made by os.pread in a thread
                # without the GIL; arrays are views on the received buffers.
                return await run_in_helper_thread(decode_reply, call, data, buffers)
            # On the loop: a thread would not help, unpickling Python objects holds
            # the GIL. A result that takes long to decode is counted and named.
            decoding = time.perf_counter()
            try:
                return decode_reply(call, data, buffers)
            finally:
                held = time.perf_counter() - decoding
                if held >= SLOW_DECODE:
                    self._held_loop(call, held)

    def _held_loop(self, call: Call, held: float) -> None:
        self.counters.slow_decodes += 1
        now = time.monotonic()
        if now < self._quiet_until:
            return
        self._quiet_until = now + SLOW_DECODE_LOG_EVERY
        logger.warning(
            "pool %r: decoding the result of %s held the event loop for %.0f ms (%d such "
            "results so far): unpickling Python objects holds the GIL; return arrays, bytes "
            "or Arrow data instead (docs: troubleshooting, large arguments and results)",
            self.name,
            call.name,
            held * 1000,
            self.counters.slow_decodes,
        )

    def _claim(self, worker: WorkerHandle, call: Call) -> None:
        worker.held = True
        worker.call = call
        self._busy += 1

    def _unclaim(self, worker: WorkerHandle) -> None:
        self._busy -= 1
        worker.held = False
        worker.call = None
        if worker.exited.is_set():
            worker.close()

    def _start_job(self, worker: WorkerHandle, job: _Job) -> bool:
        """Send a waiting call's frame to the worker it is handed, now: its caller's
        task runs a loop turn later, and the worker would idle until then (64 callers,
        2 workers, no-op: 10.3k -> 13.6k calls/s here). Whether the call is on its way."""
        try:
            job.unsent = worker.send_some(job.request)
        except OSError:  # BrokenPipeError (dead): the caller will see
            return False
        self._claim(worker, job.call)
        return True

    def _abandon_job(self, worker: WorkerHandle) -> None:
        """The call started by :meth:`_start_job` was cancelled before its task ran."""
        logger.info(
            "pool %r: killing worker %d running %s (cancelled)",
            self.name,
            worker.pid,
            worker.call.name if worker.call is not None else "a call",
        )
        self._kill(worker)
        self._unclaim(worker)

    async def _exchange(
        self, worker: WorkerHandle, request: wire.Frame
    ) -> tuple[wire.Received, list[wire.Received]]:
        """The rest of a call with REMOTE arguments once its frame is sent: they are
        written, and its answer read, REMOTE buffers included (see ``wire.py``)."""
        data, received = await worker.recv()
        status, addresses = wire.decode(data, wire.local(received))
        if status != wire.WRITE_TO:  # a channel out of step: fails as a channel error
            raise ValueError(f"expected WRITE_TO from worker {worker.pid}, got {status}")
        await self._copy(
            worker, functools.partial(wire.deliver, worker.pid, request.remote, addresses)
        )
        await worker.send(wire.GO_AHEAD)
        data, received = await worker.recv()
        if not wire.has_remote(received):
            return data, wire.local(received)
        return await self._fetch(worker, data, received)

    async def _fetch(
        self,
        worker: WorkerHandle,
        data: wire.Received,
        received: list[wire.Received | wire.Remote],
    ) -> tuple[wire.Received, list[wire.Received]]:
        """An answer's REMOTE buffers, read out of the worker's memory."""
        buffers = await self._copy(worker, functools.partial(wire.fetch, worker.pid, received))
        await worker.send(wire.GO_AHEAD)
        return data, buffers

    async def _copy(self, worker: WorkerHandle, copy: Callable[[], T]) -> T:
        """Run a copy between memories (~15 ms per 64 MiB, without the GIL) in a thread.

        :raises OSError: the copy failed; the worker, if still there, waits for a
            go-ahead that will not come: it is stopped, and the call fails as a crash
        """
        try:
            return await run_in_helper_thread(copy)
        except OSError as exc:
            if worker.proc.poll() is None:
                logger.error(
                    "pool %r: copying buffers to or from worker %d failed (%s): stopping it",
                    self.name,
                    worker.pid,
                    exc,
                )
                self._kill(worker)
            raise

    def _release(self, worker: WorkerHandle) -> None:
        if worker not in self._ready:
            return  # died or was stopped while the caller read its answer
        worker.calls += 1
        if self._worn_out(worker):
            # The limits hold while the pool drains too; a replacement then starts
            # only for calls still waiting.
            self.counters.recycled += 1
            self._retire(worker)
            if not worker.successor and (not self._closing or self._slots.queued):
                self._task_group.start_soon(self._replace)
        else:
            limit = self.settings.max_tasks_per_worker
            if limit is not None and worker.calls == limit - 1 and not self._closing:
                # One call to go: start its successor now, so that it is ready
                # (or nearly) when this one retires, and capacity has no gap.
                worker.successor = True
                self._task_group.start_soon(self._replace)
            self._slots.put(worker)


class _Job:
    """A waiting call, for :meth:`ProcessPool._start_job`."""

    __slots__ = ("call", "request", "unsent")

    def __init__(self, call: Call, request: wire.Frame) -> None:
        self.call = call
        self.request = request
        self.unsent: Sequence[wire.Buffer] = ()


@atexit.register
def _kill_leftover_workers() -> None:
    for pool in list(_live_pools):
        pool.kill_now()
