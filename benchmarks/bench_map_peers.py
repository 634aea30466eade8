"""``Executor.map`` beside its peers' ``map``: many tiny items, and many 25 ms items.

Every pool has one worker per CPU, is started and warmed up (every worker running)
before the clocks run, and is measured in the same run as the others; each round
runs every contender once per scenario, in one order on even rounds and the reverse
on odd ones; every result is checked. The tables give medians over rounds.

* **tiny items**: 10,000 items through ``abs`` (``--quick``: 2,000): offload's
  process ``map`` (ordered, its default window) against
  ``ProcessPoolExecutor.map``, loky's ``get_reusable_executor().map`` and
  ``pebble.ProcessPool().map`` (all results consumed), each with ``chunksize`` 1
  and ``ceil(n / (4 * workers))`` (the stdlib docs' advice for many items), and
  ``anyio.to_process.run_sync``, one task per item under a limiter of ``workers``.
  Headline: ms for the whole map; "vs best peer": that time over the fastest peer
  row's (below 1: faster than every peer).
* **25 ms items**: 200 items of ``spin`` (pure Python, calibrated once per run to
  take 25 ms on one core; ``--quick``: 40 items) through the same contenders, with
  ``chunksize`` 1 and ``ceil(n / (4 * workers))``. Headline: the fraction of ideal
  scaling, ``n * 25 ms / workers`` over the wall time; "vs floor": the wall time of
  the machine's floor in the same round over the contender's (median of the rounds'
  ratios), the floor being plain processes, one per CPU, forked before any pool,
  each running its share of the items with no IPC per item; measured twice: in the
  caller's session, as the peers' workers are, and each in a session of its own, as
  offload's workers are (where the kernel schedules sessions as groups, that
  decides how much CPU a process gets on a busy machine).

Where offload's ``map`` takes ``chunksize`` (detected from its signature), its rows
are the automatic choice and each peer's explicit ``chunksize``; before that, one
call per item. The peers' ``map`` blocks, so it runs in a thread
(``asyncio.to_thread``), as an async caller runs it: one hop per map, not per item.
Peers keep their default start method. Run from the repository root
(``pip install -e ".[bench]"``)::

    python benchmarks/bench_map_peers.py --quick      # < 60 s
    python benchmarks/bench_map_peers.py [--rounds 5] [--only tiny|cpu] [--json [PATH]]

``--json`` alone writes ``benchmarks/results/map_peers.json``. Exits 1 if a result
was wrong, a contender failed or a process was left behind.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import inspect
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Iterable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _contenders import BENCH_DIR, PROCESS_WORKERS, setup_paths
from _funcs import spin
from _procs import leftovers
from _report import version
from _scaling import TASK_S, iterations

setup_paths()

import anyio  # noqa: E402
import anyio.to_process  # noqa: E402

from offload import Executor, Offloader, OffloadSettings, PoolSettings  # noqa: E402

W = PROCESS_WORKERS
#: does offload's ``map`` take a ``chunksize`` yet?
HAS_CHUNKSIZE = "chunksize" in inspect.signature(Executor.map).parameters
SIZES = {"quick": {"tiny": 2_000, "cpu": 40}, "full": {"tiny": 10_000, "cpu": 200}}
FLOOR = "bare processes (floor)"
FLOOR_SESSIONS = "bare processes, a session each"

MapFn = Callable[[Callable[[Any], Any], Iterable[Any]], Awaitable[list[Any]]]


@dataclass
class Row:
    """One contender with one chunksize, and what each round measured."""

    name: str
    chunksize: str  # as shown: "1", "1250", "auto", "per item"
    run: MapFn
    peer: bool = True
    seconds: list[float] = field(default_factory=list)
    vs_floor: list[float] = field(default_factory=list)
    vs_floor_sessions: list[float] = field(default_factory=list)
    task_cpu_ms: list[float] = field(default_factory=list)


def advised_chunksize(n: int) -> int:
    """``ceil(n / (4 * workers))``: what the stdlib docs suggest for many items."""
    return math.ceil(n / (4 * W))


# --- the pools ---------------------------------------------------------------------


async def open_pools(stack: AsyncExitStack) -> dict[str, Any]:
    """Every pool, fork-based ones first, before others start their threads."""
    from concurrent.futures import ProcessPoolExecutor

    import loky
    import pebble

    ppe = ProcessPoolExecutor(W)
    stack.callback(ppe.shutdown, wait=True)
    pebble_pool = pebble.ProcessPool(max_workers=W)
    stack.callback(pebble_pool.join)
    stack.callback(pebble_pool.close)  # last in, first out: close, then join
    loky_ex = loky.get_reusable_executor(max_workers=W)
    stack.callback(loky_ex.shutdown, wait=True)
    settings = OffloadSettings(
        process=PoolSettings(max_workers=W), thread=PoolSettings(max_workers=2)
    )
    ex = await stack.enter_async_context(Offloader(settings))
    return {"ppe": ppe, "pebble": pebble_pool, "loky": loky_ex, "offload": ex.pool("process")}


def rows_for(pools: dict[str, Any], n: int) -> list[Row]:
    """The contenders of a scenario of ``n`` items."""
    ex: Executor = pools["offload"]
    chunks = sorted({1, advised_chunksize(n)})

    def offload_map(**kw: Any) -> MapFn:
        async def run(fn: Callable[[Any], Any], items: Iterable[Any]) -> list[Any]:
            async with ex.map(fn, items, **kw) as results:
                return [r async for r in results]

        return run

    def blocking(call: Callable[[Callable[[Any], Any], Iterable[Any]], list[Any]]) -> MapFn:
        async def run(fn: Callable[[Any], Any], items: Iterable[Any]) -> list[Any]:
            return await asyncio.to_thread(call, fn, items)

        return run

    def ppe(c: int) -> MapFn:
        return blocking(lambda fn, items: list(pools["ppe"].map(fn, items, chunksize=c)))

    def loky(c: int) -> MapFn:
        return blocking(lambda fn, items: list(pools["loky"].map(fn, items, chunksize=c)))

    def pebble(c: int) -> MapFn:
        return blocking(
            lambda fn, items: list(pools["pebble"].map(fn, items, chunksize=c).result())
        )

    limiter = anyio.CapacityLimiter(W)

    async def anyio_tasks(fn: Callable[[Any], Any], items: Iterable[Any]) -> list[Any]:
        todo = list(items)
        out: list[Any] = [None] * len(todo)

        async def one(i: int, item: Any) -> None:
            out[i] = await anyio.to_process.run_sync(fn, item, limiter=limiter)

        async with anyio.create_task_group() as tg:
            for i, item in enumerate(todo):
                tg.start_soon(one, i, item)
        return out

    rows: list[Row] = []
    if HAS_CHUNKSIZE:
        rows.append(Row("offload map", "auto", offload_map(), peer=False))
        rows += [Row("offload map", str(c), offload_map(chunksize=c), peer=False) for c in chunks]
    else:
        rows.append(Row("offload map", "per item", offload_map(), peer=False))
    for c in chunks:
        rows.append(Row("ProcessPoolExecutor.map", str(c), ppe(c)))
        rows.append(Row("loky reusable executor map", str(c), loky(c)))
        rows.append(Row("pebble.ProcessPool.map", str(c), pebble(c)))
    rows.append(Row("anyio.to_process, task per item", "1", anyio_tasks))
    return rows


async def warm_up(rows: list[Row], n_iter: int) -> None:
    """Start every worker of every pool: ``W`` short spins at once, twice, then tiny items."""
    for row in rows:
        for _ in range(2):
            await row.run(spin, [n_iter // 10] * (2 * W))
        await row.run(abs, range(50))


# --- the floor ---------------------------------------------------------------------


class BareWorkers:
    """The floor: ``W`` plain processes forked once, before any pool starts, each
    running its share of a batch of spins when told to: one message each way per
    batch, no IPC per item. Long-lived, as pool workers are, so that the kernel
    treats them alike (forked for each batch, they came out slower than every pool
    on a busy machine).

    ``own_sessions``: each in a session of its own, as offload's workers are: where
    the kernel groups processes by session for scheduling (autogroups), each then
    weighs as much as the caller's whole session, which the other pools' workers
    share.
    """

    def __init__(self, own_sessions: bool) -> None:
        self.pids: list[int] = []
        self.pipes: list[tuple[int, int]] = []  # (write the batch, read its CPU time)
        for _ in range(W):
            from_parent, to_child = os.pipe()
            from_child, to_parent = os.pipe()
            pid = os.fork()
            if pid == 0:  # pragma: no cover - the child
                self._serve(from_parent, to_parent, own_sessions)
            os.close(from_parent)
            os.close(to_parent)
            self.pids.append(pid)
            self.pipes.append((to_child, from_child))

    @staticmethod
    def _serve(rfd: int, wfd: int, own_sessions: bool) -> None:
        code = 1
        try:
            for fd in map(int, os.listdir("/proc/self/fd")):
                if fd > 2 and fd not in (rfd, wfd):
                    with contextlib.suppress(OSError):
                        os.close(fd)
            if own_sessions:
                os.setsid()
            while msg := os.read(rfd, 16):
                share, n_iter = (int(x) for x in msg.split())
                cpu = sum(spin(n_iter) for _ in range(share))
                os.write(wfd, f"{cpu:.6f}".encode())
            code = 0
        finally:
            os._exit(code)

    def run(self, n_iter: int, items: int) -> tuple[float, float]:
        """Wall seconds of ``items`` spins split among the processes; CPU s per item."""
        t0 = time.perf_counter()
        for k, (wfd, _) in enumerate(self.pipes):
            os.write(wfd, f"{len(range(k, items, W))} {n_iter}".encode())
        replies = [os.read(rfd, 32) for _, rfd in self.pipes]
        wall = time.perf_counter() - t0
        if not all(replies):
            raise RuntimeError("a bare process failed")
        return wall, sum(float(r) for r in replies) / items

    def close(self) -> None:
        for wfd, rfd in self.pipes:
            os.close(wfd)
            os.close(rfd)
        for pid in self.pids:
            os.waitpid(pid, 0)


# --- the rounds --------------------------------------------------------------------


async def measure(args: argparse.Namespace, errors: list[str]) -> dict[str, Any]:
    sizes = SIZES["quick" if args.quick else "full"]
    n_tiny, n_cpu = sizes["tiny"], sizes["cpu"]
    n_iter = iterations()  # calibrated before any pool runs
    async with AsyncExitStack() as stack:
        bare = {own: BareWorkers(own) for own in (False, True)}
        for b in bare.values():
            stack.callback(b.close)
        pools = await open_pools(stack)
        tiny, cpu = rows_for(pools, n_tiny), rows_for(pools, n_cpu)
        await warm_up(tiny, n_iter)
        for b in bare.values():
            b.run(n_iter // 10, 2 * W)
        floor = Row(FLOOR, "-", _unused, peer=False)
        floor_sessions = Row(FLOOR_SESSIONS, "-", _unused, peer=False)
        expected_tiny = [abs(i) for i in range(n_tiny)]
        for r in range(args.rounds):
            t_round = time.perf_counter()
            forward = r % 2 == 0
            for row in (tiny if forward else tiny[::-1]) if "tiny" in args.only else ():
                await _timed(row, abs, range(n_tiny), expected_tiny, errors)
            cpu_order = [floor, floor_sessions, *cpu] if "cpu" in args.only else []
            for row in cpu_order if forward else cpu_order[::-1]:
                gc.collect()
                if row is floor or row is floor_sessions:
                    b = bare[row is floor_sessions]
                    wall, cpu_s = await asyncio.to_thread(b.run, n_iter, n_cpu)
                    row.seconds.append(wall)
                    row.task_cpu_ms.append(cpu_s * 1e3)
                    continue
                spent = await _timed(row, spin, [n_iter] * n_cpu, None, errors)
                if spent is not None:
                    row.task_cpu_ms.append(statistics.median(spent) * 1e3)
            for row in cpu_order:
                if len(row.seconds) == r + 1:  # ratios of walls of the same round
                    row.vs_floor.append(floor.seconds[-1] / row.seconds[-1])
                    row.vs_floor_sessions.append(floor_sessions.seconds[-1] / row.seconds[-1])
            dt = time.perf_counter() - t_round
            print(f"round {r + 1}/{args.rounds} done in {dt:.1f} s", file=sys.stderr)
    result: dict[str, Any] = {}
    if "tiny" in args.only:
        result["tiny"] = {"items": n_tiny, "rows": tiny}
    if "cpu" in args.only:
        result["cpu"] = {"items": n_cpu, "rows": [floor, floor_sessions, *cpu]}
        result["cpu"]["iterations"] = n_iter
    return result


async def _unused(fn: Callable[[Any], Any], items: Iterable[Any]) -> list[Any]:
    raise AssertionError("the floor runs no pool")


async def _timed(
    row: Row,
    fn: Callable[[Any], Any],
    items: Iterable[Any],
    expected: list[Any] | None,
    errors: list[str],
) -> list[Any] | None:
    """Run ``row`` once; its time recorded if its results are right."""
    gc.collect()
    t0 = time.perf_counter()
    try:
        out = await row.run(fn, items)
    except Exception as exc:
        errors.append(f"{row.name}, chunksize {row.chunksize}: {type(exc).__name__}: {exc}")
        return None
    dt = time.perf_counter() - t0
    n = len(items) if isinstance(items, (list, range)) else None
    wrong = out != expected if expected is not None else len(out) != n or min(out) <= 0
    if wrong:
        errors.append(f"{row.name}, chunksize {row.chunksize}: wrong results")
        return None
    row.seconds.append(dt)
    return out


# --- the report --------------------------------------------------------------------


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    """Medians and ratios per scenario, JSON-ready."""
    out: dict[str, Any] = {}
    for key, scenario in result.items():
        n = scenario["items"]
        rows: list[Row] = scenario["rows"]
        summary = []
        for row in rows:
            med = _median(row.seconds)
            entry: dict[str, Any] = {
                "contender": row.name,
                "chunksize": row.chunksize,
                "peer": row.peer,
                "rounds": len(row.seconds),
                "seconds": row.seconds,
                "median_ms": med * 1e3 if med is not None else None,
            }
            if key == "tiny":
                entry["us_per_item"] = med / n * 1e6 if med is not None else None
            else:
                ideal = n * TASK_S / W
                entry["of_ideal"] = ideal / med if med is not None else None
                entry["of_ideal_rounds"] = [ideal / s for s in row.seconds]
                entry["vs_floor"] = _median(row.vs_floor)
                entry["vs_floor_sessions"] = _median(row.vs_floor_sessions)
                entry["task_cpu_ms"] = _median(row.task_cpu_ms)
            summary.append(entry)
        peers = [e for e in summary if e["peer"] and e["median_ms"] is not None]
        best = min(peers, key=lambda e: e["median_ms"]) if peers else None
        for e in summary:
            if best is None or e["median_ms"] is None:
                e["vs_best_peer"] = None
            elif key == "tiny":  # a time: below 1 is faster
                e["vs_best_peer"] = e["median_ms"] / best["median_ms"]
            else:  # a fraction of ideal: above 1 is better
                e["vs_best_peer"] = best["median_ms"] / e["median_ms"]
        out[key] = {"items": n, "best_peer": best and f"{best['contender']}, {best['chunksize']}"}
        out[key]["rows"] = summary
        if key == "cpu":
            out[key]["iterations"] = scenario["iterations"]
    return out


def _fmt(fmt: str, value: float | None) -> str:
    return "-" if value is None else fmt.format(value)


def render(summary: dict[str, Any], rounds: int) -> str:
    lines = []
    if "tiny" in summary:
        lines += render_tiny(summary["tiny"], rounds)
    if "cpu" in summary:
        lines += render_cpu(summary["cpu"], rounds)
    lines += goals(summary)
    return "\n".join(lines)


def render_tiny(tiny: dict[str, Any], rounds: int) -> list[str]:
    lines = [
        f"## {tiny['items']:,} tiny items (`abs`), {W} workers, median of {rounds} rounds",
        "",
        "| contender | chunksize | ms per map | µs per item | rounds min-max ms | vs best peer |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for e in sorted(tiny["rows"], key=lambda e: e["median_ms"] or math.inf):
        name = e["contender"] if e["peer"] else f"**{e['contender']}**"
        spread = f"{min(e['seconds']) * 1e3:.0f} - {max(e['seconds']) * 1e3:.0f}"
        lines.append(
            f"| {name} | {e['chunksize']} | {_fmt('{:.0f}', e['median_ms'])} "
            f"| {_fmt('{:.1f}', e['us_per_item'])} | {spread if e['seconds'] else '-'} "
            f"| {_fmt('{:.2f}x', e['vs_best_peer'])} |"
        )
    return [*lines, ""]


def render_cpu(cpu: dict[str, Any], rounds: int) -> list[str]:
    lines = [
        f"## {cpu['items']} items of 25 ms (`spin`, {cpu['iterations']:,} iterations),"
        f" {W} workers, median of {rounds} rounds",
        "",
        "| contender | chunksize | wall ms | of ideal | rounds min-max | vs floor "
        "| vs floor, a session each | vs best peer | task CPU ms |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for e in sorted(cpu["rows"], key=lambda e: -(e["of_ideal"] or 0)):
        name = e["contender"] if e["peer"] else f"**{e['contender']}**"
        spread = "-"
        if e["of_ideal_rounds"]:
            spread = f"{min(e['of_ideal_rounds']):.3f} - {max(e['of_ideal_rounds']):.3f}"
        lines.append(
            f"| {name} | {e['chunksize']} | {_fmt('{:.0f}', e['median_ms'])} "
            f"| {_fmt('{:.3f}', e['of_ideal'])} | {spread} | {_fmt('{:.3f}', e['vs_floor'])} "
            f"| {_fmt('{:.3f}', e['vs_floor_sessions'])} "
            f"| {_fmt('{:.2f}x', e['vs_best_peer'])} | {_fmt('{:.1f}', e.get('task_cpu_ms'))} |"
        )
    return [*lines, ""]


def goals(summary: dict[str, Any]) -> list[str]:
    """The project's goals for ``map``, against these medians."""
    out = []
    for e in summary.get("tiny", {}).get("rows", []):
        if e["contender"] == "offload map" and e["vs_best_peer"] is not None:
            met = "met" if e["vs_best_peer"] < 1 else "**not met**"
            out.append(
                f"- goal, tiny items: offload faster than the best peer "
                f"({summary['tiny']['best_peer']}): offload map, chunksize {e['chunksize']}, "
                f"{e['vs_best_peer']:.2f}x its time: {met}"
            )
    for e in summary.get("cpu", {}).get("rows", []):
        if e["contender"] == "offload map" and e["of_ideal"] is not None:
            met = "met" if e["of_ideal"] >= 0.93 else "**not met**"
            out.append(
                f"- goal, 25 ms items: offload map, chunksize {e['chunksize']}: "
                f"{e['of_ideal']:.3f} of ideal scaling (goal >= 0.93): {met}; "
                f"{_fmt('{:.3f}', e['vs_floor'])} of the floor's speed,"
                f" {_fmt('{:.3f}', e['vs_floor_sessions'])} of the floor's with a session each"
            )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer items, 2 rounds: < 60 s")
    parser.add_argument("--rounds", type=int, help="default: 2 with --quick, else 5")
    parser.add_argument(
        "--json",
        type=Path,
        nargs="?",
        const=BENCH_DIR / "results" / "map_peers.json",
        help="write the rounds and medians here (alone: benchmarks/results/map_peers.json)",
    )
    parser.add_argument(
        "--only",
        nargs="+",
        choices=("tiny", "cpu"),
        default=("tiny", "cpu"),
        help="run only these scenarios",
    )
    args = parser.parse_args()
    args.rounds = args.rounds or (2 if args.quick else 5)
    load_before = os.getloadavg()
    errors: list[str] = []
    t0 = time.perf_counter()
    result = asyncio.run(measure(args, errors))
    left = leftovers()
    summary = summarize(result)
    load = [round(load_before[0], 2), round(os.getloadavg()[0], 2)]
    print(
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())},"
        f" `{shlex.join(['python', 'benchmarks/bench_map_peers.py', *sys.argv[1:]])}`,"
        f" {os.cpu_count()} CPUs, 1-minute load average {load[0]} before, {load[1]} after;"
        f" offload's map {'with' if HAS_CHUNKSIZE else 'without'} chunksize;"
        f" {time.perf_counter() - t0:.0f} s\n"
    )
    print(render(summary, args.rounds))
    for e in errors:
        print(f"ERROR: {e}", file=sys.stderr)
    if left:
        print(f"ERROR: processes left behind: {left}", file=sys.stderr)
    if args.json is not None:
        report = {
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "command": shlex.join(["python", "benchmarks/bench_map_peers.py", *sys.argv[1:]]),
            "machine": {
                "nproc": os.cpu_count(),
                "python_version": platform.python_version(),
                "platform": platform.platform(terse=True),
                "loadavg_1min": load,
                "packages": {d: version(d) for d in ("offload", "anyio", "loky", "pebble")},
            },
            "workers": W,
            "rounds": args.rounds,
            "offload_map_has_chunksize": HAS_CHUNKSIZE,
            "errors": errors,
            "leftover_children": left,
            **summary,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nraw results: {args.json}", file=sys.stderr)
    if errors or left:
        sys.exit(1)


if __name__ == "__main__":
    main()
