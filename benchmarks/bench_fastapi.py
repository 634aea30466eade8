"""The FastAPI demo's measurement as a benchmark: offload's process pool beside its peers.

The demo app (:mod:`offload.demo.app`, on uvicorn) serves the same pure-Python CPU
work (:func:`offload.demo.work.burn`, calibrated once to take ``--task-ms``) in several
ways; for each mode a separate load process (:mod:`offload.demo.load`) has
``--concurrency`` clients loop on it for ``--duration`` seconds while a pinger
requests ``/ping`` every 10 ms. Modes:

* ``idle``: the pinger alone (the baseline of the round);
* ``blocking``: an ``async def`` route calling the function, on the event loop;
* ``anyio-thread``: ``anyio.to_thread.run_sync``;
* ``loky``: loky's reusable executor, one worker per CPU, through
  ``asyncio.wrap_future``;
* ``offload-process``: offload's process pool, one worker per CPU, with its workers
  at the server's priority, at the default (niceness 10), and under SCHED_IDLE; and
  at the default once more on uvicorn's plain asyncio and h11 (the other servers run
  on what uvicorn picks when ``uvicorn[standard]`` is installed: uvloop and httptools);
* ``bare processes``, a reference without a server: one plain process per CPU
  calling the function in a loop, what this machine sustains under load (its CPUs
  slow down under sustained load, so it can stay well below the ideal).
* ``floor: every CPU busy``, a reference for the pings: the pinger alone against the
  idle server while one plain process per CPU (each in a session of its own, at
  niceness 10) calls the function in a loop; what a ping gets when the CPUs are busy
  with anything, before any work request reaches the server.

The workers' priority is read from ``OFFLOAD_PROCESS__NICENESS`` and
``OFFLOAD_PROCESS__IDLE_PRIORITY`` when the server starts, so four servers run side
by side for the whole benchmark: ``normal`` (niceness 0), which serves the pings of
``idle`` and every mode but three, ``default`` (neither variable set: niceness 10),
``idle`` (idle priority on) and ``h11`` (as ``default``, on asyncio and h11). Each
round first measures the time one task takes alone (this machine's CPU speed
drifts), then runs every mode once in a shuffled order. Per mode and round: /ping
p50 and p99, the p99 over the idle p99 of the same round, work requests answered per
second, and that as a percent of the ideal (CPUs / one task's time alone in that
round) and of the bare processes of the round, the server process's own CPU time,
and that of the processes it started (the workers of the mode's pool: how many of the
CPUs the work itself got). The table gives medians over rounds.

Run from the repository root (table to stdout, progress to stderr, per-round numbers
and the machine to benchmarks/results/fastapi.json unless ``--json``)::

    python benchmarks/bench_fastapi.py --quick      # 1 round, 1.5 s per mode: < 60 s
    python benchmarks/bench_fastapi.py              # 3 rounds, 5 s per mode: ~2 min

Ctrl-C (or SIGTERM) stops it and every process it started. Needs fastapi, uvicorn
and psutil (``pip install -e ".[demo,bench]"``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's offload

from _report import version

from offload import PoolSettings
from offload.demo.children import Children, DemoError, signals_ignored, start_server
from offload.demo.command import load_records, positive, terminated
from offload.demo.report import Phase, Progress
from offload.demo.work import burn, calibrate, timed

BENCH_DIR = Path(__file__).resolve().parent
NICENESS_VAR = "OFFLOAD_PROCESS__NICENESS"
IDLE_PRIORITY_VAR = "OFFLOAD_PROCESS__IDLE_PRIORITY"
#: the servers, by name: the environment each starts with (variables not given: unset)
SERVERS: dict[str, dict[str, str]] = {
    "normal": {NICENESS_VAR: "0"},
    "default": {},
    "idle": {IDLE_PRIORITY_VAR: "true"},
    "h11": {},
}
#: uvicorn's options per server; the others take uvicorn's choice: uvloop and httptools
UVICORN_ARGS: dict[str, tuple[str, ...]] = {"h11": ("--loop", "asyncio", "--http", "h11")}
#: goals of the performance issue, for offload's process pool
GOAL_P99_RATIO = 2.0
GOAL_PCT_IDEAL = 85.0
IDLE = "idle"
BARE = "bare processes"
FLOOR = "floor: every CPU busy"
#: the floor's burners run this much longer than the pinger's window, to cover it whole
FLOOR_MARGIN = 3.0
#: one process of the bare reference: ``burn(steps)`` in a loop for ``seconds``; prints
#: how many tasks it finished within them
BARE_CODE = """\
import os, sys, time
from offload.demo.work import burn
steps, seconds, niceness = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
os.nice(niceness)
end = time.perf_counter() + seconds
done = 0
while time.perf_counter() < end:
    burn(steps)
    done += time.perf_counter() <= end
