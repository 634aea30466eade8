"""A generator run by a thread pool's worker thread: its items handed to the
consumer, at most ``buffer`` ahead, and the generator closed in the thread that ran
it (``Executor.stream`` on a pool of kind thread; ``thread.py`` runs the threads).
"""

from __future__ import annotations

import collections
import contextvars
import logging
import threading
import time
from collections.abc import Callable
from types import CoroutineType, GeneratorType
from typing import TYPE_CHECKING, Any, Protocol

import anyio

from .._errors import CallAborted, PoolClosed
from .base import StreamSource

if TYPE_CHECKING:
    from .._call import Call

__all__ = ("Bridge", "ThreadStream", "current")

logger = logging.getLogger("offload")

#: the job a worker thread runs (``check_cancelled`` reads it)
current = threading.local()


class Bridge(Protocol):
    """How a worker thread runs a callback on the event loop's thread."""

    def call_soon_threadsafe(self, fn: Callable[[], None]) -> None: ...


class ThreadStream(StreamSource):
    """A generator running in a worker thread, its items handed to the consumer
    through a bounded deque.

    The thread asks the generator for an item only when the deque has room: it runs
    at most ``buffer`` items ahead of its consumer, and holds its thread (its slot)
    while it waits. Everything the two sides share is under ``lock``; the thread
    waits on ``room``, the consumer on an event the thread sets through the bridge.
    Closing sets ``closing``, which the thread sees between items: it then closes
    the generator itself, in its own thread, the one that ran it.
    """

    def __init__(
        self,
        call: Call,
        context: contextvars.Context,
        buffer: int,
        bridge: Bridge,
    ) -> None:
        self.call = call
        self.context = context
        self.buffer = buffer
        self.bridge = bridge
        self.lock = threading.Lock()
        self.room = threading.Condition(self.lock)
        self.items: collections.deque[Any] = collections.deque()
        self.started = False
        self.producing = False  # in the generator's body (or starting it)
        self.finished = False  # the thread is done with the generator
        self.closing = False
        self.abandoned = False  # for check_cancelled: its consumer has left
        self.aborted: PoolClosed | None = None  # by the pool's shutdown
        self.error: BaseException | None = None
        self.waiter: anyio.Event | None = None  # the consumer's, while it waits
        self.release: Callable[[ThreadStream], None] = _ignore

    # -- in the worker thread ---------------------------------------------------

    def run(self) -> None:
        with self.lock:
            if self.closing:  # its consumer left while it was queued: never start it
                self.finished = True
            else:
                self.started = self.producing = True
        if self.finished:
            self._wake()
            self.release(self)
            return
        current.job = self
        call = self.call
        begun = time.perf_counter()
        call.queue_wait = begun - call.started
        run = self.context.run
        iterator: Any = None
        try:
            iterator = run(_start, call)
            while True:
                with self.lock:
                    self.producing = False
                    while len(self.items) >= self.buffer and not self.closing:
                        self.room.wait()
                    if self.closing:
                        break
                    self.producing = True
                try:
                    item = run(next, iterator)
                except StopIteration:
                    break
                with self.lock:
                    self.items.append(item)
                    self._wake_locked()
                del item
        except BaseException as exc:
            self.error = exc
        finally:
            try:
                close = getattr(iterator, "close", None)
                if close is not None:
                    # Closed here, in the thread that ran it: its ``finally`` runs
                    # here too (a no-op for a generator that has finished).
                    run(close)
            except BaseException as exc:
                if self.error is None and not self.closing:
                    self.error = exc
                else:
                    logger.warning("closing %s raised", call.name, exc_info=True)
            del iterator
            current.job = None
            call.ran = time.perf_counter() - begun
        with self.lock:
            self.finished = True
            self.producing = False
            self._wake_locked()
        self.release(self)

    def _wake_locked(self) -> None:
        waiter, self.waiter = self.waiter, None
        if waiter is not None:
            self.bridge.call_soon_threadsafe(waiter.set)

    def _wake(self) -> None:
        with self.lock:
            self._wake_locked()

    # -- in the event loop's thread ---------------------------------------------

    async def get(self) -> Any:
        while True:
            with self.lock:
                if self.aborted is not None:
                    raise self.aborted
                if self.items:
                    item = self.items.popleft()
                    self.room.notify()
                    return item
                if self.finished:
                    error, self.error = self.error, None
                    if error is None:
                        raise StopAsyncIteration
                    try:
                        raise _as_raised(error, self.call)
                    finally:
                        del error
                self.waiter = waiter = anyio.Event()
            await waiter.wait()

    def close(self) -> bool:
        with self.lock:
            self.items.clear()
            if self.finished:
                return True
            self.closing = self.abandoned = True
            self.room.notify()
            return self.started and not self.producing

    async def wait_closed(self) -> None:
        while True:
            with self.lock:
                if self.finished:
                    return
                self.waiter = waiter = anyio.Event()
            await waiter.wait()

    def abort(self, error: PoolClosed) -> None:
        """Shutdown ran out of time: the consumer gets ``error``; the thread closes
        the generator between items."""
        with self.lock:
            self.aborted = error
            self.closing = self.abandoned = True
            self.room.notify()
            waiter, self.waiter = self.waiter, None
        if waiter is not None:
            waiter.set()


def _start(call: Call) -> Any:
    """The iterator of the call's generator (or of what else the function returned)."""
    result = call.target(*call.args, **call.kwargs)
    if type(result) is CoroutineType:
        result.close()
        raise TypeError(
            f"{call.name} returned a coroutine: offload runs blocking "
            "functions; await async functions directly"
        )
    return result if type(result) is GeneratorType else iter(result)


def _as_raised(error: BaseException, call: Call) -> BaseException:
    """What the consumer gets for ``error``: itself, unless it would end the program."""
    if isinstance(error, Exception):
        return error
    aborted = CallAborted(
        f"{call.name} raised {type(error).__qualname__}; it is not "
        "re-raised as such, which would end this program"
    )
    aborted.__cause__ = error
    return aborted


def _ignore(job: ThreadStream) -> None:
    pass
