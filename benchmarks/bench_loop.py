"""How late a 1 ms sleeper on the event loop wakes while offload does its heaviest work.

Its scenarios, each in a fresh Offloader on asyncio, with anyio's backend
imported first (as in any Starlette app):

* ``start and stop``: entering and leaving an Offloader with both pools;
* ``crash storm``: 20 calls whose worker exits (``os._exit``), then 20 calls killed
  by their deadline, each worker replaced;
* ``64 MiB payloads``: NumPy arrays and ``bytes`` of 64 MiB to a worker and back; the
  results are kept until the end, so that freeing them (the caller's cost, ~5-20 ms
  per 64 MB here) does not count;
* ``busy workers``: two callers keep both workers computing (25 ms calls) for 2 s;
* ``dask embedded``: start of a dask pool on an embedded cluster, 20 calls, stop
  (skipped without ``distributed``), with distributed imported before the rounds, as
  docs/dask.md tells applications to do;
* ``floor: first import of distributed``: that import alone, in a thread as the
  Offloader does it, in a fresh process each round: CPython holds the GIL through
  parts of it (and a full garbage collection falls inside it), which no library
  can change;
* and, without offload, what the machine itself allows: ``floor: idle``, the sleeper
  alone for 2 s; ``floor: interpreters starting``, while a thread starts 40 Python
  interpreters at niceness 10, two at a time (what a crash storm's replacements do).

Before the rounds, the objects made by the imports are frozen (``gc.collect()``, then
``gc.freeze()``), as an application may freeze what its start made: a full garbage
collection scans every object of the process (22-39 ms here, with distributed and
NumPy imported), an interpreter pause whose length is the application's heap, and it
would land on whichever scenario happened to trigger it. A column counts the full
collections that ran during a scenario anyway, with the longest.

The last column is the machine's steal time during the scenario, all rounds together
(``/proc/stat``, 10 ms steps): the time the hypervisor ran something else on our
CPUs. No wake-up can be on time then; on the benchmark's VM it came in bursts after
the payload scenario had freed hundreds of MB, which the guest hands back to the host
(free page reporting), then takes back, one host fault at a time, when new processes
(Dask's) allocate memory.

Per scenario and round: p99 and max of the sleeper's lateness; the table gives medians
over rounds (max: the worst round). Where the time of a late wake-up went, from the
sleep to the wake-up (1 ms + the lag), for the worst of all rounds:

* ran: the loop's thread was on a CPU (``time.thread_time``), running callbacks, the
  library's among them; time the hypervisor stole from it meanwhile counts here too;
* waited for a CPU: it was runnable, and the scheduler ran something else (Linux:
  ``run_delay`` in ``/proc/thread-self/schedstat``; 0 elsewhere);
* slept: neither; in its selector (the 1 ms asked for), or waiting for the GIL.

A column gives the most the loop's thread ran between two wake-ups, in any round: an
upper bound on how long offload (or the benchmark) held the loop in one stretch.

Run from the repository root::

    python benchmarks/bench_loop.py [--rounds 5] [--only SCENARIO ...] [--idle-priority]

``--idle-priority`` runs the offload scenarios with ``idle_priority=True``: their
workers (and a Dask cluster's processes) under ``SCHED_IDLE``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import anyio._backends._asyncio  # noqa: F401 (imported by any Starlette app already)
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from offload import Offloader, OffloadSettings, OffloadTimeout, WorkerCrashed

if TYPE_CHECKING:
    from offload._settings import PoolSettingsDict

MB = 1 << 20
FIRST_IMPORT_NAME = "floor: first import of distributed"


def exit_now() -> None:
    os._exit(3)


def spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def echo(value: object) -> object:
    return value


def settings(idle_priority: bool = False) -> tuple[OffloadSettings, OffloadSettings]:
    """The offload scenarios' settings, and the dask scenario's."""
    process: PoolSettingsDict = {"max_workers": 2, "idle_priority": idle_priority}
    dask: PoolSettingsDict = {"kind": "dask", "max_workers": 2, "idle_priority": idle_priority}
    thread: PoolSettingsDict = {"max_workers": 2}
    return (
        OffloadSettings(process=process, thread=thread, lag_probe=False),
        OffloadSettings(process=process, thread=thread, lag_probe=False, pools={"d": dask}),
    )


# Made once, before the measurements, as an application makes its settings at start:
# building them reads the environment and the .env file, 2-3 ms of the loop's thread.
SETTINGS, DASK_SETTINGS = settings()


async def start_and_stop() -> None:
    async with Offloader(SETTINGS) as ex:
        await ex.run(abs, -1)


async def crash_storm() -> None:
    async with Offloader(SETTINGS) as ex:
        pool = ex.pool("process")
        for _ in range(20):
            try:
                await pool.run(exit_now)
            except WorkerCrashed:
                pass
        deadline = pool.options(timeout=0.02)
        for _ in range(20):
            try:
                await deadline.run(spin, 10)
            except OffloadTimeout:
                pass


#: made before, and freed after, the measurement: allocating or freeing 64 MB takes
#: milliseconds on whatever thread does it, the caller's cost
PAYLOADS: list[object] = []
KEPT: list[object] = []


async def payloads() -> None:
    async with Offloader(SETTINGS) as ex:
        pool = ex.pool("process")
        for value in PAYLOADS * 2:
            KEPT.append(await pool.run(echo, value))


async def dask_embedded() -> None:
    async with Offloader(DASK_SETTINGS) as ex:
        for _ in range(20):
            await ex.pool("d").run(abs, -1)


async def busy_workers() -> None:
    async with Offloader(SETTINGS) as ex:
        pool = ex.pool("process")
        end = time.perf_counter() + 2

        async def caller() -> None:
            while time.perf_counter() < end:
                await pool.run(spin, 0.025)

        await asyncio.gather(caller(), caller())


async def idle() -> None:
    await asyncio.sleep(2)


def _start_interpreters() -> None:
    for _ in range(20):
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", "import pickle, socket, struct"], stdin=subprocess.DEVNULL
            )
            for _ in range(2)
        ]
        for proc in procs:
            with contextlib.suppress(OSError):
                os.setpriority(os.PRIO_PROCESS, proc.pid, 10)
        for proc in procs:
            proc.wait()


async def interpreters_starting() -> None:
    await asyncio.to_thread(_start_interpreters)


FIRST_IMPORT = """
import asyncio, sys
sys.path.insert(0, sys.argv[1])
import bench_loop

