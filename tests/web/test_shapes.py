"""The FastAPI layer beyond the plain route: mounted apps, routers, WebSockets, and
the exceptions FastAPI answers itself, raised in a worker process."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import Depends, FastAPI, WebSocket
from fastapi.testclient import TestClient
from starlette.applications import Starlette
from starlette.middleware.gzip import GZipMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Mount, Route, Router
from starlette.testclient import WebSocketDenialResponse
from starlette.websockets import WebSocketDisconnect

from offload import Executor, OffloadSettings, OffloadTimeout, get_executor
from offload.fastapi import Lifespan, install

from .. import funcs
from .conftest import Server, assert_gone, start_server
from .test_disconnect import assert_workers_go_idle, send_and_drop


@pytest.mark.parametrize("prefix", ["/sub", "/api"], ids=["mounted-app", "router-prefix"])
def test_errors_are_mapped_in_mounted_apps_and_routers(server: Server, prefix: str) -> None:
    response = httpx.get(f"{server.url}{prefix}/timeout", timeout=10)
    assert response.status_code == 504
    assert response.json() == {"detail": "the work took too long"}


@pytest.mark.parametrize("kind", ["uvicorn", "hypercorn"])
def test_disconnect_in_a_mounted_app_cancels_the_call_quietly(tmp_path: Path, kind: str) -> None:
    log = tmp_path / "server.log"
    server = start_server(kind, log=log)
    try:
        before = server.worker_pids()
        send_and_drop(server, b"GET /sub/spin/30 HTTP/1.1\r\nHost: test\r\n\r\n")
        assert_workers_go_idle(server, before)
    finally:
        pids = server.worker_pids()
        assert server.stop() in (0, -signal.SIGTERM)
        assert_gone(pids)
    text = log.read_text()
    assert "ERROR" not in text, text
    assert "Traceback" not in text, text


@pytest.mark.parametrize(
    ("path", "status", "detail", "headers"),
    [
        ("/http-error/thread", 404, "no such item", {"x-why": "gone"}),
        ("/http-error/process", 404, "no such item", {"x-why": "gone"}),
        ("/sub/http-error", 409, "conflict", {}),
        ("/api/http-error", 409, "conflict", {}),
    ],
)
def test_http_exception_in_a_pool_keeps_status_detail_and_headers(
    server: Server, path: str, status: int, detail: str, headers: dict[str, str]
) -> None:
    response = httpx.get(f"{server.url}{path}", timeout=10)
    assert response.status_code == status
    assert response.json() == {"detail": detail}
    for name, value in headers.items():
        assert response.headers.get(name) == value


def test_dependency_in_a_websocket_route() -> None:
    app = FastAPI(lifespan=Lifespan(OffloadSettings(process={"max_workers": 1})))
    install(app)

    @app.websocket("/ws")
    async def ws(websocket: WebSocket, ex: Executor = Depends(get_executor)) -> None:
        await websocket.accept()
        x = int(await websocket.receive_text())
        await websocket.send_json({"result": await ex.run(funcs.add, x, x)})
        await websocket.close()

    with TestClient(app) as client, client.websocket_connect("/ws") as websocket:
        websocket.send_text("21")
        assert websocket.receive_json() == {"result": 42}


def raising_app(*, mount: str = "plain") -> tuple[Starlette, Starlette]:
    """An app wired with offload whose mounted app raises OffloadTimeout at /sub/late."""

    async def late(request: Request) -> Response:
        raise OffloadTimeout("late")

    sub = Starlette(routes=[Route("/late", late)])
    app = Starlette(lifespan=Lifespan(OffloadSettings(process={"max_workers": 1})))
    install(app)
    if mount == "plain":
        app.mount("/sub", sub)
    elif mount == "middleware":
        app.mount("/sub", GZipMiddleware(sub))
    elif mount == "nested":
        app.mount("/outer", Router(routes=[Mount("/sub", app=sub)]))
    return app, sub


@pytest.mark.parametrize(
    ("mount", "path"),
    [("plain", "/sub/late"), ("middleware", "/sub/late"), ("nested", "/outer/sub/late")],
)
def test_starlette_apps_mounted_any_way_are_covered(mount: str, path: str) -> None:
    app, _ = raising_app(mount=mount)
    with TestClient(app) as client:
        response = client.get(path)
    assert response.status_code == 504
    assert response.json() == {"detail": "the work took too long"}


def test_mounted_apps_are_covered_without_offloads_lifespan() -> None:
    # Decorated functions need no lifespan: the default Offloader serves them.
    async def late(request: Request) -> Response:
        raise OffloadTimeout("late")

    app = Starlette()
    install(app)
    app.mount("/sub", Starlette(routes=[Route("/late", late)]))
    with TestClient(app) as client:
        response = client.get("/sub/late")
    assert response.status_code == 504


def test_a_mounted_app_keeps_its_own_handler() -> None:
    app, sub = raising_app()

    async def mine(request: Request, exc: Exception) -> Response:
        return PlainTextResponse("mine", status_code=599)

    sub.add_exception_handler(OffloadTimeout, mine)
    with TestClient(app) as client:
        assert client.get("/sub/late").text == "mine"


def test_a_mounted_app_that_already_served_is_refused() -> None:
    app, sub = raising_app()
    with TestClient(sub, raise_server_exceptions=False) as client:
        client.get("/late")  # builds its middleware: its handlers are fixed now
    with pytest.raises(RuntimeError, match="mounted at '/sub' has served requests"):  # noqa: SIM117
        with TestClient(app):
            pass


def test_plain_starlette_route_gets_the_executor() -> None:
    async def add(request: Request) -> Response:
        ex = await get_executor(request)
        return JSONResponse(await ex.pool("thread").run(funcs.add, 2, 3))

    app = Starlette(
        routes=[Route("/add", add)],
        lifespan=Lifespan(OffloadSettings(process={"max_workers": 1})),
    )
    install(app)
    with TestClient(app) as client:
        assert client.get("/add").json() == 5


def test_lifespan_of_a_mounted_app_only_says_so() -> None:
    sub = FastAPI(lifespan=Lifespan(OffloadSettings(process={"max_workers": 1})))

    @sub.get("/workers")
    async def workers(ex: Executor = Depends(get_executor)) -> None:
        pass

    app = FastAPI()
    app.mount("/sub", sub)
    with TestClient(app) as client, pytest.raises(RuntimeError, match="mounted app"):
        client.get("/sub/workers")


def test_server_without_lifespan_says_so(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    server = start_server(args=("--lifespan", "off"), log=log)
    try:
        assert httpx.get(f"{server.url}/workers", timeout=10).status_code == 500
    finally:
        assert server.stop() in (0, -signal.SIGTERM)
    assert "--lifespan off" in log.read_text()


def websocket_app() -> FastAPI:
    app = FastAPI(lifespan=Lifespan(OffloadSettings(process={"max_workers": 1})))
    install(app)

    @app.websocket("/late/{accept}")
    async def late(
        websocket: WebSocket, accept: bool, ex: Executor = Depends(get_executor)
    ) -> None:
        if accept:
            await websocket.accept()
        await ex.options(timeout=0.2).run(funcs.sleep_then, 5, None)

    @app.websocket("/crash")
    async def crash(websocket: WebSocket, ex: Executor = Depends(get_executor)) -> None:
        await websocket.accept()
        await ex.run(funcs.exit_now, 3)

    return app


def test_websocket_errors_close_the_connection_with_a_code() -> None:
    with TestClient(websocket_app()) as client:
        with client.websocket_connect("/late/true") as websocket:
            late = websocket.receive()
        with client.websocket_connect("/crash") as websocket:
            crashed = websocket.receive()
    assert late == {"type": "websocket.close", "code": 1011, "reason": "the work took too long"}
    assert crashed == {"type": "websocket.close", "code": 1011, "reason": "internal server error"}


def test_websocket_errors_before_accept_deny_it_with_the_status() -> None:
    with (
        TestClient(websocket_app()) as client,
        pytest.raises(WebSocketDenialResponse) as denied,
        client.websocket_connect("/late/false"),
    ):
        pass
    assert denied.value.status_code == 504
    assert denied.value.json() == {"detail": "the work took too long"}


def test_websocket_client_leaving_cancels_the_call(tmp_path: Path) -> None:
    app = FastAPI(lifespan=Lifespan(OffloadSettings(process={"max_workers": 1})))
    install(app)
    pidfile = tmp_path / "pid"
    outcome: dict[str, Any] = {}

    @app.websocket("/spin")
    async def spin(websocket: WebSocket, ex: Executor = Depends(get_executor)) -> None:
        await websocket.accept()
        try:
            await ex.run(funcs.write_pid_then_spin, str(pidfile), 30)
        except WebSocketDisconnect as exc:
            outcome["code"] = exc.code
            outcome["cancelled"] = ex.stats().cancelled

    with TestClient(app) as client, client.websocket_connect("/spin") as websocket:
        wait_for(pidfile.exists, "the call reached a worker")
        websocket.close(1001)
        wait_for(lambda: "code" in outcome, "the call ended with WebSocketDisconnect")
    assert outcome == {"code": 1001, "cancelled": 1}
    assert_gone({int(pidfile.read_text())})


def test_websocket_messages_sent_during_a_call_still_reach_the_route() -> None:
    app = FastAPI(lifespan=Lifespan(OffloadSettings(process={"max_workers": 1})))
    install(app)

    @app.websocket("/echo")
    async def echo(websocket: WebSocket, ex: Executor = Depends(get_executor)) -> None:
        await websocket.accept()
        first = await websocket.receive_text()
        await ex.run(funcs.sleep_then, 0.3, None)  # the watch reads ahead meanwhile
        second = await websocket.receive_text()
        third = await websocket.receive_bytes()
        await websocket.send_json([first, second, third.decode()])
        await websocket.close()

    with TestClient(app) as client, client.websocket_connect("/echo") as websocket:
        websocket.send_text("a")
        websocket.send_text("b")
        websocket.send_bytes(b"c")
        assert websocket.receive_json() == ["a", "b", "c"]


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.02)
