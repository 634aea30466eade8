"""The soak: many concurrent callers, every kind of outcome, then a check for leaks.

Shared by ``benchmarks/soak.py`` (the standalone run) and ``tests/test_soak.py``. The
worker functions are passed in (:class:`Funcs`), so that each caller uses functions
its worker processes can import: ``_funcs`` here, ``tests.funcs`` in the test suite.

A plan, drawn from a seeded RNG before anything is measured, says for each call its
kind and pool:

==========  ===============================================  =====================
kind        call                                             expected outcome
==========  ===============================================  =====================
ok          ``add(a, b)``, random ints                       the exact sum
raise       ``boom(f"boom {i}")``                            ``Boom``, that message
deadline    ``sleep_then(1, i)`` under a 0.05 s timeout       ``OffloadTimeout``
cancel      ``sleep_then(1, i)`` in ``move_on_after(0.01-0.1)`` cancelled, no result
crash       ``exit_now(3)`` (process pool only)              ``WorkerCrashed``, code 3
==========  ===============================================  =====================

Every call must end with exactly one outcome, the expected one; pool counters must
agree with the plan. After the Offloader exits: no child process left, no thread of
offload's pools left (abandoned ones included; the one spawner thread a process keeps
for its life, and the event loop's own idle worker threads, which it ends in its own
time, are not offload's to end), as many open file descriptors as before, and RSS
grown by less than a limit (after ``gc.collect()``). The baseline is taken after a warm-up
soak in its own Offloader, so that one-time costs (imports, caches) are not counted.
"""

from __future__ import annotations

import gc
import os
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import anyio
import psutil

from offload import (
    Executor,
    Offloader,
    OffloadSettings,
    OffloadTimeout,
    PoolSettings,
    PoolStats,
    WorkerCrashed,
)

__all__ = (
    "DEFAULT_WEIGHTS",
    "KINDS",
    "Funcs",
    "Planned",
    "Resources",
    "SoakReport",
    "make_plan",
    "soak",
)

KINDS = ("ok", "raise", "deadline", "cancel", "crash")
#: share of calls of each kind
DEFAULT_WEIGHTS: Mapping[str, float] = {
    "ok": 0.79,
    "raise": 0.10,
    "deadline": 0.05,
    "cancel": 0.05,
    "crash": 0.01,
}
#: share of the calls of every kind but crash that go to the thread pool
THREAD_SHARE = 0.25
#: how long ``sleep_then`` sleeps in deadline and cancel calls: far past either
SLEEP = 1.0
#: the timeout of deadline calls
DEADLINE = 0.05
#: caller cancellations come after this many seconds, uniformly
CANCEL_AFTER = (0.01, 0.1)
CRASH_CODE = 3
#: seconds leftovers (abandoned threads, exiting processes) get to go away
SETTLE = 10.0
#: problems recorded in detail; the rest are only counted
MAX_PROBLEMS = 50


@dataclass(frozen=True)
class Funcs:
    """The worker functions, importable by the workers (see the module docstring)."""

    add: Callable[[int, int], int]
    boom: Callable[[str], None]
    boom_type: type[BaseException]
    sleep_then: Callable[[float, Any], Any]
    exit_now: Callable[[int], None]


@dataclass(frozen=True, slots=True)
class Planned:
    kind: str
    pool: str
    a: int = 0
    b: int = 0
    wait: float = 0.0  # cancel: seconds before the caller gives up


def make_plan(
    calls: int,
    seed: int,
    weights: Mapping[str, float] = DEFAULT_WEIGHTS,
    thread_share: float = THREAD_SHARE,
) -> list[Planned]:
    rng = random.Random(seed)
    kinds, shares = list(weights), list(weights.values())
    plan = []
    for _ in range(calls):
        (kind,) = rng.choices(kinds, shares)
        pool = "thread" if kind != "crash" and rng.random() < thread_share else "process"
        if kind == "ok":
            big = 10**12
            plan.append(Planned(kind, pool, rng.randint(-big, big), rng.randint(-big, big)))
        elif kind == "cancel":
            plan.append(Planned(kind, pool, wait=rng.uniform(*CANCEL_AFTER)))
        else:
            plan.append(Planned(kind, pool))
    return plan


def expected_counts(plan: list[Planned]) -> dict[str, dict[str, int]]:
    """Per pool, what its ``stats()`` must count once every call ended as planned."""
    field_of = {
        "ok": "completed",
        "raise": "failed",
        "deadline": "timed_out",
        "cancel": "cancelled",
        "crash": "crashed",
    }
    counts: dict[str, dict[str, int]] = {}
    for pool in ("process", "thread"):
        counts[pool] = dict.fromkeys([*field_of.values(), "rejected"], 0)
    for p in plan:
        counts[p.pool][field_of[p.kind]] += 1
    return counts


# -- resources -------------------------------------------------------------------------