async def work():
    await asyncio.to_thread(__import__, "distributed")

print(*bench_loop.summarize(asyncio.run(bench_loop.lag_during(work))).numbers())
"""


def first_import() -> Round:
    """The sleeper's round while a fresh process imports distributed in a thread."""
    done = subprocess.run(
        [sys.executable, "-c", FIRST_IMPORT, str(Path(__file__).resolve().parent)],
        capture_output=True,
        text=True,
        check=True,
    )
    return Round.parse(done.stdout)


#: how long each full garbage collection took (s), while a scenario runs
FULL_COLLECTIONS: list[float] = []
_collection_start = 0.0


def _time_full_collections(phase: str, info: dict[str, int]) -> None:
    global _collection_start
    if info["generation"] != 2:
        return
    if phase == "start":
        _collection_start = time.perf_counter()
    else:
        FULL_COLLECTIONS.append(time.perf_counter() - _collection_start)


def steal_time() -> float:
    """Seconds the hypervisor has run something else on this machine's CPUs (Linux;
    0 elsewhere)."""
    try:
        with open("/proc/stat") as stat:
            fields = stat.readline().split()
    except OSError:
        return 0.0
    return int(fields[8]) / os.sysconf("SC_CLK_TCK") if len(fields) > 8 else 0.0


class Wakeup(NamedTuple):
    """One wake-up of the sleeper, in seconds."""

    late: float  #: after the time it asked for
    #: from its sleep to its wake-up (1 ms + late), the loop's thread was on a CPU
    #: (callbacks, offload's and ours; time stolen by the hypervisor meanwhile too)
    ran: float
    #: ... and runnable, without a CPU (0 where not Linux); else it slept: in its
    #: selector, or waiting for the GIL
    waited: float


class Round(NamedTuple):
    """What a table row takes from one round of a scenario, in seconds."""

    p99: float  #: of the lateness
    worst: Wakeup  #: the latest wake-up
    longest_run: float  #: the most the loop's thread ran between two wake-ups

    def numbers(self) -> tuple[float, ...]:
        return (self.p99, *self.worst, self.longest_run)

    @classmethod
    def parse(cls, text: str) -> Round:
        p99, late, ran, waited, longest_run = map(float, text.split())
        return cls(p99, Wakeup(late, ran, waited), longest_run)


def summarize(wakeups: list[Wakeup]) -> Round:
    lates = sorted(w.late for w in wakeups)
    return Round(
        lates[int(0.99 * (len(lates) - 1))],
        max(wakeups, key=lambda w: w.late),
        max(w.ran for w in wakeups),
    )


class _ThreadClock:
    """CPU time and run-queue wait of the calling thread, in seconds. The wait is the
    kernel's schedstat (0 where there is none); the CPU time is not taken from it too,
    as schedstat's is only brought up to date at the scheduler's ticks."""

    def __init__(self) -> None:
        try:
            self._fd: int | None = os.open("/proc/thread-self/schedstat", os.O_RDONLY)
        except OSError:
            self._fd = None

    def read(self) -> tuple[float, float]:
        waited = 0 if self._fd is None else int(os.pread(self._fd, 100, 0).split()[1])
        return time.thread_time(), waited / 1e9

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)


