"""The caller's context follows the call: all of it into a thread, the chosen context
variables and the trace context into a worker process.

Real worker processes, on asyncio and trio. The trace tests set up OpenTelemetry's
SDK in the workers (their initializer), whose spans are written to a file this
process reads; the parent's spans go to an in-memory exporter.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from pydantic import ValidationError

from offload import Executor, Offloader, OffloadSettings, SerializationError
from offload._call import Call

from .. import funcs, funcs_context
from ..funcs_context import CONTEXT_VARS, UNSET, request_id, secret, tenant
from ..processes import run_script

if TYPE_CHECKING:
    from opentelemetry.trace import Tracer


def tracing_to(spans: Path) -> dict[str, Any]:
    """Settings of a process pool of one worker that writes the spans it ends to
    ``spans``, a JSON object a line (see ``worker_spans``)."""
    return {
        "max_workers": 1,
        "initializer": "tests.funcs_context:trace_to_file",
        "initializer_args": (str(spans),),
    }


def context_settings(**overrides: Any) -> OffloadSettings:
    """One thread and one worker process, so that consecutive calls share them."""
    values: dict[str, Any] = {
        "thread": {"max_workers": 1},
        "process": {"max_workers": 1},
        "context_vars": CONTEXT_VARS,
        "shutdown_timeout": 5,
        **overrides,
    }
    return OffloadSettings(**values)


@pytest.fixture
async def ex() -> AsyncIterator[Executor]:
    async with Offloader(context_settings()) as executor:
        yield executor


@pytest.fixture
def tracer() -> Iterator[tuple[Tracer, InMemorySpanExporter]]:
    """A tracer of this test's own (no global provider), and what it exported."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider.get_tracer("tests"), exporter
    provider.shutdown()


