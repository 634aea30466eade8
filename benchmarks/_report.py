"""The suite's summary (medians over rounds, ratios to the best peer), targets and Markdown."""

from __future__ import annotations

import importlib.metadata
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _scenario import Metrics, Table

Raw = dict[str, dict[str, list[Metrics]]]  # scenario -> contender -> one Metrics per round
Summary = dict[str, dict[str, dict[str, float | None]]]  # scenario -> contender -> medians
LAG_KEYS = ("lag_p99_ms", "lag_max_ms")
RATIO = "ratio: value / best peer's (non-offload) of the same family"


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.median(present) if present else None


def summarize(raw: Raw, families: dict[str, str], peers: set[str], tables: list[Table]) -> Summary:
    """Medians over rounds of every metric, the headline's range and its ratio to the best peer.

    The loop lag's maximum is the worst over rounds; its p99, like the rest, a median.

    ``families``: contender -> family; ``peers``: the contenders that are not offload.
    """
    summary: Summary = {}
    for table in tables:
        rounds = raw.get(table.key, {})
        med: dict[str, dict[str, float | None]] = {}
        for name, rs in rounds.items():
            keys = dict.fromkeys(k for r in rs for k in r)
            med[name] = {k: _median([r.get(k) for r in rs]) for k in keys}
            worst = [v for r in rs if (v := r.get("lag_max_ms")) is not None]
            med[name]["lag_max_ms"] = max(worst) if worst else None  # the worst, not a median
            heads = [v for r in rs if (v := r.get(table.headline)) is not None]
            med[name]["rounds"] = float(len(rs))
            med[name]["headline_min"] = min(heads) if heads else None
            med[name]["headline_max"] = max(heads) if heads else None
        best: dict[str, float] = {}
        for name, m in med.items():
            value, fam = m.get(table.headline), families[name]
            if name not in peers or value is None:
                continue
            if fam not in best or (value < best[fam]) == table.lower_is_better:
                best[fam] = value
        for name, m in med.items():
            value, ref = m.get(table.headline), best.get(families[name])
            m["vs_best_peer"] = value / ref if value is not None and ref else None
        summary[table.key] = med
    return summary


@dataclass(frozen=True)
class Target:
    what: str
    scenario: str
    contender: str
    metric: str  # a key of the summary, e.g. "vs_best_peer"
    goal: str  # "<= 0.7"
    ref: str | None = None  # ratio to this contender instead of the metric itself


OFF_P, OFF_T = "offload process pool", "offload thread pool"
TARGETS = [
    Target("process round trip vs best peer", "latency", OFF_P, "vs_best_peer", "<= 0.7"),
    Target(
        "process 64-caller throughput vs best peer", "throughput", OFF_P, "vs_best_peer", ">= 1.5"
    ),
    Target(
        "thread round trip vs asyncio.to_thread",
        "latency",
        OFF_T,
        "p50_us",
        "<= 1.0",
        ref="asyncio.to_thread",
    ),
    Target(
        "thread 64-caller throughput vs asyncio.to_thread",
        "throughput",
        OFF_T,
        "calls_per_s",
        ">= 0.9",
        ref="asyncio.to_thread",
    ),
    *(
        Target(
            f"{size} MiB {kind} round trip time vs best peer",
            f"payload_{kind}_{size}MiB",
            OFF_P,
            "vs_best_peer",
            goal,
        )
        for size, goal in ((64, "<= 0.125"), (1, "<= 1.0"))
        for kind in ("bytes", "numpy")
    ),
    Target(
        "scaling efficiency, process pool (batch alone)", "scaling", OFF_P, "efficiency", ">= 0.95"
    ),
    Target(
        "first call after start, process pool (ms)", "first_call", OFF_P, "first_call_ms", "< 2"
    ),
    Target("first call after start, thread pool (ms)", "first_call", OFF_T, "first_call_ms", "< 2"),
]


def check_targets(summary: Summary) -> list[dict[str, Any]]:
    out = []
    for t in TARGETS:
        rows = summary.get(t.scenario, {})
        value = rows.get(t.contender, {}).get(t.metric)
        if t.ref is not None:
            ref = rows.get(t.ref, {}).get(t.metric)
            value = value / ref if value is not None and ref else None
        op, bound = t.goal.split()
        met = None
        if value is not None:
            met = {
                "<=": value <= float(bound),
                ">=": value >= float(bound),
                "<": value < float(bound),
            }[op]
        out.append(
            {
                "target": t.what,
                "scenario": t.scenario,
                "contender": t.contender,
                "goal": t.goal,
                "measured": value,
                "met": met,
            }
        )
    return out


