"""``python -m offload demo``: it runs to its table and chart, and leaves no process behind.

Each test runs the demo in a subprocess, as a user would, and records every descendant
(uvicorn, the load process, offload's workers) while it runs, to check afterwards
that all of them are gone: at its normal end, and after a Ctrl-C (SIGINT) mid-run.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from offload.__main__ import main as offload_main

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parent.parent
PNG = b"\x89PNG\r\n\x1a\n"
MODES = ("blocking", "thread", "process")
NUMBER = r"(\d+(?:\.\d+)?)"

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
        ([], "a command is required: demo"),
        (["info"], "invalid choice: 'info'"),
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
    assert "--chart PATH" in out


class Demo:
    """``python -m offload demo ...`` in a subprocess, output to files, descendants recorded."""

    def __init__(self, tmp_path: Path, *args: str) -> None:
        self.stdout_path = tmp_path / "stdout.txt"
        self.stderr_path = tmp_path / "stderr.txt"
        with self.stdout_path.open("wb") as out, self.stderr_path.open("wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "offload", "demo", *args],
                cwd=tmp_path,
                stdout=out,
                stderr=err,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
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
    return Demo(
        tmp_path,
        *("--duration", duration, "--concurrency", "2", "--task-ms", "10"),
        *("--chart", str(tmp_path / "c.png")),
    )


@pytest.mark.timeout(180)
def test_demo_prints_the_table_and_draws_the_chart(tmp_path: Path) -> None:
    demo = short_run(tmp_path, "1")
    try:
        demo.watch(lambda: False, timeout=120)
    finally:
        if demo.proc.poll() is None:
            demo.kill_all()
    assert demo.proc.returncode == 0, demo.stderr()
    out = demo.stdout()
    share = r"(\d+%|-)"  # the loop's shares: "-" where the kernel does not count them
    idle = rf"^\| idle \(no work\) \| {NUMBER} \| {NUMBER} \| {share} \| {share} \| - \| - \|$"
    assert re.search(idle, out, re.M), out
    busy = {}
    for mode in MODES:
        row = re.search(
            rf"^\| {mode} \| {NUMBER} \| {NUMBER} \| {share} \| {share} \| {NUMBER} \| (\d+)% \|$",
            out,
            re.M,
        )
        assert row is not None, f"no row for {mode}:\n{out}"
        p50, p99, rate = map(float, row.group(1, 2, 5))
        assert 0 <= p50 <= p99
        assert p99 > 0
        assert rate > 0
        busy[mode] = row.group(3)
    busy["idle"] = re.search(idle, out, re.M).group(3)  # type: ignore[union-attr]
    if Path("/proc/self/schedstat").exists():
        # The blocking route computes on the loop; the idle phase and the process pool
        # leave it free. Compared within the run: the shares depend on the machine's load.
        assert int(busy["idle"].rstrip("%")) < int(busy["blocking"].rstrip("%")), out
        assert int(busy["process"].rstrip("%")) < int(busy["blocking"].rstrip("%")), out
    chart = tmp_path / "c.png"
    assert chart.read_bytes().startswith(PNG)
    assert str(chart) in out
    assert_all_gone(demo)


@pytest.mark.timeout(180)
def test_ctrl_c_mid_run_leaves_no_process(tmp_path: Path) -> None:
    demo = short_run(tmp_path, "5")
    try:
        demo.watch(lambda: "running blocking" in demo.stderr(), timeout=100)
        assert demo.proc.poll() is None, demo.stderr()
        demo.record_for(0.5)  # well inside the mode: the clients are busy
        demo.proc.send_signal(signal.SIGINT)
        started = time.monotonic()
        code = demo.proc.wait(timeout=15)
        took = time.monotonic() - started
    finally:
        if demo.proc.poll() is None:
            demo.kill_all()
    assert code == 130, demo.stderr()
    assert took < 15
    assert "interrupted" in demo.stderr()
    assert not (tmp_path / "c.png").exists()
    assert_all_gone(demo)
