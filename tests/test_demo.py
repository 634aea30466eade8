"""``python -m offload`` and its demo: it runs every phase to its table and chart,
writes nothing where it was started, and leaves no process behind.

The runs of the demo happen in a subprocess, as a user would start it, and record
every descendant (uvicorn, the load process, offload's workers) while they go, to
check afterwards that all of them are gone: at the normal end, and after a Ctrl-C
(SIGINT) mid-run. They check the table's structure, not its figures, which depend on
the machine and its load (docs/benchmarks.md has figures); the one comparison of
figures sets one mode against another measured in the same run.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from offload.__main__ import main as offload_main
from offload.demo import command
from offload.demo.report import Phase

ROOT = Path(__file__).resolve().parent.parent
PNG = b"\x89PNG\r\n\x1a\n"
MODES = ("blocking", "thread", "process")
NUMBER = r"(\d+(?:\.\d+)?)"
CHART_LINE = re.compile(r"^chart of the /ping latencies: (.+)$", re.M)
needs_demo_extra = pytest.mark.skipif(
    any(importlib.util.find_spec(name) is None for name in ("fastapi", "uvicorn", "matplotlib")),
    reason="needs offload[demo]",
)
needs_matplotlib = pytest.mark.skipif(
    importlib.util.find_spec("matplotlib") is None, reason="needs matplotlib"
)

#: imports the library and its FastAPI integration, runs a call in each kind of pool,
#: prints the demo's modules then imported
CORE_ONLY = """\
import sys

import anyio

import offload
import offload.fastapi
from offload import Offloader, OffloadSettings


async def main() -> None:
    async with Offloader(OffloadSettings(process={"max_workers": 1})) as ex:
        assert await ex.pool("process").run(abs, -3) == 3
        assert await ex.pool("thread").run(abs, -4) == 4


