"""One call on its way to a pool."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import anyio

__all__ = ("Call", "describe")


def describe(fn: Callable[..., Any]) -> str:
    """A readable name for ``fn`` in errors and logs: ``module.qualname``."""
    target = getattr(fn, "__wrapped__", fn)
    name = getattr(target, "__qualname__", None) or getattr(target, "__name__", None)
    if name is None:
        return repr(fn)
    module = getattr(target, "__module__", None)
    return f"{module}.{name}" if module else name


class Call:
    """A function with its arguments, and the deadline it must meet.

    The deadline is fixed when the call is made, so time spent waiting in a
    pool's queue counts against it.
    """

    __slots__ = ("args", "deadline", "fn", "kwargs", "timeout")

    def __init__(
        self,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        timeout: float | None = None,
    ) -> None:
        self.fn = fn
        self.args = args
        self.kwargs = kwargs
        self.timeout = timeout
        self.deadline = math.inf if timeout is None else anyio.current_time() + timeout

    @property
    def name(self) -> str:
        # Only errors and logs need it: not worth computing on every call.
        return describe(self.fn)

    @property
    def target(self) -> Callable[..., Any]:
        """What to call: the original function of a decorated one."""
        if getattr(type(self.fn), "__offload_function__", False):
            return self.fn.__wrapped__  # type: ignore[attr-defined,no-any-return]
        return self.fn
