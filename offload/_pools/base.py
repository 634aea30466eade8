"""The one interface every pool kind implements, and the call lifecycle they share.

A call's life is the same in every kind; only :meth:`Pool._execute` differs::

    run(call) ── closed? ──> PoolClosed
        │
        ├─ CancelScope(deadline), if there is one ─────────────┐
        │     _execute(call): wait for a slot, run, hand back  │ deadline passed ─> OffloadTimeout
        └─ counters, latency and phases ───────────────────────┘

    aclose(drain) ── drain timed out ──> _abort(): every call in flight ─> PoolClosed

``_execute`` must leave the pool sound whenever it is cancelled: a process pool
kills the worker that was running the call, a thread pool abandons the thread.

A pool belongs to the process that made it. A fork copies the pool's objects into the
child, but not its threads, nor its workers, which stay the parent's: in the child
every pool made before the fork refuses calls (:class:`PoolClosed`, naming the fork)
and closing it stops nothing. The child starts pools of its own.
"""

from __future__ import annotations

import logging
import math
import os
import time
import weakref
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar

import anyio

from .._errors import (
    OffloadError,
    OffloadTimeout,
    PoolClosed,
    PoolOverloaded,
    PoolStartError,
    WorkerCrashed,
)
from .._stats import Counters, PoolStats

if TYPE_CHECKING:
    from anyio.abc import TaskGroup

    from .._call import Call
    from .._settings import Kind, PoolSettings

__all__ = ("Pool", "StreamSource")

logger = logging.getLogger("offload")

# Every pool made in this process, for the fork handler below.
_pools: weakref.WeakSet[Pool] = weakref.WeakSet()


class StreamSource(ABC):
    """One generator running on a worker, as its consumer sees it (``open_stream``)."""

    call: Call
    #: counted as over (``Pool.end_stream``)
    ended: bool = False

    @abstractmethod
    async def get(self) -> Any:
        """The next item, once produced; the generator's exception raised at its
        position; :class:`StopAsyncIteration` at its end. Cancellation-safe: an item
        is taken only by a call that returns it."""

    @abstractmethod
    def close(self) -> bool:
        """Stop the generator, without waiting: it is closed in its worker (its
        ``finally`` runs there) as soon as it is suspended at a ``yield``. Whether it is
        suspended now, so that :meth:`wait_closed` will not wait for the rest of an
        item's computation."""

    @abstractmethod
    async def wait_closed(self) -> None:
        """Return once the generator is closed (or finished) in its worker."""


