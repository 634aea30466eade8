"""``Executor``: what a route receives and ``async with Offloader(...)`` binds."""

from __future__ import annotations

import copy
from collections.abc import AsyncIterable, Callable, Iterable
from types import EllipsisType
from typing import TYPE_CHECKING, Any, TypeVar, overload

import anyio.lowlevel

from ._call import Call
from ._errors import OffloadTimeout
from ._map_results import MapResults, map_results
from ._stream import Stream
from ._types import check_streamable, check_sync_callable, check_timeout

if TYPE_CHECKING:
    from ._offloader import Offloader
    from ._pools.base import Pool, StreamSource
    from ._stats import PoolStats
    from ._types import Offloaded, P

__all__ = ("Executor",)

T = TypeVar("T")
Y = TypeVar("Y")

#: items a stream's generator may run ahead of its consumer, unless set with options()
DEFAULT_BUFFER = 16
A = TypeVar("A")


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

    __slots__ = ("_buffer", "_offloader", "_pool_name", "_timeout")

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
        self._buffer = DEFAULT_BUFFER

    def __repr__(self) -> str:
        timeout = "" if self._timeout is ... else f", timeout={self._timeout!r}"
        buffer = "" if self._buffer == DEFAULT_BUFFER else f", buffer={self._buffer!r}"
        return f"<Executor pool={self._pool_name!r}{timeout}{buffer}>"

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

    def options(
        self, *, timeout: float | EllipsisType | None = ..., buffer: int | None = None
    ) -> Executor:
        """An executor whose calls use these options.

        :param timeout: seconds from the call (queue wait included) until
            :class:`~offload.OffloadTimeout`; ``None`` for no deadline; ``...`` (the
            default, as when it is not given) for the pool's ``timeout`` setting. A
            stream's deadline covers the whole stream, up to its last item.
        :param buffer: for :meth:`stream`: how many items the generator may run ahead
            of its consumer (default 16); ``None`` keeps this executor's
        :raises TypeError: ``timeout`` is not a number (a ``bool`` is not one here),
            or ``buffer`` is not an ``int``
        :raises ValueError: ``timeout`` or ``buffer`` is not positive
        """
        check_timeout(timeout)
        if buffer is not None:
            if isinstance(buffer, bool) or not isinstance(buffer, int):
                raise TypeError(f"buffer must be a positive number of items, not {buffer!r}")
            if buffer < 1:
                raise ValueError(f"buffer must be a positive number of items, not {buffer!r}")
        derived = copy.copy(self)
        derived._timeout = timeout
        if buffer is not None:
            derived._buffer = buffer
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

    def stream(
        self, genfn: Callable[P, Iterable[Y]], /, *args: P.args, **kwargs: P.kwargs
    ) -> Stream[Y]:
        """Run the generator function ``genfn(*args, **kwargs)`` in this executor's
        pool, and iterate its items as it produces them::

            async with ex.stream(frames, video) as items:
                async for frame in items:
                    await send(frame)

        Every keyword goes to ``genfn``; options (``timeout``, ``buffer``) are set
        with :meth:`options`. ``genfn`` may also be a function that returns an
        iterable: the iterable is iterated in the worker.

        The generator runs at most ``buffer`` items ahead of the consumer, then waits
        (holding its worker) until the consumer takes one. Nothing runs until the
        first item is asked for or the ``async with`` block is entered.

        The deadline covers the whole stream, from this call to the last item: when
        it passes, the consumer gets :class:`~offload.OffloadTimeout` and the
        generator is stopped. Leaving the ``async with`` block, :meth:`Stream.aclose
        <offload.Stream.aclose>`, the deadline and the consumer's
        cancellation all close the generator in its worker, where its ``finally``
        runs. An exception the generator raises reaches the consumer at its
        position, after the items produced before it, as its own type.

        In a process pool, a deadline or cancellation that comes while the consumer
        waits for an item kills the worker, which is inside the generator's body (its
        ``finally`` does not run), as for :meth:`run`. In a dask pool, the items
        travel through a queue on the scheduler; a running item cannot be
        interrupted, so the generator is closed once it is done (with
        ``hard_cancel``, the worker is restarted instead), and closing does not
        wait for it (docs/dask.md, "Streams").

        :raises TypeError: ``genfn`` is an async function or async generator
            function, or not callable (at once)
        :raises WorkerCrashed: the worker process died during the stream
        :raises SerializationError: ``genfn``, its arguments or an item would not pickle
        :raises OffloadTimeout: the deadline passed
        :raises PoolOverloaded: every worker is busy and ``max_pending`` calls wait
        :raises PoolClosed: the Offloader is not running or is shutting down
        """
        check_streamable(genfn)
        pool_name, timeout, buffer = self._pool_name, self._timeout, self._buffer
        offloader = self._offloader
        call = Call(genfn, args, kwargs, None)

        async def open_() -> tuple[Pool, Call, StreamSource]:
            await anyio.lowlevel.checkpoint_if_cancelled()
            pool = offloader.get_pool(pool_name, refusing=True)
            call.timeout = pool.settings.timeout if timeout is ... else timeout
            if call.timeout is not None:
                call.deadline = made + call.timeout
            if pool.carries_context:
                call.context = offloader._capture_context()
            with anyio.CancelScope(deadline=call.deadline) as scope:
                source = await pool.open_stream(call, buffer)
            if scope.cancelled_caught:
                pool.counters.timed_out += 1
                raise OffloadTimeout(f"{call.name} did not start within {call.timeout:g} s")
            return pool, call, source

        made = anyio.current_time()
        return Stream(open_, self._client_gone())

    def _client_gone(self) -> Callable[[], Exception | None] | None:
        """For a stream: what says, before each item, that the consumer's client has
        left (the error to raise then); None: no client to watch."""
        return None

    @overload
    def map(
        self,
        fn: Offloaded[[A], T],
        items: Iterable[A] | AsyncIterable[A],
        /,
        *,
        ordered: bool = True,
        max_in_flight: int | None = None,
        chunksize: int | None = None,
        timeout: float | EllipsisType | None = ...,
    ) -> MapResults[T]: ...

    @overload
    def map(
        self,
        fn: Callable[[A], T],
        items: Iterable[A] | AsyncIterable[A],
        /,
        *,
        ordered: bool = True,
        max_in_flight: int | None = None,
        chunksize: int | None = None,
        timeout: float | EllipsisType | None = ...,
    ) -> MapResults[T]: ...

    def map(
        self,
        fn: Callable[[A], Any],
        items: Iterable[A] | AsyncIterable[A],
        /,
        *,
        ordered: bool = True,
        max_in_flight: int | None = None,
        chunksize: int | None = None,
        timeout: float | EllipsisType | None = ...,
    ) -> MapResults[Any]:
        r"""Run ``fn(item)`` for each item in this executor's pool, several small
        items to a call; an async iterator of the results, and an async context
        manager::

            async with ex.map(resize, images) as results:
                async for small in results:
                    ...

        ``items`` (an iterable or an async iterable) is taken lazily: at most
        ``max_in_flight`` items ahead of the results delivered. Nothing starts until
        the first result is asked for, or the ``async with`` block is entered.

        Errors: the first error (in the items' order when ``ordered``) is raised as
        ``run`` would raise it, its own type, not an ExceptionGroup: after exactly the
        results before its item (``ordered``), or when it finishes. The calls still
        running are then cancelled as a cancelled ``run`` is (a queued call never
        starts, a process worker running one is killed and replaced, a thread is
        abandoned), and return before the error is raised.

        Cancellation: leaving the ``async with`` block (``break``, an exception,
        cancellation) cancels what is left before the block ends; so does a
        cancellation or an error raised while a result is awaited (the consumer's
        cancellation is checked whenever it waits for a result, else about once a
        millisecond of its own time: every 1 to 1,024 results, by its pace). A
        bare ``async for`` left by ``break`` cancels what is left only when the
        iterator is dropped (at once in CPython when nothing else refers to it) or
        ``aclose()`` is awaited: prefer ``async with``.

        Chunks: tiny items sent one call each would spend their time on the round
        trips; a chunk sends several items in one call, and brings back each item's
        own result or exception, as a call of its own would have it. By default
        (``chunksize=None``) the size is chosen from measured times: one item at
        first, then chunks large enough that a call's fixed cost is at most about 5%
        of their work; slow items go one per call, and so does an item or a result
        of 64 KiB or more. A crash or a deadline fails the whole chunk it hits: each
        of its items gets an error of its own (noting the chunk, on Python 3.11+).

        :param ordered: results in the items' order (True), or as they finish (False;
            a chunk's results come in its own order)
        :param max_in_flight: how many calls' worth of items may be taken ahead of
            the results delivered: calls in flight plus results waiting for the
            consumer (so a slow consumer, or a slow item ahead of finished ones,
            stops taking items); default: the pool's ``max_workers`` plus
            ``max(2, max_workers // 2)``, at most ``max_pending`` more
        :param chunksize: items per call: ``None`` (the default) to choose from
            measured times, ``1`` for a call per item, as ``run`` makes it
        :param timeout: per item, as ``run``'s: seconds from the item's call (queue
            wait included) until :class:`~offload.OffloadTimeout`; ``None`` for no
            deadline; ``...`` (the default) for this executor's (see :meth:`options`).
            A chunk of ``n`` items has ``n`` times as long.
        :raises TypeError: ``fn`` is an async or generator function, or not callable;
            ``items`` is not iterable; an option has the wrong type (at once)
        :raises ValueError: ``max_in_flight`` or ``chunksize`` is below 1, or
            ``timeout`` is not positive (at once)
        :raises PoolClosed: the Offloader is not running (from the first result)
        """
        check_sync_callable(fn)
        check_timeout(timeout)
        executor = self if timeout is ... else self.options(timeout=timeout)

        async def resolve() -> Executor:
            return executor

        return map_results(
            resolve, fn, items, ordered=ordered, max_in_flight=max_in_flight, chunksize=chunksize
        )

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
