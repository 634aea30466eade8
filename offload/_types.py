"""Types and checks shared across modules; light enough for a worker to import."""

from __future__ import annotations

import inspect
from types import BuiltinFunctionType, FunctionType, MethodType
from typing import TYPE_CHECKING, ParamSpec, TypeVar

if TYPE_CHECKING:
    from collections.abc import Callable, Coroutine
    from typing import Any, Protocol

__all__ = (
    "P",
    "T",
    "check_streamable",
    "check_sync_callable",
    "check_timeout",
    "generator_refusal",
)

P = ParamSpec("P")
T = TypeVar("T")

if TYPE_CHECKING:
    T_co = TypeVar("T_co", covariant=True)

    class Offloaded(Protocol[P, T_co]):
        """An :class:`~offload.OffloadedFunction`, as ``Executor.run`` types it: calling
        it makes a coroutine of its result, and ``run`` returns that result itself.

        Structural, so that the executor's module names nothing of the decorator's,
        which sits above it (the decorator runs calls through an executor)."""

        __offload_function__: bool

        def __call__(self, *args: P.args, **kwargs: P.kwargs) -> Coroutine[Any, Any, T_co]: ...


# A timeout option is ``float | EllipsisType | None``, spelled out where it is taken:
# seconds; None, no deadline; ``...`` (the default), the pool's ``timeout`` setting.
# Ellipsis rather than a sentinel of offload's own (or an alias of that union): a
# public signature then names nothing its reader cannot import, and None stays free
# to mean "no deadline".


_REFUSED_FLAGS = inspect.CO_COROUTINE | inspect.CO_ASYNC_GENERATOR | inspect.CO_GENERATOR


def check_sync_callable(fn: object) -> None:
    """:raises TypeError: if ``fn`` cannot run in a worker as a plain call"""
    if type(fn) is FunctionType:
        # The common case, on every call: one flag test instead of inspect's walk.
        if not fn.__code__.co_flags & _REFUSED_FLAGS:
            return
    elif type(fn) is BuiltinFunctionType:
        return  # written in C: never a coroutine or generator function (no inspect)
    elif type(fn) is MethodType:
        func = fn.__func__
        if type(func) is FunctionType and not func.__code__.co_flags & _REFUSED_FLAGS:
            return
    elif (
        type(call := getattr(type(fn), "__call__", None)) is FunctionType  # noqa: B004
        and not call.__code__.co_flags & _REFUSED_FLAGS
        and not _is_offloaded(fn)
        and getattr(fn, "_is_coroutine_marker", None) is None  # inspect.markcoroutinefunction
    ):
        return  # an instance of a class whose __call__ is a plain function (a map's chunk)
    elif not callable(fn):
        raise TypeError(f"expected a function, got {type(fn).__name__} {fn!r}")
    target = getattr(fn, "__wrapped__", fn) if _is_offloaded(fn) else fn
    name = getattr(target, "__qualname__", target)
    if _is(inspect.iscoroutinefunction, target) or _is(inspect.isasyncgenfunction, target):
        raise TypeError(
            f"{name!r} is an async function: offload runs "
            "blocking, CPU-bound functions; await async functions directly"
        )
    if _is(inspect.isgeneratorfunction, target):
        raise TypeError(generator_refusal(name))


def generator_refusal(name: object) -> str:
    """Why a generator cannot be run as a plain call: a thread would hand the
    generator to the event loop's thread, which would then run its body; a process
    cannot pickle it."""
    return (
        f"{name!r} is a generator function: stream its items with "
        "Executor.stream (or decorate it with @offload and iterate the call), "
        "return a list instead, or offload a function that consumes the generator"
    )


def check_streamable(fn: object) -> None:
    """:raises TypeError: if ``fn`` cannot run in a worker as a stream's generator"""
    if not callable(fn):
        raise TypeError(f"expected a generator function, got {type(fn).__name__} {fn!r}")
    target = getattr(fn, "__wrapped__", fn) if _is_offloaded(fn) else fn
    name = getattr(target, "__qualname__", target)
    if _is(inspect.isasyncgenfunction, target):
        raise TypeError(
            f"{name!r} is an async generator function: offload streams the items of "
            "blocking generators run in a worker; iterate async generators directly"
        )
    if _is(inspect.iscoroutinefunction, target):
        raise TypeError(
            f"{name!r} is an async function: offload runs blocking, CPU-bound "
            "functions; await async functions directly"
        )


def _is(test: Callable[[object], bool], fn: object) -> bool:
    """``test(fn)``, or of its ``__call__`` for an instance of a class that has one."""
    if test(fn):
        return True
    call = getattr(type(fn), "__call__", None)  # noqa: B004
    return isinstance(call, FunctionType) and test(call)


def _is_offloaded(fn: object) -> bool:
    return getattr(type(fn), "__offload_function__", False) is True


def check_timeout(timeout: object) -> None:
    """Refuse a timeout the settings would refuse, and a ``bool`` (which is an ``int``);
    ``None`` and ``...`` (the pool's setting) pass.

    :raises TypeError: ``timeout`` is not a number, or is a ``bool``
    :raises ValueError: ``timeout`` is not positive (or is NaN)
    """
    if timeout is None or timeout is ...:
        return
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError(f"timeout must be a positive number of seconds or None, not {timeout!r}")
    if not timeout > 0:  # NaN too
        raise ValueError(f"timeout must be a positive number of seconds or None, not {timeout!r}")
