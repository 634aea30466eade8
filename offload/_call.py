"""One call on its way to a pool."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
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


@dataclass(slots=True)
class Call:
    """A function with its arguments, and the deadline it must meet.

    The deadline is fixed when the call is made, so time spent waiting in a
    pool's queue counts against it.
    """

    fn: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    timeout: float | None = None
    name: str = ""
    deadline: float = field(init=False)

    @property
    def target(self) -> Callable[..., Any]:
        """What to call: the original function of a decorated one."""
        if getattr(type(self.fn), "__offload_function__", False):
            return self.fn.__wrapped__  # type: ignore[attr-defined,no-any-return]
        return self.fn

    def __post_init__(self) -> None:
        if not self.name:
            self.name = describe(self.fn)
        self.deadline = math.inf if self.timeout is None else anyio.current_time() + self.timeout
