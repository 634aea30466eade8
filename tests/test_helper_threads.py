"""offload's own helper threads never wait for anyio's default thread limiter, which the
application shares (FastAPI runs its sync routes and dependencies under it)."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator

import anyio
import anyio.to_thread
import pytest

from offload import Offloader, OffloadSettings

from . import funcs

BIG = 8 << 20  # past every threshold: out of band, copied or decoded in a helper thread


@pytest.fixture
async def default_limiter_exhausted() -> AsyncIterator[anyio.CapacityLimiter]:
    """Every token of anyio's default thread limiter held by a blocked thread."""
    limiter = anyio.to_thread.current_default_thread_limiter()
    release = threading.Event()

    async def hold() -> None:
        await anyio.to_thread.run_sync(release.wait)

    async with anyio.create_task_group() as tg:
        try:
            for _ in range(int(limiter.total_tokens)):
                tg.start_soon(hold)
            with anyio.fail_after(30):
                while limiter.borrowed_tokens < limiter.total_tokens:
                    await anyio.sleep(0.01)
            yield limiter
        finally:
            release.set()


@pytest.mark.parametrize("cross_memory", [True, False], ids=["cross-memory", "channel"])
async def test_large_payloads_while_the_default_limiter_is_exhausted(
    default_limiter_exhausted: anyio.CapacityLimiter, cross_memory: bool
) -> None:
    limiter = default_limiter_exhausted
    settings = OffloadSettings(
        process={"max_workers": 1, "cross_memory": cross_memory},
        thread={"max_workers": 1},
        lag_probe=False,
    )
    # A safety bound only: waiting for the default limiter would wait for ever.
    with anyio.fail_after(60):
        async with Offloader(settings) as ex:  # starting uses helper threads too
            assert len(await ex.run(funcs.make_bytes, BIG)) == BIG
            size, _, _ = await ex.run(funcs.bytes_and_size, bytes(BIG))
            assert size == BIG
            assert await ex.pool("thread").run(funcs.add, 1, 2) == 3
            assert limiter.borrowed_tokens == limiter.total_tokens  # still all taken
