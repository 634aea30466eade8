"""The FastAPI layer against a real uvicorn server on 127.0.0.1."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import httpx
import pytest
from fastapi import Request

from offload import get_executor
from offload.fastapi import STATE_KEY, warn_if_oversubscribed

from .conftest import Server, assert_gone, start_server


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    # The code under test runs in the server's process, on its loop: the client's
    # loop adds nothing. And this module's server is shared, so a second pass of the
    # tests would find the workers the first pass's crashes left restarting.
    return "asyncio"


async def test_lifespan_starts_warm_workers_and_keeps_app_state(server: Server) -> None:
    async with httpx.AsyncClient(base_url=server.url) as client:
        health = (await client.get("/health")).json()
        workers = (await client.get("/workers")).json()
    assert health == {"ok": True, "greeting": "hello"}
    assert workers["process"]["workers"] == 2
    assert workers["tiny"]["workers"] == 1
    assert len(server.worker_pids()) == 3


async def test_dependency_and_decorator_in_routes(server: Server) -> None:
    async with httpx.AsyncClient(base_url=server.url) as client:
        response = await client.post("/add/21")
    assert response.status_code == 200
    assert response.json() == {"result": 42, "decorated": 42}


@pytest.mark.parametrize(
    ("path", "status", "retry_after"),
    [
        ("/timeout", 504, None),
        ("/overload", 503, "1"),
        ("/closed", 503, "1"),
        ("/start-error", 503, "1"),
        ("/crash", 500, None),
    ],
)
async def test_error_mapping(
    server: Server, path: str, status: int, retry_after: str | None
) -> None:
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        response = await client.get(path)
    assert response.status_code == status
    assert response.headers.get("retry-after") == retry_after
    body = response.json()
    assert set(body) == {"detail"}
    # no internals: no function names, pids, tracebacks
    assert "funcs" not in body["detail"]
    assert "Traceback" not in response.text
    assert not any(ch.isdigit() for ch in body["detail"])


async def test_user_exceptions_pass_through_untouched(server: Server) -> None:
    async with httpx.AsyncClient(base_url=server.url) as client:
        response = await client.get("/user-error")
    assert response.status_code == 500  # FastAPI's (Starlette's) own handler
    assert "secret detail" not in response.text


async def test_get_executor_without_lifespan_says_how_to_wire_it() -> None:
    request = Request({"type": "http", "method": "GET", "path": "/", "headers": []})
    with pytest.raises(RuntimeError, match=r"FastAPI\(lifespan=offload.lifespan\)"):
        await get_executor(request)


def test_dependency_adds_nothing_to_openapi() -> None:
    from .app import app

    schema = app.openapi()
    operation = schema["paths"]["/add/{x}"]["post"]
    assert [p["name"] for p in operation["parameters"]] == ["x"]
    assert "requestBody" not in operation
    assert STATE_KEY not in str(schema)


def test_oversubscription_warning(caplog: pytest.LogCaptureFixture, monkeypatch) -> None:
    from offload import OffloadSettings

    monkeypatch.setenv("WEB_CONCURRENCY", "4")
    warn_if_oversubscribed(OffloadSettings(process={"max_workers": 2}))
    assert "worker processes per server x 4 server processes (WEB_CONCURRENCY) = 8" in caplog.text
    caplog.clear()
    monkeypatch.delenv("WEB_CONCURRENCY")
    warn_if_oversubscribed(OffloadSettings(process={"max_workers": 1}))
    assert caplog.text == ""


def test_sigterm_mid_request_completes_it_then_exits_clean(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    server = start_server(args=("--log-level", "info"), log=log)
    pids = server.worker_pids()
    assert len(pids) == 3
    release = tmp_path / "release"
    result: dict[str, httpx.Response] = {}

    def request() -> None:
        result["response"] = httpx.get(
            f"{server.url}/hold", params={"path": str(release)}, timeout=60
        )

    client = threading.Thread(target=request)
    client.start()
    deadline = time.monotonic() + 30
    while httpx.get(f"{server.url}/workers").json()["process"]["busy"] != 1:
        assert time.monotonic() < deadline, "the request never reached a worker"
        time.sleep(0.02)
    server.proc.send_signal(signal.SIGTERM)
    # The request is held in its worker until the server has seen the signal: it
    # is in flight during the shutdown, however fast the machine.
    while b"Shutting down" not in log.read_bytes():
        assert time.monotonic() < deadline, "the server never began to shut down"
        time.sleep(0.02)
    assert "response" not in result
    assert server.proc.poll() is None
    release.touch()
    assert server.stop(signal.SIGTERM) in (0, -signal.SIGTERM)
    client.join(30)
    assert result["response"].status_code == 200
    assert result["response"].json() == {"result": "released"}
    assert_gone(pids)
