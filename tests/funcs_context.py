"""Context variables, and functions that read them, for workers to import by reference.

OpenTelemetry is imported inside the functions only: a worker that imports this
module must not get it by the way (tests check when it does).
"""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Iterator, Sequence
from contextvars import ContextVar
from typing import Any

#: travels with process calls when the settings name it
request_id: ContextVar[str] = ContextVar("request_id")
#: travels too; has a default, which a caller that sets nothing leaves to the worker
tenant: ContextVar[str] = ContextVar("tenant", default="no tenant")
#: never named in the settings: stays in the caller
secret: ContextVar[str] = ContextVar("secret", default="not sent")
#: not a ContextVar: refused by the settings' resolution
not_a_var = "request_id"

UNSET = "<unset>"

CONTEXT_VARS = ("tests.funcs_context:request_id", "tests.funcs_context:tenant")


def seen() -> dict[str, str]:
    """The values this call sees."""
    return {
        "request_id": request_id.get(UNSET),
        "tenant": tenant.get(),
        "secret": secret.get(),
    }


def set_and_see(value: str) -> dict[str, str]:
    """Set every variable, then report what the call saw before."""
    before = seen()
    request_id.set(value)
    tenant.set(value)
    secret.set(value)
    return before


def thread_ident_and_seen() -> tuple[int, dict[str, str]]:
    return threading.get_ident(), seen()


def async_library() -> str | None:
    """What sniffio says runs here: nothing, in a worker thread."""
    import sniffio

    try:
        return sniffio.current_async_library()
    except sniffio.AsyncLibraryNotFoundError:
        return None


def otel_imported() -> bool:
    return "opentelemetry" in sys.modules and sys.modules["opentelemetry"] is not None


def current_span_ids() -> tuple[int, int] | None:
    """(trace id, span id) of the span current in this call, if any is valid."""
    from opentelemetry import trace

    context = trace.get_current_span().get_span_context()
    return (context.trace_id, context.span_id) if context.is_valid else None


def open_span(name: str) -> dict[str, str]:
    """Open and end a span named ``name`` in the worker's tracer provider."""
    from opentelemetry import trace

    with trace.get_tracer("tests.funcs_context").start_as_current_span(name):
        return seen()


def spans_per_item(n: int, name: str) -> Iterator[tuple[dict[str, str], tuple[int, int] | None]]:
    """A stream: item ``i`` is made in a span named ``name i``, and is what that item's
    computation saw: the variables, and the span current before it opened its own."""
    from opentelemetry import trace

    tracer = trace.get_tracer("tests.funcs_context")
    for i in range(n):
        outer = current_span_ids()
        with tracer.start_as_current_span(f"{name} {i}"):
            values = seen()
        yield values, outer


def set_in_each_item(n: int) -> Iterator[dict[str, str]]:
    """A stream: item ``i`` is what its computation saw, before it set the variables
    to ``item i``."""
    for i in range(n):
        yield set_and_see(f"item {i}")


class _FileExporter:
    """Appends each finished span to a file, one JSON object a line: what a test in
    the parent reads of the spans of a worker process."""

    def __init__(self, path: str) -> None:
        self.path = path

    def export(self, spans: Sequence[Any]) -> Any:
        from opentelemetry.sdk.trace.export import SpanExportResult

        with open(self.path, "a") as file:
            for span in spans:
                parent = span.parent
                record = {
                    "name": span.name,
                    "trace_id": span.context.trace_id,
                    "span_id": span.context.span_id,
                    "parent_span_id": None if parent is None else parent.span_id,
                }
                file.write(json.dumps(record) + "\n")
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


def trace_to_file(path: str) -> None:
    """A pool's initializer: this worker's spans go to ``path`` as they end."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor

    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(_FileExporter(path)))  # type: ignore[arg-type]
    trace.set_tracer_provider(provider)


def without_opentelemetry() -> None:
    """A pool's initializer: OpenTelemetry cannot be imported in this worker."""
    for name in [m for m in sys.modules if m == "opentelemetry" or m.startswith("opentelemetry.")]:
        del sys.modules[name]
    sys.modules["opentelemetry"] = None  # type: ignore[assignment]


def set_in_initializer() -> None:
    """A pool's initializer that sets a variable: every call starts from it."""
    tenant.set("set by the initializer")


def hide_module(name: str) -> None:
    """A pool's initializer: the module ``name`` cannot be imported in this worker."""
    sys.modules.pop(name, None)
    sys.modules[name] = None  # type: ignore[assignment]
