"""The app the web tests serve with a real uvicorn (or hypercorn) on 127.0.0.1."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
from fastapi import APIRouter, BackgroundTasks, Depends, FastAPI, Request, WebSocket
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.responses import Response, StreamingResponse
from starlette.websockets import WebSocketDisconnect

from offload import (
    Executor,
    OffloadSettings,
    PoolClosed,
    PoolOverloaded,
    PoolStartError,
    get_executor,
)
from offload.fastapi import Lifespan, install

from .. import funcs, stream_funcs
from . import raising

SETTINGS = OffloadSettings(
    process={"max_workers": 2},
    thread={"max_workers": 2},
    pools={"tiny": {"kind": "process", "max_workers": 1, "max_pending": 0}},
    shutdown_timeout=10,
    cancel_on_disconnect=not os.environ.get("TEST_NO_CANCEL"),
    server_timing=bool(os.environ.get("TEST_SERVER_TIMING")),
)


@asynccontextmanager
async def app_lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
    # The app's own setup runs with the pools already up.
    yield {"greeting": "hello"}


app = FastAPI(lifespan=Lifespan(SETTINGS, wraps=app_lifespan))
install(app)

if os.environ.get("TEST_BASE_HTTP_MIDDLEWARE"):

    class Passthrough(BaseHTTPMiddleware):
        async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
            return await call_next(request)

    app.add_middleware(Passthrough)


@app.get("/health")
async def health(request: Request) -> dict[str, Any]:
    # Served without the lifespan too (uvicorn --lifespan off), to say what breaks.
    return {"ok": True, "greeting": getattr(request.state, "greeting", None)}


@app.get("/workers")
async def workers(ex: Executor = Depends(get_executor)) -> dict[str, Any]:
    stats = ex.offloader.stats()
    return {name: {"workers": s.workers, "busy": s.busy} for name, s in stats.items()}


@app.post("/add/{x}")
async def add(x: int, ex: Executor = Depends(get_executor)) -> dict[str, int]:
    return {"result": await ex.run(funcs.add, x, x), "decorated": await funcs.double(x)}


@app.get("/sleep/{seconds}")
async def sleep(seconds: float, ex: Executor = Depends(get_executor)) -> dict[str, Any]:
    return {"result": await ex.run(funcs.sleep_then, seconds, "slept")}


@app.get("/spin/{seconds}")
async def spin(seconds: float, ex: Executor = Depends(get_executor)) -> dict[str, Any]:
    return {"result": await ex.run(funcs.spin, seconds)}


@app.get("/sleep-then-touch/{seconds}")
async def sleep_then_touch(
    seconds: float, path: str, ex: Executor = Depends(get_executor)
) -> dict[str, Any]:
    return {"result": await ex.run(funcs.sleep_then_touch, seconds, path)}


@app.get("/hold")
async def hold(path: str, ex: Executor = Depends(get_executor)) -> dict[str, Any]:
    """Holds a worker until ``path`` exists: a request in flight for as long as the
    test needs."""
    return {"result": await ex.run(funcs.wait_for_file, path, "released")}


@app.get("/ticks")
async def ticks(marker: str, ex: Executor = Depends(get_executor)) -> StreamingResponse:
    """Streams a generator's ticks from a thread until the client leaves."""

    async def body() -> AsyncIterator[bytes]:
        async with ex.pool("thread").options(buffer=2).stream(stream_funcs.ticks, marker) as items:
            async for tick in items:
                yield tick

    return StreamingResponse(body(), media_type="text/plain")


@app.get("/tiny/numbers")
async def tiny_numbers(
    progress: str, marker: str, hold: int, ex: Executor = Depends(get_executor)
) -> StreamingResponse:
    """Streams numbers from the "tiny" pool's only worker process; after ``hold`` of
    them the response waits (as one does sending to a client that reads slowly),
    while the generator runs its buffer ahead and waits at a ``yield``."""

    async def body() -> AsyncIterator[bytes]:
        async with (
            ex.pool("tiny")
            .options(buffer=2)
            .stream(stream_funcs.numbers, 1000, progress, marker) as items
        ):
            async for number in items:
                yield f"{number}\n".encode()
                if number + 1 == hold:
                    await anyio.sleep_forever()

    return StreamingResponse(body(), media_type="text/plain")


@app.get("/tiny/chunks")
async def tiny_chunks(
    size: int, progress: str, marker: str, ex: Executor = Depends(get_executor)
) -> StreamingResponse:
    """Streams lines of ``size`` bytes from the "tiny" pool's only worker process."""

    async def body() -> AsyncIterator[bytes]:
        async with (
            ex.pool("tiny")
            .options(buffer=2)
            .stream(stream_funcs.chunks, size, progress, marker) as items
        ):
            async for chunk in items:
                yield chunk

    return StreamingResponse(body(), media_type="text/plain")


