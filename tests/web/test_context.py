"""A request's context follows its offloaded calls: a request id that a middleware sets,
and the span it opens, reach a thread and a worker process."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import pytest
from fastapi import Depends, FastAPI
from fastapi.testclient import TestClient
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from offload import Executor, OffloadSettings, get_executor
from offload.fastapi import Lifespan, install

from .. import funcs_context
from ..funcs_context import CONTEXT_VARS, request_id, tenant

Backend = Literal["asyncio", "trio"]
BACKENDS: list[Backend] = ["asyncio", "trio"]


class RequestContext:
    """Sets the request id, and opens the request's span, around the app: a pure ASGI
    middleware. (``@app.middleware("http")`` works as well, but on trio under Python
    3.10 its request stream is left to the garbage collector, which reports it as an
    unraisable ResourceWarning.)"""

    def __init__(self, app: Any, tracer: Any = None) -> None:
        self.app = app
        self.tracer = tracer

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id.set(dict(scope["headers"])[b"x-request-id"].decode())
        if self.tracer is None:
            await self.app(scope, receive, send)
            return
        with self.tracer.start_as_current_span(f"{scope['method']} {scope['path']}"):
            await self.app(scope, receive, send)


def traced_app(settings: OffloadSettings, tracer: Any = None) -> FastAPI:
    app = FastAPI(lifespan=Lifespan(settings))
    install(app)
    app.add_middleware(RequestContext, tracer=tracer)

    @app.get("/seen")
    async def seen(ex: Executor = Depends(get_executor)) -> dict[str, Any]:
        tenant.set("set in the route")
        return {
            "process": await ex.run(funcs_context.seen),
            "thread": await ex.pool("thread").run(funcs_context.seen),
        }

    @app.get("/span")
    async def span(ex: Executor = Depends(get_executor)) -> dict[str, str]:
        return await ex.run(funcs_context.open_span, "work")

    return app


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_request_id_set_by_a_middleware_reaches_threads_and_processes(backend: Backend) -> None:
    settings = OffloadSettings(
        process={"max_workers": 1}, thread={"max_workers": 1}, context_vars=CONTEXT_VARS
    )
    with TestClient(traced_app(settings), backend=backend) as client:
        for number in range(3):  # one worker: the same process serves every request
            answer = client.get("/seen", headers={"x-request-id": f"req-{number}"}).json()
            expected = {"request_id": f"req-{number}", "tenant": "set in the route"}
            assert answer["process"] == {**expected, "secret": "not sent"}
            assert answer["thread"] == {**expected, "secret": "not sent"}


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_span_in_a_worker_process_is_a_child_of_the_requests_span(
    backend: Backend, tmp_path: Path
) -> None:
    spans = tmp_path / "spans.jsonl"
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    settings = OffloadSettings(
        process={
            "max_workers": 1,
            "initializer": "tests.funcs_context:trace_to_file",
            "initializer_args": (str(spans),),
        },
        thread={"max_workers": 1},
        context_vars=CONTEXT_VARS,
    )
    app = traced_app(settings, provider.get_tracer("tests"))
    with TestClient(app, backend=backend) as client:
        answer = client.get("/span", headers={"x-request-id": "traced"})
    assert answer.json()["request_id"] == "traced"
    (request_span,) = [s for s in exporter.get_finished_spans() if s.name == "GET /span"]
    route = request_span.get_span_context()
    assert route is not None
    (work,) = [json.loads(line) for line in spans.read_text().splitlines()]
    assert work["name"] == "work"
    assert work["trace_id"] == route.trace_id
    assert work["parent_span_id"] == route.span_id
    provider.shutdown()
