"""``Stream``: a generator running in a worker, as an async iterator of its items."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import anyio
import anyio.lowlevel

from ._errors import OffloadTimeout

if TYPE_CHECKING:
    from ._call import Call
    from ._pools.base import Pool, StreamSource

__all__ = ("Stream",)

Y = TypeVar("Y")
Opener = Callable[[], Awaitable["tuple[Pool, Call, StreamSource]"]]


class Stream(AsyncIterator[Y], Generic[Y]):
    """The items of a generator running in a worker, as it produces them.

    Made by :meth:`Executor.stream <offload.Executor.stream>` and by calling a
    generator function decorated with :func:`~offload.offload`. Nothing runs until
    the first item is asked for (or the ``async with`` block is entered). Use it in
    ``async with``, which closes the generator when the block is left however it is
    left, or iterate it and call :meth:`aclose` when done early.
    """

    __slots__ = ("_call", "_ended", "_gone", "_open", "_pool", "_source", "_thread")

    def __init__(
        self,
        open_: Callable[[], Awaitable[Any]],
        gone: Callable[[], Exception | None] | None = None,
    ) -> None:
        # Made by offload only: ``open_()`` returns ``(pool, call, source)``; ``gone()``,
        # asked before each item, the error to raise once nobody is left to take them
        # (the client of the request that streams has left).
        self._open: Opener | None = open_
        self._gone = gone
        self._pool: Pool | None = None
        self._call: Call | None = None
        self._source: StreamSource | None = None
        self._ended = False
        self._thread = threading.get_ident()  # the event loop's

    def __repr__(self) -> str:
        name = "" if self._call is None else f" of {self._call.name}"
        state = "ended" if self._ended else "running" if self._source else "not started"
        return f"<offload.Stream{name}, {state}>"

    async def __aenter__(self) -> Stream[Y]:
        await self._start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __aiter__(self) -> Stream[Y]:
        return self

    async def _start(self) -> StreamSource:
        if self._source is not None:
            return self._source
        if self._open is None:
            raise RuntimeError("this stream has ended")  # the open failed before
        open_, self._open = self._open, None
        try:
            self._pool, self._call, self._source = await open_()
        except BaseException:
            self._ended = True
            raise
        return self._source

    async def _start_parts(self) -> tuple[Pool, Call, StreamSource]:
        """Open the stream for another one that stands for it (a decorated
        generator's), which then owns what this returns."""
        open_, self._open = self._open, None
        assert open_ is not None
        return await open_()

    async def __anext__(self) -> Y:
        if self._ended:
            raise StopAsyncIteration
        if self._gone is not None and (gone := self._gone()) is not None:
            # Its client has left, and the consumer, not told (a server drops what is
            # sent to a client that left), asks for more: asking the generator for it
            # would set it computing, where the cancellation that follows would kill
            # its worker. It is closed where it waits instead, without waiting for
            # anyone; a cancellation on its way (the server's disconnect cancelling
            # the response) is taken rather than this error.
            self._close()
            await anyio.lowlevel.checkpoint()
            raise gone
        source = self._source or await self._start()
        call = self._call
        assert call is not None
        scope = anyio.CancelScope(deadline=call.deadline)
        try:
            with scope:
                item: Y = await source.get()
            if scope.cancelled_caught:
                raise OffloadTimeout(f"{call.name} did not finish within {call.timeout:g} s")
        except StopAsyncIteration:
            self._end(None)
            raise
        except BaseException as exc:
            # The generator raised (it is over), or the deadline passed, or the
            # consumer was cancelled: either way it stops here.
            source.close()
            self._end(exc)
            raise
        return item

    async def aclose(self) -> None:
        """Stop the generator: it is closed in its worker (its ``finally`` runs there).

        If it is suspended at a ``yield``, this waits until it is closed, within the
        stream's deadline; if it is computing an item, it is closed once that item is
        done (and :func:`~offload.check_cancelled` raises in it meanwhile), without
        waiting. A dask pool's stream is closed without waiting, at its next item
        (docs/dask.md, "Streams"). Closing a stream that has not started starts
        nothing; closing it again does nothing.
        """
        if self._close():
            source, call = self._source, self._call
            assert source is not None
            assert call is not None
            with anyio.CancelScope(deadline=call.deadline):
                await source.wait_closed()

    def _close(self) -> bool:
        """Close the generator without waiting; whether it was suspended at a
        ``yield`` (then closed as soon as its worker reads the request)."""
        self._open = None
        source = self._source
        if source is None or self._call is None or self._ended:
            self._ended = True
            return False
        suspended = source.close()
        self._end(None)
        return suspended

    def _end(self, error: BaseException | None) -> None:
        if self._ended:
            return
        self._ended = True
        if self._pool is not None and self._source is not None:
            self._pool.end_stream(self._source, error)

    def __del__(self) -> None:
        # Dropped without aclose(), as an ``async for`` left early leaves it: the
        # generator is closed in its worker all the same (without waiting).
        source = self._source
        # Not from another thread (a cyclic collection there): a pool is the loop's.
        if source is not None and not self._ended and threading.get_ident() == self._thread:
            try:
                source.close()
                self._end(None)
            except Exception:  # the pool is gone already: nothing left to close
                pass