class Pool(ABC):
    """A set of workers of one kind that runs calls under deadlines."""

    kind: ClassVar[Kind]
    #: how the pool knows a call's transfer (``Counters.record``): True, what is left
    #: of its latency past queue wait and run; False, it has none; None, unknown
    transfer: ClassVar[bool | None] = None
    #: whether its calls carry the caller's chosen context (``Call.context``): a
    #: worker process's; a thread sees the caller's whole context without it
    carries_context: ClassVar[bool] = True

    def __init__(self, name: str, settings: PoolSettings, task_group: TaskGroup) -> None:
        self.name = name
        self.settings = settings
        self.max_workers = settings.resolved_max_workers(self.kind)
        self.counters = Counters()
        # Background work (replacing a killed worker, say) runs here, never in a caller.
        self._task_group = task_group
        self._inflight = 0  # calls between run() and their outcome
        self._closing = False
        self._forced = False
        self._drained: anyio.Event | None = None
        self._owner = os.getpid()
        self._inherited = False  # this process was forked from the pool's owner
        self._not_here: str | None = None  # why it may not start here (in a worker)
        _pools.add(self)
        # Set by start_on_first_use(): the first call starts the workers.
        self._first_start: anyio.Event | None = None
        self._start_pending = False
        self._start_error: Exception | None = None

    @property
    def closing(self) -> bool:
        return self._closing

    @classmethod  # noqa: B027 (an optional hook)
    def prepare(cls) -> None:
        """Once per process before a pool of this kind starts, in a thread: the slow,
        one-off setup that must not hold the event loop. (The thread kind needs none.)"""

    @abstractmethod
    async def start(self) -> None:
        """Start the workers; return once they can take calls."""

    @abstractmethod
    async def _execute(self, call: Call) -> Any:
        """Run ``call`` on a worker, waiting in line for one; cancellation-safe."""

    @abstractmethod
    async def _stop(self) -> None:
        """Stop every worker; nothing of the pool may outlive this."""

    @abstractmethod
    def _occupancy(self) -> tuple[int, int, int]:
        """``(workers, busy, queued)`` right now."""

    def stats(self) -> PoolStats:
        workers, busy, queued = self._occupancy()
        return self.counters.snapshot(
            name=self.name, kind=self.kind, workers=workers, busy=busy, queued=queued
        )

    def start_on_first_use(self) -> None:
        """Instead of :meth:`start` now: the first :meth:`run` starts the workers
        (in the background task group, so a cancelled caller cannot leave it half
        started); calls wait for it, under their deadlines. If that start fails,
        every call raises :class:`~offload.PoolStartError` from its error."""
        self._start_pending = True

    async def _start_once(self) -> None:
        if self._first_start is None:
            self._first_start = done = anyio.Event()
            logger.info("pool %r: starting at its first call", self.name)

            async def start() -> None:
                try:
                    await self.start()
                    self._start_pending = False
                except Exception as exc:
                    # For good, as a warm start's failure fails the Offloader: a
                    # second start() over the first one's remains could leak them.
                    self._start_error = exc
                finally:
                    done.set()

            self._task_group.start_soon(start, name=f"offload-start-{self.name}")
        await self._first_start.wait()
        if self._start_error is not None:
            # A new error each time: raising the one instance again and again would
            # grow its traceback with every call.
            raise PoolStartError(
                f"pool {self.name!r} could not start at its first call: {self._start_error}"
            ) from self._start_error

    async def run(self, call: Call) -> Any:
        """Run ``call`` and return its result, under its deadline.

        :raises OffloadTimeout: the deadline passed; the work was stopped
        :raises PoolClosed: the pool is closing, or was forced shut during the call
        :raises PoolOverloaded: every worker is busy and the queue is full
        :raises PoolStartError: the pool has had no worker for ``start_timeout`` seconds,
            may not start its workers here (see ``process/nested_pools.py``), or starts on
            first use and could not start (its cause: the error a warm start would
            have raised)
        :raises WorkerCrashed: the worker died while running the call
        """
        counters = self.counters
        if self._closing:
            counters.closed += 1
            raise self._refusal()
        call.started = started = time.perf_counter()
        self._inflight += 1
        try:
            if call.deadline == math.inf:
                # No scope without a deadline: it costs more than a round trip's
                # worth of bookkeeping, and shutdown reaches calls through _abort.
                if self._start_pending:
                    await self._start_once()
                result = await self._execute(call)
            else:
                with anyio.CancelScope(deadline=call.deadline) as scope:
                    if self._start_pending:
                        await self._start_once()
                    result = await self._execute(call)
                if scope.cancelled_caught:
                    counters.timed_out += 1
                    raise OffloadTimeout(f"{call.name} did not finish within {call.timeout:g} s")
        except OffloadTimeout:
            raise
        except anyio.get_cancelled_exc_class():
            counters.cancelled += 1
            raise
        except WorkerCrashed:
            counters.crashed += 1
            raise
        except (PoolOverloaded, PoolStartError):  # refused: it never ran
            counters.rejected += 1
            raise
        except PoolClosed:
            counters.closed += 1
            raise
        except BaseException:
            counters.failed += 1
            raise
        finally:
            self._inflight -= 1
            counters.record(call, time.perf_counter() - started, self.transfer)
            if self._drained is not None and not self._inflight:
                self._drained.set()
        counters.completed += 1
        return result

    async def open_stream(self, call: Call, buffer: int) -> StreamSource:
        """Start running the generator function of ``call`` on a worker (waiting in
        line for one), its items handed over as produced, at most ``buffer`` ahead
        of the consumer. The stream counts as a call in flight until
        :meth:`end_stream`.

        :raises PoolClosed: the pool is closing
        """
        if self._closing:
            self.counters.closed += 1
            raise self._refusal()
        call.started = time.perf_counter()
        if self._start_pending:
            await self._start_once()
        self._inflight += 1
        try:
            return await self._open_stream(call, buffer)
        except BaseException as exc:
            self._inflight -= 1
            self.counters.record(call, time.perf_counter() - call.started, self.transfer)
            if isinstance(exc, (PoolOverloaded, PoolStartError)):
                self.counters.rejected += 1
            if self._drained is not None and not self._inflight:
                self._drained.set()
            raise

    @abstractmethod
    async def _open_stream(self, call: Call, buffer: int) -> StreamSource:
        """Start the stream of :meth:`open_stream` on a worker; cancellation-safe."""

    def end_stream(self, source: StreamSource, error: BaseException | None) -> None:
        """A stream from :meth:`open_stream` is over: ``error``, how it ended (None:
        its generator finished, or its consumer left early). Once per stream: its
        consumer and the pool's shutdown may both end it."""
        if source.ended:
            return
        source.ended = True
        call = source.call
        counters = self.counters
        if error is None:
            counters.completed += 1
        elif isinstance(error, OffloadTimeout):
            counters.timed_out += 1
        elif isinstance(error, anyio.get_cancelled_exc_class()):
            counters.cancelled += 1
        elif isinstance(error, WorkerCrashed):
            counters.crashed += 1
        elif isinstance(error, PoolClosed):
            counters.closed += 1
        else:
            counters.failed += 1
        self._inflight -= 1
        counters.record(call, time.perf_counter() - call.started, self.transfer)
        if self._drained is not None and not self._inflight:
            self._drained.set()

    @abstractmethod
    def _abort(self) -> None:
        """Shutdown ran out of time: end every call in flight with :class:`PoolClosed`
        (queued calls too), at once."""

    def _refusal(self) -> OffloadError:
        if self._not_here is not None:
            return PoolStartError(self._not_here)
        if self._inherited:
            return PoolClosed(
                f"pool {self.name!r} belongs to process {self._owner}, from which this "
                "process was forked: start an Offloader in this process"
            )
        return PoolClosed(f"pool {self.name!r} is closed")

    def _after_fork(self) -> None:
        """In a child just forked: the pool is the parent's; refuse calls from now on."""
        self._inherited = True
        self._closing = True
        self._forget()

    def _refuse_to_start(self, reason: str) -> None:
        """Start without workers: every call gets :class:`PoolStartError` for ``reason``."""
        logger.error("%s", reason)
        self._not_here = reason
        self._closing = True

    def _forget(self) -> None:  # noqa: B027 (an optional hook)
        """In a child just forked: drop what the pool holds of the parent's workers,
        without signalling or waiting for them. (Threads do not survive a fork.)"""

    def _closed_error(self) -> PoolClosed:
        return PoolClosed(f"pool {self.name!r} was shut down before the call finished")

    async def aclose(self, drain_timeout: float) -> None:
        """Refuse new calls, let calls in flight finish for ``drain_timeout`` seconds,
        then end the rest (they get :class:`PoolClosed`) and stop the workers.
        In a process forked from the pool's owner, nothing: the workers are not ours."""
        if self._inherited:
            return
        self._closing = True
        self._drained = anyio.Event()
        if self._inflight:
            with anyio.move_on_after(drain_timeout):
                await self._drained.wait()
        if self._inflight:
            logger.warning(
                "pool %r: %d calls still running after %g s; ending them",
                self.name,
                self._inflight,
                drain_timeout,
            )
            self._forced = True
            self._abort()
            # The callers unwind at their next checkpoint.
            with anyio.move_on_after(5):
                await self._drained.wait()
        if self._first_start is not None:
            # A start on first use still under way would add workers after _stop.
            await self._first_start.wait()
        await self._stop()


def _after_fork_in_child() -> None:
    for pool in list(_pools):
        pool._after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
