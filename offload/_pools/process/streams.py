"""A stream's generator running on a worker process (``Executor.stream``).

The worker sends each item as an ITEM frame, at most ``buffer`` ahead of the
consumer: the parent gives it credit (MORE) as the consumer takes items, and the
worker, out of credit, waits for some. Its final frame is an ordinary answer: OK at
the generator's end, else the exception (or the item that could not be sent) at its
position. The worker then serves the next call::

    parent                                           worker
    call frame (with the buffer)              ──>
                                              <──    ITEM, ITEM, ... (while credit)
    MORE 1, as the consumer takes each item   ──>
                                              <──    OK / RAISED / BAD_RESULT ...

The logger levels, when they changed (a LOG frame, ``logs.py``), go before a MORE, as
before a call: the worker makes its next items under them.

Closing early: the parent sends CLOSE; the worker reads it between items, closes the
generator (its ``finally`` runs there) and answers OK; the parent, in the background,
discards the items still on their way and takes the worker back. A deadline that
passes, or a consumer cancelled, while it waits for an item kills the worker, which is
then inside the generator's body: its ``finally`` does not run. Items travel in the
frame, never as REMOTE buffers.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import anyio

from ..._errors import SerializationError
from ..base import StreamSource
from . import framing
from .call_encoding import outcome
from .framing import HEADER, LOG
from .remote_buffers import has_remote, inline_buffers
from .worker_handle import CHUNK, EXIT_STATUS_WAIT

if TYPE_CHECKING:
    from ..._call import Call
    from .buffers import Received
    from .framing import Remote
    from .pool import ProcessPool
    from .worker_handle import WorkerHandle

__all__ = ("ProcessStream",)

logger = logging.getLogger("offload")

_MORE_ONE = framing.encode((framing.MORE, 1))
_CLOSE = framing.encode((framing.CLOSE, None))
_NOT_FINAL = (framing.ITEM, framing.STARTED)


async def _recv_one(worker: WorkerHandle) -> tuple[Received, list[Received | Remote]]:
    """The worker's next frame, read exactly: several items may wait in the channel,
    where a call's answer is alone (``WorkerHandle.recv`` reads ahead). LOG frames
    go to the log sink on the way."""
    while True:
        header = memoryview(bytearray(HEADER.size))
        await _fill(worker, header)
        length, count = HEADER.unpack(header)
        if count != LOG:
            break
        record = memoryview(bytearray(length))
        await _fill(worker, record)
        if worker.log_sink is not None:
            worker.log_sink.handle(record, worker.call)
    parser = framing.parse_frame(header, HEADER.size)
    try:
        view = next(parser)
        while True:
            await _fill(worker, view)
            view = parser.send(len(view))
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]


async def _fill(worker: WorkerHandle, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = await worker._read_into(view[got:], min(len(view) - got, CHUNK))
        if not n:
            raise EOFError("the worker closed its channel")
        got += n


class ProcessStream(StreamSource):
    """The consumer's side of a stream whose frame was sent to ``worker``."""

    def __init__(self, pool: ProcessPool, worker: WorkerHandle, call: Call) -> None:
        self.pool = pool
        self.worker: WorkerHandle | None = worker
        self.call = call
        self.closed = anyio.Event()
        self.started = False  # the worker said STARTED: it will read a CLOSE

    async def get(self) -> Any:
        worker = self.worker
        if worker is None:
            raise StopAsyncIteration
        if self.pool._forced:  # shutdown gave up on the stream: its worker is killed
            self._kill("shut down")
            raise self.pool._closed_error()
        reply = await self._next_frame(worker)
        if reply[0] == framing.STARTED:
            self.started = True
            reply = await self._next_frame(worker)
        if reply[0] == framing.ITEM:
            try:
                # With the logger levels, if they changed: the generator's next items
                # are made under them.
                if unsent := worker.send_some(worker.with_levels(_MORE_ONE)):
                    await worker.send(unsent)
            except OSError:
                pass  # dead: the next read says how
            except BaseException:
                self._kill("cancelled")
                raise
            return reply[1]
        # The stream's last frame, after which the worker serves the next call; not
        # for a stream that never ran (its request failed: no STARTED).
        try:
            if self.started and (unsent := worker.send_some(_CLOSE)):
                await worker.send(unsent)
        except OSError:
            pass  # dead: its watcher sees to it
        except BaseException:
            self._kill("cancelled")
            raise
        self._take_back(worker)
        outcome(self.call, reply)  # raises the stream's error, if any
        raise StopAsyncIteration

    async def _next_frame(self, worker: WorkerHandle) -> Any:
        pool = self.pool
        try:
            data, received = await _recv_one(worker)
            if has_remote(received):
                raise ValueError("a stream's frame with REMOTE buffers")
            buffers = inline_buffers(received)
        except (EOFError, OSError, ValueError, anyio.ClosedResourceError) as exc:
            self.worker = None
            self.closed.set()
            if pool._forced:
                pool._unclaim(worker)
                raise pool._closed_error() from None
            raise await self._crash(worker, exc) from None
        except BaseException:
            # Cancelled, or the deadline passed, waiting for an item: the worker is
            # inside the generator's body, and cannot be reused.
            passed = anyio.current_time() >= self.call.deadline
            self._kill("deadline passed" if passed else "cancelled")
            raise
        try:
            return framing.decode(data, buffers)
        except Exception as exc:
            self._kill("an item could not be unpickled")
            raise SerializationError(
                f"an item of {self.call.name} cannot be unpickled: {exc}"
            ) from exc

    async def _crash(self, worker: WorkerHandle, exc: BaseException) -> BaseException:
        pool = self.pool
        try:
            if (
                isinstance(exc, (OSError, ValueError))
                and not isinstance(exc, ConnectionError)
                and worker.proc.poll() is None
            ):
                pool._stop_worker(worker, f"the channel to worker {worker.pid} failed ({exc})")
                return SerializationError(f"the stream of {self.call.name} failed: {exc}")
            with anyio.move_on_after(EXIT_STATUS_WAIT):
                await worker.exited.wait()
            crash = worker.crashed(f"running {self.call.name}", self.call.name)
            if not worker.exited.is_set():
                worker.crash_told = True
                pool._kill(worker)
            logger.error(
                "pool %r: worker %d %s while streaming %s",
                pool.name,
                worker.pid,
                worker.ending(crash.traceback),
                self.call.name,
            )
            return crash
        finally:
            pool._unclaim(worker)

    def _take_back(self, worker: WorkerHandle) -> None:
        self.worker = None
        self.pool._unclaim(worker)
        self.pool._release(worker)
        self.closed.set()

    def _kill(self, why: str) -> None:
        worker = self.worker
        if worker is None:
            return
        self.worker = None
        if not worker.exited.is_set():
            try:
                self.pool._kill_running(worker, why)
            except RuntimeError:  # the pool has stopped, its workers with it
                pass
        self.pool._unclaim(worker)
        self.closed.set()

    def close(self) -> bool:
        worker = self.worker
        if worker is None:
            return True
        if self.pool.stopping:
            self._kill("shut down")
            return True
        if self.started and not self._send_close(worker):
            return True
        self.pool._task_group.start_soon(self._drain, worker, name=f"offload-close-{worker.pid}")
        return True

    def _send_close(self, worker: WorkerHandle) -> bool:
        """Send CLOSE now; False if the worker could not take it (and was killed)."""
        try:
            unsent = worker.send_some(_CLOSE)
        except OSError:
            unsent = _CLOSE
        if unsent:  # a worker that does not read: no use waiting for it
            self._kill("closed")
            return False
        return True

    async def _drain(self, worker: WorkerHandle) -> None:
        """Read what the worker still sends until its final answer (it closed the
        generator), then take it back; within the stream's deadline, else kill it."""
        with anyio.CancelScope(deadline=self.call.deadline) as scope:
            try:
                while (status := (await self._next_frame(worker))[0]) in _NOT_FINAL:
                    if status == framing.STARTED:
                        self.started = True
                        if not self._send_close(worker):
                            return
            except Exception:
                return  # counted already, or the worker is gone
            else:
                if self.worker is not None:
                    self._take_back(worker)
                return
        if scope.cancelled_caught:
            self._kill("deadline passed while closing")

    async def wait_closed(self) -> None:
        await self.closed.wait()
