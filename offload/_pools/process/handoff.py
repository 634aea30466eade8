"""First-come, first-served hand-off of free worker processes to waiting calls."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import anyio

from ..._errors import PoolOverloaded

__all__ = ("Handoff",)

W = TypeVar("W")


class _Waiter(Generic[W]):
    """A call waiting for a worker. On asyncio it waits on a bare future of the loop:
    under 64 callers every call waits, and an ``anyio.Event`` (a backend lookup and
    an ``asyncio.Event`` around a future) took ~8% of the parent's time per call."""

    __slots__ = ("error", "sent_early", "signal", "waiting", "worker")

    def __init__(self, waiting: Any, loop: asyncio.AbstractEventLoop | None) -> None:
        self.signal: asyncio.Future[None] | anyio.Event = (
            anyio.Event() if loop is None else loop.create_future()
        )
        self.worker: W | None = None
        self.error: BaseException | None = None
        self.waiting = waiting
        self.sent_early = False

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


class Handoff(Generic[W]):
    """Free workers, and the calls waiting for one, in arrival order.

    At most ``max_pending`` calls wait; the next one gets :class:`PoolOverloaded`
    at once, so a burst of callers costs a bounded amount of memory.
    """

    def __init__(
        self,
        max_pending: int,
        pool_name: str,
        send_early: Callable[[W, Any], bool] | None = None,
        abandon: Callable[[W], None] | None = None,
    ) -> None:
        """``send_early(worker, waiting)``, if given, sends a waiting call (what the
        call passed to :meth:`get`) to the worker it is handed, at once, rather than
        when the call's task next runs (a loop turn later, while the worker idles); it
        says whether it did. ``abandon(worker)`` then deals with a worker sent a call
        whose caller was cancelled before its task ran.
        """
        self._free: list[W] = []
        self._waiters: deque[_Waiter[W]] = deque()
        self._max_pending = max_pending
        self._pool_name = pool_name
        self._send_early = send_early
        self._abandon = abandon
        #: the running asyncio loop, set by the pool when it starts; None: use anyio
        self.loop: asyncio.AbstractEventLoop | None = None

    @property
    def queued(self) -> int:
        return len(self._waiters)

    @property
    def idle(self) -> int:
        return len(self._free)

    def take(self) -> W | None:
        """A free worker at once, or None: :meth:`get` without a coroutine."""
        # Most recently used first: its caches and pages are warm.
        return self._free.pop() if self._free else None

    def put(self, worker: W) -> None:
        """Hand ``worker`` to the longest-waiting call, or keep it for the next one."""
        if self._waiters:
            waiter = self._waiters.popleft()
            waiter.worker = worker
            if waiter.waiting is not None and self._send_early is not None:
                waiter.sent_early = self._send_early(worker, waiter.waiting)
            waiter.wake()
        else:
            self._free.append(worker)

    def remove_idle(self, worker: W) -> bool:
        """Take ``worker`` out of the free list; ``False`` if it was not there."""
        try:
            self._free.remove(worker)
        except ValueError:
            return False
        return True

    def take_all_idle(self) -> list[W]:
        free, self._free = self._free, []
        return free

    def fail_waiters(self, error: BaseException) -> None:
        """Wake every waiting call with ``error``."""
        while self._waiters:
            waiter = self._waiters.popleft()
            waiter.error = error
            waiter.wake()

    async def get(self, waiting: Any = None) -> tuple[W, bool]:
        """A free worker, waiting in line for one if needed; and whether ``waiting``
        was sent to it already (see ``send_early``).

        :raises PoolOverloaded: if ``max_pending`` calls are already waiting
        """
        if self._free:
            return self._free.pop(), False  # as in take()
        if len(self._waiters) >= self._max_pending:
            raise PoolOverloaded(
                f"pool {self._pool_name!r} is full: every worker is busy and "
                f"{self._max_pending} calls are waiting (max_pending)"
            )
        waiter: _Waiter[W] = _Waiter(waiting, self.loop)
        self._waiters.append(waiter)
        try:
            await waiter.wait()
        except BaseException:
            if waiter.worker is None:
                if waiter.error is None:
                    self._waiters.remove(waiter)
            elif waiter.sent_early:
                assert self._abandon is not None
                self._abandon(waiter.worker)
            else:
                # Handed a worker in the same instant we were cancelled: pass it on.
                self.put(waiter.worker)
            raise
        if waiter.error is not None:
            raise waiter.error
        assert waiter.worker is not None
        return waiter.worker, waiter.sent_early