print(done)
"""


@dataclass(frozen=True)
class Mode:
    name: str  # in the table and the JSON
    route: str  # the load's phase: GET /work/<route>, or "idle" for the pinger alone
    server: str | None  # a key of SERVERS; None: no server (the bare reference)
    explain: str


OFFLOAD_NORMAL = "offload-process, normal priority"
OFFLOAD_DEFAULT = "offload-process, niceness 10 (default)"
OFFLOAD_IDLE = "offload-process, SCHED_IDLE"
OFFLOAD_H11 = "offload-process, niceness 10, h11 on asyncio"
MODES = (
    Mode(IDLE, IDLE, "normal", "the pinger alone, no work: the round's baseline"),
    Mode(
        BARE,
        BARE,
        None,
        "reference, no server: one plain process per CPU calling the function in a loop; "
        "what this machine sustains",
    ),
    Mode(
        FLOOR,
        FLOOR,
        "normal",
        "reference, no work requests: the pinger alone while one plain process per CPU "
        "(each in a session of its own, at niceness 10) calls the function in a loop; "
        "what the pings get with every CPU busy and the server otherwise idle",
    ),
    Mode("blocking", "blocking", "normal", "`async def` route calling the function"),
    Mode("anyio-thread", "thread", "normal", "`await anyio.to_thread.run_sync(burn, steps)`"),
    Mode(
        "loky",
        "loky",
        "normal",
        "`await asyncio.wrap_future(get_reusable_executor(max_workers=cpus)"
        ".submit(burn, steps))`, workers at the server's priority",
    ),
    Mode(
        OFFLOAD_NORMAL,
        "process",
        "normal",
        f"offload's process pool, one worker per CPU, `{NICENESS_VAR}=0`: at the server's priority",
    ),
    Mode(
        OFFLOAD_DEFAULT,
        "process",
        "default",
        "offload's process pool, one worker per CPU, default settings: workers at nice 10",
    ),
    Mode(
        OFFLOAD_IDLE,
        "process",
        "idle",
        f"offload's process pool, one worker per CPU, `{IDLE_PRIORITY_VAR}=true`: "
        "workers under SCHED_IDLE",
    ),
    Mode(
        OFFLOAD_H11,
        "process",
        "h11",
        "as the default, with uvicorn on plain asyncio and h11 (`--loop asyncio --http h11`), "
        "what it runs on without uvicorn[standard]",
    ),
)

ROUTES = {IDLE: "none (/ping only)", BARE: "none (no server)"}
Servers = dict[str, tuple[subprocess.Popen[bytes], int]]  # name -> (process, port)
Round = dict[str, Any]


@contextlib.contextmanager
def environ(values: Mapping[str, str]) -> Iterator[None]:
    """The offload variables unset but ``values`` for the block, then restored."""
    old = {k: v for k, v in os.environ.items() if k.startswith("OFFLOAD_")}
    try:
        for name in old:
            del os.environ[name]
        os.environ.update(values)
        yield
    finally:
        for name in [k for k in os.environ if k.startswith("OFFLOAD_")]:
            del os.environ[name]
        os.environ.update(old)


def single_task(steps: int) -> float:
    """Seconds one task of ``steps`` takes alone, here: the fastest of 5."""
    return min(timed(burn, steps) for _ in range(5))


def run_phase(
    children: Children,
    servers: Servers,
    mode: Mode,
    *,
    steps: int,
    args: argparse.Namespace,
    progress: Progress,
) -> tuple[Phase, float, float]:
    """One mode, by a load process of its own against the mode's server; returns what
    the load measured, the server process's CPU time in the window (% of one CPU) and
    that of the processes it started (its workers), in CPUs."""
    if mode.server is None:
        bare = run_bare(children, mode, steps=steps, args=args, progress=progress)
        return bare, float("nan"), float("nan")
    _, port = servers[mode.server]
    burners = []
    if mode.route == FLOOR:
        burners = start_burners(children, steps, args.duration + FLOOR_MARGIN, niceness=10)
    load = children.start(
        "load",
        [
            "-m",
            "offload.demo.load",
            *("--port", str(port), "--steps", str(steps)),
            *("--duration", str(args.duration), "--concurrency", str(args.concurrency)),
            *("--idle", "0", "--modes", IDLE if mode.route == FLOOR else mode.route),
        ],
        stdout=subprocess.PIPE,
    )
    phase: Phase | None = None
    running = {name: server for name, (server, _) in servers.items()}
    server = psutil.Process(running[mode.server].pid)
    cpu_start = window = cpu_pct = workers_cpus = 0.0
    workers_start: dict[int, float] = {}
    for record in load_records(load, running, progress):
        if record["event"] == "start":
            progress.start(mode.name, record["seconds"])
            cpu_start, window = server_cpu(server), time.monotonic()
            workers_start = descendants_cpu(server)
        elif record["event"] == "result":
            seconds = time.monotonic() - window
            cpu_pct = 100 * (server_cpu(server) - cpu_start) / seconds
            workers = descendants_cpu(server)
            workers_cpus = sum(t - workers_start.get(pid, 0.0) for pid, t in workers.items())
            workers_cpus /= seconds
            phase = Phase(
                mode.name,
                record["seconds"],
                record["ping_ms"],
                record["done"],
                record["errors"],
            )
            progress.finish_phase()
    if load.wait() != 0 or phase is None:
        raise DemoError(f"{mode.name}: the load process failed (exit code {load.returncode})")
    for proc in burners:
        proc.terminate()
        proc.wait(timeout=60)
    return phase, cpu_pct, workers_cpus


def start_burners(
    children: Children, steps: int, seconds: float, *, niceness: int = 0
) -> list[subprocess.Popen[bytes]]:
    """One process per CPU calling ``burn(steps)`` in a loop for ``seconds``."""
    from loky import cpu_count

    return [
        children.start(
            "bare",
            ["-c", BARE_CODE, str(steps), str(seconds), str(niceness)],
            stdout=subprocess.PIPE,
        )
        for _ in range(int(cpu_count()))
    ]


def descendants_cpu(server: psutil.Process) -> dict[int, float]:
    """The CPU seconds of each process the server started (a worker that exits in the
    window takes its time with it: rare, and only ever an undercount)."""
    used = {}
    for proc in server.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            times = proc.cpu_times()
            used[proc.pid] = float(times.user + times.system)
    return used


def server_cpu(server: psutil.Process) -> float:
    """The CPU seconds of the server process itself (its threads; not its workers)."""
    times = server.cpu_times()
    return float(times.user + times.system)


def run_bare(
    children: Children, mode: Mode, *, steps: int, args: argparse.Namespace, progress: Progress
) -> Phase:
    """The bare reference: one process per CPU running the work, no server, no pinger."""
    procs = start_burners(children, steps, args.duration)
    progress.start(mode.name, args.duration)
    done = 0
    for proc in procs:
        out, _ = proc.communicate(timeout=args.duration + 60)
        if proc.returncode != 0:
            raise DemoError(f"{mode.name}: a process failed (exit code {proc.returncode})")
        done += int(out)
    progress.finish_phase()
    return Phase(mode.name, args.duration, [], done, 0)


def measure(
    phase: Phase, cpu_pct: float, workers_cpus: float, *, idle: Phase, ideal: float
) -> dict[str, Any]:
    """The numbers of one mode in one round (``cpu_pct``: the server's CPU time,
    ``workers_cpus``: its workers')."""
    if phase.name == BARE:
        return {
            "done": phase.done,
            "req_per_s": phase.rate,
            "pct_of_ideal": 100 * phase.rate / ideal,
        }
    p99 = phase.ping(0.99)
    out: dict[str, Any] = {
        "ping_p50_ms": phase.ping(0.50),
        "ping_p90_ms": phase.ping(0.90),
        "ping_p99_ms": p99,
        "ping_max_ms": max(phase.ping_ms, default=float("nan")),
        "pings": len(phase.ping_ms),
        "errors": phase.errors,
        "seconds": phase.seconds,
        "server_cpu_pct": cpu_pct,
        "workers_cpus": workers_cpus,
    }
    if phase.name != IDLE:
        out["p99_vs_idle"] = p99 / idle.ping(0.99)
    if phase.name not in (IDLE, FLOOR):
        out["done"] = phase.done
        out["req_per_s"] = phase.rate
        out["pct_of_ideal"] = 100 * phase.rate / ideal
    return out


def descendants(servers: Servers) -> list[psutil.Process]:
    """The processes the running servers started, and theirs."""
    procs = []
    for server, _ in servers.values():
        with contextlib.suppress(psutil.Error):
            procs += psutil.Process(server.pid).children(recursive=True)
    return procs


def stop_leftovers(procs: Sequence[psutil.Process]) -> list[str]:
    """Stop those of ``procs`` still running (SIGTERM, then SIGKILL); returns what they were.

    Once the servers are stopped, only loky's are left: uvicorn re-raises the SIGTERM
    after its graceful shutdown, so loky's atexit hook never stops its workers, which
    would otherwise wait out their idle timeout (300 s), with loky's resource trackers
    (which then warn of the server's semaphores, and remove them).
    """
    left = []
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                name = " ".join(proc.cmdline())
                proc.terminate()
                left.append((proc, name))
    _, alive = psutil.wait_procs([proc for proc, _ in left], timeout=5)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(alive, timeout=2)
    return [name for _, name in left]


def priority(pid: int) -> str:
    """A process's scheduling policy and nice value, e.g. ``"idle, nice 0"``."""
    policy = POLICIES.get(os.sched_getscheduler(pid), "other")
    return f"{policy}, nice {psutil.Process(pid).nice()}"


POLICIES = {os.SCHED_OTHER: "normal", os.SCHED_BATCH: "batch", os.SCHED_IDLE: "idle"}


def worker_priority(servers: Servers) -> dict[str, Any]:
    """Per server, the priority of the server and of its workers, by kind."""
    seen: dict[str, Any] = {}
    for name, (server, _) in servers.items():
        try:
            parent = psutil.Process(server.pid)
            kinds: dict[str, set[str]] = {"server": {priority(parent.pid)}}
            for child in parent.children(recursive=True):
                cmdline = " ".join(child.cmdline())
                kind = "other"
                if "offload._pools.process.worker" in cmdline:
                    kind = "offload worker"
                elif "loky" in cmdline and "resource_tracker" not in cmdline:
                    kind = "loky worker"
                kinds.setdefault(kind, set()).add(priority(child.pid))
        except (OSError, psutil.Error) as exc:
            seen[name] = f"{type(exc).__name__}: {exc}"
            continue
        seen[name] = {kind: sorted(values) for kind, values in kinds.items()}
    return seen


def check_priority(seen: Mapping[str, Any]) -> list[str]:
    """Warnings when the offload workers of a server do not run at the priority set."""
    warnings = []
    for name, env in SERVERS.items():
        kinds = seen.get(name)
        if not isinstance(kinds, dict) or "offload worker" not in kinds:
            continue
        settings = PoolSettings(
            niceness=int(env.get(NICENESS_VAR, PoolSettings().niceness)),
            idle_priority=env.get(IDLE_PRIORITY_VAR, "false") == "true",
        )
        base = psutil.Process().nice()
        # Below the loop, workers run under SCHED_BATCH (offload/_pools/process/scheduling.py).
        policy = "idle" if settings.idle_priority else "batch" if settings.niceness else "normal"
        want = f"{policy}, nice {min(19, base + settings.niceness)}"
        if kinds["offload worker"] != [want]:
            warnings.append(
                f"the {name} server's offload workers run at {kinds['offload worker']}, not {want}"
            )
    return warnings


def run_round(
    children: Children,
    servers: Servers,
    *,
    cpus: int,
    steps: int,
    rng: random.Random,
    args: argparse.Namespace,
    progress: Progress,
) -> Round:
    """One task alone (for the ideal), then every mode once, in a shuffled order."""
    single = single_task(steps)
    order = rng.sample(MODES, len(MODES))
    measured = {
        m.name: run_phase(children, servers, m, steps=steps, args=args, progress=progress)
        for m in order
    }
    idle = measured[IDLE][0]
    ideal = cpus / single
    modes = {m.name: measure(*measured[m.name], idle=idle, ideal=ideal) for m in MODES}
    result: Round = {
        "order": [m.name for m in order],
        "single_task_ms": 1000 * single,
        "single_task_ms_after": 1000 * single_task(steps),
        "ideal_req_per_s": ideal,
        "modes": modes,
    }
    bare = result["modes"][BARE]["req_per_s"]
    for m in MODES:
        if m.name not in (IDLE, BARE, FLOOR):
            result["modes"][m.name]["pct_of_bare"] = (
                100 * result["modes"][m.name]["req_per_s"] / bare
            )
    return result


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Calibrate, start the servers, run the rounds, stop everything; returns the numbers."""
    from loky import cpu_count

    cpus = int(cpu_count())
    rng = random.Random(args.seed)
    plan = {f"{m.name} #{r}": args.duration for r in range(args.rounds) for m in MODES}
    progress = Progress(plan, sys.stderr)
    rounds: list[Round] = []
    servers: Servers = {}
    leftovers: list[psutil.Process] = []
    started = time.monotonic()
    try:
        progress.set("calibrating the work")
        steps, _ = calibrate(args.task_ms)
        try:
            with Children() as children:
                try:
                    for name, env in SERVERS.items():
                        progress.set(f"starting the {name} server")
                        with environ(env):
                            servers[name] = start_server(children, UVICORN_ARGS.get(name, ()))
                    for r in range(args.rounds):
                        progress.set(f"round {r + 1}/{args.rounds}: one task alone")
                        rounds.append(
                            run_round(
                                children,
                                servers,
                                cpus=cpus,
                                steps=steps,
                                rng=rng,
                                args=args,
                                progress=progress,
                            )
                        )
                    seen = worker_priority(servers)
                    progress.set("stopping the servers")
                finally:  # what the servers started, while they still run
                    with signals_ignored():
                        leftovers = descendants(servers)
        finally:  # the servers are stopped: stop what outlives them
            with signals_ignored():
                stopped = stop_leftovers(leftovers)
    except BaseException:
        progress.close("stopped")
        raise
    progress.close(f"done in {time.monotonic() - started:.0f} s")
    return {
        "cpus": cpus,
        "steps": steps,
        "priority_seen": seen,
        "stopped_after_servers": stopped,
        "rounds": rounds,
    }


# -- the report ------------------------------------------------------------------------------


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def summarize(rounds: Sequence[Round]) -> dict[str, dict[str, float]]:
    """Per mode, the median over rounds of each number, and the min and max of some."""
    summary: dict[str, dict[str, float]] = {}
    for m in MODES:
        per_round = [r["modes"][m.name] for r in rounds]
        stats = {key: median([x[key] for x in per_round]) for key in per_round[0]}
        for key in ("p99_vs_idle", "pct_of_ideal", "pct_of_bare"):
            if key in per_round[0]:
                stats[f"{key}_min"] = min(x[key] for x in per_round)
                stats[f"{key}_max"] = max(x[key] for x in per_round)
        stats["errors"] = sum(x.get("errors", 0) for x in per_round)
        summary[m.name] = stats
    return summary


def md_row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def render(result: Mapping[str, Any], args: argparse.Namespace) -> str:
    rounds: list[Round] = result["rounds"]
    summary: dict[str, dict[str, float]] = result["summary"]
    cpus, steps = result["cpus"], result["steps"]
    singles = [r["single_task_ms"] for r in rounds]
    afters = [r["single_task_ms_after"] for r in rounds]
    out = [
        f"# offload FastAPI benchmark: {args.rounds} rounds, {args.duration:g} s per mode, "
        f"{args.concurrency} clients, {cpus} CPUs, Python {platform.python_version()}",
        "",
        f"One task = {steps:,} steps = {median(singles):.1f} ms alone (median over rounds, "
        f"{min(singles):.1f}-{max(singles):.1f}); ideal = {cpus} CPUs / that, per round. "
        "Medians over rounds of: ratio = /ping p99 / idle /ping p99, % of ideal, % of bare "
        "= work req/s / bare processes' req/s, each of the same round; server CPU % = "
        "the server process's own CPU time in the window (not its workers'), in % of one CPU; "
        "workers' CPUs = the CPU time of the processes the server started, over the window.",
        "",
        md_row(
            [
                "mode",
                "/ping p50 ms",
                "/ping p99 ms",
                "p99 / idle p99",
                "rounds min-max",
                "work req/s",
                "% of ideal",
                "rounds min-max",
                "% of bare",
                "rounds min-max",
                "server CPU %",
                "workers' CPUs",
            ]
        ),
        md_row(["---"] + ["---:"] * 11),
    ]
    for m in MODES:
        s = summary[m.name]
        name = f"**{m.name}**" if m.route == "process" else m.name
        ping = [f"{s['ping_p50_ms']:.1f}", f"{s['ping_p99_ms']:.1f}"] if m.name != BARE else []
        if m.name == BARE:
            cells = [name, "-", "-", "-", "-"]
        elif m.name == IDLE:
            cells = [name, *ping, "1.00x", "-"]
        else:
            cells = [name, *ping, *minmax(s, "p99_vs_idle", "{:.2f}x")]
        if m.name in (IDLE, FLOOR):
            cells += ["-"] * 5
        else:
            cells += [f"{s['req_per_s']:.1f}", *minmax(s, "pct_of_ideal", "{:.0f}%")]
            cells += ["100%", "-"] if m.name == BARE else minmax(s, "pct_of_bare", "{:.0f}%")
        cells.append("-" if m.name == BARE else f"{s['server_cpu_pct']:.0f}%")
        cells.append("-" if m.name in (BARE, IDLE, FLOOR) else f"{s['workers_cpus']:.2f}")
        out.append(md_row(cells))
    out.append("")
    out += [f"- {m.name}: {m.explain}" for m in MODES]
    out.append("")
    out += goals(summary, rounds)
    drift = max(max(singles) / min(singles), *(a / b for a, b in zip(afters, singles, strict=True)))
    if drift > 1.25:
        out.append(
            f"- note: one task alone took {min(singles):.1f}-{max(singles):.1f} ms before the "
            f"rounds and {min(afters):.1f}-{max(afters):.1f} ms after them: the CPU speed "
            "drifted, so the percents are rough"
        )
    for m in MODES:
        if summary[m.name]["errors"]:
            out.append(f"- {m.name}: {summary[m.name]['errors']:.0f} requests failed")
    out += [f"- WARNING: {w}" for w in result["warnings"]]
    return "\n".join(out)


def minmax(stats: Mapping[str, float], key: str, fmt: str) -> list[str]:
    """Two cells: the median, and the min-max over rounds."""
    low, high = fmt.format(stats[f"{key}_min"]), fmt.format(stats[f"{key}_max"])
    return [fmt.format(stats[key]), f"{low.rstrip('x%')}-{high}"]


def goals(summary: Mapping[str, Mapping[str, float]], rounds: Sequence[Round]) -> list[str]:
    """The FastAPI integration's goals, for offload's process pool at each priority."""
    floor = summary[FLOOR]["p99_vs_idle"]
    out = [f"- floor: /ping p99 {floor:.2f}x idle with every CPU busy and no work requests"]
    for name in (OFFLOAD_DEFAULT, OFFLOAD_IDLE, OFFLOAD_NORMAL):
        s = summary[name]
        ratio, pct, bare = s["p99_vs_idle"], s["pct_of_ideal"], s["pct_of_bare"]
        out.append(
            f"- goals, {name}: /ping p99 {ratio:.2f}x idle "
            f"({'met' if ratio <= GOAL_P99_RATIO else 'not met'}: <= {GOAL_P99_RATIO:g}x), "
            f"throughput {pct:.0f}% of ideal "
            f"({'met' if pct >= GOAL_PCT_IDEAL else 'not met'}: >= {GOAL_PCT_IDEAL:g}%), "
            f"{bare:.0f}% of the bare processes"
        )
    # Paired by round: they ran within seconds of each other, at the same CPU speed.
    for other in (OFFLOAD_IDLE, OFFLOAD_NORMAL):
        pairs = [(r["modes"][OFFLOAD_DEFAULT], r["modes"][other]) for r in rounds]
        lower = sum(d["p99_vs_idle"] < z["p99_vs_idle"] for d, z in pairs)
        p99 = median([d["ping_p99_ms"] / z["ping_p99_ms"] for d, z in pairs])
        rate = median([d["req_per_s"] / z["req_per_s"] for d, z in pairs])
        out.append(
            f"- default vs {other.partition(', ')[2]}, paired by round: /ping p99 "
            f"x{p99:.2f} (lower in {lower} of {len(pairs)} rounds), work req/s x{rate:.2f}"
        )
    return out


def git(*args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=BENCH_DIR, capture_output=True, text=True, check=True
    ).stdout.strip()


def git_commit() -> str:
    """The checkout's commit, with ``+dirty`` when its tracked files differ from it."""
    try:
        return git("rev-parse", "HEAD") + ("+dirty" if git("status", "-s", "-uno") else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.processor() or "unknown"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 round, 1.5 s per mode: < 60 s")
    parser.add_argument(
        "--rounds", type=positive(int), help="rounds of every mode (default: 3, --quick: 1)"
    )
    parser.add_argument(
        "--duration", type=positive(float), help="seconds per mode (default: 5, --quick: 1.5)"
    )
    parser.add_argument(
        "--concurrency", type=positive(int), default=8, help="work clients (default: 8)"
    )
    parser.add_argument(
        "--task-ms", type=positive(float), default=40.0, help="ms of CPU per task (default: 40)"
    )
    parser.add_argument("--json", type=Path, default=BENCH_DIR / "results" / "fastapi.json")
    parser.add_argument("--seed", type=int, default=random.randrange(2**32))
    args = parser.parse_args(argv)
    args.rounds = int(args.rounds or (1 if args.quick else 3))
    args.duration = float(args.duration or (1.5 if args.quick else 5.0))

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, terminated)  # cleans up like Ctrl-C
    try:
        result = run(args)
    except KeyboardInterrupt:
        print("interrupted: the servers and the load are stopped", file=sys.stderr)
        sys.exit(130)
    except DemoError as exc:
        print(f"bench_fastapi: {exc}", file=sys.stderr)
        sys.exit(1)
    if result["stopped_after_servers"]:
        print(
            f"stopped {len(result['stopped_after_servers'])} processes the servers left behind",
            file=sys.stderr,
        )
    result["summary"] = summarize(result["rounds"])
    result["warnings"] = check_priority(result["priority_seen"])
    print(render(result, args), flush=True)

    report = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {
            "nproc": os.cpu_count(),
            "cpus": result["cpus"],
            "cpu": cpu_model(),
            "python": sys.version,
            "platform": platform.platform(),
            "commit": git_commit(),
            "packages": {
                d: version(d)
                for d in ("offload", "anyio", "loky", "fastapi", "starlette", "uvicorn")
            },
        },
        "config": {**vars(args), "json": str(args.json), "steps": result["steps"]},
        "modes": {
            m.name: {
                "route": ROUTES.get(m.route, f"/work/{m.route}"),
                "server": m.server,
                "environment": SERVERS[m.server] if m.server else None,
                "explain": m.explain,
            }
            for m in MODES
        },
        "priority_seen": result["priority_seen"],
        "stopped_after_servers": result["stopped_after_servers"],
        "warnings": result["warnings"],
        "rounds": result["rounds"],
        "summary": result["summary"],
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nraw results: {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
