"""``python -m offload demo``: a real FastAPI server stalls under CPU-bound work, then does not.

It starts the example app :mod:`offload.demo.app` with uvicorn in a child process,
on a free port of 127.0.0.1, and drives it from another child process
(:mod:`offload.demo.load`). The app serves the same pure-Python work (:func:`burn`,
calibrated here to take ``--task-ms``) three ways: ``blocking`` (an ``async def``
route calling it), ``thread`` (``anyio.to_thread.run_sync``) and ``process``
(offload's process pool). For each, ``--concurrency`` clients loop on it for
``--duration`` seconds while a pinger requests ``/ping`` every 10 ms; an idle
phase first measures ``/ping`` alone.

It prints a Markdown table: per mode, the latency of ``/ping`` (what every other
request of the server waits), how the server's event-loop thread spent the time (on
Linux: running, or ready to run without a CPU; what ``Offloader.stats().loop`` reports
as ``busy`` and ``cpu_wait`` inside an app), and the work's throughput against the
ideal (CPUs divided by the time one task takes alone); and it draws the distributions of the
``/ping`` latencies to a PNG (``--chart``). Ctrl-C stops it, its children with it.
Needs ``pip install 'offload[demo]'`` (FastAPI, uvicorn, matplotlib).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import http.client
import importlib.util
import json
import math
import os
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

__all__ = ("burn", "calibrate", "main")

MODES = ("blocking", "thread", "process")
#: seconds of the idle phase, the pinger alone
IDLE_SECONDS = 2.0
#: what each mode is, for the table's legend
EXPLAIN = {
    "blocking": "`async def` route calling the function: it runs on the event loop",
    "thread": "`anyio.to_thread.run_sync`: the loop is free, the GIL runs one thread at a time",
    "process": "offload's process pool, one worker per CPU: the loop is free, every CPU works",
}
#: the packages of the ``demo`` extra
NEEDS = ("fastapi", "uvicorn", "matplotlib")
#: seconds a child gets to stop after SIGTERM, before SIGKILL
STOP_TIMEOUT = {"load": 5.0, "server": 10.0}
#: seconds the server gets to start
START_TIMEOUT = 60.0
PR_SET_PDEATHSIG = 1
ROOT = Path(__file__).resolve().parent.parent.parent


class DemoError(Exception):
    """The demo cannot go on; the message says why."""


def burn(steps: int) -> int:
    """A fixed amount of pure-Python CPU work; returns a checksum.

    The demo app serves it; it lives here, in a module that imports nothing heavy,
    so that offload's workers, which import it by name, start their first call fast.
    """
    total = 0
    for n in range(steps):
        total = (total * 31 + n) % 1_000_003
    return total


def calibrate(ms: float) -> tuple[int, float]:
    """Steps of :func:`burn` that take about ``ms`` alone, and their measured time (s)."""
    probe = 10_000
    while (took := _timed(burn, probe)) < 0.02:
        probe *= 2
    # The fastest run of half a second's worth: CPUs may take a while to speed up.
    until = time.perf_counter() + 0.5
    while time.perf_counter() < until:
        took = min(took, _timed(burn, probe))
    steps = max(1, round(probe * ms / 1000 / took))
    return steps, min(_timed(burn, steps) for _ in range(5))


def _timed(fn: Callable[[int], object], arg: int) -> float:
    start = time.perf_counter()
    fn(arg)
    return time.perf_counter() - start


# -- results ---------------------------------------------------------------------------------


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


# -- child processes -------------------------------------------------------------------------


class Children:
    """The demo's child processes: on exit, each is stopped (SIGTERM, then SIGKILL) and reaped.

    Children start in a session of their own, so a Ctrl-C at the terminal reaches only
    this process, which stops them in order (the load, then the server); on Linux they
    also get SIGTERM if this process dies without stopping them.
    """

    def __init__(self) -> None:
        self._procs: list[tuple[str, subprocess.Popen[bytes]]] = []
        self._libc: Any = None
        if sys.platform.startswith("linux"):
            with contextlib.suppress(OSError):
                self._libc = ctypes.CDLL(None, use_errno=True)

    def __enter__(self) -> Children:
        return self

    def __exit__(self, *exc: object) -> None:
        with _signals_ignored():
            for name, proc in reversed(self._procs):
                _stop(proc, STOP_TIMEOUT.get(name, 5.0))
            self._procs.clear()

    def start(self, name: str, args: Sequence[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        """``python args...`` from the package's root, with ``offload`` importable."""
        path = os.environ.get("PYTHONPATH")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), path]))}
        with _signals_deferred():  # a Ctrl-C now would leave it running unrecorded
            proc = subprocess.Popen(
                [sys.executable, *args],
                cwd=ROOT,
                env=env,
                start_new_session=True,
                preexec_fn=self._child_setup(os.getpid()),
                **kwargs,
            )
            self._procs.append((name, proc))
        return proc

    def _child_setup(self, parent: int) -> Callable[[], None]:
        libc = self._libc

        def setup() -> None:  # in the child, between fork and exec
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _DEFERRED)
            if libc is not None:
                libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
                if os.getppid() != parent:  # the parent died before prctl
                    os._exit(1)

        return setup