def worker_spans(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def finished(exporter: InMemorySpanExporter, name: str) -> ReadableSpan:
    (span,) = [s for s in exporter.get_finished_spans() if s.name == name]
    return span


# -- threads ------------------------------------------------------------------------


async def test_a_thread_call_sees_the_callers_context(ex: Executor) -> None:
    threads = ex.pool("thread")
    request_id.set("r-1")
    secret.set("kept in this process")  # not in context_vars: threads see it anyway
    ident, values = await threads.run(funcs_context.thread_ident_and_seen)
    assert ident != threading.get_ident()
    assert values == {"request_id": "r-1", "tenant": "no tenant", "secret": "kept in this process"}


async def test_what_a_thread_call_sets_stays_in_it(ex: Executor) -> None:
    threads = ex.pool("thread")  # one thread: both calls run in it
    request_id.set("caller's")
    before = await threads.run(funcs_context.set_and_see, "the function's")
    assert before["request_id"] == "caller's"
    assert request_id.get() == "caller's"  # not leaked back to the caller
    assert secret.get() == "not sent"
    request_id.set("second")
    assert await threads.run(funcs_context.seen) == {
        "request_id": "second",
        "tenant": "no tenant",  # the first call's value is gone with its copy
        "secret": "not sent",
    }


async def test_each_task_gives_its_thread_calls_its_own_context(ex: Executor) -> None:
    threads = ex.pool("thread")
    results: dict[str, dict[str, str]] = {}

    async def caller(name: str) -> None:
        request_id.set(name)
        await anyio.sleep(0)  # the other task sets its own value meanwhile
        results[name] = await threads.run(funcs_context.seen)

    async with anyio.create_task_group() as tg:
        for name in ("a", "b", "c"):
            tg.start_soon(caller, name)
    assert {name: seen["request_id"] for name, seen in results.items()} == {
        "a": "a",
        "b": "b",
        "c": "c",
    }
    assert request_id.get(UNSET) == UNSET


async def test_a_thread_call_runs_outside_any_async_library(ex: Executor) -> None:
    # As with asyncio.to_thread and trio.to_thread.run_sync: the copied context
    # must not tell sniffio that an event loop runs in the thread.
    assert await ex.pool("thread").run(funcs_context.async_library) is None


async def test_a_thread_call_runs_in_the_callers_span(
    ex: Executor, tracer: tuple[Tracer, InMemorySpanExporter]
) -> None:
    with tracer[0].start_as_current_span("route") as span:
        ids = await ex.pool("thread").run(funcs_context.current_span_ids)
    assert ids == (span.get_span_context().trace_id, span.get_span_context().span_id)


# -- processes: context_vars ----------------------------------------------------------


async def test_chosen_variables_reach_a_worker_process(ex: Executor) -> None:
    request_id.set("r-42")
    tenant.set("acme")
    secret.set("must stay here")
    assert await ex.run(funcs_context.seen) == {
        "request_id": "r-42",
        "tenant": "acme",
        "secret": "not sent",  # not in context_vars
    }


async def test_variables_the_caller_has_not_set_stay_unset_in_the_worker(ex: Executor) -> None:
    assert await ex.run(funcs_context.seen) == {
        "request_id": UNSET,
        "tenant": "no tenant",
        "secret": "not sent",
    }


async def test_nothing_of_a_call_s_context_reaches_the_next_call(ex: Executor) -> None:
    # One worker process: each call after the first finds what the one before left.
    request_id.set("first")
    tenant.set("first tenant")
    before = await ex.run(funcs_context.set_and_see, "set by the function")
    assert before == {"request_id": "first", "tenant": "first tenant", "secret": "not sent"}
    assert request_id.get() == "first"  # nor back into the caller
    carried = request_id.set("second")
    assert await ex.run(funcs_context.seen) == {
        "request_id": "second",
        "tenant": "first tenant",  # the caller's, not what the function set
        "secret": "not sent",
    }
    request_id.reset(carried)
    tenant.set("third tenant")
    pid = await ex.run(funcs.getpid)
    await ex.run(funcs_context.set_and_see, "again")  # a call with values it sets
    with anyio.fail_after(30):  # the same worker, call after call
        assert await ex.run(funcs.getpid) == pid
    request_id.set("fourth")
    assert (await ex.run(funcs_context.seen))["request_id"] == "fourth"


async def test_a_call_with_no_context_leaves_nothing_for_the_next() -> None:
    # No context_vars: calls carry nothing, yet each still runs in a context of its own.
    async with Offloader(context_settings(context_vars=())) as ex:
        await ex.run(funcs_context.set_and_see, "leaked?")
        assert await ex.run(funcs_context.seen) == {
            "request_id": UNSET,
            "tenant": "no tenant",
            "secret": "not sent",
        }


async def test_every_call_starts_from_what_the_initializer_set() -> None:
    settings = context_settings(
        process={"max_workers": 1, "initializer": "tests.funcs_context:set_in_initializer"}
    )
    async with Offloader(settings) as ex:
        await ex.run(funcs_context.set_and_see, "by a call")
        assert (await ex.run(funcs_context.seen))["tenant"] == "set by the initializer"
        tenant.set("by the caller")
        assert (await ex.run(funcs_context.seen))["tenant"] == "by the caller"


async def test_the_values_are_taken_when_the_call_is_made(ex: Executor) -> None:
    request_id.set("at the call")
    call = Call(funcs_context.seen, (), {})
    call.context = ex.offloader._capture_context()
    request_id.set("later")
    pool = ex.offloader.get_pool("process")
    assert (await pool.run(call))["request_id"] == "at the call"


async def test_a_call_carries_nothing_when_nothing_is_set(ex: Executor) -> None:
    assert ex.offloader._capture_context() is None
    request_id.set("x")
    assert ex.offloader._capture_context() == ((("tests.funcs_context:request_id", "x"),), None)


async def test_an_unpicklable_value_fails_only_its_call_naming_the_variable(
    ex: Executor,
) -> None:
    request_id.set(threading.Lock())  # type: ignore[arg-type]
    with pytest.raises(
        SerializationError, match=r"context variable tests\.funcs_context:request_id"
    ):
        await ex.run(funcs_context.seen)
    request_id.set("fine again")
    assert (await ex.run(funcs_context.seen))["request_id"] == "fine again"


async def test_a_value_travels_by_value_when_pickle_cannot_name_it(ex: Executor) -> None:
    def local() -> str:
        return "a closure"

    request_id.set(local)  # type: ignore[arg-type]
    got: Any = (await ex.run(funcs_context.seen))["request_id"]
    assert got() == "a closure"


async def test_a_variable_a_worker_cannot_import_fails_only_its_call() -> None:
    process = {
        "max_workers": 1,
        "initializer": "tests.funcs_context:hide_module",
        "initializer_args": ("tests.funcs_context",),
    }
    async with Offloader(context_settings(process=process)) as ex:
        token = request_id.set("cannot land")
        with pytest.raises(
            SerializationError,
            match=r"context variable tests\.funcs_context:request_id \(context_vars\) "
            "does not import here",
        ):
            await ex.run(funcs.getpid)
        request_id.reset(token)  # unset again: nothing to import
        assert await ex.run(funcs.add, 1, 2) == 3  # the worker carries on


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("tests.funcs_context:missing", "does not import: AttributeError"),
        ("tests.no_such_module:var", "does not import: ModuleNotFoundError"),
        ("tests.funcs_context:not_a_var", r"is a str, not a contextvars\.ContextVar"),
        ("__main__:request_id", "is in __main__, which worker processes cannot import"),
    ],
)
async def test_a_variable_that_does_not_resolve_fails_the_start(name: str, message: str) -> None:
    with pytest.raises(ValueError, match=rf"^context_vars: '{re.escape(name)}' {message}"):
        async with Offloader(context_settings(context_vars=(name,))):
            pass