@app.get("/tiny/stuck")
async def tiny_stuck(marker: str, ex: Executor = Depends(get_executor)) -> StreamingResponse:
    """Streams from the "tiny" pool's worker a generator stuck computing its second item."""

    async def body() -> AsyncIterator[bytes]:
        async with ex.pool("tiny").stream(stream_funcs.stuck_after_one, marker) as items:
            async for number in items:
                yield f"{number}\n".encode()

    return StreamingResponse(body(), media_type="text/plain")


@app.get("/tiny/pid")
async def tiny_pid(ex: Executor = Depends(get_executor)) -> dict[str, int]:
    return {"pid": await ex.pool("tiny").run(funcs.getpid)}


@app.get("/timeout")
async def timeout(ex: Executor = Depends(get_executor)) -> None:
    await ex.options(timeout=0.2).run(funcs.sleep_then, 5, None)


@app.get("/crash")
async def crash(ex: Executor = Depends(get_executor)) -> None:
    await ex.run(funcs.exit_now, 3)


@app.get("/overload")
async def overload(ex: Executor = Depends(get_executor)) -> None:
    tiny = ex.pool("tiny")
    refused: PoolOverloaded | None = None
    async with anyio.create_task_group() as tg:
        tg.start_soon(tiny.run, funcs.sleep_then, 0.3, None)
        while tiny.stats().busy == 0:
            await anyio.sleep(0.01)
        try:
            await tiny.run(funcs.add, 1, 1)  # the only worker is busy, no queue: refused
        except PoolOverloaded as exc:
            refused = exc
    if refused is not None:
        raise refused


@app.get("/closed")
async def closed() -> None:
    raise PoolClosed("pool 'process' is closed")


@app.get("/start-error")
async def start_error() -> None:
    raise PoolStartError("pool 'process' has had no worker for 60 s")


@app.get("/user-error")
async def user_error(ex: Executor = Depends(get_executor)) -> None:
    await ex.run(funcs.boom, "secret detail")


@app.post("/spin-body/{seconds}")
async def spin_body(
    seconds: float, payload: dict[str, Any], ex: Executor = Depends(get_executor)
) -> dict[str, Any]:
    return {"result": await ex.run(funcs.spin, seconds), "echo": payload}


@app.post("/ignore-body/{seconds}")
async def ignore_body(seconds: float, ex: Executor = Depends(get_executor)) -> dict[str, Any]:
    # Has a body it never reads: the watch reads ahead to see the client leave.
    return {"result": await ex.run(funcs.spin, seconds)}


@app.get("/background")
async def background(
    path: str, tasks: BackgroundTasks, ex: Executor = Depends(get_executor)
) -> None:
    # After the response, the request is over: its calls must not count as abandoned.
    tasks.add_task(ex.run, funcs.sleep_then_touch, 0.3, path)


@app.get("/http-error/{kind}")
async def http_error(kind: str, ex: Executor = Depends(get_executor)) -> None:
    pool = ex.pool(kind)
    await pool.run(raising.raise_fastapi_http, 404, "no such item", {"X-Why": "gone"})


@app.websocket("/ws")
async def ws(websocket: WebSocket, ex: Executor = Depends(get_executor)) -> None:
    await websocket.accept()
    x = int(await websocket.receive_text())
    await websocket.send_json({"result": await ex.run(funcs.add, x, x)})
    await websocket.close()


# The same routes in a mounted FastAPI app (wired only through the outer app) and
# in a router included with a prefix.
def shaped_routes(router: APIRouter | FastAPI) -> None:
    @router.get("/timeout")
    async def shaped_timeout(ex: Executor = Depends(get_executor)) -> None:
        await ex.options(timeout=0.2).run(funcs.sleep_then, 5, None)

    @router.get("/spin/{seconds}")
    async def shaped_spin(seconds: float, ex: Executor = Depends(get_executor)) -> dict[str, Any]:
        return {"result": await ex.run(funcs.spin, seconds)}

    @router.get("/http-error")
    async def shaped_http_error(ex: Executor = Depends(get_executor)) -> None:
        await ex.run(raising.raise_fastapi_http, 409, "conflict", None)


sub = FastAPI()
shaped_routes(sub)
app.mount("/sub", sub)
api = APIRouter()
shaped_routes(api)
app.include_router(api, prefix="/api")


@app.websocket("/ws-spin/{seconds}")
async def ws_spin(
    websocket: WebSocket, seconds: float, ex: Executor = Depends(get_executor)
) -> None:
    await websocket.accept()
    try:
        await websocket.send_json({"result": await ex.run(funcs.spin, seconds)})
    except WebSocketDisconnect:
        return  # the client left: the call was cancelled, nobody to answer
    await websocket.close()
