"""FastAPI integration: the pools live as long as the app.

::

    from fastapi import Depends, FastAPI
    from offload import Executor, get_executor, lifespan
    from offload.fastapi import install

    app = FastAPI(lifespan=lifespan)       # pools start with the app, drain on shutdown
    install(app)                           # cancel on disconnect; 504, 503, 500 for errors

    @app.post("/resize")
    async def route(data: bytes, executor: Executor = Depends(get_executor)):
        return await executor.run(resize, data, 256)

This is the only module of the library that imports FastAPI or Starlette (the demo's
app, ``offload/demo/app.py``, is an application of it); ``import offload`` loads it only when
one of its names is used.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import TYPE_CHECKING, Any, cast

import anyio
from fastapi.responses import JSONResponse, Response
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, HTTPConnection
from starlette.routing import Router
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from ._disconnect import WATCH_KEY, DisconnectMiddleware, Watch
from ._errors import OffloadTimeout, PoolClosed, PoolOverloaded, PoolStartError, WorkerCrashed
from ._executor import Executor
from ._offloader import Offloader, starts_on_first_use
from ._server_timing import STATE_KEY as STATE_KEY  # where the Offloader is in the state
from ._server_timing import ServerTimingMiddleware
from ._servers import server_processes
from ._settings import usable_cpus

if TYPE_CHECKING:
    from starlette.types import ExceptionHandler

    from ._call import Call
    from ._pools.base import Pool
    from ._settings import OffloadSettings

__all__ = (
    "DisconnectMiddleware",
    "Lifespan",
    "RequestExecutor",
    "add_exception_handlers",
    "cover_mounted_apps",
    "get_executor",
    "install",
    "lifespan",
)


logger = logging.getLogger("offload")

#: seconds a client is told to wait before retrying a 503
RETRY_AFTER = 1

AppLifespan = Callable[[Any], AbstractAsyncContextManager[Mapping[str, Any] | None]]


class Lifespan:
    """A FastAPI (or Starlette) lifespan that runs an :class:`~offload.Offloader`.

    ``FastAPI(lifespan=lifespan)`` uses ``OffloadSettings()`` read from the
    environment when the app starts. With explicit settings, or around the app's own
    lifespan (which then runs with the pools already up, and whose state is kept)::

        FastAPI(lifespan=Lifespan(OffloadSettings(process={"max_workers": 4}),
                                  wraps=app_lifespan))

    On shutdown the Offloader stops accepting calls, lets calls in flight finish for
    ``shutdown_timeout`` seconds, then stops every worker.

    :param settings: the Offloader's settings; default: ``OffloadSettings()`` at startup
    :param wraps: the app's own lifespan, run inside this one
    """

    def __init__(
        self, settings: OffloadSettings | None = None, *, wraps: AppLifespan | None = None
    ) -> None:
        self.settings = settings
        self.wraps = wraps

    def __call__(self, app: Any) -> AbstractAsyncContextManager[dict[str, Any]]:
        return self._run(app)

    @asynccontextmanager
    async def _run(self, app: Any) -> AsyncIterator[dict[str, Any]]:
        if isinstance(app, Starlette):
            # Now, not in install(): the app's own handlers and mounts are all there.
            cover_mounted_apps(app)
        offloader = Offloader(self.settings)
        async with offloader:
            warn_if_oversubscribed(offloader.settings)
            state: dict[str, Any] = {STATE_KEY: offloader}
            if self.wraps is None:
                yield state
            else:
                async with self.wraps(app) as inner:
                    yield {**state, **(inner or {})}


lifespan = Lifespan()
"""``FastAPI(lifespan=lifespan)``: an Offloader from ``OffloadSettings()`` for the app's life."""


