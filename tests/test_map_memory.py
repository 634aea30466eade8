"""Mapping over an endless generator holds a bounded window of items, however many
go through, in chunks (the default) or a call per item: in a file of its own, being
the longest of the map tests (32,000 calls per item on each loop), so that the test
runners can share the suite evenly."""

from __future__ import annotations

import gc
import itertools
from typing import TYPE_CHECKING

import pytest

from .funcs import identity

if TYPE_CHECKING:
    from offload import Executor

#: items before the first count: what is made once (caches, pools) is made by then
WARM_UP = 5_000
#: items from the first count to the last
MORE = 25_000
#: counts at each end, this many items apart: the least of them is what the map holds
#: for good, not what the items in flight held when it was counted (up to ~200 objects)
SAMPLES, APART = 3, 1_000


@pytest.mark.parametrize("chunksize", [None, 1])
async def test_memory_stays_flat_over_an_endless_generator(
    ex: Executor, chunksize: int | None
) -> None:
    first = [WARM_UP + i * APART for i in range(SAMPLES)]
    last = [WARM_UP + MORE + i * APART for i in range(SAMPLES)]
    counts: dict[int, int] = {}
    n = 0
    async with ex.pool("thread").map(identity, itertools.count(), chunksize=chunksize) as results:
        async for _ in results:
            n += 1
            if n in first or n in last:
                gc.collect()
                counts[n] = len(gc.get_objects())
            if n == last[-1]:
                break
    # A leak of one live object per 100 items fails (250 here): as strict as the bound
    # of 1,000 objects over 90,000 items this test had, with a third of the items.
    growth = min(counts[i] for i in last) - min(counts[i] for i in first)
    assert growth < MORE // 100, counts