anyio.run(main)
assert "offload.fastapi" in sys.modules
print(sorted(name for name in sys.modules if name.split(".")[:2] == ["offload", "demo"]))
"""


def test_the_library_never_imports_the_demo(tmp_path: Path) -> None:
    pytest.importorskip("fastapi")
    result = subprocess.run(
        [sys.executable, "-c", CORE_ONLY],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("argv", "error"),
    [
        ([], "a command is required: demo, info"),
        (["nope"], "invalid choice: 'nope'"),
    ],
)
def test_an_unknown_command_is_a_usage_error(
    capsys: pytest.CaptureFixture[str], argv: list[str], error: str
) -> None:
    with pytest.raises(SystemExit) as exited:
        offload_main(argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: python -m offload "), err
    assert error in err


def test_the_command_hands_its_arguments_to_the_demo(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        offload_main(["demo", "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m offload demo "), out
    assert "--output PATH" in out


def test_a_chart_path_in_no_directory_is_refused_before_the_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        offload_main(["demo", "--output", str(tmp_path / "missing" / "c.png")])
    assert exited.value.code == 2
    assert "no such directory" in capsys.readouterr().err


@pytest.mark.parametrize(("argv", "idle"), [([], 2.0), (["--duration", "0.5"], 0.5)])
def test_the_idle_phase_is_no_longer_than_a_mode(argv: list[str], idle: float) -> None:
    assert command.idle_seconds(command.parser().parse_args(argv)) == idle


# -- the end of a run: the table, then the chart -----------------------------------------------


def some_phases() -> dict[str, Phase]:
    pings = [1.0 + i / 10 for i in range(50)]
    return {
        "idle": Phase("idle", 1.0, pings, 0, 0, 0.1, 0.0),
        **{mode: Phase(mode, 1.0, [p * 3 for p in pings], 20, 0, 0.5, 0.1) for mode in MODES},
    }


def conclude(*argv: str) -> None:
    args = command.parser().parse_args(argv)
    command.conclude(some_phases(), cpus=2, steps=1000, timings=(0.01, 0.011), args=args)


@pytest.fixture
def places(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """An empty current directory and an empty temporary directory, both watched."""
    cwd, temp = tmp_path / "cwd", tmp_path / "tmp"
    cwd.mkdir()
    temp.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    return cwd, temp


@needs_matplotlib
def test_the_chart_goes_to_a_new_temporary_directory(
    places: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    cwd, temp = places
    conclude()
    out = capsys.readouterr().out
    assert re.search(r"^\| process \|", out, re.M), out
    printed = CHART_LINE.search(out)
    assert printed is not None, out
    chart = Path(printed.group(1))
    assert chart.parent.parent == temp
    assert chart.read_bytes().startswith(PNG)
    assert list(cwd.iterdir()) == []


@needs_matplotlib
def test_the_chart_goes_where_output_says(
    places: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    cwd, temp = places
    conclude("--output", "../chosen.png")
    printed = CHART_LINE.search(capsys.readouterr().out)
    assert printed is not None
    assert Path(printed.group(1)) == cwd.parent / "chosen.png"
    assert (cwd.parent / "chosen.png").read_bytes().startswith(PNG)
    assert list(cwd.iterdir()) == list(temp.iterdir()) == []


def test_without_matplotlib_the_table_still_prints(
    places: tuple[Path, Path], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    cwd, temp = places
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what find_spec reads first
    conclude()
    out = capsys.readouterr().out
    for mode in ("idle \\(no work\\)", *MODES):
        assert re.search(rf"^\| {mode} \|", out, re.M), out
    assert "no chart: matplotlib is not installed" in out
    assert CHART_LINE.search(out) is None
    assert list(cwd.iterdir()) == list(temp.iterdir()) == []


# -- whole runs ------------------------------------------------------------------------------


class Demo:
    """``python -m offload demo ...`` in a subprocess, output to files, descendants recorded."""

    def __init__(self, tmp_path: Path, *args: str) -> None:
        self.stdout_path = tmp_path / "stdout.txt"
        self.stderr_path = tmp_path / "stderr.txt"
        #: where it starts, and its temporary directory: both empty at the start
        self.cwd, self.temp = tmp_path / "cwd", tmp_path / "tmp"
        self.cwd.mkdir()
        self.temp.mkdir()
        with self.stdout_path.open("wb") as out, self.stderr_path.open("wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "offload", "demo", *args],
                cwd=self.cwd,
                stdout=out,
                stderr=err,
                env={**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(self.temp)},
                # Ctrl-C must work even if this test runs with SIGINT ignored (a background job).
                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
            )
        self.seen: dict[int, str] = {}

    def record(self) -> None:
        """Note the descendants alive now, with their command lines."""
        try:
            descendants = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return
        for child in descendants:
            # Again at every look: seen between fork and exec, a child still shows its
            # parent's command line.
            try:
                cmdline = " ".join(child.cmdline())
            except psutil.Error:
                cmdline = ""
            if cmdline or child.pid not in self.seen:
                self.seen[child.pid] = cmdline or "?"

    def watch(self, until: Callable[[], bool], timeout: float) -> None:
        """Record descendants until ``until()`` or the demo's exit; fail after ``timeout``."""
        deadline = time.monotonic() + timeout
        while not until() and self.proc.poll() is None:
            self.record()
            assert time.monotonic() < deadline, f"timed out; stderr:\n{self.stderr()}"
            time.sleep(0.05)

    def record_for(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and self.proc.poll() is None:
            self.record()
            time.sleep(0.05)

    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def kill_all(self) -> None:
        """After a failure: leave nothing running."""
        self.record()
        for pid in [self.proc.pid, *self.seen]:
            try:
                psutil.Process(pid).kill()
            except psutil.Error:
                pass
        self.proc.wait()


def alive(pids: list[int]) -> list[int]:
    left = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                left.append(pid)
        except psutil.NoSuchProcess:
            pass
    return left


def assert_all_gone(demo: Demo, timeout: float = 10) -> None:
    """The demo's descendants were seen (server, load, workers), and are all gone."""
    kinds = " ".join(demo.seen.values())
    for part in ("uvicorn", "offload.demo.load", "offload._pools.process.worker"):
        assert part in kinds, f"never saw {part} among {demo.seen}"
    deadline = time.monotonic() + timeout
    while left := alive(list(demo.seen)):
        assert time.monotonic() < deadline, f"still alive: {[demo.seen[p] for p in left]}"
        time.sleep(0.05)


def short_run(tmp_path: Path, duration: str) -> Demo:
    """The smallest load that still runs every phase: one client, short tasks."""
    return Demo(tmp_path, "--duration", duration, "--concurrency", "1", "--task-ms", "10")


def row(out: str, mode: str) -> re.Match[str]:
    """The table's row of ``mode``, its figures as groups: /ping p50 and p99, the loop's
    shares (busy, waiting for a CPU; "-" where the kernel does not count them), req/s
    and % of the ideal ("-" for idle)."""
    share, rate = r"(\d+%|-)", rf"({NUMBER[1:-1]}|-)"
    found = re.search(
        rf"^\| {re.escape(mode)} \| {NUMBER} \| {NUMBER} \| {share} \| {share} "
        rf"\| {rate} \| (\d+%|-) \|$",
        out,
        re.M,
    )
    assert found is not None, f"no row for {mode}:\n{out}"
    return found


@needs_demo_extra
@pytest.mark.timeout(180)
def test_demo_runs_every_phase_to_the_table_and_the_chart(tmp_path: Path) -> None:
    demo = short_run(tmp_path, "0.5")
    try:
        demo.watch(lambda: False, timeout=150)
    finally:
        if demo.proc.poll() is None:
            demo.kill_all()
    assert demo.proc.returncode == 0, demo.stderr()
    out = demo.stdout()
    rows = {"idle": row(out, "idle (no work)")} | {mode: row(out, mode) for mode in MODES}
    for mode, found in rows.items():
        p50, p99 = float(found.group(1)), float(found.group(2))
        assert 0 <= p50 <= p99 < math.inf, out
        assert p99 > 0, out
        if mode != "idle":
            assert float(found.group(5)) > 0, out  # work was answered in the window
    busy = {mode: found.group(3) for mode, found in rows.items()}
    if "-" not in busy.values():
        # The blocking route computes on the loop; the idle phase and the process pool
        # leave it free (a comparison within the run: the shares depend on the machine).
        blocking = int(busy["blocking"].rstrip("%"))
        assert int(busy["process"].rstrip("%")) < blocking, out
        assert int(busy["idle"].rstrip("%")) < blocking, out
    printed = CHART_LINE.search(out)
    assert printed is not None, out
    chart = Path(printed.group(1))
    assert chart.parent.parent == demo.temp, "a directory of its own in the temporary one"
    assert chart.read_bytes().startswith(PNG)
    assert list(demo.cwd.iterdir()) == []
    assert_all_gone(demo)


@needs_demo_extra
@pytest.mark.timeout(180)
def test_ctrl_c_mid_run_leaves_no_process(tmp_path: Path) -> None:
    demo = short_run(tmp_path, "5")
    try:
        demo.watch(lambda: "running blocking" in demo.stderr(), timeout=100)
        assert demo.proc.poll() is None, demo.stderr()
        demo.record_for(0.5)  # well inside the mode: the clients are busy
        demo.proc.send_signal(signal.SIGINT)
        code = demo.proc.wait(timeout=15)
    finally:
        if demo.proc.poll() is None:
            demo.kill_all()
    assert code == 130, demo.stderr()
    assert "interrupted" in demo.stderr()
    assert list(demo.cwd.iterdir()) == []
    assert not list(demo.temp.glob("offload-demo-*"))
    assert_all_gone(demo)