def _fmt(fmt: str, value: float | None) -> str:
    return "-" if value is None else fmt.format(value)


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def table_markdown(
    table: Table, summary: Summary, families: dict[str, str], peers: set[str]
) -> list[str]:
    med = summary.get(table.key, {})
    if not med:
        return ["_no results_"]
    head = ["contender", *(c.label for c in table.columns), "rounds min-max", "vs best peer"]
    head += ["loop lag p99 ms", "loop lag max ms"]
    lines = [_row(head), _row(["---"] + ["---:"] * (len(head) - 1))]
    sign = 1 if table.lower_is_better else -1

    def order(name: str) -> tuple[str, float]:
        v = med[name].get(table.headline)
        return (families[name], sign * v if v is not None else math.inf)

    fmt = next(c.fmt for c in table.columns if c.key == table.headline)
    for name in sorted(med, key=order):
        m = med[name]
        cells = [name if name in peers else f"**{name}**"]
        cells += [_fmt(c.fmt, m.get(c.key)) for c in table.columns]
        cells.append(f"{_fmt(fmt, m.get('headline_min'))} - {_fmt(fmt, m.get('headline_max'))}")
        cells.append(_fmt("{:.2f}x", m.get("vs_best_peer")))
        cells += [_fmt("{:.2f}", m.get(k)) for k in LAG_KEYS]
        lines.append(_row(cells))
    return lines


def markdown(
    report: dict[str, Any], tables: list[Table], charts: dict[str, str], level: int
) -> str:
    """The results as Markdown; ``charts``: table key -> image path; headings at ``level``."""
    h = "#" * level
    cfg, machine = report["config"], report["machine"]
    families = {n: c["family"] for n, c in report["contenders"].items()}
    peers = {n for n, c in report["contenders"].items() if c["peer"]}
    load = machine["loadavg_1min"]
    pkgs = ", ".join(f"{k} {v}" for k, v in machine["packages"].items())
    out = []
    if cfg["quick"]:
        out += [
            '!!! warning "Quick mode"',
            "    These figures come from a `--quick` run (few calls, few rounds): a smoke",
            "    test of the suite, not a measurement to draw conclusions from.",
            "",
        ]
    out += [
        f"{report['date']}, `{cfg['command']}` ({cfg['rounds']} rounds, seed {cfg['seed']}),"
        f" {machine['nproc']} CPUs (1-minute load average {load[0]} before the run, {load[1]}"
        " after it, the suite's own included),"
        f" {machine['platform']}, Python {machine['python_version']};"
        f" {pkgs}. Process pools: {cfg['process_workers']} workers; thread pools:"
        f" {cfg['thread_workers']} threads (peers' defaults otherwise). Medians over rounds;"
        f" {RATIO}. Loop lag: how late a 1 ms sleep on the caller's event loop woke up"
        " during the measurement (p99: median over rounds; max: the worst of all rounds).",
        "",
    ]
    for name, why in report["skipped"].items():
        out += [f"_skipped {name}: {why}_", ""]
    for err in report["errors"]:
        out += [
            f"_error: {err['scenario']}, {err['contender']}, round {err['round']}: "
            f"{err['error'].splitlines()[0] if err['error'] else ''}_",
            "",
        ]
    out += [f"{h} Targets", "", _row(["target", "goal", "measured", "met"]), _row(["---"] * 4)]
    for t in report["targets"]:
        met = {True: "yes", False: "**no**", None: "not measured"}[t["met"]]
        out.append(_row([t["target"], t["goal"], _fmt("{:.3g}", t["measured"]), met]))
    out.append("")
    for i, table in enumerate(tables):
        better = "lower" if table.lower_is_better else "higher"
        explain = table.explain[0].upper() + table.explain[1:]
        out += [f"{h} {table.title}", "", f"{explain}; {better} is better.", ""]
        out += table_markdown(table, report["summary"], families, peers)
        out.append("")
        chart = charts.get(table.key)
        following = tables[i + 1].key if i + 1 < len(tables) else None
        if chart and charts.get(following or "") != chart:  # after a chart's last table
            alt = Path(chart).stem.replace("_", " ")
            out += [f"![chart: {alt}]({chart})", ""]
    return "\n".join(out)


def version(dist: str) -> str:
    """The installed version of ``dist``, for the machine's record."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"
