"""Soak: 2,000 calls from 64 concurrent callers, every kind of outcome, then leaks.

The driver is ``benchmarks/_soak.py``, shared with ``benchmarks/soak.py`` (which runs
the same soak at any size); the worker functions come from ``tests.funcs``. The mix,
drawn with a fixed seed: normal calls (exact result checked), user exceptions,
deadlines, caller cancellations and crashes (about 1%), to the process pool (2
workers) and the thread pool. Run with ``pytest -s`` to see the figures.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any

from . import funcs
from .conftest import Backend, loop_name

BENCH_DIR = Path(__file__).resolve().parents[1] / "benchmarks"
CALLS = 2000
SEED = 20240611
RSS_LIMIT = 10 << 20


def soak_driver() -> Any:
    """``benchmarks/_soak.py`` (the benchmarks are no package, and must not import
    the tests: the tests import them)."""
    if str(BENCH_DIR) not in sys.path:
        sys.path.append(str(BENCH_DIR))
    return importlib.import_module("_soak")


async def test_soak(anyio_backend: Backend) -> None:
    driver = soak_driver()
    fns = driver.Funcs(
        add=funcs.add,
        boom=funcs.boom,
        boom_type=funcs.Boom,
        sleep_then=funcs.sleep_then,
        exit_now=funcs.exit_now,
    )
    report = await driver.soak(
        fns,
        calls=CALLS,
        seed=SEED,
        backend=loop_name(anyio_backend),
        concurrency=64,
        time_limit=50,
        rss_limit=RSS_LIMIT,
    )
    print()
    print(report.format())

    # Every call ended exactly once, as planned, and the pools counted it so.
    assert report.problem_count == 0, report.problems
    assert sum(report.outcomes.values()) == CALLS
    for kind in driver.KINDS:  # the seed yields every kind, on each pool that runs it
        assert report.outcomes[f"{kind}/process"] > 0, kind
        if kind != "crash":
            assert report.outcomes[f"{kind}/thread"] > 0, kind
    # After the Offloader exited: nothing left behind.
    assert not report.leaked_children
    assert report.extra_threads <= 0, (report.before, report.after)
    assert report.extra_fds <= 0, (report.before, report.after)
    assert report.rss_growth < RSS_LIMIT, report.rss_growth
    assert report.failures() == []
    assert report.duration < 60
