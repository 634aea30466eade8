"""The Server-Timing header (``OffloadSettings(server_timing=True)``): the summed
queue wait, transfer and run of the offloaded calls a request made."""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator
from typing import Literal

import httpx
import pytest
from fastapi import Depends, FastAPI
from fastapi.responses import StreamingResponse
from fastapi.testclient import TestClient

from offload import Executor, OffloadSettings, get_executor
from offload.fastapi import Lifespan, install

from .. import funcs
from .conftest import assert_gone, start_server

Backend = Literal["asyncio", "trio"]
BACKENDS: list[Backend] = ["asyncio", "trio"]
#: what a route's call sleeps in the worker, in seconds
NAP = 0.1


def make_app(server_timing: bool) -> FastAPI:
    settings = OffloadSettings(
        process={"max_workers": 1},
        thread={"max_workers": 1},
        shutdown_timeout=5,
        server_timing=server_timing,
        lag_probe=False,
    )
    app = FastAPI(lifespan=Lifespan(settings))
    install(app)

    @app.get("/executor")
    async def through_the_executor(ex: Executor = Depends(get_executor)) -> dict[str, int]:
        await ex.run(funcs.sleep_then, NAP, None)
        return {"sum": await ex.pool("thread").run(funcs.add, 1, 2)}

    @app.get("/decorated")
    async def decorated() -> dict[str, int]:
        return {"double": await funcs.double(2)}

    @app.get("/nothing")
    async def nothing() -> dict[str, bool]:
        return {"ok": True}

    @app.get("/stream")
    async def stream(ex: Executor = Depends(get_executor)) -> StreamingResponse:
        first = await ex.run(funcs.add, 1, 2)

        async def body() -> AsyncIterator[bytes]:
            yield f"{first}\n".encode()
            # After the header went: in no header, and no harm.
            yield f"{await ex.run(funcs.add, 3, 4)}\n".encode()

        return StreamingResponse(body(), media_type="text/plain")

    return app


def parse(header: str) -> dict[str, dict[str, str]]:
    """``offload-run;dur=1.5, offload-calls;desc=2`` -> {name: {param: value}}."""
    metrics: dict[str, dict[str, str]] = {}
    for metric in header.split(","):
        name, *params = (part.strip() for part in metric.split(";"))
        metrics[name] = dict(param.split("=", 1) for param in params)
    return metrics


@pytest.mark.parametrize("backend", BACKENDS)
def test_header_sums_the_calls_of_the_request(backend: Backend) -> None:
    with TestClient(make_app(True), backend=backend) as client:
        response = client.get("/executor")
        decorated = client.get("/decorated")
    assert response.json() == {"sum": 3}
    metrics = parse(response.headers["server-timing"])
    assert set(metrics) == {"offload-queue", "offload-transfer", "offload-run", "offload-calls"}
    assert metrics["offload-calls"] == {"desc": "2"}
    durations = {name: float(m["dur"]) for name, m in metrics.items() if "dur" in m}
    # Milliseconds: the nap, measured by its worker, is in the run.
    assert durations["offload-run"] >= NAP * 1000
    assert durations["offload-queue"] >= 0
    assert durations["offload-transfer"] >= 0
    # A call of an @offload function counts as well.
    assert decorated.json() == {"double": 4}
    assert parse(decorated.headers["server-timing"])["offload-calls"] == {"desc": "1"}


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_header_when_off_or_nothing_was_offloaded(backend: Backend) -> None:
    with TestClient(make_app(False), backend=backend) as client:
        off = client.get("/executor")
    with TestClient(make_app(True), backend=backend) as client:
        idle = client.get("/nothing")
    assert off.json() == {"sum": 3}
    assert "server-timing" not in off.headers
    assert idle.json() == {"ok": True}
    assert "server-timing" not in idle.headers


@pytest.mark.parametrize("backend", BACKENDS)
def test_streaming_response_carries_the_calls_before_it(backend: Backend) -> None:
    with TestClient(make_app(True), backend=backend) as client:
        response = client.get("/stream")
    assert response.text == "3\n7\n"
    assert parse(response.headers["server-timing"])["offload-calls"] == {"desc": "1"}


def test_real_server_behind_a_base_http_middleware() -> None:
    # Under uvicorn, with the app's BaseHTTPMiddleware around offload's (which then
    # runs in a task of its own), one call through the executor and one decorated.
    server = start_server(env={"TEST_SERVER_TIMING": "1", "TEST_BASE_HTTP_MIDDLEWARE": "1"})
    try:
        response = httpx.post(f"{server.url}/add/3", timeout=30)
        health = httpx.get(f"{server.url}/health", timeout=30)
    finally:
        pids = server.worker_pids()
        assert server.stop() in (0, -signal.SIGTERM)
        assert_gone(pids)
    assert response.json() == {"result": 6, "decorated": 6}
    metrics = parse(response.headers["server-timing"])
    assert metrics["offload-calls"] == {"desc": "2"}
    assert {"offload-queue", "offload-transfer", "offload-run"} <= set(metrics)
    assert "server-timing" not in health.headers