@dataclass(frozen=True)
class Resources:
    children: frozenset[int]  # pids of child processes, zombies included
    threads: int  # offload's threads but its spawner (see _offload_threads)
    fds: int
    rss: int  # bytes, after gc.collect()

    @classmethod
    def now(cls) -> Resources:
        gc.collect()
        children = []
        for child in psutil.Process().children(recursive=True):
            children.append(child.pid)
        return cls(
            children=frozenset(children),
            threads=_offload_threads(),
            fds=len(os.listdir("/proc/self/fd")),
            rss=psutil.Process().memory_info().rss,
        )


def _offload_threads() -> int:
    """Live threads of offload's pools: a thread pool's (``offload-<pool>-<n>``) and any
    other that offload names, but the spawner, which lives as long as the process."""
    return sum(
        1
        for thread in threading.enumerate()
        if thread.name.startswith("offload-") and thread.name != "offload-spawner"
    )


async def settle(baseline: Resources, timeout: float = SETTLE) -> Resources:
    """Resources once threads and child processes are back to ``baseline``, or as they
    are after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        now = Resources.now()
        done = now.threads <= baseline.threads and now.children <= baseline.children
        if done or time.monotonic() > deadline:
            return now
        await anyio.sleep(0.05)


# -- the run ---------------------------------------------------------------------------


@dataclass
class SoakReport:
    calls: int
    seed: int
    concurrency: int
    backend: str
    duration: float = 0.0
    outcomes: Counter[str] = field(default_factory=Counter)  # "kind/pool" -> count
    problems: list[str] = field(default_factory=list)
    problem_count: int = 0
    stats: dict[str, PoolStats] = field(default_factory=dict)
    before: Resources | None = None
    after: Resources | None = None
    rss_limit: int = 10 << 20

    def _measured(self) -> tuple[Resources, Resources]:
        if self.before is None or self.after is None:
            raise RuntimeError("the soak has not finished")
        return self.before, self.after

    def problem(self, message: str) -> None:
        self.problem_count += 1
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(message)

    @property
    def leaked_children(self) -> set[int]:
        before, after = self._measured()
        return set(after.children - before.children)

    @property
    def extra_threads(self) -> int:
        before, after = self._measured()
        return after.threads - before.threads

    @property
    def extra_fds(self) -> int:
        before, after = self._measured()
        return after.fds - before.fds

    @property
    def rss_growth(self) -> int:
        before, after = self._measured()
        return after.rss - before.rss

    def failures(self) -> list[str]:
        """Every invariant that does not hold; empty if the soak passed."""
        failed = []
        if self.problem_count:
            failed.append(f"{self.problem_count} calls ended wrongly: {self.problems[:10]}")
        if self.before is None or self.after is None:
            failed.append("the soak did not finish")
            return failed
        if self.leaked_children:
            failed.append(f"child processes left: {sorted(self.leaked_children)}")
        if self.extra_threads > 0:
            failed.append(f"{self.extra_threads} more threads than before")
        if self.extra_fds > 0:
            failed.append(f"{self.extra_fds:+d} open file descriptors")
        if self.rss_growth >= self.rss_limit:
            failed.append(
                f"RSS grew by {self.rss_growth / 2**20:.1f} MB "
                f"(limit {self.rss_limit / 2**20:.0f} MB)"
            )
        return failed

    def format(self) -> str:
        lines = [
            f"soak: {self.calls} calls, seed {self.seed}, {self.concurrency} callers, "
            f"{self.backend}: {self.duration:.1f} s ({self.calls / max(self.duration, 1e-9):.0f}"
            " calls/s)",
        ]
        for kind in KINDS:
            per_pool = ", ".join(
                f"{pool} {self.outcomes[f'{kind}/{pool}']}" for pool in ("process", "thread")
            )
            total = self.outcomes[f"{kind}/process"] + self.outcomes[f"{kind}/thread"]
            lines.append(f"  {kind:<9}{total:>6}  ({per_pool})")
        for name, s in self.stats.items():
            lines.append(
                f"  stats {name}: completed {s.completed} failed {s.failed} "
                f"timed_out {s.timed_out} cancelled {s.cancelled} crashed {s.crashed} "
                f"rejected {s.rejected}"
            )
        if self.before is not None and self.after is not None:
            lines.append(
                f"  leaks: processes {len(self.leaked_children)}, threads "
                f"{self.extra_threads:+d} ({self.before.threads} -> {self.after.threads}), "
                f"fds {self.extra_fds:+d} ({self.before.fds} -> {self.after.fds})"
            )
            lines.append(
                f"  RSS {self.before.rss / 2**20:.1f} MB -> {self.after.rss / 2**20:.1f} MB: "
                f"{self.rss_growth / 2**20:+.2f} MB (limit {self.rss_limit / 2**20:.0f} MB)"
            )
        lines.append(f"  problems: {self.problem_count}")
        lines.extend(f"    {p}" for p in self.problems[:10])
        failed = self.failures()
        lines.append("  PASS" if not failed else "  FAIL: " + "; ".join(failed))
        return "\n".join(lines)


def soak_settings(process_workers: int = 2, thread_workers: int = 8) -> OffloadSettings:
    return OffloadSettings(
        process=PoolSettings(max_workers=process_workers),
        thread=PoolSettings(max_workers=thread_workers),
        shutdown_timeout=10,
    )


async def _drive(
    ex: Executor, plan: list[Planned], fns: Funcs, concurrency: int, report: SoakReport
) -> list[int]:
    """Run ``plan`` with ``concurrency`` callers; how many outcomes each call got."""
    seen = [0] * len(plan)
    # The executors, made once: a call is then only what the plan says.
    pools = {name: ex.pool(name) for name in ("process", "thread")}
    timed = {name: pool.options(timeout=DEADLINE) for name, pool in pools.items()}
    next_call = 0

    def record(i: int, outcome: str) -> None:
        seen[i] += 1
        p = plan[i]
        if seen[i] > 1:
            report.problem(f"call {i} ({p.kind}, {p.pool}): another outcome: {outcome}")
        if outcome == p.kind:
            report.outcomes[f"{p.kind}/{p.pool}"] += 1
        else:
            report.problem(f"call {i} ({p.kind}, {p.pool}): {outcome}")

    async def one(i: int) -> None:
        p = plan[i]
        pool = pools[p.pool]
        try:
            if p.kind == "ok":
                value = await pool.run(fns.add, p.a, p.b)
                right = p.a + p.b
                record(i, "ok" if value == right else f"returned {value!r}, not {right!r}")
            elif p.kind == "raise":
                await pool.run(fns.boom, f"boom {i}")
                record(i, "returned instead of raising")
            elif p.kind == "deadline":
                value = await timed[p.pool].run(fns.sleep_then, SLEEP, i)
                record(i, f"returned {value!r}")
            elif p.kind == "cancel":
                with anyio.move_on_after(p.wait) as scope:
                    value = await pool.run(fns.sleep_then, SLEEP, i)
                record(i, "cancel" if scope.cancelled_caught else f"returned {value!r}")
            else:
                await pool.run(fns.exit_now, CRASH_CODE)
                record(i, "returned instead of crashing")
        except fns.boom_type as exc:
            good = type(exc) is fns.boom_type and str(exc) == f"boom {i}"
            record(i, "raise" if good else f"{type(exc).__name__}: {exc}")
        except OffloadTimeout:
            record(i, "deadline")
        except WorkerCrashed as exc:
            record(i, "crash" if exc.exitcode == CRASH_CODE else f"WorkerCrashed: {exc}")
        except Exception as exc:
            record(i, f"{type(exc).__name__}: {exc}")

    async def caller() -> None:
        nonlocal next_call
        while next_call < len(plan):
            i = next_call
            next_call += 1
            await one(i)

    async with anyio.create_task_group() as tg:
        for _ in range(concurrency):
            tg.start_soon(caller)
    return seen


async def soak(
    fns: Funcs,
    *,
    calls: int,
    seed: int,
    backend: str,
    concurrency: int = 64,
    settings: OffloadSettings | None = None,
    warmup_calls: int = 200,
    time_limit: float | None = None,
    rss_limit: int = 10 << 20,
) -> SoakReport:
    """Run the soak in the running event loop; see the module docstring.

    :param backend: the running backend's name, for the report
    :param time_limit: seconds the calls may take in all before the soak gives up
        (the calls still running then are reported); default: generous for the size
    """
    settings = settings if settings is not None else soak_settings()
    report = SoakReport(calls, seed, concurrency, backend, rss_limit=rss_limit)
    if time_limit is None:
        time_limit = 60 + calls * 0.02

    # Warm-up: imports, caches and allocator pools, in an Offloader of its own; then
    # wait for its abandoned threads and its processes to be gone.
    initial = Resources.now()
    warm = make_plan(warmup_calls, seed ^ 0x5EED)
    warm[0] = Planned("crash", "process")
    async with Offloader(settings) as ex:
        await _drive(ex, warm, fns, concurrency, SoakReport(warmup_calls, seed, concurrency, ""))
    await settle(initial)

    plan = make_plan(calls, seed)
    expected = expected_counts(plan)
    report.before = await settle(Resources.now(), timeout=2)

    started = time.perf_counter()
    seen: list[int] = []
    async with Offloader(settings) as ex:
        with anyio.move_on_after(time_limit) as limit:
            seen = await _drive(ex, plan, fns, concurrency, report)
        report.duration = time.perf_counter() - started
    report.stats = ex.offloader.stats()
    if limit.cancelled_caught:
        report.problem(f"the calls did not all end within {time_limit:g} s")
    else:
        missing = [i for i, n in enumerate(seen) if n == 0]
        for i in missing:
            report.problem(f"call {i} ({plan[i].kind}, {plan[i].pool}): no outcome")
        if not report.problem_count:
            for name, counts in expected.items():
                stats = report.stats[name]
                got = {key: getattr(stats, key) for key in counts}
                if got != counts:
                    report.problem(f"stats of pool {name!r}: {got}, expected {counts}")
    del plan, seen
    report.after = await settle(report.before)
    return report
