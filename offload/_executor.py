"""``Executor``: what a route receives and ``async with Offloader(...)`` binds."""

from __future__ import annotations

import copy
from collections.abc import Callable
from types import EllipsisType
from typing import TYPE_CHECKING, Any, TypeVar, overload

import anyio.lowlevel

from ._call import Call
from ._types import check_sync_callable, check_timeout

if TYPE_CHECKING:
    from ._offloader import Offloader
    from ._pools.base import Pool
    from ._stats import PoolStats
    from ._types import Offloaded, P

__all__ = ("Executor",)

T = TypeVar("T")


class Executor:
    """Runs functions in one pool of an :class:`~offload.Offloader`.

    ``await ex.run(fn, *args, **kwargs)`` runs ``fn`` in the pool and returns what
    it returns; every keyword goes to ``fn``. Options are set on the executor,
    never on the call, so they cannot clash with ``fn``'s own keywords::

        await ex.run(resize, image, width=256)                 # the default pool
        await ex.pool("thread").run(checksum, data)            # another pool
        await ex.options(timeout=2).run(resize, image, 256)    # a deadline

    Executors are cheap, immutable views: ``pool()`` and ``options()`` return new ones.
    """

    __slots__ = ("_offloader", "_pool_name", "_timeout")

    def __init__(
        self,
        offloader: Offloader,
        pool: str | None = None,
        *,
        timeout: float | EllipsisType | None = ...,
    ) -> None:
        self._offloader = offloader
        self._pool_name = pool if pool is not None else offloader.settings.default_pool
        self._timeout = timeout

    def __repr__(self) -> str:
        timeout = "" if self._timeout is ... else f", timeout={self._timeout!r}"
        return f"<Executor pool={self._pool_name!r}{timeout}>"

    @property
    def pool_name(self) -> str:
        """The name of the pool this executor runs calls in."""
        return self._pool_name

    @property
    def offloader(self) -> Offloader:
        return self._offloader

    def pool(self, name: str) -> Executor:
        """An executor bound to the pool ``name`` (``"thread"``, ``"process"`` or a named pool).

        :raises LookupError: if there is no such pool; the message lists the pools
        """
        self._offloader.check_pool_name(name)
        derived = copy.copy(self)
        derived._pool_name = name
        return derived

    def options(self, *, timeout: float | EllipsisType | None = ...) -> Executor:
        """An executor whose calls use these options.

        :param timeout: seconds from the call (queue wait included) until
            :class:`~offload.OffloadTimeout`; ``None`` for no deadline; ``...`` (the
            default, as when it is not given) for the pool's ``timeout`` setting
        :raises TypeError: ``timeout`` is not a number (a ``bool`` is not one here)
        :raises ValueError: ``timeout`` is not positive
        """
        check_timeout(timeout)
        derived = copy.copy(self)
        derived._timeout = timeout
        return derived

    @overload
    async def run(self, fn: Offloaded[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T: ...

    @overload
    async def run(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T: ...

    async def run(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """Run ``fn(*args, **kwargs)`` in this executor's pool and return its result.

        An exception raised by ``fn`` reaches the caller as its own type; in a
        process pool its traceback in the worker is attached as ``__cause__``.

        Cancellation: if the calling task is cancelled, or the deadline passes, the
        call stops as its pool allows: a queued call never starts, a process worker
        running it is killed and replaced, a thread is abandoned (see
        :func:`~offload.check_cancelled`). A call made in a scope that is already
        cancelled sends nothing. Like every await of anyio and trio, the call is a
        checkpoint even when it fails at once: it lets other tasks run first.

        :raises OffloadTimeout: the deadline passed
        :raises PoolOverloaded: every worker is busy and ``max_pending`` calls wait
        :raises PoolClosed: the Offloader is not running or is shutting down
        :raises PoolStartError: the process pool has had no worker, and could not start
            one, for ``start_timeout`` seconds
        :raises WorkerCrashed: the worker process died while running the call
        :raises SerializationError: ``fn``, its arguments or its result would not pickle
        :raises TypeError: ``fn`` is an async or generator function, or not callable
        """
        # Every await of anyio and trio is a checkpoint, and so is this one. A call
        # made in a cancelled scope sends nothing (nor kills the idle worker it would
        # have taken). A call that succeeds has waited for its worker, so it yielded;
        # one refused at once (PoolOverloaded, PoolClosed) yields before it raises, so
        # that a caller retrying on the error still lets the loop run: busy workers'
        # answers are read, deadlines fire. Not a full checkpoint on every call: that
        # cost the parent a quarter of its CPU per no-op round trip, this check a
        # fraction of it (docs/benchmarks.md, "Figures behind the code").
        await anyio.lowlevel.checkpoint_if_cancelled()
        try:
            check_sync_callable(fn)
            pool = self._offloader.get_pool(self._pool_name, refusing=True)
            timeout = pool.settings.timeout if self._timeout is ... else self._timeout
            call = Call(fn, args, kwargs, timeout)
            if pool.carries_context:
                call.context = self._offloader._capture_context()
            result: T = await self._submit(pool, call)
        except BaseException as exc:
            if not isinstance(exc, anyio.get_cancelled_exc_class()):
                await anyio.lowlevel.checkpoint()
            raise
        return result

    async def _submit(self, pool: Pool, call: Call) -> Any:
        """Where a call leaves the executor for its pool: a subclass may wrap it."""
        return await pool.run(call)

    def stats(self) -> PoolStats:
        """A snapshot of this executor's pool; once its Offloader has stopped, the last
        one (as :meth:`Offloader.stats() <offload.Offloader.stats>` gives).

        :raises LookupError: if there is no such pool
        :raises PoolClosed: if the Offloader has not started
        """
        offloader = self._offloader
        if not offloader.running:
            final = offloader.stats().get(self._pool_name)
            if final is not None:
                return final
        return offloader.get_pool(self._pool_name).stats()
