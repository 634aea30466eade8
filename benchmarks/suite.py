"""offload's benchmark suite: its pools beside the usual ways to offload from asyncio.

Scenarios (one module each): no-op round trip p50/p99 and 64-caller throughput
(``_roundtrip``), payload round trips of bytes and NumPy arrays of 1, 16 and 64 MiB
(``_payload``), CPU scaling on one worker per CPU (``_scaling``), first call after
start and memory, each in fresh child processes (``_cold``). During every
measurement a loop-lag probe (``_lagprobe``) records how late a 1 ms sleep on the
caller's event loop wakes. Contenders are in ``_contenders``.

The warm pools are created once; each round runs every scenario for every
contender in a shuffled order, so the machine's noise hits all alike; the report
gives medians over rounds and ratios to the best peer of the same family, and says
which of the project's targets are met.

Run from the repository root (needs ``pip install -e ".[bench]"``)::

    python benchmarks/suite.py --quick          # smoke run, under a minute
    python benchmarks/suite.py [--rounds 7] [--seed N] [--out DIR] [--only MEASUREMENT ...]
    python benchmarks/suite.py --replot benchmarks/results/suite.json   # tables, charts again

Without ``--out`` it writes ``benchmarks/results/suite.json``, ``docs/benchmarks/suite.md``
and ``docs/benchmarks/*.png``, and replaces the results section of
``docs/benchmarks.md``; with ``--out DIR``, everything goes to DIR and the repository
is left alone. Exits 1 if any measurement failed (the others are still reported).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import random
import shlex
import sys
import time
from contextlib import AsyncExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any

import _cold
import _payload
import _roundtrip
import _scaling
from _charts import draw
from _contenders import (
    BENCH_DIR,
    FACTORIES,
    PROCESS_WORKERS,
    REPO_ROOT,
    THREAD_WORKERS,
    Contender,
    setup_paths,
    start_every_worker,
)
from _procs import leftovers
from _report import Raw, check_targets, markdown, summarize, version

if TYPE_CHECKING:
    from _scenario import Measurement, Table

setup_paths()
log = logging.getLogger("suite")

MEASUREMENTS: list[Measurement] = [
    *_roundtrip.MEASUREMENTS,
    *_payload.MEASUREMENTS,
    *_scaling.MEASUREMENTS,
    *_cold.MEASUREMENTS,
]
TABLES: list[Table] = [t for m in MEASUREMENTS for t in m.tables]
DOCS_PAGE = REPO_ROOT / "docs" / "benchmarks.md"
BEGIN = "<!-- suite results: begin (written by benchmarks/suite.py; do not edit) -->"
END = "<!-- suite results: end -->"


async def setup(stack: AsyncExitStack, skipped: dict[str, str]) -> list[Contender]:
    contenders: list[Contender] = []
    for factory in FACTORIES:
        try:
            new = await factory(stack)
            for c in new:
                await start_every_worker(c)
        except Exception as exc:  # report it, bench the others
            skipped[factory.__name__] = why = f"{type(exc).__name__}: {exc}"
            trace = not isinstance(exc, ImportError)  # no traceback if just missing
            log.warning("WARNING: skipping %s: %s", factory.__name__, why, exc_info=trace)
            continue
        contenders += new
    return contenders


def rounds_for(m: Measurement, args: argparse.Namespace) -> int:
    rounds: int = args.rounds
    if args.quick and m.quick_rounds is not None:
        return min(rounds, m.quick_rounds)
    return rounds


async def run(
    args: argparse.Namespace,
    skipped: dict[str, str],
    errors: list[dict[str, Any]],
    spent: dict[str, float],
) -> tuple[list[Contender], Raw]:
    rng = random.Random(args.seed)
    measurements = [m for m in MEASUREMENTS if not args.only or m.name in args.only]
    raw: Raw = {t.key: {} for m in measurements for t in m.tables}
    async with AsyncExitStack() as stack:
        t_setup = time.perf_counter()
        contenders = await setup(stack, skipped)
        if any(m.name == "scaling" for m in measurements):
            _scaling.iterations()  # calibrate before the clocks run
        spent["setup"] = time.perf_counter() - t_setup
        for r in range(args.rounds):
            t0 = time.perf_counter()
            for m in measurements:
                if r >= rounds_for(m, args):
                    continue
                eligible = [c for c in contenders if c.family in m.families]
                t_m = time.perf_counter()
                for c in rng.sample(eligible, len(eligible)):
                    try:
                        results = await m.run(c, args.quick)
                    except Exception as exc:
                        why = f"{type(exc).__name__}: {exc}"
                        log.error("ERROR in %s, %s: %s", m.name, c.name, why, exc_info=True)
                        errors.append(
                            {"scenario": m.name, "contender": c.name, "round": r + 1, "error": why}
                        )
                        continue
                    for key, metrics in results.items():
                        raw[key].setdefault(c.name, []).append(metrics)
                spent[m.name] = spent.get(m.name, 0.0) + time.perf_counter() - t_m
            dt = time.perf_counter() - t0
            print(f"round {r + 1}/{args.rounds} done in {dt:.1f} s", file=sys.stderr)
    return contenders, raw


def write_docs_section(text: str) -> None:
    """Replace the generated section of docs/benchmarks.md between its markers."""
    page = DOCS_PAGE.read_text()
    if BEGIN not in page or END not in page:
        log.warning("WARNING: %s has no suite markers; not updated", DOCS_PAGE)
        return
    head, rest = page.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    DOCS_PAGE.write_text(f"{head}{BEGIN}\n\n{text}\n{END}{tail}")


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Run the measurements; the report, JSON-ready."""
    t0 = time.perf_counter()
    load_before = os.getloadavg()
    skipped: dict[str, str] = {}
    errors: list[dict[str, Any]] = []
    spent: dict[str, float] = {}
    contenders, raw = asyncio.run(run(args, skipped, errors, spent))
    left = leftovers()
    if left:
        log.error("ERROR: processes left behind: %s", left)
    spent["total"] = time.perf_counter() - t0
    return {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {
            "nproc": os.cpu_count(),
            "python": sys.version,
            "python_version": platform.python_version(),
            "platform": platform.platform(terse=True),
            # 1-minute load average before and after: above 0 means others used the CPUs
            "loadavg_1min": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
            "packages": {
                d: version(d) for d in ("offload", "anyio", "loky", "pebble", "numpy", "psutil")
            },
        },
        "config": {
            "command": shlex.join(["python", "benchmarks/suite.py", *sys.argv[1:]]),
            "quick": args.quick,
            "rounds": args.rounds,
            "seed": args.seed,
            "only": args.only,
            "process_workers": PROCESS_WORKERS,
            "thread_workers": THREAD_WORKERS,
            "quick_rounds": {m.name: m.quick_rounds for m in MEASUREMENTS if m.quick_rounds},
            "latency_calls": _roundtrip.LATENCY_CALLS,
            "throughput_calls": _roundtrip.THROUGHPUT_CALLS,
            "concurrency": _roundtrip.CONCURRENCY,
            "payload_calls": {
                m: {str(k): v for k, v in c.items()} for m, c in _payload.CALLS.items()
            },
            "payload_budget_s": _payload.BUDGET_S,
            "scaling_tasks_per_worker": _scaling.TASKS_PER_WORKER,
            "scaling_task_iterations": _scaling._iterations[0] if _scaling._iterations else None,
        },
        "contenders": {
            c.name: {"family": c.family, "peer": c.peer, "note": c.note} for c in contenders
        },
        "skipped": skipped,
        "errors": errors,
        "leftover_children": left,
        "seconds_spent": spent,
        "raw": raw,
    }


