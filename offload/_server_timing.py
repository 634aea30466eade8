"""The ``Server-Timing`` header: where the time of a request's offloaded calls went.

With ``OffloadSettings(server_timing=True)``, :class:`ServerTimingMiddleware` (added
by ``offload.fastapi.install``) gives each HTTP request a
:class:`~offload._stats.RequestTimings` in a context variable, which the pools add
every call of the request to, whether made through ``get_executor`` or an
``@offload`` function: the request's task and the tasks it starts share it. When the
response starts, the sums go into the header (W3C Server Timing), in milliseconds::

    Server-Timing: offload-queue;dur=0.012, offload-transfer;dur=0.061,
                   offload-run;dur=48.113, offload-calls;desc=2

A phase no call measured (the transfer of a dask call) is left out, and a response
that started before any call ended (a streaming one) carries what came before it,
or no header.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._offloader import Offloader
from ._stats import RequestTimings, request_timings

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ("STATE_KEY", "ServerTimingMiddleware", "header_value")

#: the key of the Offloader in the lifespan state (``request.state.offload``)
STATE_KEY = "offload"
_HEADER = b"server-timing"


def header_value(timings: RequestTimings) -> bytes:
    """The header's value for ``timings``."""
    metrics = [
        f"offload-{name};dur={seconds * 1000:.3f}"
        for name, seconds in (
            ("queue", timings.queue_wait),
            ("transfer", timings.transfer),
            ("run", timings.run),
        )
        if seconds is not None
    ]
    metrics.append(f"offload-calls;desc={timings.calls}")
    return ", ".join(metrics).encode("ascii")


def _wanted(scope: Scope) -> bool:
    state = scope.get("state")
    offloader = state.get(STATE_KEY) if state else None
    return isinstance(offloader, Offloader) and offloader.settings.server_timing


class ServerTimingMiddleware:
    """Pure ASGI middleware: the ``Server-Timing`` header of the request's offloaded
    calls, when its Offloader's ``server_timing`` setting is on (read at each request:
    the Offloader starts after the app is built)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or request_timings.get() is not None or not _wanted(scope):
            # not HTTP, a mounted app's middleware inside the outer one's, or off
            await self.app(scope, receive, send)
            return
        timings = RequestTimings()

        async def timed_send(message: Message) -> None:
            if message["type"] == "http.response.start" and timings.calls:
                headers = [*message.get("headers", ()), (_HEADER, header_value(timings))]
                message = {**message, "headers": headers}
            await send(message)

        token = request_timings.set(timings)
        try:
            await self.app(scope, receive, timed_send)
        finally:
            request_timings.reset(token)
