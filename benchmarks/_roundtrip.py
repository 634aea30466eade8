"""No-op round trip: latency (one caller) and throughput (64 concurrent callers)."""

from __future__ import annotations

import gc
import statistics
import time

from _contenders import Contender, calls
from _funcs import noop
from _lagprobe import LagProbe
from _scenario import Column, Measurement, Results, Table

CONCURRENCY = 64
WARMUP_CALLS = 10  # untimed calls before each measurement
# calls per round, by mode and family
LATENCY_CALLS = {
    "quick": {"thread": 600, "process": 200},
    "full": {"thread": 3_000, "process": 1_000},
}
THROUGHPUT_CALLS = {
    "quick": {"thread": 4_032, "process": 960},
    "full": {"thread": 32_000, "process": 6_400},
}


async def latency(c: Contender, quick: bool) -> Results:
    n = LATENCY_CALLS["quick" if quick else "full"][c.family]
    await calls(c.run, noop, WARMUP_CALLS)
    gc.collect()
    clock, samples, run = time.perf_counter_ns, [0] * n, c.run
    async with LagProbe() as lag:
        for i in range(n):
            t0 = clock()
            await run(noop)
            samples[i] = clock() - t0
    p99 = statistics.quantiles(samples, n=100, method="inclusive")[98]
    metrics = {"p50_us": statistics.median(samples) / 1e3, "p99_us": p99 / 1e3}
    return {"latency": {**metrics, **lag.summary()}}


async def throughput(c: Contender, quick: bool) -> Results:
    n = THROUGHPUT_CALLS["quick" if quick else "full"][c.family]
    await calls(c.run, noop, WARMUP_CALLS * 4, concurrency=4)
    gc.collect()
    total = n // CONCURRENCY * CONCURRENCY
    async with LagProbe() as lag:
        t0 = time.perf_counter()
        await calls(c.run, noop, total, CONCURRENCY)
        dt = time.perf_counter() - t0
    return {"throughput": {"calls_per_s": total / dt, **lag.summary()}}


LATENCY = Table(
    "latency",
    "No-op round trip",
    "one caller awaiting a no-op function in a worker, call after call; per-call µs",
    (Column("p50_us", "p50 µs"), Column("p99_us", "p99 µs")),
    headline="p50_us",
    lower_is_better=True,
)
THROUGHPUT = Table(
    "throughput",
    f"Throughput, {CONCURRENCY} concurrent callers",
    f"{CONCURRENCY} tasks each awaiting the no-op in a loop; calls per second",
    (Column("calls_per_s", "calls/s", "{:,.0f}"),),
    headline="calls_per_s",
    lower_is_better=False,
)
MEASUREMENTS = [
    Measurement("latency", ("thread", "process"), (LATENCY,), latency),
    Measurement("throughput", ("thread", "process"), (THROUGHPUT,), throughput),
]