def test_names_are_checked_as_import_strings() -> None:
    with pytest.raises(ValidationError, match="must look like"):
        OffloadSettings(context_vars=("tests.funcs_context.request_id",))


def test_the_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OFFLOAD_CONTEXT_VARS", json.dumps(list(CONTEXT_VARS)))
    monkeypatch.setenv("OFFLOAD_PROPAGATE_TRACE", "false")
    settings = OffloadSettings()
    assert settings.context_vars == CONTEXT_VARS
    assert settings.propagate_trace is False


# -- processes: traces ----------------------------------------------------------------


async def test_a_span_in_a_worker_process_is_a_child_of_the_callers(
    tmp_path: Path, tracer: tuple[Tracer, InMemorySpanExporter]
) -> None:
    spans = tmp_path / "spans.jsonl"
    process = tracing_to(spans)
    async with Offloader(context_settings(process=process)) as ex:
        with tracer[0].start_as_current_span("route"):
            request_id.set("traced")
            seen = await ex.run(funcs_context.open_span, "work")
        await ex.run(funcs_context.open_span, "untraced")  # no span active here
    assert seen["request_id"] == "traced"
    route = finished(tracer[1], "route").get_span_context()
    assert route is not None
    by_name = {span["name"]: span for span in worker_spans(spans)}
    assert by_name["work"]["trace_id"] == route.trace_id
    assert by_name["work"]["parent_span_id"] == route.span_id
    assert by_name["untraced"]["parent_span_id"] is None
    assert by_name["untraced"]["trace_id"] != route.trace_id


async def test_propagate_trace_off_sends_no_trace_context(
    tmp_path: Path, tracer: tuple[Tracer, InMemorySpanExporter]
) -> None:
    spans = tmp_path / "spans.jsonl"
    process = tracing_to(spans)
    settings = context_settings(process=process, propagate_trace=False)
    async with Offloader(settings) as ex:
        with tracer[0].start_as_current_span("route"):
            assert ex.offloader._capture_context() is None
            await ex.run(funcs_context.open_span, "work")
    (work,) = worker_spans(spans)
    assert work["parent_span_id"] is None


async def test_a_worker_without_opentelemetry_runs_traced_calls_all_the_same(
    tracer: tuple[Tracer, InMemorySpanExporter],
) -> None:
    process = {"max_workers": 1, "initializer": "tests.funcs_context:without_opentelemetry"}
    async with Offloader(context_settings(process=process)) as ex:
        with tracer[0].start_as_current_span("route"):
            request_id.set("still here")
            carried = ex.offloader._capture_context()
            assert carried is not None
            assert carried[1] is not None  # a trace is sent
            assert (await ex.run(funcs_context.seen))["request_id"] == "still here"
            assert await ex.run(funcs_context.otel_imported) is False


async def test_a_worker_imports_opentelemetry_only_for_a_traced_call(
    ex: Executor, tracer: tuple[Tracer, InMemorySpanExporter]
) -> None:
    request_id.set("no trace")
    assert await ex.run(funcs_context.otel_imported) is False
    with tracer[0].start_as_current_span("route") as span:
        ids = await ex.run(funcs_context.current_span_ids)
    assert ids == (span.get_span_context().trace_id, span.get_span_context().span_id)


# -- streams --------------------------------------------------------------------------


