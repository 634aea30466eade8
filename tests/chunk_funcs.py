"""Functions the chunk tests map: importable, so that process workers find them."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

#: a bound on every wait here: a test that goes wrong fails rather than hangs
SAFETY_TIMEOUT = 30.0


def raise_at_13(i: int) -> int:
    if i == 13:
        raise ValueError(f"item {i}")
    return i


def crash_in_chunk(spec: tuple[int, str]) -> int:
    """``(i, directory)``: item 7 writes ``crashing`` and ends its worker; items 0 to
    4 wait for that file first, so that their chunk runs while the other crashes."""
    i, directory = spec
    marker = Path(directory, "crashing")
    if i == 7:
        marker.touch()
        os._exit(3)
    if i < 5:
        deadline = time.monotonic() + SAFETY_TIMEOUT
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.002)
    return i


class Unpicklable:
    def __reduce__(self) -> Any:
        raise TypeError("Unpicklable refuses")


def unpicklable_at(i: int) -> Any:
    """A result that cannot be pickled (not even by cloudpickle) for item 3."""
    return Unpicklable() if i == 3 else i


class ExitsWhenUnpickled:
    """Pickles fine, but unpickling it calls sys.exit."""

    def __reduce__(self) -> Any:
        import sys

        return (sys.exit, (9,))


def exits_when_unpickled_at(i: int) -> Any:
    return ExitsWhenUnpickled() if i == 2 else i


def system_exit_at(i: int) -> int:
    if i == 4:
        raise SystemExit(4)
    return i


def pid_of(_: object) -> int:
    return os.getpid()


def nbytes(data: bytes) -> int:
    return len(data)


def large_result(i: int) -> bytes:
    return bytes(1 << 17)