async def get_executor(request: HTTPConnection) -> Executor:
    """FastAPI dependency: ``executor: Executor = Depends(get_executor)``.

    Returns an executor of the Offloader started by :data:`lifespan`, for the
    default pool, bound to the request or WebSocket: with :func:`install` done, when
    the client disconnects while a call runs, the call is cancelled as by a deadline
    (a process worker running it is killed) and raises Starlette's
    :class:`~starlette.requests.ClientDisconnect`, which :func:`add_exception_handlers`
    answers with a bodiless 499; in a WebSocket route, Starlette's
    :class:`~starlette.websockets.WebSocketDisconnect`, as ``receive`` would. Turn
    this off with ``OffloadSettings(cancel_on_disconnect=False)``. It adds nothing to
    the OpenAPI schema.

    :param request: the request, or the WebSocket (FastAPI passes either)
    :raises RuntimeError: if the app was not started with offload's lifespan
    """
    offloader = _offloader_of(request)
    if not offloader.settings.cancel_on_disconnect:
        return offloader.executor
    watch = request.scope.get(WATCH_KEY)
    if watch is None:
        global _warned_no_watch
        if not _warned_no_watch:
            _warned_no_watch = True
            logger.warning(
                "offload: calls cannot be cancelled when clients disconnect: "
                "call offload.fastapi.install(app) where the app is built"
            )
        return offloader.executor
    return RequestExecutor(offloader, watch)


def _offloader_of(connection: HTTPConnection) -> Offloader:
    offloader = (connection.scope.get("state") or {}).get(STATE_KEY)
    if not isinstance(offloader, Offloader):
        raise RuntimeError(
            "no Offloader in the lifespan state: start the app with offload's lifespan, "
            "FastAPI(lifespan=offload.lifespan) or "
            "offload.fastapi.Lifespan(wraps=your_lifespan), on the outermost app "
            "(Starlette never runs the lifespan of a mounted app), with a server that "
            "runs it (not uvicorn --lifespan off)"
        )
    return offloader


_warned_no_watch = False


class RequestExecutor(Executor):
    """An :class:`~offload.Executor` whose calls end when the request's client leaves.

    While a call runs, a task waits for the request's :class:`Watch` (put in the
    scope by :class:`DisconnectMiddleware`, which :func:`install` adds) to see the
    client go; then the call is cancelled as by a deadline, and raises Starlette's
    :class:`~starlette.requests.ClientDisconnect` (an HTTP request) or
    :class:`~starlette.websockets.WebSocketDisconnect` (a WebSocket).

    A stream asks the Watch before each item: once the client has left, the stream
    is closed (its generator where it waits) and the item asked for raises the same.
    """

    __slots__ = ("_watch",)

    def __init__(self, offloader: Offloader, watch: Watch) -> None:
        super().__init__(offloader)
        self._watch = watch

    async def _submit(self, pool: Pool, call: Call) -> Any:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # trio
            pass
        else:
            return await self._submit_asyncio(loop, pool, call)
        result: Any = None
        error: Exception | None = None
        left = False
        async with anyio.create_task_group() as tg:
            with anyio.CancelScope() as scope:

                async def listen() -> None:
                    nonlocal left
                    await self._watch.wait_until_client_leaves()
                    left = True
                    scope.cancel()

                tg.start_soon(listen)
                try:
                    result = await pool.run(call)
                except Exception as exc:  # kept out of the task group: no ExceptionGroup
                    error = exc
            tg.cancel_scope.cancel()
        if left:
            raise self._disconnect_error()
        if error is not None:
            try:
                raise error
            finally:
                del error
        return result

    async def _submit_asyncio(self, loop: asyncio.AbstractEventLoop, pool: Pool, call: Call) -> Any:
        # Every request pays for this, and an anyio task group costs more on asyncio
        # than a bare task (CancelScope.cancel alone formats the task's repr; see
        # docs/benchmarks.md, "Figures behind the code"): the listener is a plain
        # task, cancelled once the call ends.
        # The done callback retrieves whatever the listener ends with, so an error
        # of the server's receive never surfaces as "exception never retrieved"; the
        # call is cancelled only when the client has gone.
        running = True
        with anyio.CancelScope() as scope:

            def on_listener_done(task: asyncio.Task[None]) -> None:
                if not task.cancelled() and task.exception() is None and running:
                    scope.cancel()

            listener = loop.create_task(self._watch.wait_until_client_leaves())
            listener.add_done_callback(on_listener_done)
            try:
                return await pool.run(call)
            finally:
                running = False
                listener.cancel()
        raise self._disconnect_error()  # reached only when on_listener_done() cancelled the scope

    def _client_gone(self) -> Callable[[], Exception | None]:
        return self._left

    def _left(self) -> Exception | None:
        """The error of a client that has left before the response was complete (as
        far as the Watch has seen), else None."""
        watch = self._watch
        if watch.disconnect is None or watch.response_done:
            return None
        return self._disconnect_error()

    def _disconnect_error(self) -> Exception:
        message = self._watch.disconnect
        if message is not None and message["type"] == "websocket.disconnect":
            return WebSocketDisconnect(message.get("code", 1000), message.get("reason"))
        return ClientDisconnect()


def install(app: Starlette) -> None:
    """The one line that wires offload's HTTP behaviour into an app: ``install(app)``.

    Adds :class:`DisconnectMiddleware` (so that calls made through
    :func:`get_executor` are cancelled when the client leaves), the middleware that
    writes the ``Server-Timing`` header when ``OffloadSettings.server_timing`` is on,
    and :func:`add_exception_handlers`. Call it where the app is built, before it starts,
    on the outermost app (FastAPI or Starlette): apps mounted in it get the same
    error mapping when it starts, or at its first request without offload's lifespan
    (:func:`cover_mounted_apps`).
    """
    app.add_middleware(ServerTimingMiddleware)
    app.add_middleware(DisconnectMiddleware, on_first_request=_cover_apps_mounted_in)
    add_exception_handlers(app)


def _cover_apps_mounted_in(app: Any) -> None:
    if isinstance(app, Starlette):
        cover_mounted_apps(app)


#: the exceptions offload's handlers answer
_HANDLED: tuple[type[Exception], ...] = (
    OffloadTimeout,
    PoolOverloaded,
    PoolClosed,
    PoolStartError,
    WorkerCrashed,
    ClientDisconnect,
)


def add_exception_handlers(app: Starlette) -> None:
    """Answer offload's errors with the right status and a short JSON body.

    ``OffloadTimeout`` -> 504; ``PoolOverloaded``, ``PoolClosed`` and
    ``PoolStartError`` (a pool that lost its workers and cannot start new ones) -> 503
    with ``Retry-After``; ``WorkerCrashed`` -> 500. The body is FastAPI's
    ``{"detail": ...}`` with a fixed message: nothing about the function, its
    arguments or the worker leaks to the client. A call cancelled because its client
    left (``ClientDisconnect``) gets a bodiless 499. Exceptions raised by your own
    functions are left to FastAPI's handlers.

    In a WebSocket route, an error raised before the WebSocket is accepted denies it
    with the same response; after, it closes the connection with code 1011
    (internal error: timeout, crash) or 1013 (try again later: overloaded, closed)
    and the same message as reason.
    """
    handlers = {
        OffloadTimeout: _timeout,
        PoolOverloaded: _overloaded,
        PoolClosed: _closed,
        # A pool without workers heals when a start succeeds: as unavailable as closed.
        PoolStartError: _closed,
        WorkerCrashed: _crashed,
        ClientDisconnect: _disconnected,
    }
    for exc, handler in handlers.items():
        # One handler for HTTP and WebSocket alike, which Starlette's type splits.
        app.add_exception_handler(exc, cast("ExceptionHandler", handler))


def cover_mounted_apps(app: Starlette) -> None:
    """Give every app mounted in ``app`` (at any depth) ``app``'s handlers of offload's errors.

    A mounted Starlette or FastAPI app answers exceptions with its own handlers
    only: without offload's, an ``OffloadTimeout`` in it becomes a plain-text 500,
    and the 499 of a client that left an ERROR traceback. A handler the mounted app
    has of its own is kept. :data:`Lifespan` calls this when the app starts, and
    :func:`install`'s middleware at the first request.

    :raises RuntimeError: if a mounted app lacking them has already served requests
        (its handlers are fixed then)
    """
    handlers = {
        exc: app.exception_handlers[exc] for exc in _HANDLED if exc in app.exception_handlers
    }
    if not handlers:
        return
    for path, sub in _mounted_apps(app.router, ""):
        missing = {exc: h for exc, h in handlers.items() if exc not in sub.exception_handlers}
        if not missing:
            continue
        if sub.middleware_stack is not None:
            raise RuntimeError(
                f"the app mounted at {path!r} has served requests before offload's error "
                "handlers could be given to it: call offload.fastapi.add_exception_handlers "
                "on it where it is built"
            )
        sub.exception_handlers.update(missing)


def _mounted_apps(router: Router, prefix: str) -> Iterator[tuple[str, Starlette]]:
    for route in router.routes:
        inner: Any = getattr(route, "app", None)
        # Through the middleware a Mount may wrap it in, to the app or router.
        for _ in range(32):
            if inner is None or isinstance(inner, (Starlette, Router)):
                break
            inner = getattr(inner, "app", None)
        path = prefix + getattr(route, "path", "")
        if isinstance(inner, Starlette):
            yield path, inner
            yield from _mounted_apps(inner.router, path)
        elif isinstance(inner, Router):
            yield from _mounted_apps(inner, path)


# WebSocket close codes (RFC 6455, IANA registry): the connection's counterparts of
# 500 and 503, for errors raised once the WebSocket was accepted.
_INTERNAL_ERROR = 1011
_TRY_AGAIN_LATER = 1013


async def _answer(
    conn: HTTPConnection,
    status: int,
    detail: str,
    close_code: int,
    headers: Mapping[str, str] | None = None,
) -> Response | None:
    """The JSON answer; on an accepted WebSocket, a close with ``close_code`` instead
    (a response then would break the protocol), and nothing on a closed one. A
    WebSocket not yet accepted is denied with the response, as Starlette does."""
    if isinstance(conn, WebSocket) and conn.application_state != WebSocketState.CONNECTING:
        if conn.application_state == WebSocketState.CONNECTED:
            try:
                await conn.close(close_code, detail)
            except (RuntimeError, OSError):  # the client left meanwhile: nobody to tell
                pass
        return None
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


async def _timeout(conn: HTTPConnection, exc: Exception) -> Response | None:
    return await _answer(conn, 504, "the work took too long", _INTERNAL_ERROR)


async def _overloaded(conn: HTTPConnection, exc: Exception) -> Response | None:
    retry = {"Retry-After": str(RETRY_AFTER)}
    return await _answer(conn, 503, "server busy, try again later", _TRY_AGAIN_LATER, retry)


async def _closed(conn: HTTPConnection, exc: Exception) -> Response | None:
    retry = {"Retry-After": str(RETRY_AFTER)}
    return await _answer(conn, 503, "server unavailable, try again later", _TRY_AGAIN_LATER, retry)


async def _disconnected(conn: HTTPConnection, exc: Exception) -> Response:
    # Nobody is left to read it: 499, nginx's "client closed request", for the logs.
    return Response(status_code=499)


async def _crashed(conn: HTTPConnection, exc: Exception) -> Response | None:
    method = conn.scope.get("method", "WEBSOCKET")
    logger.error("request %s %s: %s", method, conn.url.path, exc)
    return await _answer(conn, 500, "internal server error", _INTERNAL_ERROR)


def warn_if_oversubscribed(settings: OffloadSettings) -> None:
    """Log a warning when the worker processes of this server outnumber the CPUs.

    Counts the workers of every process pool of ``settings`` that starts with the
    Offloader (not one that starts on first use), times the number of server
    processes: ``uvicorn --workers``, ``gunicorn -w`` or ``hypercorn --workers``
    read from the running server's configuration, else ``WEB_CONCURRENCY``; against
    the CPUs this process may use (cgroup quotas included). Call it on the event
    loop's thread.
    """
    lazy = starts_on_first_use(settings)
    per_server = sum(
        pool.resolved_max_workers("process")
        for name, pool in settings.pool_settings().items()
        if pool.kind == "process" and name not in lazy
    )
    servers, source = server_processes()
    cpus = usable_cpus()
    if per_server * servers > cpus:
        logger.warning(
            "offload: %d worker processes per server x %d server processes (%s) = %d, "
            "for %d CPUs: CPU-bound calls will compete; lower OFFLOAD_PROCESS__MAX_WORKERS "
            "or the number of server processes",
            per_server,
            servers,
            source,
            per_server * servers,
            cpus,
        )
