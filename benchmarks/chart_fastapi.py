"""Draw the "Why" page's chart from a ``bench_fastapi.py`` run.

::

    python benchmarks/chart_fastapi.py      # results/fastapi.json -> docs/img/why-fastapi.png

Two panels from the run's medians: ``/ping`` latency (p50 and p99, log scale) while 8
clients load the server with CPU-bound requests, and how many of those requests a
second the server completed, for the same work done three ways (on the event loop, in
a thread, in offload's process pool) beside an idle server and bare processes.
Needs matplotlib (``pip install -e ".[bench]"``). It only reads the JSON: no benchmark
runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent

#: (mode in the JSON, label on the chart, colour)
MODES = (
    ("idle", "idle server\n(no work)", "#9e9e9e"),
    ("blocking", "async def route\ncalls it", "#d62728"),
    ("anyio-thread", "in a thread\n(anyio.to_thread)", "#ff7f0e"),
    ("offload-process, niceness 10 (default)", "offload\nprocess pool", "#2ca02c"),
)


def draw(report: dict[str, Any], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    summary = report["summary"]
    config = report["config"]
    fig = Figure(figsize=(10, 5), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ping, work = fig.subplots(1, 2, width_ratios=(3, 2))
    labels = [label for _, label, _ in MODES]
    colours = [colour for _, _, colour in MODES]
    xs = range(len(MODES))
    p50 = [summary[mode]["ping_p50_ms"] for mode, _, _ in MODES]
    p99 = [summary[mode]["ping_p99_ms"] for mode, _, _ in MODES]
    width = 0.38
    ping.bar([x - width / 2 for x in xs], p50, width, color=colours, alpha=0.55, label="p50")
    ping.bar([x + width / 2 for x in xs], p99, width, color=colours, label="p99")
    for x, (a, b) in enumerate(zip(p50, p99, strict=True)):
        ping.annotate(f"{a:.1f}", (x - width / 2, a), ha="center", va="bottom", fontsize=10)
        ping.annotate(f"{b:.1f}", (x + width / 2, b), ha="center", va="bottom", fontsize=10)
    ping.set_yscale("log")
    ping.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ping.set_xticks(list(xs), labels, fontsize=11)
    ping.set_ylabel("ms (log scale)")
    ping.set_title("GET /ping while the server is loaded: p50 (light), p99 (dark)", fontsize=12)
    ping.grid(True, axis="y", which="both", alpha=0.3)

    loaded = MODES[1:]
    rates = [summary[mode]["req_per_s"] for mode, _, _ in loaded]
    work.bar(range(len(loaded)), rates, color=[c for _, _, c in loaded])
    for x, rate in enumerate(rates):
        work.annotate(f"{rate:g}", (x, rate), ha="center", va="bottom", fontsize=10)
    bare = summary["bare processes"]["req_per_s"]
    work.axhline(bare, color="black", linestyle=":", linewidth=1)
    work.annotate(f"bare processes, no server: {bare:g}", (-0.4, bare), va="bottom", fontsize=10)
    work.set_xticks(range(len(loaded)), [label for _, label, _ in loaded], fontsize=11)
    work.set_ylabel("CPU-bound requests completed / s")
    work.set_title("throughput of the CPU-bound route", fontsize=12)
    work.set_ylim(0, bare * 1.2)
    work.grid(True, axis="y", alpha=0.3)

    machine = report["machine"]
    task_ms = statistics.median(r["single_task_ms"] for r in report["rounds"])
    fig.suptitle(
        f"{config['concurrency']} clients, one task {task_ms:.0f} ms alone, "
        f"{machine['cpus']} CPUs ({machine['cpu']}), medians of {config['rounds']} rounds, "
        f"{report['date'][:10]}",
        fontsize=12,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=BENCH_DIR / "results" / "fastapi.json")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img" / "why-fastapi.png")
    args = parser.parse_args()
    draw(json.loads(args.json.read_text()), args.out)
    print(args.out)


if __name__ == "__main__":
    main()
