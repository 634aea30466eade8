"""Types and checks shared across modules; light enough for a worker to import."""

from __future__ import annotations

import inspect
from enum import Enum
from types import FunctionType
from typing import Final, ParamSpec, TypeVar

__all__ = ("UNSET", "P", "T", "Unset", "check_sync_callable", "check_timeout")

P = ParamSpec("P")
T = TypeVar("T")


class Unset(Enum):
    """Tells "not passed" apart from ``None`` (which means "no timeout")."""

    UNSET = "UNSET"


UNSET: Final = Unset.UNSET


_ASYNC_FLAGS = inspect.CO_COROUTINE | inspect.CO_ASYNC_GENERATOR


def check_sync_callable(fn: object) -> None:
    """:raises TypeError: if ``fn`` cannot run in a worker as a plain call"""
    if type(fn) is FunctionType:
        # The common case, on every call: one flag test instead of inspect's walk.
        if not fn.__code__.co_flags & _ASYNC_FLAGS:
            return
    elif not callable(fn):
        raise TypeError(f"expected a function, got {type(fn).__name__} {fn!r}")
    target = getattr(fn, "__wrapped__", fn) if _is_offloaded(fn) else fn
    if inspect.iscoroutinefunction(target) or inspect.isasyncgenfunction(target):
        raise TypeError(
            f"{getattr(target, '__qualname__', target)!r} is an async function: offload runs "
            "blocking, CPU-bound functions; await async functions directly"
        )


def _is_offloaded(fn: object) -> bool:
    return getattr(type(fn), "__offload_function__", False) is True


def check_timeout(timeout: object) -> None:
    """Refuse a timeout the settings would refuse, and a ``bool`` (which is an ``int``).

    :raises TypeError: ``timeout`` is not a number, or is a ``bool``
    :raises ValueError: ``timeout`` is not positive (or is NaN)
    """
    if timeout is None or timeout is UNSET:
        return
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError(f"timeout must be a positive number of seconds or None, not {timeout!r}")
    if not timeout > 0:  # NaN too
        raise ValueError(f"timeout must be a positive number of seconds or None, not {timeout!r}")
