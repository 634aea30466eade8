"""The example FastAPI app that ``python -m offload demo`` serves with uvicorn.

It serves the same CPU-bound, pure-Python work (:func:`offload.demo.work.burn`, a
fixed number of ``steps`` given as a query parameter) several ways, next to a
``/ping`` that answers at once:

- ``GET /work/blocking``: an ``async def`` route that calls the function directly,
  so the event loop runs it and every other request waits;
- ``GET /work/thread``: ``anyio.to_thread.run_sync``, what people usually do; the
  loop stays free, but the GIL still runs one thread of pure Python at a time;
- ``GET /work/process``: offload's process pool, one worker per CPU, through the
  ``get_executor`` dependency of :mod:`offload.fastapi`;
- ``GET /work/loky``: loky's reusable executor, one worker per CPU, created at the
  first request (a peer for ``benchmarks/bench_fastapi.py``; the demo does not use it).

Run it alone with ``uvicorn offload.demo.app:app`` (needs ``offload[demo]``).
"""

# No ``from __future__ import annotations``: FastAPI reads the routes' annotations.
import asyncio
from typing import Annotated

import anyio.to_thread
from fastapi import Depends, FastAPI, Query
from loky import cpu_count, get_reusable_executor

from offload import Executor, OffloadSettings
from offload.fastapi import Lifespan, get_executor, install

from .work import burn

__all__ = ("SETTINGS", "app")

SETTINGS = OffloadSettings(
    default_pool="process",
    process={"max_workers": int(cpu_count())},
    shutdown_timeout=3,
)

app = FastAPI(title="offload demo", lifespan=Lifespan(SETTINGS))
install(app)  # cancel calls whose client left; 504/503/500 for offload's errors

#: iterations of the CPU-bound loop, calibrated by the demo to take ``--task-ms``
Steps = Annotated[int, Query(ge=0, le=1_000_000_000)]


@app.get("/ping")
async def ping() -> dict[str, bool]:
    """Answer at once: its latency is how long any request waits for the event loop."""
    return {"ok": True}


@app.get("/work/blocking")
async def work_blocking(steps: Steps) -> dict[str, int]:
    """The work on the event loop: nothing else runs meanwhile."""
    return {"result": burn(steps)}


@app.get("/work/thread")
async def work_thread(steps: Steps) -> dict[str, int]:
    """The work in a thread: the loop is free, but shares the GIL with the work."""
    return {"result": await anyio.to_thread.run_sync(burn, steps)}


@app.get("/work/process")
async def work_process(steps: Steps, executor: Executor = Depends(get_executor)) -> dict[str, int]:
    """The work in offload's process pool: the loop is free and the CPUs run in parallel."""
    return {"result": await executor.run(burn, steps)}


@app.get("/work/loky")
async def work_loky(steps: Steps) -> dict[str, int]:
    """The work in loky's reusable executor (one worker per CPU, started at first use)."""
    executor = get_reusable_executor(max_workers=int(cpu_count()))
    return {"result": await asyncio.wrap_future(executor.submit(burn, steps))}