_DEFERRED = {signal.SIGINT, signal.SIGTERM}


def _stop(proc: subprocess.Popen[bytes], timeout: float) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    if not _in_main_thread():
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _DEFERRED)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


@contextlib.contextmanager
def _signals_ignored() -> Iterator[None]:
    if not _in_main_thread():
        yield
        return
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


def start_server(
    children: Children, uvicorn_args: Sequence[str] = ()
) -> tuple[subprocess.Popen[bytes], int]:
    """Uvicorn serving the demo app on a listening socket bound here; returns it and the port.

    uvicorn picks uvloop and httptools when they are installed (the ``demo`` extra
    has them): they cost the server 25-40% less CPU per request than asyncio and h11
    here. ``uvicorn_args`` are added to its command line.
    """
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # uvicorn sees an --fd socket as AF_UNIX, so asyncio does not set TCP_NODELAY on
        # the connections; Linux copies it from the listener. Without it, Nagle holds the
        # response body until the client's delayed ACK of the headers: 40 ms per request.
        listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen(128)
        port = int(listener.getsockname()[1])
        fd = listener.fileno()
        proc = children.start(
            "server",
            [
                "-m",
                "uvicorn",
                "offload.demo.app:app",
                "--fd",
                str(fd),
                "--app-dir",
                str(ROOT),
                "--lifespan",
                "on",
                "--log-level",
                "warning",
                "--no-access-log",
                "--timeout-graceful-shutdown",
                "3",
                *uvicorn_args,
            ],
            pass_fds=(fd,),
        )
    _wait_ready(proc, port)
    return proc, port


def _wait_ready(proc: subprocess.Popen[bytes], port: int) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        try:
            conn.request("GET", "/ping")
            if conn.getresponse().status == 200:
                return
        except (OSError, http.client.HTTPException):
            pass
        finally:
            conn.close()
        if proc.poll() is not None:
            raise DemoError(f"the server exited with code {proc.returncode} while starting")
        if time.monotonic() > deadline:
            raise DemoError(f"the server did not answer within {START_TIMEOUT:g} s")
        time.sleep(0.05)


# -- progress and the run --------------------------------------------------------------------


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
            str(IDLE_SECONDS),
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


def run(args: argparse.Namespace) -> None:
    from loky import cpu_count

    cpus = int(cpu_count())
    plan = {"idle": IDLE_SECONDS, **dict.fromkeys(MODES, args.duration)}
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
    timings = (single, min(_timed(burn, steps) for _ in range(5)))
    single = min(timings)
    print(render_table(phases, cpus=cpus, steps=steps, timings=timings, args=args))
    chart = Path(args.chart).resolve()
    title = (
        f"/ping latency while {args.concurrency} clients request "
        f"{single * 1000:.0f} ms of CPU work ({cpus} CPUs)"
    )
    write_chart(chart, phases, title)
    print(f"\nchart of the /ping latencies: {chart}")


def _terminated(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


DESCRIPTION = """\
Start an example FastAPI app on uvicorn (127.0.0.1, a free port) that serves the
same CPU-bound pure-Python work three ways: blocking the event loop (an async def
route calling it), in a thread (anyio.to_thread.run_sync), and in offload's process
pool. A separate process drives each mode with --concurrency clients for --duration
seconds while it requests /ping every 10 ms. Prints a Markdown table (/ping latency,
work requests per second, percent of the ideal) and writes a chart of the /ping
latencies. About 30 s with the defaults; Ctrl-C stops it and everything it started.
"""


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m offload", description="offload's tools")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo",
        help="see a FastAPI server stall under CPU-bound work, then not",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_argument(
        "--duration", type=_positive(float), default=8.0, help="seconds per mode (default: 8)"
    )
    demo.add_argument(
        "--concurrency",
        type=_positive(int),
        default=8,
        help="clients requesting the work at once (default: 8)",
    )
    demo.add_argument(
        "--task-ms",
        type=_positive(float),
        default=40.0,
        help="milliseconds of CPU per work request (default: 40)",
    )
    demo.add_argument(
        "--chart",
        default="offload-demo.png",
        metavar="PATH",
        help="where to write the PNG chart (default: offload-demo.png)",
    )
    args = parser.parse_args(argv)
    missing = [name for name in NEEDS if importlib.util.find_spec(name) is None]
    if missing:
        parser.exit(
            2,
            f"the demo needs {', '.join(missing)}: pip install 'offload[demo]' "
            '(from a checkout: pip install -e ".[demo]")\n',
        )
    if _in_main_thread():
        signal.signal(signal.SIGTERM, _terminated)  # cleans up like Ctrl-C
    try:
        run(args)
    except KeyboardInterrupt:
        print("interrupted: the server and the load are stopped", file=sys.stderr)
        sys.exit(130)
    except DemoError as exc:
        print(f"offload demo: {exc}", file=sys.stderr)
        sys.exit(1)


def _positive(kind: Callable[[str], float]) -> Callable[[str], float]:
    def parse(text: str) -> float:
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be positive: {text}")
        return value

    parse.__name__ = kind.__name__
    return parse
