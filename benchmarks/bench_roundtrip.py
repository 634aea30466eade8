"""Round-trip overhead of offload's pools next to the usual asyncio offloading tools.

Measures, from asyncio code, awaiting the no-op ``_funcs.noop`` in a worker:

* latency: sequential awaits; p50 and p99 of the per-call µs within a round;
* throughput: 64 concurrent callers awaiting noop in a loop; calls/s.

Contenders come in two families, each compared with its best non-offload peer:
threads (``asyncio.to_thread``, ``anyio.to_thread``, ``run_in_executor`` on a
``ThreadPoolExecutor(8)``, offload's thread pool of 8) and processes, one worker
per CPU each (``run_in_executor`` on a ``ProcessPoolExecutor``, ``anyio.to_process``, loky's
reusable executor, ``pebble.ProcessPool``, offload's process pool): the suite's
contenders (``_contenders.py``). Peers keep their default start method. Pools
are created and warmed up once; each round runs every contender once per scenario
in a shuffled order, so noise hits all alike, and the tables report medians over
rounds. Without an importable offload the
peers are still measured, with a warning.

Run from the repository root (tables to stdout, progress to stderr, raw
per-round numbers to benchmarks/results/roundtrip.json unless ``--json``)::

    python benchmarks/bench_roundtrip.py --quick        # smoke run, < 60 s
    python benchmarks/bench_roundtrip.py [--rounds 7] [--json PATH] [--seed N]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from _contenders import BENCH_DIR, FACTORIES, setup_paths
from _report import version

log = logging.getLogger("bench_roundtrip")
CONCURRENCY = 64
WARMUP_CALLS = 10  # untimed calls before each measurement
# (latency calls, throughput calls) per round, by mode and family.
SIZES = {
    "quick": {"thread": (1_000, 8_000), "process": (300, 1_920)},
    "full": {"thread": (3_000, 32_000), "process": (1_000, 6_400)},
}


setup_paths()

Call = Callable[[], Awaitable[object]]


@dataclass
class Contender:
    name: str
    family: str  # "thread" or "process"
    call: Call  # awaits noop() in a worker
    note: str  # workers and start method, for the JSON
    peer: bool = True


async def calls(c: Contender, n: int, concurrency: int = 1) -> None:
    async def caller(k: int) -> None:
        for _ in range(k):
            await c.call()

    await asyncio.gather(*(caller(n // concurrency) for _ in range(concurrency)))


async def measure_latency(c: Contender, n: int) -> dict[str, float]:
    await calls(c, WARMUP_CALLS)
    gc.collect()
    clock, samples = time.perf_counter_ns, [0] * n
    for i in range(n):
        t0 = clock()
        await c.call()
        samples[i] = clock() - t0
    p99 = statistics.quantiles(samples, n=100, method="inclusive")[98]
    return {"p50_us": statistics.median(samples) / 1e3, "p99_us": p99 / 1e3}


async def measure_throughput(c: Contender, n: int) -> dict[str, float]:
    await calls(c, WARMUP_CALLS * 4, concurrency=4)
    gc.collect()
    total = n // CONCURRENCY * CONCURRENCY
    t0 = time.perf_counter()
    await calls(c, total, CONCURRENCY)
    return {"calls_per_s": total / (time.perf_counter() - t0)}


Measure = Callable[[Contender, int], Awaitable[dict[str, float]]]
# name: (measure, index into SIZES, headline metric, lower is better)
SCENARIOS: dict[str, tuple[Measure, int, str, bool]] = {
    "latency": (measure_latency, 0, "p50_us", True),
    "throughput": (measure_throughput, 1, "calls_per_s", False),
}
Raw = dict[str, dict[str, list[dict[str, float]]]]  # scenario -> name -> rounds
Meta = dict[str, Contender]  # name -> contender


async def setup(stack: AsyncExitStack, skipped: dict[str, str]) -> list[Contender]:
    from _funcs import noop

    contenders: list[Contender] = []
    for factory in FACTORIES:  # the suite's contenders, each awaiting noop
        try:
            new = [
                Contender(c.name, c.family, partial(c.run, noop), c.note, c.peer)
                for c in await factory(stack)
            ]
            for c in new:  # start every worker: a few bursts wider than the pool
                for _ in range(3):
                    await calls(c, 16, concurrency=16)
        except Exception as exc:  # report it, bench the others
            skipped[factory.__name__] = why = f"{type(exc).__name__}: {exc}"
            trace = not isinstance(exc, ImportError)  # no traceback if just missing
            log.warning("WARNING: skipping %s: %s", factory.__name__, why, exc_info=trace)
            continue
        contenders += new
    return contenders


async def run(args: argparse.Namespace, skipped: dict[str, str]) -> tuple[Meta, Raw]:
    sizes = SIZES["quick" if args.quick else "full"]
    rng = random.Random(args.seed)
    raw: Raw = {s: {} for s in SCENARIOS}
    async with AsyncExitStack() as stack:
        contenders = await setup(stack, skipped)
        for r in range(args.rounds):
            t0 = time.perf_counter()
            for scenario, (measure, idx, _, _) in SCENARIOS.items():
                for c in rng.sample(contenders, len(contenders)):
                    result = await measure(c, sizes[c.family][idx])
                    raw[scenario].setdefault(c.name, []).append(result)
            dt = time.perf_counter() - t0
            print(f"round {r + 1}/{args.rounds} done in {dt:.1f} s", file=sys.stderr)
    return {c.name: c for c in contenders}, raw


Summary = dict[str, dict[str, dict[str, float]]]  # scenario -> name -> medians


RATIO = "ratio = value / best peer (non-offload) of the same family"


def label(key: str) -> str:
    return key.replace("_us", " µs").replace("_per_", "/")  # p50_us -> p50 µs


def md_row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def summarize(raw: Raw, meta: Meta) -> tuple[list[str], Summary]:
    """Markdown lines and, per scenario and contender, the medians over rounds."""
    out: list[str] = []
    summary: Summary = {}
    for scenario, (_, _, key, lower) in SCENARIOS.items():
        rounds = raw[scenario]
        med = {
            n: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for n, rs in rounds.items()
        }
        best: dict[str, float] = {}
        for n, m in med.items():
            fam = meta[n].family
            if meta[n].peer and (fam not in best or (m[key] < best[fam]) == lower):
                best[fam] = m[key]
        for n, m in med.items():
            m["vs_best_peer"] = m[key] / best.get(meta[n].family, float("nan"))
        summary[scenario] = med

        cols = ("p50_us", "p99_us") if lower else (key,)
        fmt = "{:.1f}" if lower else "{:,.0f}"
        better = "lower" if lower else "higher"
        head = ["contender", "family", *map(label, cols)]
        head += ["rounds min-max", "vs best peer"]
        out += [f"\n### {scenario} ({better} is better; {RATIO})\n", md_row(head)]
        out.append(md_row(["---", "---"] + ["---:"] * (len(cols) + 2)))
        sign = 1 if lower else -1  # best first within each family
        for n in sorted(med, key=lambda n: (meta[n].family, sign * med[n][key])):
            vals = [r[key] for r in rounds[n]]
            row = [n if meta[n].peer else f"**{n}**", meta[n].family]
            row += [fmt.format(med[n][k]) for k in cols]
            row.append(f"{fmt.format(min(vals))}-{fmt.format(max(vals))}")
            row.append(f"{med[n]['vs_best_peer']:.2f}x")
            out.append(md_row(row))
    return out, summary


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run, < 60 s")
    parser.add_argument("--rounds", type=int, help="default: 3 with --quick, else 7")
    default_json = BENCH_DIR / "results" / "roundtrip.json"
    parser.add_argument("--json", type=Path, default=default_json)
    parser.add_argument("--seed", type=int, default=random.randrange(2**32))
    args = parser.parse_args()
    args.rounds = args.rounds or (3 if args.quick else 7)

    skipped: dict[str, str] = {}
    meta, raw = asyncio.run(run(args, skipped))
    lines, summary = summarize(raw, meta)
    print(
        f"# offload round-trip benchmark: {args.rounds} rounds, {CONCURRENCY} callers,"
        f" {os.cpu_count()} CPUs, Python {platform.python_version()}"
    )
    lines[:0] = [f"\n_skipped {name}: {why}_" for name, why in skipped.items()]
    print("\n".join(lines), flush=True)

    sizes = SIZES["quick" if args.quick else "full"]
    constants = {
        "concurrency": CONCURRENCY,
        "warmup_calls": WARMUP_CALLS,
        "sizes": sizes,
    }
    report = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {
            "nproc": os.cpu_count(),
            "python": sys.version,
            "platform": platform.platform(),
            "packages": {d: version(d) for d in ("anyio", "loky", "pebble", "offload")},
        },
        "config": {**vars(args), "json": str(args.json), **constants},
        "contenders": {
            n: {"family": c.family, "peer": c.peer, "note": c.note} for n, c in meta.items()
        },
        "skipped": skipped,
        "raw": raw,
        "summary": summary,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nraw results: {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