async def lag_during(work: Callable[[], Awaitable[None]]) -> list[Wakeup]:
    """Each wake-up of a 1 ms sleeper while ``work`` runs."""
    wakeups: list[Wakeup] = []
    done = asyncio.Event()
    clock = _ThreadClock()

    async def sleeper() -> None:
        while not done.is_set():
            ran, waited = clock.read()
            asked = time.perf_counter() + 0.001
            await asyncio.sleep(0.001)
            late = time.perf_counter() - asked
            ran_after, waited_after = clock.read()
            wakeups.append(Wakeup(late, ran_after - ran, waited_after - waited))

    task = asyncio.create_task(sleeper())
    await asyncio.sleep(0.01)
    try:
        await work()
    finally:
        done.set()
        await task
        clock.close()
    return wakeups


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--only", nargs="+", help="scenarios to run, by name")
    parser.add_argument(
        "--idle-priority",
        action="store_true",
        help="workers and the embedded Dask cluster under SCHED_IDLE (idle_priority=True)",
    )
    args = parser.parse_args()
    global SETTINGS, DASK_SETTINGS
    SETTINGS, DASK_SETTINGS = settings(args.idle_priority)
    # In this order: on this VM, a scenario that keeps both workers busy right after
    # the payloads were freed saw the loop stall 20-33 ms, with or without offload's
    # time slice: the host taking back the memory freed (see the steal column).
    scenarios: dict[str, Callable[[], Awaitable[None]]] = {
        "start and stop": start_and_stop,
        "busy workers": busy_workers,
        "crash storm": crash_storm,
        "64 MiB payloads": payloads,
    }
    scenarios["floor: idle"] = idle
    scenarios["floor: interpreters starting"] = interpreters_starting
    if args.only:
        scenarios = {k: v for k, v in scenarios.items() if k in args.only}
    try:
        import distributed  # noqa: F401 (here, not in the first round: see the docstring)
    except ImportError:
        print("dask embedded: skipped (no distributed)", file=sys.stderr)
    else:
        if not args.only or "dask embedded" in args.only:
            scenarios["dask embedded"] = dask_embedded
        if not args.only or FIRST_IMPORT_NAME in args.only:
            scenarios[FIRST_IMPORT_NAME] = idle  # measured in a child, see first_import
    gc.collect()
    gc.freeze()  # see the docstring
    gc.callbacks.append(_time_full_collections)
    results: dict[str, list[Round]] = {name: [] for name in scenarios}
    collections: dict[str, list[float]] = {name: [] for name in scenarios}
    stolen = dict.fromkeys(scenarios, 0.0)
    for r in range(args.rounds):
        for name, work in scenarios.items():
            if name == FIRST_IMPORT_NAME:
                results[name].append(first_import())
                continue
            if work is payloads:
                PAYLOADS[:] = [np.ones(8 * MB), b"\x01" * (64 * MB)]
            FULL_COLLECTIONS.clear()
            steal = steal_time()
            wakeups = asyncio.run(lag_during(work))
            stolen[name] += steal_time() - steal
            collections[name] += FULL_COLLECTIONS
            if work is payloads:
                PAYLOADS.clear()
                KEPT.clear()
            results[name].append(summarize(wakeups))
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    below = ", workers under SCHED_IDLE" if args.idle_priority else ""
    print(f"# event-loop lag, 1 ms sleeper, {args.rounds} rounds, {os.cpu_count()} CPUs{below}\n")
    print(
        "| scenario | lag p99 ms (median) | lag max ms (median) | lag max ms (worst) "
        "| the worst's 1 ms + lag: ran + waited for a CPU + slept, ms "
        "| loop's thread ran between two wake-ups, longest ms "
        "| full collections, all rounds (longest ms) | steal ms, all rounds |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, rounds in results.items():
        p99 = statistics.median(r.p99 for r in rounds) * 1e3
        maxes = [r.worst.late * 1e3 for r in rounds]
        late, ran, waited = max((r.worst for r in rounds), key=lambda w: w.late)
        slept = 0.001 + late - ran - waited
        parts = f"{ran * 1e3:.2f} + {waited * 1e3:.2f} + {slept * 1e3:.2f}"
        longest_run = max(r.longest_run for r in rounds) * 1e3
        seen = collections[name]
        full = "-" if name == FIRST_IMPORT_NAME else f"{len(seen)}"
        if seen:
            full += f" ({max(seen) * 1e3:.1f})"
        steal_ms = "-" if name == FIRST_IMPORT_NAME else f"{stolen[name] * 1e3:.0f}"
        print(
            f"| {name} | {p99:.2f} | {statistics.median(maxes):.2f} | {max(maxes):.2f} "
            f"| {parts} | {longest_run:.2f} | {full} | {steal_ms} |"
        )


if __name__ == "__main__":
    main()
