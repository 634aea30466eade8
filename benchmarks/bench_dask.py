"""Round trip and throughput of the dask pool beside offload's process pool.

One Offloader holds both: the process pool (2 workers) and a dask pool on an
embedded LocalCluster (2 single-threaded worker processes), so both run on the same
machine in the same run. Each round measures, for each pool in shuffled order:

* latency: sequential awaits of the no-op ``_funcs.noop``; p50 and p99 in ms;
* throughput: 64 concurrent callers awaiting noop in a loop; calls/s.

The tables report medians over rounds. Run from the repository root::

    python benchmarks/bench_dask.py --quick      # < 1 minute
    python benchmarks/bench_dask.py [--rounds 5] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import statistics
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
for _path in (str(BENCH_DIR), str(REPO_ROOT)):
    if _path not in sys.path:
        sys.path.insert(0, _path)
os.environ["PYTHONPATH"] = os.pathsep.join(
    [str(BENCH_DIR), str(REPO_ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(":"))]
)

import _funcs  # noqa: E402

from offload import Executor, Offloader, OffloadSettings  # noqa: E402

CONCURRENCY = 64
WARMUP = 10
#: (latency calls, throughput calls) per round
SIZES = {"quick": (100, 640), "full": (300, 2_560)}
POOLS = ("process", "dask")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def latency(ex: Executor, calls: int) -> tuple[float, float]:
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        await ex.run(_funcs.noop)
        times.append((time.perf_counter() - started) * 1000)
    return percentile(times, 0.5), percentile(times, 0.99)


async def throughput(ex: Executor, calls: int) -> float:
    remaining = calls

    async def caller() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await ex.run(_funcs.noop)

    started = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(CONCURRENCY)))
    return calls / (time.perf_counter() - started)


async def main(rounds: int, mode: str, seed: int) -> dict[str, dict[str, list[float]]]:
    latency_calls, throughput_calls = SIZES[mode]
    settings = OffloadSettings(
        process={"max_workers": 2, "max_pending": 1000},
        thread={"max_workers": 1},
        pools={"dask": {"kind": "dask", "max_workers": 2, "max_pending": 1000}},
    )
    rng = random.Random(seed)
    results: dict[str, dict[str, list[float]]] = {
        name: {"p50_ms": [], "p99_ms": [], "calls_per_s": []} for name in POOLS
    }
    async with Offloader(settings) as root:
        pools = {name: root.pool(name) for name in POOLS}
        for ex in pools.values():
            for _ in range(WARMUP):
                await ex.run(_funcs.noop)
        for number in range(rounds):
            order = list(POOLS)
            rng.shuffle(order)
            for name in order:
                p50, p99 = await latency(pools[name], latency_calls)
                rate = await throughput(pools[name], throughput_calls)
                results[name]["p50_ms"].append(p50)
                results[name]["p99_ms"].append(p99)
                results[name]["calls_per_s"].append(rate)
                print(
                    f"round {number + 1}/{rounds} {name}: p50 {p50:.3f} ms, "
                    f"p99 {p99:.3f} ms, {rate:.0f} calls/s",
                    file=sys.stderr,
                )
    return results


def report(results: dict[str, dict[str, list[float]]], rounds: int) -> str:
    lines = [
        f"medians over {rounds} rounds; no-op call; 2 workers each; {CONCURRENCY} callers",
        "",
        "| pool | p50 round trip | p99 round trip | throughput |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, series in results.items():
        lines.append(
            f"| {name} | {statistics.median(series['p50_ms']):.3f} ms "
            f"| {statistics.median(series['p99_ms']):.3f} ms "
            f"| {statistics.median(series['calls_per_s']):,.0f} calls/s |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run, under a minute")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None, help="write raw rounds here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    mode = "quick" if args.quick else "full"
    rounds = args.rounds or (3 if args.quick else 5)
    results = asyncio.run(main(rounds, mode, args.seed))
    print(report(results, rounds))
    if args.json is not None:
        args.json.write_text(json.dumps({"rounds": rounds, "mode": mode, "results": results}))
