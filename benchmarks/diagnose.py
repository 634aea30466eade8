"""Measurements behind statements in docs/benchmarks.md, for the next engineer.

``python benchmarks/diagnose.py scaling-gaps``
    The suite's scaling scenario (40 tasks of ~25 ms per worker, 2 workers of offload's process
    pool), with timestamps taken in the tasks: per worker, how long it waited between
    two tasks, and when it finished; alternately with the suite's 1 ms lag probe on the
    loop and without it (the probe's wake-ups take CPU from the workers); then one
    caller alone, how long a call takes to
    reach its worker and to come back, after a 25 ms task, a 1 ms task and a no-op.
``python benchmarks/diagnose.py scaling-floor``
    The machine's own ceiling for that scenario: the same tasks, without the lag probe,
    alternately on offload's pool and on the least a dispatcher can do (two forked
    processes at niceness 10, one socket pair each, a blocking ``selectors`` loop that
    sends the next task the moment an answer arrives: no event loop, no library).
``python benchmarks/diagnose.py cpu-pairs``
    How long one ~25 ms task takes alone, and each of two run at once on the two CPUs,
    alternately (plain forked processes, no library): whether "CPUs / one task's time"
    is an ideal this machine can reach with every CPU busy.
``python benchmarks/diagnose.py slices``
    How late a 1 ms sleeper on the loop wakes, and how many ~25 ms calls two busy
    workers finish a second, in rounds of 4 s, alternately: workers as by default
    (niceness 10, ``SCHED_BATCH`` and the longest time slice, see
    ``offload/_pools/process/scheduling.py``), the same under ``SCHED_OTHER``, at
    niceness 10 with the kernel's default slice, and under ``SCHED_IDLE``.
``python benchmarks/diagnose.py probe-cost``
    What the suite's 1 ms lag probe costs the loop's process: CPU time per wake-up,
    alternately on an idle machine and with one plain process per CPU burning CPU at
    niceness 10 (as busy workers do), in rounds of 2 s.
``python benchmarks/diagnose.py map-parts``
    Where a process ``map`` of 10,000 tiny items (``abs``) spends its time, wall and
    the parent's CPU per item, alternately: one call per item, the same map with its
    calls answered in the parent (the map's own machinery), ``await run`` in a loop,
    a map with ``chunksize=1250`` beside ``ProcessPoolExecutor.map`` with the same,
    and the ``async for`` over results all ready.
``python benchmarks/diagnose.py sends``
    How long the loop's thread stands still in each send of a process ``map`` of
    10,000 tiny items in chunks of 1,250 (wall against the thread's CPU: the rest is
    time the kernel gave another task), with workers under ``SCHED_BATCH`` (the
    default) and under ``SCHED_OTHER``, alternately, and the map's median time.
``python benchmarks/diagnose.py server-cost``
    The demo server's own CPU time per ``GET /ping``, back to back and at one every
    10 ms, on uvicorn with h11 on asyncio and with httptools on uvloop.

Needs ``pip install -e ".[bench]"``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import itertools
import os
import pickle
import selectors
import socket
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's offload

from _funcs import timed_spin
from _lagprobe import LagProbe
from _scaling import TASKS_PER_WORKER, iterations

from offload import Offloader, OffloadSettings

WORKERS = 2


async def scaling_gaps(runs: int) -> None:
    n = iterations()
    async with Offloader(OffloadSettings(process={"max_workers": WORKERS})) as ex:
        pool = ex.pool("process")
        await asyncio.gather(*(pool.run(timed_spin, n // 10) for _ in range(WORKERS)))
        efficiency: dict[bool, list[float]] = {True: [], False: []}
        for run in range(2 * runs):
            probed = run % 2 == 0  # alternately with the suite's 1 ms lag probe, and without
            t0 = time.time()
            async with LagProbe() if probed else contextlib.nullcontext():
                done = await asyncio.gather(
                    *(pool.run(timed_spin, n) for _ in range(TASKS_PER_WORKER["full"] * WORKERS))
                )
            wall = time.time() - t0
            efficiency[probed].append(sum(d[3] for d in done) / WORKERS / wall)
            line = f"{'with' if probed else 'no'} probe, efficiency {efficiency[probed][-1]:.3f}:"
            for pid in sorted({d[0] for d in done}):
                spans = sorted((s, e) for p, s, e, _ in done if p == pid)
                waits = sum(b[0] - a[1] for a, b in itertools.pairwise(spans))
                line += (
                    f"  worker {pid}: {len(spans)} tasks, waited {1e3 * waits:.1f} ms between "
                    f"them, done at {1e3 * (spans[-1][1] - t0):.0f} ms"
                )
            print(line)
        for probed, values in efficiency.items():
            print(
                f"median efficiency {'with' if probed else 'without'} the lag probe: "
                f"{statistics.median(values):.3f}"
            )
        for size, label in ((n, "25 ms task"), (n // 25, "1 ms task"), (0, "no-op")):
            there, back = [], []
            for _ in range(30):
                sent = time.time()
                _, start, end, _ = await pool.run(timed_spin, size)
                there.append(start - sent)
                back.append(time.time() - end)
            print(
                f"one caller, {label}: to the worker {1e3 * statistics.median(there):.3f} ms, "
                f"back {1e3 * statistics.median(back):.3f} ms (medians of 30)"
            )


def _floor_worker(sock: socket.socket) -> None:
    os.nice(10)  # as offload's workers
    while sock.recv(64):
        sock.sendall(pickle.dumps(timed_spin(iterations())))
    os._exit(0)


def _floor_batch(socks: list[socket.socket], tasks: int) -> list[tuple[int, float, float, float]]:
    """``tasks`` tasks on the forked workers: each gets the next the moment it answers."""
    done: list[tuple[int, float, float, float]] = []
    with selectors.DefaultSelector() as sel:
        for sock in socks:
            sel.register(sock, selectors.EVENT_READ)
            sock.sendall(b"go")
        sent = len(socks)
        while len(done) < tasks:
            for key, _ in sel.select():
                ready = key.fileobj
                assert isinstance(ready, socket.socket)
                done.append(pickle.loads(ready.recv(4096)))
                if sent < tasks:
                    ready.sendall(b"go")
                    sent += 1
    return done


def fork_floor_workers() -> list[socket.socket]:
    """The minimal dispatcher's workers, forked before any event loop or thread runs."""
    iterations()  # measured once, here: the workers inherit it
    socks = []
    for _ in range(WORKERS):
        ours, theirs = socket.socketpair()
        if os.fork() == 0:
            ours.close()
            _floor_worker(theirs)
        theirs.close()
        socks.append(ours)
    return socks


