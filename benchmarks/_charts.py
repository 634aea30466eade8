"""The suite's PNG charts: each scenario's figures beside its loop lag (p99 and max).

Sized for the docs site: a figure is 1,000 px wide and shown in a column of about
750 px on a laptop, so no text is set below 10 pt (about 10 px once scaled down).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from _scenario import Table

LAG_FLOOR_MS = 0.01  # log axis: lag below this is drawn at it
TEXT_PT = 10  # the smallest text of a chart (see the module's docstring)
TITLE_PT = 12


@dataclass(frozen=True)
class Chart:
    file: str
    keys: tuple[str, ...]  # scenario tables, one row of panels each
    series: tuple[tuple[str, str], ...]  # (metric, legend label) drawn on the left
    unit: str
    log: bool = False
    target: float | None = None  # a vertical line, e.g. the scaling goal


CHARTS = [
    Chart("latency.png", ("latency",), (("p50_us", "p50"), ("p99_us", "p99")), "µs per call"),
    Chart("throughput.png", ("throughput",), (("calls_per_s", "64 callers"),), "calls/s"),
    *(
        Chart(
            f"payload_{kind}.png",
            tuple(f"payload_{kind}_{s}MiB" for s in (1, 16, 64)),
            (("p50_ms", "p50"),),
            "ms per round trip",
        )
        for kind in ("bytes", "numpy")
    ),
    Chart(
        "scaling.png",
        ("scaling",),
        (("efficiency", "efficiency"), ("efficiency_probed", "under the lag probe")),
        "ideal / measured",
        target=0.95,
    ),
    Chart(
        "first_call.png",
        ("first_call",),
        (("cold_ms", "creation to 1st result"), ("first_call_ms", "1st call after start")),
        "ms",
        log=True,
    ),
    Chart(
        "memory.png",
        ("memory",),
        (("parent_delta_mb", "parent +RSS"), ("worker_rss_mb", "RSS per worker")),
        "MB",
    ),
]


def _log_axis(ax: Any, smallest: float) -> None:
    """A log x axis from the decade below ``smallest``, so that every bar shows its length.

    Plain tick labels: the default's mathtext is slow to lay out.
    """
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_xscale("log")
    ax.set_xlim(left=10 ** math.floor(math.log10(smallest)))
    ax.xaxis.set_major_locator(LogLocator(base=10))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())


def _bars(
    ax: Any, names: list[str], series: list[tuple[str, list[float | None]]], log: bool
) -> None:
    """Horizontal bars, one group per name, each bar labelled with its value."""
    height = 0.8 / len(series)
    floor = LAG_FLOOR_MS if log else 0.0
    shown: list[float] = []
    for i, (label, values) in enumerate(series):
        ys = [y + (i - (len(series) - 1) / 2) * height for y in range(len(names))]
        xs = [v if v is not None and not math.isnan(v) else floor for v in values]
        xs = [max(floor, x) for x in xs]
        shown += xs
        bars = ax.barh(ys, xs, height=height, label=label)
        texts = ["-" if v is None else f"{v:,.0f}" if v >= 1000 else f"{v:.3g}" for v in values]
        ax.bar_label(bars, texts, fontsize=TEXT_PT, padding=2)
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    ax.grid(axis="x", alpha=0.3)
    if log:
        _log_axis(ax, min(x for x in shown if x > 0) if any(shown) else 1.0)
    ax.margins(x=0.15)  # room for the labels


def draw(report: dict[str, Any], tables: list[Table], out_dir: Path) -> dict[str, str]:
    """Write the PNGs into ``out_dir``; returns scenario key -> file name."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_key = {t.key: t for t in tables}
    summary = report["summary"]
    peers = {n for n, c in report["contenders"].items() if c["peer"]}
    families = {n: c["family"] for n, c in report["contenders"].items()}
    written: dict[str, str] = {}
    for chart in CHARTS:
        keys = [k for k in chart.keys if summary.get(k)]
        if not keys:
            continue
        rows = len(keys)
        n_names = max(len(summary[k]) for k in keys)
        fig, axes = plt.subplots(
            rows, 2, figsize=(10, 0.7 + rows * (0.5 * n_names + 1.1)), squeeze=False
        )
        for row, key in enumerate(keys):
            med, table = summary[key], by_key[key]
            sign = 1 if table.lower_is_better else -1

            def order(n: str, med: Any = med, sign: int = sign, h: str = table.headline) -> Any:
                v = med[n].get(h)
                return (families[n], sign * v if v is not None else math.inf)

            names = sorted(med, key=order)
            left, right = axes[row]
            series = [(lbl, [med[n].get(k) for n in names]) for k, lbl in chart.series]
            _bars(left, names, series, chart.log)
            if chart.target is not None:
                left.axvline(chart.target, color="k", linestyle="--", linewidth=1, label="target")
            left.set_xlabel(chart.unit)
            left.set_title(table.title, fontsize=TITLE_PT)
            lags = [
                (lbl, [med[n].get(k) for n in names])
                for k, lbl in (("lag_p99_ms", "p99"), ("lag_max_ms", "max"))
            ]
            _bars(right, names, lags, log=True)
            right.set_xlabel("ms late (log)")
            right.set_title("event-loop lag (1 ms sleep)", fontsize=TITLE_PT)
            for ax in (left, right):
                for tick in ax.get_yticklabels():
                    if tick.get_text() not in peers:
                        tick.set_fontweight("bold")
                ax.tick_params(labelsize=TEXT_PT)
                ax.xaxis.label.set_size(TEXT_PT + 1)
            if row == rows - 1:  # under the last row: a legend inside would hide bars
                for ax in (left, right):
                    ax.legend(
                        fontsize=TEXT_PT, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=3
                    )
        mode = "quick run" if report["config"]["quick"] else f"{report['config']['rounds']} rounds"
        fig.suptitle(
            f"offload benchmark suite ({mode}, {report['date'][:10]}); bold: offload",
            fontsize=TITLE_PT,
        )
        fig.tight_layout()
        fig.savefig(out_dir / chart.file, dpi=100)
        plt.close(fig)
        written.update(dict.fromkeys(keys, chart.file))
    return written
