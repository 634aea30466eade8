"""What forwarding a worker's log records to the parent costs (``forward_logs``).

Each round starts an Offloader with two process pools of one worker each, alike but
for ``forward_logs``: on (the default) and off, and measures, in alternating order
(which pool forwards alternates too):

* round trip: sequential awaits of the no-op ``_funcs.noop``, which logs nothing;
  the median per call, in µs: the cost of forwarding when nothing is logged;
* burst (forwarding on only): one call that logs 10,000 INFO records of ~100
  characters to a logger whose handler here counts them; the call's time, how many
  arrived and how many the worker dropped (``PoolStats.logs_dropped``).

The table reports medians over rounds, the best round of each, and the median of the
rounds' on/off ratios, the figure to read: a worker's round trip can be 3x another's
for its whole life, depending on where the scheduler runs it (on the parent's CPU, or
woken up on another), so that the medians of a few rounds may be far apart for no
reason of their own, where both pools of a round mostly share its conditions. Run from
the repository root::

    python benchmarks/bench_logs.py --quick      # < 30 s
    python benchmarks/bench_logs.py [--rounds 9] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
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

WARMUP = 50
#: round-trip calls per pool and round
CALLS = {"quick": 500, "full": 3_000}
RECORDS = 10_000


class Count(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1


async def round_trip(ex: Executor, calls: int) -> float:
    """Median µs of a no-op round trip."""
    times = [0] * calls
    clock = time.perf_counter_ns
    for i in range(calls):
        started = clock()
        await ex.run(_funcs.noop)
        times[i] = clock() - started
    return statistics.median(times) / 1000


async def burst(ex: Executor, counter: Count) -> dict[str, float]:
    counter.count = 0
    dropped = ex.stats().logs_dropped
    started = time.perf_counter()
    await ex.run(_funcs.log_records, RECORDS, "bench.logs")
    took = time.perf_counter() - started
    return {
        "ms": took * 1000,
        "arrived": counter.count,
        "dropped": ex.stats().logs_dropped - dropped,
    }


def settings(first_on: bool) -> OffloadSettings:
    """Two process pools of one worker, ``a`` and ``b``, one forwarding logs; the
    built-in process pool is not started (no pool calls it)."""
    return OffloadSettings(
        default_pool="thread",
        thread={"max_workers": 1},
        pools={
            "a": {"kind": "process", "max_workers": 1, "forward_logs": first_on},
            "b": {"kind": "process", "max_workers": 1, "forward_logs": not first_on},
        },
        lag_probe=False,
    )


async def main(rounds: int, calls: int) -> dict[str, list[float]]:
    counter = Count()
    bench_logger = logging.getLogger("bench.logs")
    bench_logger.addHandler(counter)
    bench_logger.setLevel(logging.INFO)
    bench_logger.propagate = False
    results: dict[str, list[float]] = {
        "on_us": [],
        "off_us": [],
        "burst_ms": [],
        "arrived": [],
        "dropped": [],
    }
    for number in range(rounds):
        # Fresh workers each round: a worker's round trip depends on where the
        # scheduler runs it, for the life of the process. Which pool forwards, and
        # which is measured first, alternate.
        first_on = number % 2 == 0
        async with Offloader(settings(first_on)) as root:
            a, b = root.pool("a"), root.pool("b")
            on, off = (a, b) if first_on else (b, a)
            for ex in (on, off):
                for _ in range(WARMUP):
                    await ex.run(_funcs.noop)
            order = [("on", on), ("off", off)]
            if number % 4 >= 2:
                order.reverse()
            for name, ex in order:
                results[f"{name}_us"].append(await round_trip(ex, calls))
            outcome = await burst(on, counter)
        results["burst_ms"].append(outcome["ms"])
        results["arrived"].append(outcome["arrived"])
        results["dropped"].append(outcome["dropped"])
        print(
            f"round {number + 1}/{rounds}: on {results['on_us'][-1]:.1f} µs, "
            f"off {results['off_us'][-1]:.1f} µs; burst {outcome['ms']:.0f} ms, "
            f"{outcome['arrived']:.0f} arrived, {outcome['dropped']:.0f} dropped",
            file=sys.stderr,
        )
    return results


def report(results: dict[str, list[float]], rounds: int, calls: int) -> str:
    def med(key: str) -> float:
        return statistics.median(results[key])

    on, off = results["on_us"], results["off_us"]
    # Both pools of a round share its conditions: the ratio of each round is less
    # disturbed than the ratio of the medians.
    ratio = statistics.median(a / b for a, b in zip(on, off, strict=True))
    return "\n".join(
        [
            f"{rounds} rounds; one worker per pool; {calls} no-op calls per pool and round, "
            f"alternated; {RECORDS:,} records in the burst; medians over rounds, and the "
            "best round (on a shared machine the least disturbed)",
            "",
            "| forward_logs | no-op round trip p50 | best round | on/off, median of rounds "
            "| 10,000 records from one call |",
            "| --- | ---: | ---: | ---: | ---: |",
            f"| on | {med('on_us'):.1f} µs | {min(on):.1f} µs | {ratio:.3f} "
            f"| {med('burst_ms'):.0f} ms, {med('arrived'):,.0f} arrived, "
            f"{med('dropped'):,.0f} dropped |",
            f"| off | {med('off_us'):.1f} µs | {min(off):.1f} µs | "
            "| (records stay in the worker) |",
        ]
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run, under 30 s")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None, help="write raw rounds here")
    args = parser.parse_args()
    mode = "quick" if args.quick else "full"
    rounds = args.rounds or (3 if args.quick else 9)
    results = asyncio.run(main(rounds, CALLS[mode]))
    print(report(results, rounds, CALLS[mode]))
    if args.json is not None:
        args.json.write_text(json.dumps({"rounds": rounds, "mode": mode, "results": results}))