async def scaling_floor(runs: int, socks: list[socket.socket]) -> None:
    n = iterations()
    tasks = TASKS_PER_WORKER["full"] * WORKERS
    efficiency: dict[str, list[float]] = {"offload": [], "floor": []}
    try:
        async with Offloader(OffloadSettings(process={"max_workers": WORKERS})) as ex:
            pool = ex.pool("process")
            await asyncio.gather(*(pool.run(timed_spin, n // 10) for _ in range(WORKERS)))
            for _ in range(runs):
                for name in efficiency:
                    t0 = time.time()
                    if name == "offload":
                        done = await asyncio.gather(
                            *(pool.run(timed_spin, n) for _ in range(tasks))
                        )
                    else:
                        done = _floor_batch(socks, tasks)
                    wall = time.time() - t0
                    efficiency[name].append(sum(d[3] for d in done) / WORKERS / wall)
                    print(f"{name}: efficiency {efficiency[name][-1]:.3f}")
    finally:
        for sock in socks:
            sock.close()
        for _ in socks:
            os.wait()
    for name, values in efficiency.items():
        print(f"median efficiency, {name}: {statistics.median(values):.3f}")


def cpu_pairs(runs: int) -> None:
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    n = iterations()
    alone: list[float] = []
    paired: list[float] = []
    with ProcessPoolExecutor(WORKERS, mp_context=get_context("fork")) as pool:
        list(pool.map(_wall_spin, [n // 10] * WORKERS))  # both workers started
        for _ in range(5 * runs):
            alone.append(pool.submit(_wall_spin, n).result())
            paired += pool.map(_wall_spin, [n] * WORKERS)
    for name, values in (("alone", alone), (f"{WORKERS} at once", paired)):
        print(
            f"one task {name}: median {1e3 * statistics.median(values):.1f} ms "
            f"(min {1e3 * min(values):.1f}, max {1e3 * max(values):.1f}, {len(values)} tasks)"
        )
    print(f"{WORKERS} at once / alone: {statistics.median(paired) / statistics.median(alone):.2f}")


def _wall_spin(n: int) -> float:
    t0 = time.perf_counter()
    timed_spin(n)
    return time.perf_counter() - t0


SLICE_VARIANTS = ("default", "SCHED_OTHER", "kernel's slice", "SCHED_IDLE")


async def slices(runs: int) -> None:
    from offload._pools.process import scheduling as _scheduling

    ask, batch = _scheduling._ask_for_slice, _scheduling._set_batch
    n = iterations()
    results: dict[str, list[tuple[float, float, float]]] = {v: [] for v in SLICE_VARIANTS}
    try:
        for run in range(runs):
            order = SLICE_VARIANTS if run % 2 == 0 else SLICE_VARIANTS[::-1]
            for variant in order:
                _scheduling._ask_for_slice = (
                    ask if variant in ("default", "SCHED_OTHER") else _no_slice
                )
                _scheduling._set_batch = batch if variant == "default" else _no_batch
                results[variant].append(await _busy_workers(variant == "SCHED_IDLE", n))
    finally:
        _scheduling._ask_for_slice, _scheduling._set_batch = ask, batch
    for variant, values in results.items():
        print(
            f"{variant}: lag p99 {statistics.median(v[0] for v in values):.2f} ms, "
            f"max {statistics.median(v[1] for v in values):.2f} ms (median; "
            f"worst {max(v[1] for v in values):.2f}), "
            f"{statistics.median(v[2] for v in values):.1f} calls/s"
        )


def _no_slice(pid: int, nanoseconds: int) -> None:
    """Stands in for ``_scheduling._ask_for_slice``: workers keep the kernel's slice."""


def _no_batch(pid: int) -> None:
    """Stands in for ``_scheduling._set_batch``: workers stay under ``SCHED_OTHER``."""


async def _busy_workers(idle: bool, n: int, seconds: float = 4.0) -> tuple[float, float, float]:
    """Lag p99 and max (ms) of a 1 ms sleeper while two workers compute, and calls/s."""
    settings = OffloadSettings(
        process={"max_workers": WORKERS, "idle_priority": idle}, lag_probe=False
    )
    async with Offloader(settings) as ex:
        pool = ex.pool("process")
        await asyncio.gather(*(pool.run(timed_spin, n // 10) for _ in range(WORKERS)))
        end = time.perf_counter() + seconds
        done = 0

        async def caller() -> None:
            nonlocal done
            while time.perf_counter() < end:
                await pool.run(timed_spin, n)
                done += 1

        late: list[float] = []

        async def sleeper() -> None:
            while time.perf_counter() < end:
                asked = time.perf_counter() + 0.001
                await asyncio.sleep(0.001)
                late.append(time.perf_counter() - asked)

        await asyncio.gather(sleeper(), *(caller() for _ in range(WORKERS)))
    late.sort()
    return 1e3 * late[int(0.99 * len(late))], 1e3 * late[-1], done / seconds


def _cpu_seconds() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _probe_cost(seconds: float) -> tuple[float, int]:
    """µs of this process's CPU per wake-up of the probe, and the wake-ups."""
    cpu = _cpu_seconds()
    async with LagProbe() as probe:
        await asyncio.sleep(seconds)
    wakeups = len(probe.lateness)
    return 1e6 * (_cpu_seconds() - cpu) / wakeups, wakeups


def probe_cost(runs: int) -> None:
    import subprocess

    burn = "import os; os.nice(10)\nwhile True: pass"
    costs: dict[str, list[float]] = {"idle": [], "every CPU busy": []}
    for _ in range(runs):
        for case, values in costs.items():
            burners = []
            if case != "idle":
                burners = [
                    subprocess.Popen([sys.executable, "-c", burn])
                    for _ in range(os.cpu_count() or 1)
                ]
                time.sleep(0.3)  # let them start
            try:
                cost, wakeups = asyncio.run(_probe_cost(2.0))
            finally:
                for proc in burners:
                    proc.kill()
                    proc.wait()
            values.append(cost)
            print(f"{case}: {cost:.1f} µs of CPU per wake-up ({wakeups} wake-ups in 2 s)")
    for case, values in costs.items():
        print(f"median, {case}: {statistics.median(values):.1f} µs of CPU per wake-up")


def server_cost(seconds: float) -> None:
    import psutil

    from offload.demo.children import Children, start_server
    from offload.demo.load import PingConnection

    servers = (("--loop", "asyncio", "--http", "h11"), ("--loop", "uvloop", "--http", "httptools"))
    for args in servers:
        with Children() as children:
            server, port = start_server(children, args)
            proc = psutil.Process(server.pid)
            conn = PingConnection(port)
            for gap in (0.0, 0.010):
                before, t0, count = proc.cpu_times(), time.perf_counter(), 0
                while time.perf_counter() - t0 < seconds:
                    conn.get()
                    count += 1
                    if gap:
                        time.sleep(gap)
                after = proc.cpu_times()
                cpu = after.user + after.system - before.user - before.system
                print(
                    f"{' '.join(args)}, {'back to back' if not gap else 'one every 10 ms'}: "
                    f"{1e3 * cpu / count:.2f} ms of server CPU per /ping ({count} pings)"
                )
            conn.close()


async def map_parts(runs: int) -> None:
    from concurrent.futures import ProcessPoolExecutor

    import anyio
    import anyio.lowlevel

    from offload import Executor

    n, chunk = 10_000, 1250
    expected = list(range(n))
    ppe = ProcessPoolExecutor(WORKERS)
    ppe_map = functools.partial(ppe.map, abs, range(n), chunksize=chunk)
    async with Offloader(OffloadSettings(process={"max_workers": WORKERS})) as ex:
        pool = ex.pool("process")

        async def mapped(**kw: Any) -> list[int]:
            async with pool.map(abs, range(n), **kw) as results:
                return [r async for r in results]

        async def in_parent(self: Executor, _pool: Any, call: Any) -> Any:
            await anyio.lowlevel.checkpoint()
            return call.fn(*call.args)

        async def machinery() -> list[int]:
            # Every call answered here, at once: what is left is the map's own work.
            real = Executor._submit
            Executor._submit = in_parent  # type: ignore[method-assign,assignment]
            try:
                return await mapped(chunksize=1)
            finally:
                Executor._submit = real  # type: ignore[method-assign]

        async def sequential() -> list[int]:
            return [await pool.run(abs, i) for i in range(n)]

        async def ready() -> tuple[list[int], float, float]:
            async with pool.map(abs, range(n), chunksize=chunk, max_in_flight=n) as results:
                first = await anext(results)
                await anyio.sleep(0.3)  # every chunk has come back
                t0, c0 = time.perf_counter(), time.process_time()
                out = [first] + [r async for r in results]
                return out, time.perf_counter() - t0, time.process_time() - c0

        cases: dict[str, Callable[[], Awaitable[list[int]]]] = {
            "map, chunksize=1": lambda: mapped(chunksize=1),
            "the same, calls answered in the parent": machinery,
            "await run in a loop": sequential,
            f"map, chunksize={chunk}": lambda: mapped(chunksize=chunk),
            f"ProcessPoolExecutor.map, chunksize={chunk}": lambda: asyncio.to_thread(
                lambda: list(ppe_map())
            ),
        }
        for case in cases.values():
            await case()  # warm up
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in [*cases, "ready"]}
        for run in range(runs):
            for name in list(cases) if run % 2 == 0 else list(cases)[::-1]:
                t0, c0 = time.perf_counter(), time.process_time()
                out = await cases[name]()
                spent = (time.perf_counter() - t0, time.process_time() - c0)
                assert out == expected, name
                times[name].append(spent)
            out, wall, cpu = await ready()
            assert out == expected
            times["ready"].append((wall, cpu))
    ppe.shutdown()
    times["async for over results all ready"] = times.pop("ready")
    for name, measured in times.items():
        wall = statistics.median(w for w, _ in measured) / n * 1e6
        cpu = statistics.median(c for _, c in measured) / n * 1e6
        print(f"{name}: median wall {wall:.2f} µs per item, parent CPU {cpu:.2f} µs per item")


async def sends(runs: int) -> None:
    from offload._pools.process import scheduling as _scheduling
    from offload._pools.process.worker_handle import WorkerHandle

    n, chunk, maps = 10_000, 1250, 10
    send_some = WorkerHandle.send_some
    held: list[float] = []  # µs the thread stood still, per send

    def timed(self: WorkerHandle, parts: Any) -> Any:
        t0, c0 = time.perf_counter(), time.thread_time()
        try:
            return send_some(self, parts)
        finally:
            held.append(1e6 * ((time.perf_counter() - t0) - (time.thread_time() - c0)))

    batch = _scheduling._set_batch
    variants = {"SCHED_BATCH": batch, "SCHED_OTHER": _no_batch}
    found: dict[str, list[tuple[int, int, float]]] = {v: [] for v in variants}
    WorkerHandle.send_some = timed  # type: ignore[method-assign]
    try:
        for run in range(runs):
            for name in list(variants) if run % 2 == 0 else list(variants)[::-1]:
                _scheduling._set_batch = variants[name]
                settings = OffloadSettings(process={"max_workers": WORKERS}, lag_probe=False)
                async with Offloader(settings) as ex:
                    pool = ex.pool("process")
                    await pool.run(abs, 0)
                    held.clear()
                    took = []
                    for _ in range(maps):
                        t0 = time.perf_counter()
                        async with pool.map(abs, range(n), chunksize=chunk) as results:
                            async for _r in results:
                                pass
                        took.append(time.perf_counter() - t0)
                    found[name].append(
                        (sum(h > 100 for h in held), len(held), statistics.median(took))
                    )
    finally:
        WorkerHandle.send_some = send_some  # type: ignore[method-assign]
        _scheduling._set_batch = batch
    for name, values in found.items():
        stood = ", ".join(f"{k}/{total}" for k, total, _ in values)
        took_ms = statistics.median(1e3 * t for _, _, t in values)
        print(
            f"workers under {name}: sends that held the loop's thread over 100 µs: {stood}; "
            f"map median {took_ms:.2f} ms"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "what",
        choices=[
            "scaling-gaps",
            "scaling-floor",
            "cpu-pairs",
            "slices",
            "probe-cost",
            "server-cost",
            "map-parts",
            "sends",
        ],
    )
    parser.add_argument("--runs", type=int, default=4, help="scaling runs")
    parser.add_argument("--seconds", type=float, default=3.0, help="per server-cost case")
    args = parser.parse_args()
    if args.what == "scaling-gaps":
        asyncio.run(scaling_gaps(args.runs))
    elif args.what == "scaling-floor":
        asyncio.run(scaling_floor(args.runs, fork_floor_workers()))
    elif args.what == "cpu-pairs":
        cpu_pairs(args.runs)
    elif args.what == "slices":
        asyncio.run(slices(args.runs))
    elif args.what == "probe-cost":
        probe_cost(args.runs)
    elif args.what == "map-parts":
        asyncio.run(map_parts(args.runs))
    elif args.what == "sends":
        asyncio.run(sends(args.runs))
    else:
        server_cost(args.seconds)


if __name__ == "__main__":
    main()
