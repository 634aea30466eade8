from __future__ import annotations

import anyio
import pytest

from offload import Offloader, OffloadSettings, PoolClosed

from . import funcs
from .conftest import children


class Oops(Exception):
    pass


async def test_body_exception_propagates_unwrapped(settings: OffloadSettings) -> None:
    offloader = Offloader(settings)

    async def body() -> None:
        async with offloader as ex:
            assert await ex.run(funcs.add, 1, 1) == 2
            raise Oops

    with pytest.raises(Oops):
        await body()
    assert not children()


async def test_cancelled_body_stops_pools_without_waiting(settings: OffloadSettings) -> None:
    offloader = Offloader(settings)
    started = anyio.Event()

    async def body() -> None:
        async with offloader as ex:
            started.set()
            await ex.run(funcs.sleep_then, 30, None)

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(body)
            await started.wait()
            await anyio.sleep(0.2)  # let the call reach its worker
            tg.cancel_scope.cancel()
    assert not offloader.running
    assert not children()
    with pytest.raises(PoolClosed):
        await offloader.executor.run(funcs.add, 1, 2)


async def test_start_failure_leaves_nothing_behind() -> None:
    settings = OffloadSettings(
        process={"max_workers": 2, "initializer": "tests.funcs:does_not_exist"}
    )
    with pytest.raises(Exception, match="initializer"):
        async with Offloader(settings):
            pytest.fail("the body must not run")
    assert not children()
