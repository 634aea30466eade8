"""Mapping over an endless generator holds a bounded window of items, however many
go through: in a file of its own, being the longest of the map tests (100,000 calls),
so that the test runners can share the suite evenly."""

from __future__ import annotations

import gc
import itertools
from typing import TYPE_CHECKING

from .funcs import identity

if TYPE_CHECKING:
    from offload import Executor


async def test_memory_stays_flat_over_an_endless_generator(ex: Executor) -> None:
    counts = []
    n = 0
    async with ex.pool("thread").map(identity, itertools.count()) as results:
        async for _ in results:
            n += 1
            if n in (10_000, 100_000):
                gc.collect()
                counts.append(len(gc.get_objects()))
            if n == 100_000:
                break
    # 90,000 more items cost no more live objects than a window's worth.
    assert counts[1] - counts[0] < 1000, counts
