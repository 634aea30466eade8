"""``@offload``: turn a blocking function into an async one that runs in a pool."""

from __future__ import annotations

import functools
import importlib
import types
from collections.abc import Callable, Coroutine
from types import EllipsisType
from typing import Any, Generic, overload

from ._types import P, T, check_sync_callable, check_timeout
from ._where import in_worker

__all__ = ("OffloadedFunction", "offload")


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


def _rebuild(
    fn: Callable[..., Any], kind: str | None, timeout: float | EllipsisType | None
) -> OffloadedFunction[..., Any]:
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


@overload
def offload(fn: Callable[P, T], /) -> OffloadedFunction[P, T]: ...


@overload
def offload(
    *, kind: str | None = None, timeout: float | EllipsisType | None = ...
) -> Callable[[Callable[P, T]], OffloadedFunction[P, T]]: ...


def offload(
    fn: Callable[P, T] | None = None,
    /,
    *,
    kind: str | None = None,
    timeout: float | EllipsisType | None = ...,
) -> OffloadedFunction[P, T] | Callable[[Callable[P, T]], OffloadedFunction[P, T]]:
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
    :raises TypeError: if the decorated object is not callable or is an async
        function, or an option has the wrong type
    :raises ValueError: if ``timeout`` is not positive
    """
    if kind is not None and (not isinstance(kind, str) or not kind):
        raise TypeError(f"kind must be a pool name such as 'thread' or 'process', not {kind!r}")
    check_timeout(timeout)

    def decorate(fn: Callable[P, T]) -> OffloadedFunction[P, T]:
        if isinstance(fn, (classmethod, staticmethod)):
            raise TypeError(
                f"put @{type(fn).__name__} above @offload, not below it: "
                f"@offload takes the function itself"
            )
        check_sync_callable(fn)
        return OffloadedFunction(fn, kind=kind, timeout=timeout)

    if fn is not None:
        return decorate(fn)
    return decorate
