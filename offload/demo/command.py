"""``python -m offload demo``: a real FastAPI server stalls under CPU-bound work, then does not.

It starts the example app :mod:`offload.demo.app` with uvicorn in a child process,
on a free port of 127.0.0.1, and drives it from another child process
(:mod:`offload.demo.load`). The app serves the same pure-Python work
(:func:`offload.demo.work.burn`, calibrated here to take ``--task-ms``) three ways:
``blocking`` (an ``async def`` route calling it), ``thread``
(``anyio.to_thread.run_sync``) and ``process`` (offload's process pool). For each,
``--concurrency`` clients loop on it for ``--duration`` seconds while a pinger
requests ``/ping`` every 10 ms; an idle phase first measures ``/ping`` alone (2 s, or
``--duration`` when shorter).

It prints a Markdown table: per mode, the latency of ``/ping`` (what every other
request of the server waits), how the server's event-loop thread spent the time (on
Linux: running, or ready to run without a CPU; what ``Offloader.stats().loop`` reports
as ``busy`` and ``cpu_wait`` inside an app), and the work's throughput against the
ideal (CPUs divided by the time one task takes alone); and it draws the distributions
of the ``/ping`` latencies to a PNG, in a fresh temporary directory or at
``--output``, and prints its path. Ctrl-C stops it, its children with it.
Needs ``pip install 'offload[demo]'`` (FastAPI, uvicorn; matplotlib for the chart).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from .children import Children, DemoError, in_main_thread, start_server
from .report import Phase, Progress, chart_missing, render_table, write_chart
from .work import burn, calibrate, timed

__all__ = ("conclude", "load_records", "main", "parser", "positive", "terminated")

MODES = ("blocking", "thread", "process")
#: seconds of the idle phase, the pinger alone; no longer than a mode (``--duration``)
IDLE_SECONDS = 2.0
#: the packages of the ``demo`` extra the demo cannot run without
NEEDS = ("fastapi", "uvicorn")
#: the chart's name in the temporary directory made for it
CHART_NAME = "offload-demo.png"


def loop_clock(pid: int) -> tuple[float, float] | None:
    """Seconds the main thread of process ``pid`` (uvicorn's event loop) has run, and
    waited for a CPU, from the kernel's scheduler statistics; None where there are none.
    The run time is brought up to date at each scheduler tick: exact enough over a
    phase of seconds."""
    try:
        with open(f"/proc/{pid}/schedstat") as stat:
            ran, waited, _ = stat.read().split()
    except (OSError, ValueError):
        return None
    return int(ran) / 1e9, int(waited) / 1e9


def drive(
    children: Children,
    server: subprocess.Popen[bytes],
    port: int,
    *,
    steps: int,
    args: argparse.Namespace,
    progress: Progress,
) -> dict[str, Phase]:
    """Run the load process to its end; returns what it measured, per phase, in order."""
    load = children.start(
        "load",
        [
            "-m",
            "offload.demo.load",
            "--port",
            str(port),
            "--steps",
            str(steps),
            "--duration",
            str(args.duration),
            "--concurrency",
            str(args.concurrency),
            "--idle",
            str(idle_seconds(args)),
            "--modes",
            ",".join(MODES),
        ],
        stdout=subprocess.PIPE,
    )
    phases: dict[str, Phase] = {}
    clocks: dict[str, tuple[float, tuple[float, float] | None]] = {}
    for record in load_records(load, {"": server}, progress):
        _handle(record, phases, progress, server.pid, clocks)
    if load.wait() != 0:
        raise DemoError(f"the load process failed (exit code {load.returncode})")
    return phases


def load_records(
    load: subprocess.Popen[bytes],
    servers: Mapping[str, subprocess.Popen[bytes]],
    progress: Progress,
) -> Iterator[dict[str, Any]]:
    """The JSON records the load process writes, as they come, until it closes its
    output; redraws the progress bar meanwhile.

    :raises DemoError: if one of ``servers`` exits first
    """
    assert load.stdout is not None
    fd = load.stdout.fileno()
    buffer = b""
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        eof = False
        while not eof:
            if selector.select(timeout=0.1):
                chunk = os.read(fd, 1 << 16)
                eof = not chunk
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    yield json.loads(line)
            for name, server in servers.items():
                if server.poll() is not None:
                    what = f"the {name} server" if name else "the server"
                    raise DemoError(f"{what} exited with code {server.returncode}")
            progress.draw()
    load.stdout.close()


def _handle(
    record: dict[str, Any],
    phases: dict[str, Phase],
    progress: Progress,
    server: int,
    clocks: dict[str, tuple[float, tuple[float, float] | None]],
) -> None:
    """Take one record of the load process; ``clocks`` keeps, per phase, when its
    window opened and the server's loop clock then."""
    if record["event"] == "start":
        progress.start(record["phase"], record["seconds"])
        clocks[record["phase"]] = (time.monotonic(), loop_clock(server))
    elif record["event"] == "result":
        phase = phases[record["phase"]] = Phase(
            record["phase"],
            record["seconds"],
            record["ping_ms"],
            record["done"],
            record["errors"],
        )
        opened, before = clocks.get(record["phase"], (0.0, None))
        after = loop_clock(server)
        elapsed = time.monotonic() - opened
        if before is not None and after is not None and elapsed > 0:
            phase.loop_busy = min(1.0, (after[0] - before[0]) / elapsed)
            phase.loop_cpu_wait = min(1.0, (after[1] - before[1]) / elapsed)
        progress.finish_phase()


def idle_seconds(args: argparse.Namespace) -> float:
    """The idle phase's length: a baseline as long as a mode, up to ``IDLE_SECONDS``."""
    return min(IDLE_SECONDS, float(args.duration))


def run(args: argparse.Namespace) -> None:
    from loky import cpu_count

    cpus = int(cpu_count())
    plan = {"idle": idle_seconds(args), **dict.fromkeys(MODES, args.duration)}
    progress = Progress(plan, sys.stderr)
    started = time.monotonic()
    try:
        progress.set("calibrating the work")
        steps, single = calibrate(args.task_ms)
        with Children() as children:
            progress.set("starting the server")
            server, port = start_server(children)
            phases = drive(children, server, port, steps=steps, args=args, progress=progress)
            progress.set("stopping the server")
    except BaseException:
        progress.close("stopped")
        raise
    progress.close(f"done in {time.monotonic() - started:.0f} s")
    timings = (single, min(timed(burn, steps) for _ in range(5)))
    conclude(phases, cpus=cpus, steps=steps, timings=timings, args=args)


def conclude(
    phases: Mapping[str, Phase],
    *,
    cpus: int,
    steps: int,
    timings: tuple[float, float],
    args: argparse.Namespace,
) -> None:
    """Print the table, then draw the chart and print its path, or say why there is none.

    Without ``--output``, the chart goes to a temporary directory made for it: a run
    from any directory leaves nothing there.
    """
    print(render_table(phases, cpus=cpus, steps=steps, timings=timings, args=args))
    missing = chart_missing()
    if missing is not None:
        print(f"\nno chart: {missing}")
        return
    chart: Path = args.output or Path(tempfile.mkdtemp(prefix="offload-demo-")) / CHART_NAME
    title = (
        f"/ping latency while {args.concurrency} clients request "
        f"{min(timings) * 1000:.0f} ms of CPU work ({cpus} CPUs)"
    )
    write_chart(chart, phases, title)
    print(f"\nchart of the /ping latencies: {chart}")


def terminated(signum: int, frame: FrameType | None) -> None:
    """A SIGTERM handler that cleans up as Ctrl-C does: by unwinding."""
    raise SystemExit(128 + signum)


DESCRIPTION = """\
Start an example FastAPI app on uvicorn (127.0.0.1, a free port) that serves the
same CPU-bound pure-Python work three ways: blocking the event loop (an async def
route calling it), in a thread (anyio.to_thread.run_sync), and in offload's process
pool. A separate process drives each mode with --concurrency clients for --duration
seconds while it requests /ping every 10 ms. Prints a Markdown table (/ping latency,
work requests per second, percent of the ideal) and writes a chart of the /ping
latencies to a new temporary directory (or --output), then prints its path. About
30 s with the defaults; Ctrl-C stops it and everything it started.
"""


def parser(prog: str = "python -m offload demo") -> argparse.ArgumentParser:
    """The demo's command line."""
    demo = argparse.ArgumentParser(
        prog=prog, description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    demo.add_argument(
        "--duration", type=positive(float), default=8.0, help="seconds per mode (default: 8)"
    )
    demo.add_argument(
        "--concurrency",
        type=positive(int),
        default=8,
        help="clients requesting the work at once (default: 8)",
    )
    demo.add_argument(
        "--task-ms",
        type=positive(float),
        default=40.0,
        help="milliseconds of CPU per work request (default: 40)",
    )
    demo.add_argument(
        "--output",
        type=output_path,
        metavar="PATH",
        help=f"where to write the PNG chart (default: {CHART_NAME} in a new temporary directory)",
    )
    return demo


def main(argv: Sequence[str] | None = None, prog: str = "python -m offload demo") -> None:
    """Run the demo with the command line ``argv``; exits with 130 after a Ctrl-C."""
    demo = parser(prog)
    args = demo.parse_args(argv)
    missing = [name for name in NEEDS if importlib.util.find_spec(name) is None]
    if missing:
        demo.exit(
            2,
            f"the demo needs {', '.join(missing)}: pip install 'offload[demo]' "
            '(from a checkout: pip install -e ".[demo]")\n',
        )
    if (no_chart := chart_missing()) is not None:
        print(f"offload demo: {no_chart}: the table only, no chart", file=sys.stderr)
    if in_main_thread():
        signal.signal(signal.SIGTERM, terminated)  # cleans up like Ctrl-C
    try:
        run(args)
    except KeyboardInterrupt:
        print("interrupted: the server and the load are stopped", file=sys.stderr)
        sys.exit(130)
    except DemoError as exc:
        print(f"offload demo: {exc}", file=sys.stderr)
        sys.exit(1)


def positive(kind: Callable[[str], float]) -> Callable[[str], float]:
    """An argparse type: ``kind`` of the text, which must be above zero."""

    def parse(text: str) -> float:
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be positive: {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


def output_path(text: str) -> Path:
    """An argparse type: where the chart goes, checked before the run rather than after."""
    path = Path(text).expanduser().resolve()
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"is a directory: {text}")
    if not path.parent.is_dir():
        raise argparse.ArgumentTypeError(f"no such directory: {path.parent}")
    return path
