"""First call after start, and memory: each measured in a fresh child process.

The parent runs this file twice per contender and round, so that no earlier pool,
import or worker helps:

* ``--phase cold``: the library imported (timed apart, ``import_ms``), the clock
  runs from the pool's creation to the first no-op result (``cold_ms``);
* ``--phase started``: the pool created and started (``start_ms``: for offload the
  ``Offloader`` entry, which starts its workers; for the peers their constructor,
  since they start workers on first use), then the first call's latency
  (``first_call_ms``); after a warm-up that starts every worker, the resident
  memory (RSS, and USS: pages no other process shares) of this process and of each
  worker process, via psutil. ``parent_delta_mb`` is what the library's import and
  the started pool added to a bare child's RSS.

The child prints one JSON line; helper processes (loky's and multiprocessing's
resource trackers, a forkserver) are counted apart from workers.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import sys
import time
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

from _contenders import IMPORTS, NAMES, Contender, setup_paths, start_every_worker
from _lagprobe import LagProbe
from _procs import is_helper, leftovers
from _scenario import Column, Measurement, Metrics, Results, Table

CHILD = Path(__file__).resolve()
CHILD_TIMEOUT_S = 120
MB = 1e6


# --- the child -------------------------------------------------------------------------


def _import(name: str) -> float:
    """Import the contender's library; seconds taken."""
    t0 = time.perf_counter()
    for module in IMPORTS[NAMES[name]]:
        importlib.import_module(module)
    if NAMES[name].__name__ == "offload_pools":
        from _contenders import offload_settings

        offload_settings()  # configuration, not pool creation: before the clock (in import_ms)
    return time.perf_counter() - t0


async def _open(stack: AsyncExitStack, name: str) -> Contender:
    return next(c for c in await NAMES[name](stack) if c.name == name)


async def phase_cold(name: str) -> Metrics:
    from _funcs import noop

    async with AsyncExitStack() as stack, LagProbe() as lag:
        t0 = time.perf_counter()
        c = await _open(stack, name)
        await c.run(noop)
        cold = time.perf_counter() - t0
    return {"cold_ms": cold * 1e3, **lag.summary()}


def _memory(proc: Any, before: set[int]) -> Metrics:
    import psutil

    workers: list[tuple[float, float]] = []
    helpers = 0
    for child in proc.children(recursive=True):
        if child.pid in before:
            continue
        if is_helper(child):
            helpers += 1
            continue
        try:
            info = child.memory_full_info()
        except psutil.NoSuchProcess:
            continue
        workers.append((info.rss / MB, info.uss / MB))
    own = proc.memory_full_info()
    n = len(workers)
    return {
        "parent_rss_mb": own.rss / MB,
        "parent_uss_mb": own.uss / MB,
        "workers": float(n),
        "worker_rss_mb": sum(r for r, _ in workers) / n if n else None,
        "worker_uss_mb": sum(u for _, u in workers) / n if n else None,
        "helpers": float(helpers),
    }


async def phase_started(name: str, rss_base: float) -> Results:
    import psutil
    from _funcs import noop

    proc = psutil.Process()
    before = {p.pid for p in proc.children(recursive=True)}
    async with AsyncExitStack() as stack:
        async with LagProbe() as lag_first:
            t0 = time.perf_counter()
            c = await _open(stack, name)
            t1 = time.perf_counter()
            await c.run(noop)
            t2 = time.perf_counter()
        async with LagProbe() as lag_warm:
            await start_every_worker(c)
        memory = _memory(proc, before)
    delta = memory["parent_delta_mb"] = (memory["parent_rss_mb"] or 0.0) - rss_base
    memory["total_mb"] = delta + (memory["workers"] or 0.0) * (memory["worker_rss_mb"] or 0.0)
    first = {"start_ms": (t1 - t0) * 1e3, "first_call_ms": (t2 - t1) * 1e3}
    return {
        "first_call": {**first, **lag_first.summary()},
        "memory": {**memory, **lag_warm.summary()},
    }


def child_main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--contender", required=True, choices=sorted(NAMES))
    parser.add_argument("--phase", required=True, choices=("cold", "started"))
    args = parser.parse_args()
    import psutil

    rss_base = psutil.Process().memory_info().rss / MB
    import_s = _import(args.contender)
    out: dict[str, Any]
    if args.phase == "cold":
        out = {"cold": asyncio.run(phase_cold(args.contender)), "import_ms": import_s * 1e3}
    else:
        out = asyncio.run(phase_started(args.contender, rss_base))
        out["rss_base_mb"] = rss_base
    out["leftover"] = leftovers()
    print(json.dumps(out), flush=True)


# --- the parent ------------------------------------------------------------------------


async def _child(name: str, phase: str) -> dict[str, Any]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(CHILD),
        "--contender",
        name,
        "--phase",
        phase,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), CHILD_TIMEOUT_S)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        raise RuntimeError(f"{name} {phase}: no answer in {CHILD_TIMEOUT_S} s") from None
    if proc.returncode != 0:
        raise RuntimeError(f"{name} {phase}: exit {proc.returncode}\n{err.decode()[-2000:]}")
    result: dict[str, Any] = json.loads(out.decode().splitlines()[-1])
    if result["leftover"]:
        raise RuntimeError(f"{name} {phase}: processes left behind: {result['leftover']}")
    return result


async def cold_start(c: Contender, quick: bool) -> Results:
    cold = await _child(c.name, "cold")
    started = await _child(c.name, "started")
    first: Metrics = {**cold["cold"], "import_ms": cold["import_ms"]}
    first.update({k: v for k, v in started["first_call"].items() if not k.startswith("lag")})
    memory: Metrics = {**started["memory"], "rss_base_mb": started["rss_base_mb"]}
    return {"first_call": first, "memory": memory}


FIRST_CALL = Table(
    "first_call",
    "First call after start",
    "fresh child process each: creation to first no-op result (cold); start, then the "
    "first call's own latency; library import apart; loop lag from creation to first "
    "result. offload's two rows both start one Offloader, which starts both of its pools",
    (
        Column("cold_ms", "create to 1st result ms"),
        Column("start_ms", "start ms"),
        Column("first_call_ms", "1st call after start ms", "{:.2f}"),
        Column("import_ms", "import ms"),
    ),
    headline="first_call_ms",
    lower_is_better=True,
)
MEMORY = Table(
    "memory",
    "Memory after warm-up",
    "fresh child process: resident memory of the caller's process and per worker "
    "process, MB (10^6 bytes); parent +RSS: over a bare child's, library import included; "
    "total = parent +RSS + workers x RSS/worker; USS counts only pages no other process "
    "shares; loop lag during the warm-up. offload's two rows are one Offloader, with both "
    "pools",
    (
        Column("total_mb", "total"),
        Column("parent_rss_mb", "parent RSS"),
        Column("parent_delta_mb", "parent +RSS"),
        Column("worker_rss_mb", "RSS/worker"),
        Column("worker_uss_mb", "USS/worker"),
        Column("workers", "workers", "{:.0f}"),
        Column("helpers", "helpers", "{:.0f}"),
    ),
    headline="total_mb",
    lower_is_better=True,
)
# Two children (~0.5 s each) per contender: with --quick, one round only.
MEASUREMENTS = [
    Measurement("cold_start", ("thread", "process"), (FIRST_CALL, MEMORY), cold_start, 1)
]

if __name__ == "__main__":
    setup_paths()
    child_main()
