"""One call on its way to a pool."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import anyio

if TYPE_CHECKING:
    from ._context import Carried

__all__ = ("Call", "describe")


def describe(fn: Callable[..., Any]) -> str:
    """A readable name for ``fn`` in errors and logs: ``module.qualname``.

    Never raises: it is called on error paths, where a user's ``__repr__`` or
    ``__getattr__`` that fails must not replace the error being reported.
    """
    try:
        target = getattr(fn, "__wrapped__", fn)
        name = getattr(target, "__qualname__", None) or getattr(target, "__name__", None)
        if not isinstance(name, str):  # a partial, a callable object
            text = repr(fn)
            return text if len(text) <= 200 else f"{text[:200]}..."
        module = getattr(target, "__module__", None)
        return f"{module}.{name}" if isinstance(module, str) else name
    except Exception:
        kind = type(fn)
        return f"a {kind.__module__}.{kind.__qualname__} object"


class Call:
    """A function with its arguments, and the deadline it must meet.

    The deadline is fixed when the call is made, so time spent waiting in a
    pool's queue counts against it. So is ``context``: what the caller's context
    sends with the call into a worker process (see :mod:`offload._context`), ``None``
    when nothing is to travel, as for every thread call (a thread runs in a copy of
    the caller's whole context).

    Its pool notes where its time goes (``offload._stats``, "Where a call's time
    went"): ``started`` (``time.perf_counter()`` when the pool took the call),
    ``queue_wait`` (seconds until a worker took it; None: unknown) and ``ran``
    (seconds the function ran, as its worker measured; None until it reports).
    """

    __slots__ = (
        "args",
        "context",
        "deadline",
        "fn",
        "kwargs",
        "queue_wait",
        "ran",
        "started",
        "timeout",
    )

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
        self.started = 0.0
        self.queue_wait: float | None = 0.0
        self.ran: float | None = None
        self.context: Carried | None = None

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
