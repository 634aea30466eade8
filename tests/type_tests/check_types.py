"""Read by mypy (tests/test_static.py), never run: the public API's types, pinned."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Generator, Iterator
from typing import Any, assert_type

from offload import (
    Executor,
    MapResults,
    OffloadedFunction,
    OffloadedGenerator,
    OffloadSettings,
    Stream,
    offload,
)


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


@offload(kind="thread")
def numbers(n: int, *, step: int = 1) -> Iterator[int]:
    yield from range(0, n, step)


@offload
def words(text: str) -> Generator[str, None, None]:
    yield from text.split()


assert isinstance(numbers, OffloadedGenerator)
numbers("3")  # type: ignore[arg-type]
assert_type(numbers(3, step=2), Stream[int])
assert_type(words("a b"), Stream[str])
numbers_as_iterator: AsyncIterator[int] = numbers(3)
assert_type(numbers.__wrapped__(3), Iterator[int])


async def stream_types(ex: Executor) -> None:
    def rows(n: int) -> Iterator[bytes]:
        yield bytes(n)

    assert_type(ex.stream(rows, 3), Stream[bytes])
    async with ex.options(buffer=4).stream(rows, 3) as items:
        async for item in items:
            assert_type(item, bytes)
    ex.stream(rows, "3")  # type: ignore[arg-type]


async def maps(ex: Executor) -> None:
    # Results typed as the function's return, for a plain and a decorated function.
    async for text in ex.map(plain, [1, 2]):
        assert_type(text, str)
    async with ex.map(factory, range(3), ordered=False) as results:
        assert_type(results, MapResults[bytes])
        async for data in results:
            assert_type(data, bytes)
    async for data in factory.map(range(3), max_in_flight=2):
        assert_type(data, bytes)
    ex.map(plain, ["not an int"])  # type: ignore[arg-type]
