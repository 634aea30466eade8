"""A call leaves no reference cycle behind: all it allocates is freed by reference
counting, at once.

Garbage that only the cyclic GC can free makes its collections run often, and a full
collection stops the whole process, event loop included: 20-30 ms for a small app's
heap on the benchmarks' VM. Before these tests, every thread-pool call left 16 such
objects, and 64 callers triggered a full collection every ~6,000 calls.
"""

from __future__ import annotations

import gc
import types
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

import offload
from offload import Executor, OffloadTimeout

from . import funcs

OURS = str(Path(offload.__file__).parent)


def ours(obj: object) -> bool:
    if isinstance(obj, types.FrameType):
        return obj.f_code.co_filename.startswith(OURS)
    return type(obj).__module__.startswith("offload")


@contextmanager
def cyclic_garbage() -> Iterator[Counter[str]]:
    """Counts, by type, offload's objects (and frames) made while the block ran and
    freed only as cyclic garbage."""
    found: Counter[str] = Counter()
    gc.collect()
    # Only what the block made: an earlier test's Offloader may become garbage now
    # (a thread abandoned by a deadline lets go of its pool when its call ends).
    before = {id(obj) for obj in gc.get_objects()}
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        yield found
        gc.collect()
        found.update(
            type(obj).__name__ for obj in gc.garbage if ours(obj) and id(obj) not in before
        )
    finally:
        gc.garbage.clear()
        gc.set_debug(0)


async def raises(call: Awaitable[object], kind: type[BaseException]) -> None:
    # Not pytest.raises: its ExceptionInfo, a local of this frame, would hold the
    # traceback, which holds this frame: a cycle of the test's own.
    try:
        await call
    except kind:
        return
    pytest.fail(f"{kind.__name__} not raised")


def scenarios(ex: Executor, kind: str) -> list[Callable[[], Awaitable[object]]]:
    pool = ex.pool(kind)
    decorated = funcs.thread_double if kind == "thread" else funcs.double
    return [
        lambda: pool.run(funcs.add, 1, 2),
        lambda: pool.options(timeout=30).run(funcs.add, 1, 2),
        lambda: raises(pool.run(funcs.boom, "no"), funcs.Boom),
        lambda: decorated(21),
        lambda: raises(pool.options(timeout=0.05).run(funcs.sleep_then, 5, None), OffloadTimeout),
    ]


@pytest.mark.parametrize("kind", ["thread", "process"])
async def test_calls_leave_no_cycles(ex: Executor, kind: str) -> None:
    calls = scenarios(ex, kind)
    for call in calls:  # first calls fill caches, start replacement workers...
        await call()
    with cyclic_garbage() as found:
        for _ in range(5):
            for call in calls[:-1]:
                await call()
    assert not found, f"cyclic garbage of offload's: {dict(found)}"


@pytest.mark.parametrize("kind", ["thread", "process"])
async def test_a_deadline_leaves_no_cycles(ex: Executor, kind: str) -> None:
    timeout = scenarios(ex, kind)[-1]
    await timeout()
    with cyclic_garbage() as found:
        await timeout()
    assert not found, f"cyclic garbage of offload's: {dict(found)}"


async def test_a_watched_request_leaves_no_cycles() -> None:
    from starlette.types import Message, Receive, Scope, Send

    from offload._disconnect import WATCH_KEY, DisconnectMiddleware

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        assert scope[WATCH_KEY] is not None
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        pass

    middleware = DisconnectMiddleware(app)
    with cyclic_garbage() as found:
        for _ in range(5):
            scope: Scope = {"type": "http", "headers": [(b"host", b"x")]}
            await middleware(scope, receive, send)
            del scope
    assert not found, f"cyclic garbage of offload's: {dict(found)}"


async def consume(results: Any) -> None:
    async with results:
        async for _ in results:
            pass


@pytest.mark.parametrize("which", [0, 1, 2])
@pytest.mark.parametrize("kind", ["thread", "process"])
async def test_a_map_leaves_no_cycles(ex: Executor, kind: str, which: int) -> None:
    pool = ex.pool(kind)
    maps = [
        lambda: consume(pool.map(abs, range(-2000, 0))),
        lambda: consume(pool.map(abs, range(-20, 0), chunksize=1)),
        # One chunk, its items failing: nothing left to cancel (a cancelled task of
        # anyio's on asyncio leaves a cycle of its own).
        lambda: raises(consume(pool.map(funcs.boom, ["no"] * 5, chunksize=10)), funcs.Boom),
    ][which : which + 1]
    for run in maps:
        await run()
    with cyclic_garbage() as found:
        for run in maps:
            await run()
    assert not found, f"cyclic garbage of offload's: {dict(found)}"