async def test_every_item_of_a_thread_stream_runs_in_the_callers_span(
    ex: Executor, tracer: tuple[Tracer, InMemorySpanExporter]
) -> None:
    threads = ex.pool("thread").options(buffer=1)
    with tracer[0].start_as_current_span("route") as span:
        route = (span.get_span_context().trace_id, span.get_span_context().span_id)
        async with threads.stream(funcs_context.spans_per_item, 3, "item") as items:
            seen = [outer async for _, outer in items]
    assert seen == [route] * 3


async def test_every_item_of_a_process_stream_sees_the_chosen_variables(ex: Executor) -> None:
    request_id.set("r-stream")
    tenant.set("acme")
    secret.set("must stay here")
    async with ex.options(buffer=1).stream(funcs_context.set_in_each_item, 3) as items:
        seen = [item async for item in items]
    # The generator's own context: what it set for one item, the next sees.
    assert seen == [
        {"request_id": "r-stream", "tenant": "acme", "secret": "not sent"},
        *(dict.fromkeys(("request_id", "tenant", "secret"), f"item {i}") for i in (0, 1)),
    ]
    assert request_id.get() == "r-stream"
    # Nothing of it reaches the next call (one worker process: the same one).
    request_id.set("next")
    assert await ex.run(funcs_context.seen) == {
        "request_id": "next",
        "tenant": "acme",
        "secret": "not sent",
    }


async def test_every_item_of_a_process_stream_runs_in_the_callers_span(
    ex: Executor, tracer: tuple[Tracer, InMemorySpanExporter]
) -> None:
    with tracer[0].start_as_current_span("route") as span:
        route = (span.get_span_context().trace_id, span.get_span_context().span_id)
        async with ex.options(buffer=1).stream(funcs_context.spans_per_item, 3, "item") as items:
            seen = [outer async for _, outer in items]
    assert seen == [route] * 3
    # Nor does the trace outlive the stream in its worker.
    assert await ex.run(funcs_context.current_span_ids) is None


async def test_a_span_made_for_each_item_of_a_process_stream_is_a_child_of_the_callers(
    tmp_path: Path, tracer: tuple[Tracer, InMemorySpanExporter]
) -> None:
    spans = tmp_path / "spans.jsonl"
    process = tracing_to(spans)
    async with Offloader(context_settings(process=process)) as ex:
        with tracer[0].start_as_current_span("route"):
            request_id.set("traced")
            items = ex.options(buffer=1).stream(funcs_context.spans_per_item, 3, "item")
            async with items:
                seen = [values async for values, _ in items]
        async with ex.stream(funcs_context.spans_per_item, 1, "untraced") as items:
            assert [outer async for _, outer in items] == [None]
    assert [values["request_id"] for values in seen] == ["traced"] * 3
    route = finished(tracer[1], "route").get_span_context()
    assert route is not None
    by_name = {span["name"]: span for span in worker_spans(spans)}
    for i in range(3):
        assert by_name[f"item {i}"]["trace_id"] == route.trace_id
        assert by_name[f"item {i}"]["parent_span_id"] == route.span_id
    assert by_name["untraced 0"]["parent_span_id"] is None
    assert by_name["untraced 0"]["trace_id"] != route.trace_id


async def test_a_worker_without_opentelemetry_runs_traced_streams_all_the_same(
    tracer: tuple[Tracer, InMemorySpanExporter],
) -> None:
    process = {"max_workers": 1, "initializer": "tests.funcs_context:without_opentelemetry"}
    async with Offloader(context_settings(process=process)) as ex:
        with tracer[0].start_as_current_span("route"):
            request_id.set("still here")
            async with ex.stream(funcs_context.set_in_each_item, 2) as items:
                seen = [values["request_id"] async for values in items]
        assert seen == ["still here", "item 0"]
        assert await ex.run(funcs_context.otel_imported) is False


async def test_the_parent_never_imports_opentelemetry_itself(tmp_path: Path) -> None:
    result = await run_script(
        tmp_path,
        """
        import sys

        import anyio

        from offload import Offloader, OffloadSettings
        from tests import funcs, funcs_context

        async def main():
            settings = OffloadSettings(
                process={"max_workers": 1}, context_vars=funcs_context.CONTEXT_VARS
            )
            async with Offloader(settings) as ex:
                funcs_context.request_id.set("x")
                assert (await ex.run(funcs_context.seen))["request_id"] == "x"
                await ex.pool("thread").run(funcs.noop)
            print(sorted(m for m in sys.modules if m.startswith("opentelemetry")))

        anyio.run(main)
        """,
    )
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout.decode().strip() == "[]"
