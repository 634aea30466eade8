"""First-come, first-served hand-off of free worker processes to waiting calls."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import anyio

from ..._errors import PoolOverloaded

__all__ = ("SlotQueue",)

S = TypeVar("S")


class _Waiter(Generic[S]):
    """A call waiting for a slot. On asyncio it waits on a bare future of the loop:
    under 64 callers every call waits, and an ``anyio.Event`` (a backend lookup and
    an ``asyncio.Event`` around a future) took ~8% of the parent's time per call."""

    __slots__ = ("error", "job", "signal", "slot", "started")

    def __init__(self, job: Any, loop: asyncio.AbstractEventLoop | None) -> None:
        self.signal: asyncio.Future[None] | anyio.Event = (
            anyio.Event() if loop is None else loop.create_future()
        )
        self.slot: S | None = None
        self.error: BaseException | None = None
        self.job = job
        self.started = False

    async def wait(self) -> None:
        signal = self.signal
        if isinstance(signal, anyio.Event):
            await signal.wait()
        else:
            await signal

    def wake(self) -> None:
        signal = self.signal
        if isinstance(signal, anyio.Event):
            signal.set()
        elif not signal.done():  # not if its caller was cancelled
            signal.set_result(None)


class SlotQueue(Generic[S]):
    """Free slots, and the calls waiting for one, in arrival order.

    At most ``max_pending`` calls wait; the next one gets :class:`PoolOverloaded`
    at once, so a burst of callers costs a bounded amount of memory.
    """

    def __init__(
        self,
        max_pending: int,
        pool_name: str,
        start: Callable[[S, Any], bool] | None = None,
        abandon: Callable[[S], None] | None = None,
    ) -> None:
        """``start(slot, job)``, if given, starts a waiting call's ``job`` on the slot
        it is handed, at once, rather than when the call's task next runs (a loop
        turn later, while the slot idles); it says whether it did. ``abandon(slot)``
        then deals with a slot whose job started for a call cancelled before it ran.
        """
        self._free: list[S] = []
        self._waiters: deque[_Waiter[S]] = deque()
        self._max_pending = max_pending
        self._pool_name = pool_name
        self._start = start
        self._abandon = abandon
        #: the running asyncio loop, set by the pool when it starts; None: use anyio
        self.loop: asyncio.AbstractEventLoop | None = None

    @property
    def queued(self) -> int:
        return len(self._waiters)

    @property
    def idle(self) -> int:
        return len(self._free)

    def take(self) -> S | None:
        """A free slot at once, or None: :meth:`get` without a coroutine."""
        # Most recently used first: its caches and pages are warm.
        return self._free.pop() if self._free else None

    def put(self, slot: S) -> None:
        """Hand ``slot`` to the longest-waiting call, or keep it for the next one."""
        if self._waiters:
            waiter = self._waiters.popleft()
            waiter.slot = slot
            if waiter.job is not None and self._start is not None:
                waiter.started = self._start(slot, waiter.job)
            waiter.wake()
        else:
            self._free.append(slot)

    def remove_idle(self, slot: S) -> bool:
        """Take ``slot`` out of the free list; ``False`` if it was not there."""
        try:
            self._free.remove(slot)
        except ValueError:
            return False
        return True

    def take_all_idle(self) -> list[S]:
        free, self._free = self._free, []
        return free

    def fail_waiters(self, error: BaseException) -> None:
        """Wake every waiting call with ``error``."""
        while self._waiters:
            waiter = self._waiters.popleft()
            waiter.error = error
            waiter.wake()

    async def get(self, job: Any = None) -> tuple[S, bool]:
        """A free slot, waiting in line for one if needed; and whether ``job`` was
        started on it already (see ``start``).

        :raises PoolOverloaded: if ``max_pending`` calls are already waiting
        """
        if self._free:
            return self._free.pop(), False  # as in take()
        if len(self._waiters) >= self._max_pending:
            raise PoolOverloaded(
                f"pool {self._pool_name!r} is full: every worker is busy and "
                f"{self._max_pending} calls are waiting (max_pending)"
            )
        waiter: _Waiter[S] = _Waiter(job, self.loop)
        self._waiters.append(waiter)
        try:
            await waiter.wait()
        except BaseException:
            if waiter.slot is None:
                if waiter.error is None:
                    self._waiters.remove(waiter)
            elif waiter.started:
                assert self._abandon is not None
                self._abandon(waiter.slot)
            else:
                # Handed a slot in the same instant we were cancelled: pass it on.
                self.put(waiter.slot)
            raise
        if waiter.error is not None:
            raise waiter.error
        assert waiter.slot is not None
        return waiter.slot, waiter.started
