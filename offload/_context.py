"""The context a call carries into a worker process: chosen context variables, and
the trace context.

In the parent, :func:`capture` takes, when a call is made, the values of the
variables named by the ``context_vars`` setting and (``propagate_trace``) the
OpenTelemetry trace context as its propagator writes it. They travel pickled with
the call as ``(values, carrier)``: plain tuples and a dict, which a worker unpickles
without importing anything of offload's but this module.

In a worker, :func:`enter` makes the context a call runs in: a copy of the worker's
own context (which no call changes: each runs in such a copy), with the values set.
Nothing a call sets, nor the values it came with, outlives it. :func:`run_traced`
attaches the trace context for the call's run; :func:`enter_traced` puts it in a
stream's context, for every item.

Light enough for a worker process to import at start (no typing, no anyio).
OpenTelemetry is never imported here unless the application has imported it.
"""

from __future__ import annotations

import contextvars
import sys

TYPE_CHECKING = False  # not typing's: workers import this module (see offload/__init__.py)
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    #: what travels: ((import string, value), ...) and the trace carrier, if any
    Carried = tuple[tuple[tuple[str, Any], ...], dict[str, str] | None]

__all__ = ("capture", "enter", "enter_traced", "import_string", "resolve", "run_traced")

_UNSET = object()
_OTEL_CONTEXT = "opentelemetry.context"


# -- in the parent ---------------------------------------------------------------------


def resolve(names: tuple[str, ...]) -> tuple[tuple[str, contextvars.ContextVar[Any]], ...]:
    """The context variables named by import strings (``"package.module:name"``).

    :raises ValueError: a name does not import, is in ``__main__`` (which a worker
        process does not share), or is not a :class:`contextvars.ContextVar`
    """
    resolved = []
    for name in names:
        if name.partition(":")[0] == "__main__":
            raise ValueError(
                f"context_vars: {name!r} is in __main__, which worker processes cannot "
                "import; define the ContextVar in a module"
            )
        try:
            var = import_string(name)
        except Exception as exc:
            raise ValueError(
                f"context_vars: {name!r} does not import: {type(exc).__name__}: {exc}"
            ) from exc
        if not isinstance(var, contextvars.ContextVar):
            raise ValueError(
                f"context_vars: {name!r} is a {type(var).__name__}, not a contextvars.ContextVar"
            )
        resolved.append((name, var))
    return tuple(resolved)


def capture(
    variables: tuple[tuple[str, contextvars.ContextVar[Any]], ...], trace: bool
) -> Carried | None:
    """What the calling task's context sends with a call made now; ``None`` when
    nothing is to travel: no variable is set, no trace is active."""
    values: tuple[tuple[str, Any], ...] = ()
    if variables:
        values = tuple(
            (name, value) for name, var in variables if (value := var.get(_UNSET)) is not _UNSET
        )
    # Most calls: OpenTelemetry not loaded, or nothing active in it.
    carrier = trace_carrier() if trace and _OTEL_CONTEXT in sys.modules else None
    if carrier is None and not values:
        return None
    return values, carrier


def trace_carrier() -> dict[str, str] | None:
    """The current trace context as OpenTelemetry's propagator writes it (``traceparent``,
    ``tracestate``, ``baggage``), if the application has imported OpenTelemetry and
    something is active; else ``None``. Never raises."""
    otel_context = sys.modules.get(_OTEL_CONTEXT)
    if otel_context is None:
        return None
    try:
        if not otel_context.get_current():  # no span, no baggage: the usual call
            return None
        propagate: Any = sys.modules.get("opentelemetry.propagate")
        if propagate is None:  # the API is loaded, its propagators not yet
            import opentelemetry.propagate as propagate
        carrier: dict[str, str] = {}
        propagate.inject(carrier)
    except Exception:
        return None
    return carrier or None


# -- in a worker ----------------------------------------------------------------------

_variables: dict[str, contextvars.ContextVar[Any]] = {}


def enter(carried: Carried | None, ctx: contextvars.Context) -> contextvars.Context:
    """The context for one call: ``ctx``, a fresh copy of the worker's own
    (``contextvars.copy_context()``), with the carried values set in it. Nothing the
    call sets reaches the worker's context, nor the next call's.

    :raises ImportError: a carried variable does not import here
    """
    if carried is not None and carried[0]:
        ctx.run(_set, carried[0])
    return ctx


def _set(values: tuple[tuple[str, Any], ...]) -> None:
    for name, value in values:
        var = _variables.get(name)
        if var is None:
            try:
                var = _variables[name] = import_string(name)
            except Exception as exc:
                raise ImportError(
                    f"the context variable {name} (context_vars) does not import here: "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
        var.set(value)


#: OpenTelemetry's (attach, detach, extract), once looked for; False: not importable
_otel: tuple[Callable[..., Any], Callable[..., Any], Callable[..., Any]] | bool | None = None


def _tracing() -> tuple[Callable[..., Any], Callable[..., Any], Callable[..., Any]] | None:
    global _otel
    if _otel is None:
        try:
            from opentelemetry.context import attach, detach
            from opentelemetry.propagate import extract

            _otel = attach, detach, extract
        except Exception:  # not installed here, or broken: calls run untraced
            _otel = False
    return _otel or None  # type: ignore[return-value]


def _attach(carrier: dict[str, str]) -> Any:
    """Attach the trace context in ``carrier`` to the current context; the token to
    detach it, or None: no OpenTelemetry here, or a carrier it cannot read."""
    otel = _tracing()
    if otel is not None:
        try:
            return otel[0](otel[2](carrier))
        except Exception:
            pass
    return None


def run_traced(
    carrier: dict[str, str], fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    """``fn(*args, **kwargs)`` under the trace context in ``carrier``, so that a span
    it opens is a child of the caller's. Without OpenTelemetry here, or with a carrier
    it cannot read, the call runs all the same."""
    token = _attach(carrier)
    try:
        return fn(*args, **kwargs)
    finally:
        if token is not None:
            try:
                _otel[1](token)  # type: ignore[index]
            except Exception:
                pass


def enter_traced(carrier: dict[str, str], ctx: contextvars.Context) -> None:
    """Put the trace context in ``carrier`` in ``ctx``, a call's own context (from
    :func:`enter`), for all that runs in it: a stream's generator, item after item.
    It goes with ``ctx``: nothing to detach."""
    ctx.run(_attach, carrier)


def import_string(name: str) -> Any:
    """The object ``"package.module:attr.attr"`` names."""
    module, _, attr = name.partition(":")
    import importlib

    obj: Any = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj
