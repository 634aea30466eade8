"""Noticing that an HTTP client went away, without taking the request body from the app.

An ASGI server answers ``receive()`` with ``http.disconnect`` once the body is read
and the client leaves, but only if someone is calling ``receive()``; after the body
nobody does. :class:`DisconnectMiddleware` puts a :class:`Watch` between the server
and the app. The Watch is the only caller of the server's ``receive``, one call at a
time; the app's ``receive`` gets every message in order, body chunks included, and
then a repeatable ``http.disconnect`` (hypercorn delivers it only once). While an
offloaded call runs, :meth:`Watch.wait_until_client_leaves` reads ahead: it queues
body chunks the app has not asked for yet (up to 64 KiB; not when the client sent
``Expect: 100-continue``, which reading would answer), then waits for the disconnect.

``http.disconnect`` also arrives after a complete response (uvicorn returns it at
once, keep-alive or not): that is the request ending, not the client leaving, so a
call made after the response (a background task) is never cancelled.

A WebSocket is watched the same way: ``websocket.connect`` and ``websocket.receive``
messages are queued like body chunks (up to 64 KiB, or 256 messages), and
``websocket.disconnect`` is the client leaving unless the app had closed the
connection; the app gets it again on every later ``receive`` (uvicorn's queue
delivers it once).

See docs/notes/asgi-disconnect.md for the servers' behaviour this relies on.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import anyio

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ("WATCH_KEY", "DisconnectMiddleware", "Watch")

#: where the request's Watch lives in the ASGI scope
WATCH_KEY = "offload.watch"
#: request body bytes (WebSocket message payload) read ahead of the app, at most
READ_AHEAD = 1 << 16
#: messages read ahead of the app, at most: WebSocket messages can be empty
READ_AHEAD_MESSAGES = 256


class Watch:
    """One request's (or WebSocket's) view of its client: the app's ``receive``, and
    :meth:`wait_until_client_leaves`."""

    def __init__(self, receive: Receive, scope: Scope) -> None:
        self._upstream = receive
        # The headers, not the scope: the scope holds the Watch, and a cycle
        # between them would leave each request to the cyclic GC.
        self._headers = scope.get("headers") or ()
        # Created on first use: most requests never need them, and every request
        # would pay for anyio finding out which event loop runs.
        self._lock_: anyio.Lock | None = None
        self._left_: anyio.Event | None = None
        self._queue: deque[Message] = deque()
        self._queued_bytes = 0
        self._body_done = False  # an HTTP request's; a WebSocket's messages never end
        self._disconnected: Message | None = None  # the message, repeated to the app
        self.response_done = False

    @property
    def _lock(self) -> anyio.Lock:
        if self._lock_ is None:
            self._lock_ = anyio.Lock()
        return self._lock_

    @property
    def _left(self) -> anyio.Event:
        if self._left_ is None:
            self._left_ = anyio.Event()
            if self._disconnected is not None and not self.response_done:
                self._left_.set()
        return self._left_

    @property
    def disconnect(self) -> Message | None:
        """The server's ``http.disconnect`` or ``websocket.disconnect``, once it came."""
        return self._disconnected

    @property
    def _may_read_ahead(self) -> bool:
        for name, value in self._headers:
            if name == b"expect":
                return bool(value.lower() != b"100-continue")
        return True

    async def _pull(self) -> None:
        """Take one message from the server; the caller holds the lock."""
        message = await self._upstream()
        kind = message["type"]
        if kind in ("http.disconnect", "websocket.disconnect"):
            self._disconnected = message
            if not self.response_done and self._left_ is not None:
                self._left_.set()
            return
        self._queue.append(message)
        self._queued_bytes += _size(message)
        if kind == "http.request" and not message.get("more_body", False):
            self._body_done = True

    async def receive(self) -> Message:
        """The app's ``receive``: every message, in order."""
        while True:
            if self._queue:
                message = self._queue.popleft()
                self._queued_bytes -= _size(message)
                return message
            if self._disconnected is not None:
                return self._disconnected
            async with self._lock:
                if not self._queue and self._disconnected is None:
                    await self._pull()

    async def wait_until_client_leaves(self) -> None:
        """Return once the client has left before the response was complete."""
        while not self._left.is_set():
            reading_ahead = not self._body_done
            if (
                self.response_done
                or self._disconnected is not None
                or (reading_ahead and not self._may_read_ahead)
                or (reading_ahead and self._queued_bytes >= READ_AHEAD)
                or len(self._queue) >= READ_AHEAD_MESSAGES
            ):
                # Nothing more to learn by reading: wait for the app to read on.
                await self._left.wait()
                return
            async with self._lock:
                if not self._left.is_set() and self._disconnected is None:
                    await self._pull()


def _size(message: Message) -> int:
    """The bytes a queued message holds: a body chunk, a WebSocket frame's payload."""
    if message["type"] == "http.request":
        return len(message.get("body", b""))
    return len(message.get("bytes") or b"") + len(message.get("text") or "")


def _ends_response(message: Message) -> bool:
    kind = message["type"]
    if kind == "websocket.close":
        return True
    return kind in ("http.response.body", "websocket.http.response.body") and not message.get(
        "more_body", False
    )


class DisconnectMiddleware:
    """Pure ASGI middleware giving each HTTP request and WebSocket a :class:`Watch`
    in its scope.

    :param on_first_request: called once, with the scope's ``app``, before the first
        request or WebSocket goes on
    """

    def __init__(
        self, app: ASGIApp, *, on_first_request: Callable[[Any], None] | None = None
    ) -> None:
        self.app = app
        self._on_first_request = on_first_request

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or WATCH_KEY in scope:
            # lifespan; or a mounted app's middleware, watched by the outer one already
            await self.app(scope, receive, send)
            return
        if self._on_first_request is not None:
            hook, self._on_first_request = self._on_first_request, None
            hook(scope.get("app"))
        watch = Watch(receive, scope)
        scope[WATCH_KEY] = watch

        async def watched_send(message: Message) -> None:
            if _ends_response(message):
                watch.response_done = True
            await send(message)

        await self.app(scope, watch.receive, watched_send)
