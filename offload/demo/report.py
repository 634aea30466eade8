"""What the demo shows: a progress bar while it runs, then a table and a chart."""

from __future__ import annotations

import importlib.util
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    import argparse

__all__ = ("Phase", "Progress", "chart_missing", "render_table", "write_chart")

#: what each mode is, for the table's legend
EXPLAIN = {
    "blocking": "`async def` route calling the function: it runs on the event loop",
    "thread": "`anyio.to_thread.run_sync`: the loop is free, the GIL runs one thread at a time",
    "process": "offload's process pool, one worker per CPU: the loop is free, every CPU works",
}


@dataclass
class Phase:
    """What the load process measured in one phase."""

    name: str
    seconds: float
    ping_ms: list[float] = field(default_factory=list)
    done: int = 0
    errors: int = 0
    #: shares of the phase the server's loop thread ran, and waited for a CPU (Linux)
    loop_busy: float | None = None
    loop_cpu_wait: float | None = None

    def ping(self, q: float) -> float:
        """The ``q`` quantile (nearest rank) of the /ping latencies, in ms."""
        if not self.ping_ms:
            return float("nan")
        ordered = sorted(self.ping_ms)
        return ordered[min(len(ordered), max(1, math.ceil(q * len(ordered)))) - 1]

    @property
    def rate(self) -> float:
        """Work requests answered per second."""
        return self.done / self.seconds


def _percent(share: float | None) -> str:
    return "-" if share is None else f"{100 * share:.0f}%"


def render_table(
    phases: Mapping[str, Phase],
    *,
    cpus: int,
    steps: int,
    timings: tuple[float, float],
    args: argparse.Namespace,
) -> str:
    """The report: a header line, the Markdown table, a legend.

    ``timings``: seconds one task took alone, before the run and after it; the ideal
    uses the shorter.
    """
    single = min(timings)
    ideal = cpus / single
    lines = [
        f"offload demo: {cpus} CPUs, {args.concurrency} clients, {args.duration:g} s per mode, "
        f"one task = {steps:,} steps = {single * 1000:.1f} ms alone",
        "",
        "| mode | /ping p50 (ms) | /ping p99 (ms) | loop busy | loop waiting for a CPU "
        "| work req/s | % of ideal |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, phase in phases.items():
        p50, p99 = phase.ping(0.50), phase.ping(0.99)
        loop = f"{_percent(phase.loop_busy)} | {_percent(phase.loop_cpu_wait)}"
        if name == "idle":
            lines.append(f"| idle (no work) | {p50:.1f} | {p99:.1f} | {loop} | - | - |")
        else:
            lines.append(
                f"| {name} | {p50:.1f} | {p99:.1f} | {loop} | {phase.rate:.1f} "
                f"| {100 * phase.rate / ideal:.0f}% |"
            )
    lines.append("")
    for name in phases:
        if name in EXPLAIN:
            lines.append(f"- {name}: {EXPLAIN[name]}")
    lines.append(f"- ideal: {cpus} CPUs / {single * 1000:.1f} ms per task = {ideal:.1f} req/s")
    lines.append(
        "- /ping: requested every 10 ms by one more client; latency = what any request waits"
    )
    lines.append(
        "- loop busy, waiting for a CPU: shares of the time the server's event-loop thread "
        "ran, and was ready to run with no CPU free (Linux); a slow /ping with neither: "
        "the loop waited for the GIL. In your app, Offloader.stats().loop reports both "
        "(busy, cpu_wait)"
    )
    # Blocking runs one task at a time: faster than 1 / single means the CPU sped up.
    blocking = phases.get("blocking")
    if blocking is not None and not blocking.done:
        blocking = None
    if max(timings) > 1.25 * single or (blocking and blocking.rate * single > 1.1):
        before, after = (t * 1000 for t in timings)
        during = f", blocking served one every {1000 / blocking.rate:.1f} ms" if blocking else ""
        lines.append(
            f"- note: one task took {before:.1f} ms alone before the run, {after:.1f} ms after"
            f"{during}: this machine's CPU speed varies (shared? throttled?), so the percents "
            "are rough"
        )
    for name, phase in phases.items():
        if phase.errors:
            lines.append(f"- {name}: {phase.errors} requests failed")
    return "\n".join(lines)


def chart_missing() -> str | None:
    """Why no chart can be drawn here, or None if it can."""
    if importlib.util.find_spec("matplotlib") is None:
        return "matplotlib is not installed (pip install 'offload[demo]')"
    return None


def write_chart(path: Path, phases: Mapping[str, Phase], title: str) -> None:
    """Draw the /ping latency distributions (CDFs, log scale) to a PNG at ``path``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    fig = Figure(figsize=(9, 6), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for name, phase in phases.items():
        if not phase.ping_ms:
            continue
        xs = sorted(phase.ping_ms)
        ys = [(i + 1) / len(xs) for i in range(len(xs))]
        label = f"{name}: p50 {phase.ping(0.5):.1f} ms, p99 {phase.ping(0.99):.1f} ms"
        ax.step(xs, ys, where="post", label=label, linewidth=2)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("/ping latency (ms, log scale)")
    ax.set_ylabel("fraction of pings answered within")
    ax.axhline(0.99, color="grey", linestyle=":", linewidth=1)
    ax.grid(True, which="both", alpha=0.3)
    fig.legend(loc="outside lower center", ncols=2)
    ax.set_title(title)
    fig.savefig(path)


class Progress:
    """A one-line progress bar on a terminal, redrawn with ``\\r``."""

    WIDTH = 30

    def __init__(self, plan: Mapping[str, float], stream: TextIO) -> None:
        self.plan = dict(plan)
        self.total = sum(self.plan.values())
        self.stream = stream
        self.label = ""
        self._done = 0.0  # seconds of the finished phases
        self._phase_start: float | None = None
        self._phase_seconds = 0.0
        self._drawn = 0.0
        self._drawn_label = ""
        self._width = 0
        self._tty = stream.isatty()

    def start(self, phase: str, seconds: float) -> None:
        self.label = "idle: /ping alone" if phase == "idle" else f"running {phase}"
        self._phase_start = time.monotonic()
        self._phase_seconds = seconds
        self.draw(force=True)

    def finish_phase(self) -> None:
        self._done += self._phase_seconds
        self._phase_start = None
        self.draw(force=True)

    def set(self, label: str) -> None:
        self.label = label
        self.draw(force=True)

    def draw(self, *, force: bool = False) -> None:
        """Redraw, at most 10 times a second; not a terminal: once per label, a line each."""
        now = time.monotonic()
        if self._tty:
            if not force and now - self._drawn < 0.1:
                return
        elif self.label == self._drawn_label:
            return
        self._drawn = now
        self._drawn_label = self.label
        elapsed = self._done
        if self._phase_start is not None:
            elapsed += min(now - self._phase_start, self._phase_seconds)
        fraction = min(1.0, elapsed / self.total) if self.total else 1.0
        filled = round(fraction * self.WIDTH)
        line = (
            f"{self.label:<20} [{'#' * filled}{'.' * (self.WIDTH - filled)}] "
            f"{100 * fraction:3.0f}%  {elapsed:4.1f}/{self.total:.0f} s"
        )
        if self._tty:
            self._width = max(self._width, len(line))
            self.stream.write("\r" + line.ljust(self._width))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self, label: str = "done") -> None:
        self.set(label)
        if self._tty:
            self.stream.write("\n")
            self.stream.flush()
