"""CPU scaling: many 25 ms pure-Python tasks at once on N workers, against the ideal.

N is the pools' worker count, one per CPU. Each task reports the CPU time it used
in its worker; the ideal wall time is their sum divided by N, and the efficiency is
ideal / measured wall time (1.0: no time lost to dispatch, idle workers or
imbalance). CPU time, not a nominal 25 ms, so that a CPU running slower for a while
does not pass for pool overhead. Process family only: threads share the GIL.

Each round runs the batch twice per contender, in alternating order: once alone,
which gives the headline efficiency (the pool's own dispatch), and once with the
suite's 1 ms lag probe on the loop, which gives the loop's lag and the efficiency
under the probe. The probe is not free where every CPU is busy: each of its ~1,000
wake-ups a second takes a CPU from a worker, for ~60-80 µs of CPU on the 2-vCPU VM
of docs/benchmarks.md (``python benchmarks/diagnose.py probe-cost``), which costs
every contender alike about 3 points of efficiency.
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


_order: dict[str, int] = {}  # batches run per contender: which goes first this round


async def _batch(c: Contender, n_iter: int, tasks: int) -> tuple[float, list[float]]:
    t0 = time.perf_counter()
    cpu = await asyncio.gather(*(c.run(spin, n_iter) for _ in range(tasks)))
    return time.perf_counter() - t0, cpu


async def scaling(c: Contender, quick: bool) -> Results:
    n_iter = iterations()
    tasks = TASKS_PER_WORKER["quick" if quick else "full"] * PROCESS_WORKERS
    await asyncio.gather(*(c.run(spin, n_iter // 10) for _ in range(PROCESS_WORKERS)))
    efficiency: dict[bool, float] = {}
    turn = _order[c.name] = _order.get(c.name, -1) + 1
    for probed in (False, True) if turn % 2 == 0 else (True, False):
        gc.collect()
        if probed:
            async with LagProbe() as lag:
                wall, cpu = await _batch(c, n_iter, tasks)
        else:
            wall, cpu = await _batch(c, n_iter, tasks)
            metrics = {
                "wall_ms": wall * 1e3,
                "ideal_ms": sum(cpu) / PROCESS_WORKERS * 1e3,
                "task_ms": statistics.median(cpu) * 1e3,
                "tasks": float(tasks),
            }
        efficiency[probed] = sum(cpu) / PROCESS_WORKERS / wall
    metrics["efficiency"] = efficiency[False]
    metrics["efficiency_probed"] = efficiency[True]
    return {"scaling": {**metrics, **lag.summary()}}


SCALING = Table(
    "scaling",
    f"CPU scaling on {PROCESS_WORKERS} workers",
    f"{PROCESS_WORKERS} workers given many ~25 ms pure-Python tasks at once; "
    "efficiency = ideal time (tasks' CPU time / workers) / measured time, of a batch "
    "run alone; the same batch with the 1 ms lag probe on the loop gives the lag "
    "columns and the efficiency under the probe",
    (
        Column("efficiency", "efficiency", "{:.3f}"),
        Column("efficiency_probed", "under the probe", "{:.3f}"),
        Column("wall_ms", "wall ms"),
        Column("ideal_ms", "ideal ms"),
        Column("task_ms", "task ms"),
    ),
    headline="efficiency",
    lower_is_better=False,
)
MEASUREMENTS = [Measurement("scaling", ("process",), (SCALING,), scaling)]
