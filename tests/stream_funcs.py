"""Generator functions for streams in worker processes (importable there)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path


def write_whole(path: str, text: str) -> None:
    """Write ``text`` to ``path`` whole or not at all: a test reads a marker as soon as
    it exists."""
    Path(f"{path}.tmp").write_text(text)
    os.replace(f"{path}.tmp", path)


def numbers(n: int, progress: str, marker: str) -> Iterator[int]:
    """Yield ``0..n-1``, noting each before yielding it in ``progress``; at its end
    (``finally``) write this process's pid to ``marker``."""
    try:
        for i in range(n):
            with open(progress, "a") as file:
                file.write(f"{i}\n")
            yield i
    finally:
        write_whole(marker, str(os.getpid()))


def produced(progress: str) -> int:
    try:
        return len(Path(progress).read_text().splitlines())
    except FileNotFoundError:
        return 0


def fails_at(n: int) -> Iterator[int]:
    yield from range(n)
    raise ValueError(f"no item {n}")


def stuck_after_one(marker: str) -> Iterator[int]:
    try:
        yield 0
        time.sleep(60)
        yield 1
    finally:
        write_whole(marker, str(os.getpid()))


def exits_at(n: int) -> Iterator[int]:
    yield from range(n)
    os._exit(3)


def unpicklable_at(n: int) -> Iterator[object]:
    yield from range(n)
    yield threading.Lock()
    yield n + 1


def big(size: int) -> Iterator[bytes]:
    yield b"a" * size
    yield bytes(range(256)) * (size // 256)


def echo(value: object) -> Iterator[object]:
    yield value


def logs_between_items(n: int) -> Iterator[int]:
    import logging

    log = logging.getLogger("app")
    for i in range(n):
        log.warning("item %d", i)
        yield i


def request_ids(n: int) -> Iterator[str]:
    from .funcs_context import request_id

    for _ in range(n):
        yield request_id.get("unset")


def ticks(marker: str) -> Iterator[bytes]:
    """Ticks for ever, until closed: then write this process's pid and thread's name
    to ``marker``."""
    try:
        n = 0
        while True:
            yield f"tick {n}\n".encode()
            n += 1
            time.sleep(0.001)
    finally:
        write_whole(marker, f"{os.getpid()} {threading.current_thread().name}")


def chunks(size: int, progress: str, marker: str) -> Iterator[bytes]:
    """Lines of ``size`` bytes for ever, each noted in ``progress`` before it is
    yielded; at its end (``finally``) write this process's pid to ``marker``."""
    try:
        line = b"x" * (size - 1) + b"\n"
        n = 0
        while True:
            n += 1
            Path(progress).write_text("\n" * n)
            yield line
    finally:
        write_whole(marker, str(os.getpid()))


def waits_for(gate: str, marker: str) -> Iterator[int]:
    """Yield 0, then 1 once the file ``gate`` exists (60 s at most); at its end
    (``finally``) write this process's pid to ``marker``."""
    try:
        yield 0
        deadline = time.monotonic() + 60
        while not os.path.exists(gate) and time.monotonic() < deadline:
            time.sleep(0.01)
        yield 1
    finally:
        write_whole(marker, str(os.getpid()))


def then(items: list[object]) -> Iterator[object]:
    """Yield each of ``items``; an exception class among them is raised instead."""
    for item in items:
        if isinstance(item, type) and issubclass(item, BaseException):
            raise item("at its position")
        yield item


def scheduler_streams(dask_scheduler: object) -> list[str]:
    """Run on a Dask scheduler: the names of the queues and events of offload's
    streams it holds."""
    extensions = dask_scheduler.extensions  # type: ignore[attr-defined]
    names = [*extensions["queues"].queues, *extensions["events"]._events]
    return [str(name) for name in names if str(name).startswith("offload-stream-")]


def hostile_at_1(kind: str) -> Iterator[object]:
    """Yield 0, then an item that exits as it is pickled (``kind`` "pickled") or
    unpickled ("unpickled"), then 2."""
    from . import funcs

    yield 0
    yield funcs.ExitsWhenPickled() if kind == "pickled" else funcs.ExitsWhenUnpickled()
    yield 2
