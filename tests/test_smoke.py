from __future__ import annotations

from offload import Executor

from . import funcs


async def test_process_round_trip(ex: Executor) -> None:
    assert await ex.pool("process").run(funcs.add, 2, 3) == 5


async def test_thread_round_trip(ex: Executor) -> None:
    assert await ex.pool("thread").run(funcs.add, 2, 3) == 5


async def test_decorated(ex: Executor) -> None:
    assert await funcs.double(21) == 42
    assert await funcs.thread_double(4) == 8