def publish(report: dict[str, Any], out: Path | None) -> str:
    """Summarize a report's raw numbers and write the JSON, Markdown and charts.

    Returns the Markdown page. ``out``: the directory for everything; None: the
    repository's places, the docs page's results section included.
    """
    raw: Raw = report["raw"]
    tables = [t for t in TABLES if t.key in raw]
    families = {n: c["family"] for n, c in report["contenders"].items()}
    peers = {n for n, c in report["contenders"].items() if c["peer"]}
    summary = summarize(raw, families, peers, tables)
    report["scenarios"] = {
        t.key: {
            "title": t.title,
            "explain": t.explain,
            "headline": t.headline,
            "lower_is_better": t.lower_is_better,
        }
        for t in tables
    }
    report["summary"] = summary
    report["targets"] = check_targets(summary)
    json_path = out / "suite.json" if out else BENCH_DIR / "results" / "suite.json"
    docs_dir = out or REPO_ROOT / "docs" / "benchmarks"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    docs_dir.mkdir(parents=True, exist_ok=True)
    charts = draw(report, tables, docs_dir)
    report["charts"] = sorted(set(charts.values()))
    raw_last = {k: v for k, v in report.items() if k != "raw"} | {"raw": raw}  # long part last
    json_path.write_text(json.dumps(raw_last, indent=2) + "\n")
    page = markdown(report, tables, charts, level=2)
    (docs_dir / "suite.md").write_text(f"# Benchmark suite: results\n\n{page}\n")
    if out is None:
        rel = {k: f"benchmarks/{v}" for k, v in charts.items()}
        write_docs_section(markdown(report, tables, rel, level=3))
    print(f"results: {json_path}, {docs_dir / 'suite.md'}, charts in {docs_dir}", file=sys.stderr)
    return page


def main() -> None:
    logging.basicConfig(format="%(message)s")
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run, under a minute")
    parser.add_argument("--rounds", type=int, help="default: 3 with --quick, else 7")
    parser.add_argument("--seed", type=int, default=random.randrange(2**32))
    parser.add_argument("--out", type=Path, help="write every output here, not in the repo")
    names = [m.name for m in MEASUREMENTS]
    parser.add_argument("--only", nargs="+", choices=names, help="run only these measurements")
    parser.add_argument(
        "--replot", type=Path, metavar="JSON", help="measure nothing: publish a suite.json again"
    )
    args = parser.parse_args()
    args.rounds = args.rounds or (3 if args.quick else 7)

    if args.replot:
        publish(json.loads(args.replot.read_text()), args.out)
        return
    report = measure(args)
    print(publish(report, args.out))
    where = ", ".join(f"{k} {v:.1f}" for k, v in report["seconds_spent"].items())
    print(f"suite done: {where} s", file=sys.stderr)
    if report["errors"] or report["leftover_children"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
