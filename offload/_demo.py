"""``python -m offload demo``: see the event loop stall, then stop stalling.

The same CPU-bound function runs three ways while a heartbeat task on the event
loop asks to wake every 5 ms and records how late it wakes:

- ``blocking``: called straight from async code, on the event loop's thread;
- ``thread``: through offload's thread pool (the GIL still serialises pure Python);
- ``process``: through offload's process pool.

It prints, per mode, the heartbeat's lateness (what every other request of a
server would wait) and the work's throughput against the ideal: CPUs divided by
the time one task takes alone.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import anyio

from ._offloader import Offloader
from ._settings import OffloadSettings

if TYPE_CHECKING:
    from ._executor import Executor

__all__ = ("main",)

HEARTBEAT = 0.005


def burn(steps: int) -> int:
    """A fixed amount of pure-Python CPU work; returns a checksum."""
    total = 0
    for n in range(steps):
        total = (total * 31 + n) % 1_000_003
    return total


def calibrate(ms: float) -> tuple[int, float]:
    """Steps of :func:`burn` that take about ``ms`` alone, and their measured time."""
    probe = 10_000
    while (took := _timed(burn, probe)) < 0.02:
        probe *= 2
    steps = max(1, int(probe * ms / 1000 / took))
    return steps, min(_timed(burn, steps) for _ in range(3))


async def _heartbeat(lateness: list[float], stop: anyio.Event) -> None:
    while not stop.is_set():
        asked = time.perf_counter()
        await anyio.sleep(HEARTBEAT)
        lateness.append(time.perf_counter() - asked - HEARTBEAT)


async def _run_mode(
    run: Callable[[float], object] | None,
    ex: Executor,
    mode: str,
    *,
    duration: float,
    concurrency: int,
    steps: int,
) -> dict[str, float]:
    lateness: list[float] = []
    done = 0
    stop = anyio.Event()
    deadline = time.perf_counter() + duration

    async def client() -> None:
        nonlocal done
        while time.perf_counter() < deadline:
            if mode == "blocking":
                burn(steps)
                await anyio.lowlevel.checkpoint()
            else:
                await ex.pool(mode).run(burn, steps)
            done += 1

    started = time.perf_counter()
    async with anyio.create_task_group() as tg:
        tg.start_soon(_heartbeat, lateness, stop)
        async with anyio.create_task_group() as clients:
            for _ in range(concurrency):
                clients.start_soon(client)
        stop.set()
    elapsed = time.perf_counter() - started
    lateness.sort()
    return {
        "p50": statistics.median(lateness) * 1000 if lateness else float("nan"),
        "p99": lateness[int(0.99 * (len(lateness) - 1))] * 1000 if lateness else float("nan"),
        "rate": done / elapsed,
    }


async def _demo(args: argparse.Namespace) -> None:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cpus = cpus or 1
    settings = OffloadSettings(
        process={"max_workers": cpus}, thread={"max_workers": args.concurrency}
    )
    steps, single = calibrate(args.task_ms)
    ideal = cpus / single
    print(
        f"offload demo: {args.concurrency} concurrent clients, {args.task_ms:g} ms tasks, "
        f"{cpus} CPUs, {args.duration:g} s per mode",
        file=sys.stderr,
    )
    rows = []
    async with Offloader(settings) as ex:
        for mode in ("blocking", "thread", "process"):
            print(f"  running {mode} ...", file=sys.stderr, flush=True)
            result = await _run_mode(
                None,
                ex,
                mode,
                duration=args.duration,
                concurrency=args.concurrency,
                steps=steps,
            )
            rows.append((mode, result))
    print()
    print("| mode | heartbeat late p50 (ms) | p99 (ms) | tasks/s | % of ideal |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for mode, r in rows:
        print(
            f"| {mode} | {r['p50']:.1f} | {r['p99']:.1f} | {r['rate']:.1f} "
            f"| {100 * r['rate'] / ideal:.0f}% |"
        )
    print(f"\nideal: {ideal:.1f} tasks/s ({cpus} CPUs / {single * 1000:.1f} ms per task)")


def _timed(fn: Callable[[int], object], arg: int) -> float:
    start = time.perf_counter()
    fn(arg)
    return time.perf_counter() - start


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m offload", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="show the event loop stalling, then not")
    demo.add_argument("--duration", type=float, default=3.0, help="seconds per mode")
    demo.add_argument("--concurrency", type=int, default=8, help="concurrent clients")
    demo.add_argument("--task-ms", type=float, default=40.0, help="milliseconds per task")
    demo.add_argument("--backend", choices=("asyncio", "trio"), default="asyncio")
    args = parser.parse_args(argv)
    anyio.run(_demo, args, backend=args.backend)
