"""What ``Executor.map`` costs per item, next to the fan-outs users write by hand.

For each pool kind (thread, process) and loop (asyncio, trio), the same items through
a no-op (``abs``) three ways, in alternating order each round:

* ``map``: ``async with ex.map(abs, items)``, ordered, the default window;
* ``task group``: one task per item under a ``CapacityLimiter`` as large as ``map``'s
  window, results into a list by position (unbounded in items taken: the list of
  tasks grows with the input);
* ``sequential``: ``await ex.run(abs, i)`` in a loop, one call at a time.

The table reports the median over rounds of µs per item. Run from the repository
root::

    python benchmarks/bench_map.py --quick      # < 30 s
    python benchmarks/bench_map.py [--items 20000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import anyio  # noqa: E402

from offload import Executor, Offloader, OffloadSettings  # noqa: E402
from offload._mapping import default_max_in_flight  # noqa: E402

MODES = ("map", "task group", "sequential")


async def with_map(ex: Executor, n: int) -> None:
    async with ex.map(abs, range(n)) as results:
        async for _ in results:
            pass


async def with_task_group(ex: Executor, n: int, window: int) -> None:
    limiter = anyio.CapacityLimiter(window)
    out: list[Any] = [None] * n

    async def one(i: int) -> None:
        async with limiter:
            out[i] = await ex.run(abs, i)

    async with anyio.create_task_group() as tg:
        for i in range(n):
            tg.start_soon(one, i)


async def sequential(ex: Executor, n: int) -> None:
    for i in range(n):
        await ex.run(abs, i)


async def measure(kind: str, n: int, rounds: int) -> dict[str, float]:
    settings = OffloadSettings(
        process={"max_workers": 2}, thread={"max_workers": 4}, default_pool=kind
    )
    per_item: dict[str, list[float]] = {mode: [] for mode in MODES}
    async with Offloader(settings) as ex:
        pool = ex.offloader.get_pool(kind)
        window = default_max_in_flight(pool.max_workers, pool.settings.max_pending)
        runs = {
            "map": lambda: with_map(ex, n),
            "task group": lambda: with_task_group(ex, n, window),
            "sequential": lambda: sequential(ex, n),
        }
        await with_map(ex, min(n, 200))  # warm up
        for r in range(rounds):
            order = MODES if r % 2 == 0 else tuple(reversed(MODES))
            for mode in order:
                start = time.perf_counter()
                await runs[mode]()
                per_item[mode].append((time.perf_counter() - start) / n * 1e6)
    return {mode: statistics.median(values) for mode, values in per_item.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="2,000 items, 3 rounds")
    args = parser.parse_args()
    n, rounds = (2_000, 3) if args.quick else (args.items, args.rounds)
    print(f"µs per item, median of {rounds} rounds of {n} items (a no-op: abs)\n")
    print("| kind | loop | " + " | ".join(MODES) + " |")
    print("|---|---|" + "---:|" * len(MODES))
    for kind in ("thread", "process"):
        for loop in ("asyncio", "trio"):
            result = anyio.run(measure, kind, n, rounds, backend=loop)
            cells = " | ".join(f"{result[mode]:.1f}" for mode in MODES)
            print(f"| {kind} | {loop} | {cells} |")


if __name__ == "__main__":
    main()
