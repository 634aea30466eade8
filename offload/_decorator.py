"""``@offload``: turn a blocking function into an async one that runs in a pool."""

from __future__ import annotations

import functools
import importlib
import inspect
import types
from collections.abc import AsyncIterable, Callable, Coroutine, Generator, Iterable, Iterator
from types import EllipsisType
from typing import TYPE_CHECKING, Any, Generic, TypeVar, cast, overload

from ._types import P, T, check_streamable, check_sync_callable, check_timeout
from ._where import in_worker

if TYPE_CHECKING:
    from ._executor import Executor
    from ._map_results import MapResults
    from ._stream import Stream

__all__ = ("OffloadedFunction", "OffloadedGenerator", "offload")

Y = TypeVar("Y")


class OffloadedFunction(Generic[P, T]):
    """A function decorated with :func:`offload`.

    Awaiting a call runs the original function in a pool of the active Offloader
    and returns its result; inside a worker, a call runs it inline (see
    :meth:`__call__`). ``__wrapped__`` is the original, still callable
    synchronously. It works as a method, and under ``@classmethod`` or
    ``@staticmethod`` (put those above ``@offload``).

    It pickles as a reference to itself (module and qualified name), so a worker
    process imports the module and runs the original function.
    """

    __offload_function__ = True
    __wrapped__: Callable[P, T]
    __name__: str
    __qualname__: str

    def __init__(
        self, fn: Callable[P, T], *, kind: str | None, timeout: float | EllipsisType | None
    ) -> None:
        functools.update_wrapper(self, fn)
        self.__wrapped__ = fn
        self._kind = kind
        self._timeout = timeout

    def __repr__(self) -> str:
        return f"<offloaded function {self.__module__}.{self.__wrapped__.__qualname__}>"

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> Coroutine[Any, Any, T]:
        """Run the function in its pool: ``await f(*args, **kwargs)`` returns its
        result; see :meth:`offload.Executor.run`.

        Inside a worker (a worker process, or a thread of a thread pool) the call runs
        the function inline and returns its result itself, not an awaitable: there is
        no event loop there, and a worker must not start pools of its own. So a
        decorated function can call itself (a recursive ``fib``) or another decorated
        function directly. Type checkers see the awaitable only: in such code, use
        ``typing.cast`` or call ``__wrapped__``.
        """
        if in_worker():
            return self.__wrapped__(*args, **kwargs)  # type: ignore[return-value]
        return self._run(args, kwargs)

    async def _run(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> T:
        # Imported here, not at the top: a worker process imports the user's module,
        # hence this one, and must not pay for anyio and pydantic it never uses.
        from ._default import current_offloader

        try:
            offloader = await current_offloader()
            executor = offloader.executor
            if self._kind is not None:
                executor = executor.pool(self._kind)
        except BaseException as exc:
            import anyio.lowlevel

            if not isinstance(exc, anyio.get_cancelled_exc_class()):
                await anyio.lowlevel.checkpoint()  # as Executor.run: yields, failing or not
            raise
        if self._timeout is not ...:
            executor = executor.options(timeout=self._timeout)
        return await executor.run(self, *args, **kwargs)

    def map(
        self,
        items: Iterable[Any] | AsyncIterable[Any],
        /,
        *,
        ordered: bool = True,
        max_in_flight: int | None = None,
        chunksize: int | None = None,
        timeout: float | EllipsisType | None = ...,
    ) -> MapResults[T]:
        """The function over many items, in its pool: as
        :meth:`Executor.map() <offload.Executor.map>` on the executor a call would use
        (the active Offloader's, or the default one), with the function's own
        ``timeout`` as the default one::

            async with resize.map(images) as results:
                async for small in results:
                    ...
        """
        # Imported here: a worker process imports this module, and needs neither.
        from ._map_results import map_results

        check_timeout(timeout)
        chosen = timeout if timeout is not ... else self._timeout

        async def executor() -> Executor:
            from ._default import current_offloader

            executor = (await current_offloader()).executor
            if self._kind is not None:
                executor = executor.pool(self._kind)
            if chosen is not ...:
                executor = executor.options(timeout=chosen)
            return executor

        fn = cast("Callable[[Any], T]", self)  # run returns what the function returns
        return map_results(
            executor, fn, items, ordered=ordered, max_in_flight=max_in_flight, chunksize=chunksize
        )

    def __get__(self, instance: object, owner: type | None = None) -> Any:
        # Decorating a method: bind like a function does.
        if instance is None:
            return self
        return types.MethodType(self, instance)

    def __reduce__(self) -> tuple[Any, ...]:
        module, qualname = self.__module__, self.__wrapped__.__qualname__
        if module == "__main__" or "<locals>" in qualname:
            # A worker cannot import it: travel by value (cloudpickle takes the function).
            return _rebuild, (self.__wrapped__, self._kind, self._timeout)
        return _resolve, (module, qualname)


class OffloadedGenerator(OffloadedFunction[P, Any], Generic[P, Y]):
    """A generator function decorated with :func:`offload`.

    Calling it returns a :class:`~offload.Stream` of its items, which the
    generator produces in a worker of its pool (see :meth:`offload.Executor.stream`)::

        async for row in rows(path):
            ...

    Inside a worker, a call returns the generator itself, as :class:`OffloadedFunction`
    runs the function inline there.
    """

    __wrapped__: Callable[P, Iterator[Y]]

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> Stream[Y]:  # type: ignore[override]
        if in_worker():
            return self.__wrapped__(*args, **kwargs)  # type: ignore[return-value]
        from ._stream import Stream

        async def open_() -> Any:
            from ._default import current_offloader

            offloader = await current_offloader()
            executor = offloader.executor
            if self._kind is not None:
                executor = executor.pool(self._kind)
            if self._timeout is not ...:
                executor = executor.options(timeout=self._timeout)
            # The stream's deadline counts from here, once the Offloader is found.
            # Itself, not __wrapped__: a worker process finds it by reference.
            genfn = cast("Callable[P, Iterator[Y]]", self)
            return await executor.stream(genfn, *args, **kwargs)._start_parts()

        return Stream(open_)

    def __repr__(self) -> str:
        return f"<offloaded generator {self.__module__}.{self.__wrapped__.__qualname__}>"


def _rebuild(
    fn: Callable[..., Any], kind: str | None, timeout: float | EllipsisType | None
) -> OffloadedFunction[..., Any]:
    if inspect.isgeneratorfunction(fn):
        return OffloadedGenerator(fn, kind=kind, timeout=timeout)
    return OffloadedFunction(fn, kind=kind, timeout=timeout)


def _resolve(module: str, qualname: str) -> Any:
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    if isinstance(obj, types.MethodType) and isinstance(obj.__func__, OffloadedFunction):
        # Under @classmethod, the class attribute is the function bound to the class;
        # the call brings the class itself as its first argument.
        return obj.__func__
    return obj


class _Decorate:
    """What ``@offload(...)`` returns: types a generator function apart."""

    __slots__ = ("_kind", "_timeout")

    def __init__(self, kind: str | None, timeout: float | EllipsisType | None) -> None:
        self._kind = kind
        self._timeout = timeout

    @overload
    def __call__(self, fn: Callable[P, Generator[Y, Any, Any]], /) -> OffloadedGenerator[P, Y]: ...

    @overload
    def __call__(self, fn: Callable[P, Iterator[Y]], /) -> OffloadedGenerator[P, Y]: ...

    @overload
    def __call__(self, fn: Callable[P, T], /) -> OffloadedFunction[P, T]: ...

    def __call__(self, fn: Callable[P, Any], /) -> OffloadedFunction[P, Any]:
        if isinstance(fn, (classmethod, staticmethod)):
            raise TypeError(
                f"put @{type(fn).__name__} above @offload, not below it: "
                f"@offload takes the function itself"
            )
        if inspect.isasyncgenfunction(fn):
            check_streamable(fn)  # refused, saying what to do instead
        if inspect.isgeneratorfunction(fn):
            return OffloadedGenerator(fn, kind=self._kind, timeout=self._timeout)
        check_sync_callable(fn)
        return OffloadedFunction(fn, kind=self._kind, timeout=self._timeout)


@overload
def offload(fn: Callable[P, Generator[Y, Any, Any]], /) -> OffloadedGenerator[P, Y]: ...


@overload
def offload(fn: Callable[P, Iterator[Y]], /) -> OffloadedGenerator[P, Y]: ...


@overload
def offload(fn: Callable[P, T], /) -> OffloadedFunction[P, T]: ...


@overload
def offload(
    *, kind: str | None = None, timeout: float | EllipsisType | None = ...
) -> _Decorate: ...


def offload(
    fn: Callable[P, T] | None = None,
    /,
    *,
    kind: str | None = None,
    timeout: float | EllipsisType | None = ...,
) -> OffloadedFunction[P, Any] | _Decorate:
    """Make a blocking function awaitable, running it in a pool.

    ::

        @offload                                  # the default pool
        def checksum(data: bytes) -> str: ...

        @offload(kind="process", timeout=5)       # a pool by name, a deadline
        def resize(image: bytes, width: int) -> bytes: ...

        small = await resize(image, 256)

    :param kind: the pool: ``"thread"``, ``"process"`` or a pool named in the
        settings; default: the settings' ``default_pool``. Checked at call time.
    :param timeout: seconds from the call until :class:`~offload.OffloadTimeout`;
        ``None`` for no deadline; ``...`` (the default, as when it is not given) for
        the pool's ``timeout`` setting
    A generator function becomes an :class:`OffloadedGenerator`: calling it returns
    an async iterator of its items, produced in a worker (see
    :meth:`offload.Executor.stream`)::

        @offload(kind="thread")
        def rows(path: str) -> Iterator[Row]: ...

        async for row in rows(path): ...

    :raises TypeError: if the decorated object is not callable or is an async
        function or async generator function, or an option has the wrong type
    :raises ValueError: if ``timeout`` is not positive
    """
    if kind is not None and (not isinstance(kind, str) or not kind):
        raise TypeError(f"kind must be a pool name such as 'thread' or 'process', not {kind!r}")
    check_timeout(timeout)
    decorate = _Decorate(kind, timeout)
    if fn is not None:
        return decorate(fn)
    return decorate
