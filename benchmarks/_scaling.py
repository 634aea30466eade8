"""CPU scaling: many 25 ms pure-Python tasks at once on N workers, against the ideal.

N is the pools' worker count, one per CPU. Each task reports the CPU time it used
in its worker; the ideal wall time is their sum divided by N, and the efficiency is
ideal / measured wall time (1.0: no time lost to dispatch, idle workers or
imbalance). CPU time, not a nominal 25 ms, so that a CPU running slower for a while
does not pass for pool overhead. Process family only: threads share the GIL.
"""

from __future__ import annotations

import asyncio
import gc
import statistics
import time

from _contenders import PROCESS_WORKERS, Contender
from _funcs import spin
from _lagprobe import LagProbe
from _scenario import Column, Measurement, Results, Table

TASK_S = 0.025
TASKS_PER_WORKER = {"quick": 4, "full": 40}
_iterations: list[int] = []


def iterations() -> int:
    """Iterations of ``spin`` that take about 25 ms of CPU here; measured once."""
    if not _iterations:
        n = 20_000
        while spin(n) < 0.005:
            n *= 2
        per_s = statistics.median(n / spin(n) for _ in range(5))
        _iterations.append(int(per_s * TASK_S))
    return _iterations[0]


async def scaling(c: Contender, quick: bool) -> Results:
    n_iter = iterations()
    tasks = TASKS_PER_WORKER["quick" if quick else "full"] * PROCESS_WORKERS
    await asyncio.gather(*(c.run(spin, n_iter // 10) for _ in range(PROCESS_WORKERS)))
    gc.collect()
    async with LagProbe() as lag:
        t0 = time.perf_counter()
        cpu = await asyncio.gather(*(c.run(spin, n_iter) for _ in range(tasks)))
        wall = time.perf_counter() - t0
    ideal = sum(cpu) / PROCESS_WORKERS
    metrics = {
        "efficiency": ideal / wall,
        "wall_ms": wall * 1e3,
        "ideal_ms": ideal * 1e3,
        "task_ms": statistics.median(cpu) * 1e3,
        "tasks": float(tasks),
    }
    return {"scaling": {**metrics, **lag.summary()}}


SCALING = Table(
    "scaling",
    f"CPU scaling on {PROCESS_WORKERS} workers",
    f"{PROCESS_WORKERS} workers given many ~25 ms pure-Python tasks at once; "
    "efficiency = ideal time (tasks' CPU time / workers) / measured time",
    (
        Column("efficiency", "efficiency", "{:.3f}"),
        Column("wall_ms", "wall ms"),
        Column("ideal_ms", "ideal ms"),
        Column("task_ms", "task ms"),
    ),
    headline="efficiency",
    lower_is_better=False,
)
MEASUREMENTS = [Measurement("scaling", ("process",), (SCALING,), scaling)]
