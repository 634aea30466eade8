"""offload's own helper threads: one-off setup, and the copies and decodes of large
payloads, off the event loop's thread.

They run in anyio's worker threads, but under a limiter of their own: anyio's default
limiter (40 tokens) is the application's, which FastAPI's sync routes and dependencies
share. Under it, an 8 MiB result waited for a busy route's thread (2.8 s, and a spurious
``OffloadTimeout``); and a library must not take tokens the application counts on.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TypeVar

import anyio
import anyio.to_thread
from anyio.lowlevel import RunVar

__all__ = ("helper_limiter", "run_in_helper_thread")

T = TypeVar("T")

# One per event loop, as anyio's own default limiter: a limiter belongs to a loop.
_limiter: RunVar[anyio.CapacityLimiter] = RunVar("offload_helper_limiter")


def helper_limiter() -> anyio.CapacityLimiter:
    """The limiter of offload's helper threads on this event loop.

    As many tokens as CPUs, at least 4: the work is CPU-bound copying, which more
    threads would not finish sooner. (Not the cgroup-aware count: its first reading
    opens files, which the loop's thread must not.)
    """
    try:
        return _limiter.get()
    except LookupError:
        limiter = anyio.CapacityLimiter(max(4, os.cpu_count() or 1))
        _limiter.set(limiter)
        return limiter


async def run_in_helper_thread(fn: Callable[..., T], *args: object) -> T:
    """``fn(*args)`` in a worker thread under :func:`helper_limiter`.

    Cancellation: as ``anyio.to_thread.run_sync``, the caller waits for ``fn`` to
    return, then sees the cancellation.
    """
    return await anyio.to_thread.run_sync(fn, *args, limiter=helper_limiter())
