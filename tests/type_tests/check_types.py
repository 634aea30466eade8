"""Read by mypy (tests/test_static.py), never run: the public API's types, pinned."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, assert_type

from offload import Executor, OffloadedFunction, OffloadSettings, offload


def plain(x: int, *, label: str = "") -> str:
    return f"{label}{x}"


bare = offload(plain)
bare_as_callable: Callable[[int], Awaitable[str]] = bare


@offload(kind="thread", timeout=2)
def factory(x: int) -> bytes:
    return bytes(x)


factory_as_callable: Callable[[int], Awaitable[bytes]] = factory
assert isinstance(factory, OffloadedFunction)
assert_type(factory.__wrapped__(3), bytes)

OffloadSettings(process={"max_workers": 2}, pools={"ml": {"kind": "process"}})


async def calls(ex: Executor) -> None:
    assert_type(await bare(1, label="a"), str)
    assert_type(await factory(3), bytes)
    assert_type(await ex.run(plain, 1, label="x"), str)
    assert_type(await ex.run(factory, 3), bytes)
    assert_type(await ex.pool("thread").options(timeout=1).run(plain, 2), str)
    await ex.run(plain, "not an int")  # type: ignore[call-overload]
    await bare("x")  # type: ignore[arg-type]


async def awaitable(ex: Executor) -> None:
    # An awaitable outside workers (inside one, the call returns the result itself).
    call = factory(3)
    assert_type(call, Coroutine[Any, Any, bytes])  # type: ignore[unused-coroutine]
    assert_type(await call, bytes)
