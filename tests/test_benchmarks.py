"""The benchmark suite's ``--quick`` mode runs and reports every scenario.

Benchmarks are not tests: no figure is checked here, only that the suite runs to
the end without an error, measures every contender in every scenario (the loop-lag
probe included), leaves no process behind and writes its JSON, Markdown and charts
(into a temporary directory: the repository stays clean).
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROCESS = {
    "run_in_executor(ProcessPool)",
    "pebble.ProcessPool",
    "loky reusable executor",
    "anyio.to_process",
    "offload process pool",
}
THREAD = {
    "asyncio.to_thread",
    "anyio.to_thread",
    "run_in_executor(ThreadPool)",
    "offload thread pool",
}
PAYLOADS = [f"payload_{kind}_{size}MiB" for kind in ("bytes", "numpy") for size in (1, 16, 64)]
# scenario -> the contenders it measures
SCENARIOS = {
    "latency": PROCESS | THREAD,
    "throughput": PROCESS | THREAD,
    **dict.fromkeys(PAYLOADS, PROCESS),
    "scaling": PROCESS,
    "first_call": PROCESS | THREAD,
    "memory": PROCESS | THREAD,
}
CHARTS = [
    "latency.png",
    "throughput.png",
    "payload_bytes.png",
    "payload_numpy.png",
    "scaling.png",
    "first_call.png",
    "memory.png",
]


@pytest.mark.bench
@pytest.mark.timeout(420)
def test_quick_suite(tmp_path: Path) -> None:
    before = _outputs_in_repo()
    command = [
        sys.executable,
        "benchmarks/suite.py",
        "--quick",
        "--seed",
        "4",
        "--out",
        str(tmp_path),
    ]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-5000:]

    report = json.loads((tmp_path / "suite.json").read_text())
    assert report["skipped"] == {}
    assert report["errors"] == []
    assert report["leftover_children"] == []
    for scenario, contenders in SCENARIOS.items():
        rows = report["summary"][scenario]
        assert set(rows) == contenders, scenario
        for name, row in rows.items():
            headline = report["scenarios"][scenario]["headline"]
            assert row[headline] is not None, (scenario, name)
            assert row["lag_p99_ms"] is not None, (scenario, name)
            assert row["lag_max_ms"] >= row["lag_p99_ms"], (scenario, name)
    assert len(report["targets"]) == 11
    assert all(t["measured"] is not None for t in report["targets"])

    page = (tmp_path / "suite.md").read_text()
    assert "## Targets" in page
    assert "loop lag p99 ms" in page
    for chart in CHARTS:
        assert (tmp_path / chart).stat().st_size > 10_000, chart
        assert f"]({chart})" in page, chart

    # Publishing again from the JSON gives the same tables.
    again = [sys.executable, "benchmarks/suite.py", "--replot", str(tmp_path / "suite.json")]
    replot = subprocess.run(
        [*again, "--out", str(tmp_path / "replot")], cwd=ROOT, capture_output=True, timeout=120
    )
    assert replot.returncode == 0, replot.stderr[-5000:]
    assert (tmp_path / "replot" / "suite.md").read_text() == page
    assert _outputs_in_repo() == before, "--out must leave the repository alone"


def run_benchmark(script: str, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """``benchmarks/<script> <args>`` run from the checkout's root, which must succeed
    within ``timeout`` seconds."""
    command = [sys.executable, f"benchmarks/{script}", *args]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-5000:]
    return done


def _outputs_in_repo() -> dict[str, int]:
    """What the suite writes without --out, with modification times."""
    paths = [ROOT / "benchmarks" / "results" / "suite.json", ROOT / "docs" / "benchmarks.md"]
    paths += sorted((ROOT / "docs" / "benchmarks").glob("*"))
    return {str(p): p.stat().st_mtime_ns for p in paths if p.exists()}


def _lagprobe() -> Any:
    path = ROOT / "benchmarks" / "_lagprobe.py"
    spec = importlib.util.spec_from_file_location("_lagprobe", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_lag_probe_sees_a_blocked_loop() -> None:
    """A loop blocked for 50 ms shows as 50 ms late, even if the probe never woke in between."""
    lag_probe = _lagprobe().LagProbe

    async def wake_ups(probe: Any, at_least: int) -> None:
        """Until ``probe`` has woken ``at_least`` times (within 5 s)."""
        deadline = time.monotonic() + 5
        while len(probe.lateness) < at_least:
            assert time.monotonic() < deadline, "the probe stopped waking up"
            await asyncio.sleep(0.001)

    async def main() -> list[dict[str, float]]:
        async with lag_probe() as idle:
            await wake_ups(idle, 5)
        async with lag_probe() as blocked:
            time.sleep(0.05)  # the whole block: the probe cannot run before it ends
        async with lag_probe() as stalled:
            await wake_ups(stalled, 1)
            time.sleep(0.05)
            await wake_ups(stalled, 3)  # the late one, and one after it
        return [idle.summary(), blocked.summary(), stalled.summary()]

    idle, blocked, stalled = asyncio.run(main())
    assert idle["lag_samples"] >= 5
    # The blocked loops' lags are bounds from below (the 50 ms block); the idle one has
    # no bound of its own on a loaded machine, only the block to stay under.
    assert idle["lag_max_ms"] < blocked["lag_max_ms"]
    assert blocked["lag_max_ms"] >= 49
    assert stalled["lag_max_ms"] >= 49
    assert stalled["lag_samples"] >= 3


@pytest.mark.bench
@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["scaling-gaps", "--runs", "1"], ["median efficiency with the lag probe", "no-op"]),
        (["scaling-floor", "--runs", "1"], ["median efficiency, offload", "efficiency, floor"]),
        (["cpu-pairs", "--runs", "1"], ["one task alone: median", "2 at once / alone"]),
        (
            ["slices", "--runs", "1"],
            ["default: lag p99", "SCHED_OTHER: lag", "kernel's slice: lag", "SCHED_IDLE: lag"],
        ),
        (["probe-cost", "--runs", "1"], ["median, idle: ", "median, every CPU busy: "]),
        (["server-cost", "--seconds", "0.3"], ["h11, one every 10 ms", "httptools, back to back"]),
        (["map-parts", "--runs", "1"], ["calls answered in the parent", "results all ready"]),
        (["sends", "--runs", "1"], ["workers under SCHED_BATCH", "workers under SCHED_OTHER"]),
    ],
)
def test_diagnose_runs(args: list[str], expected: list[str]) -> None:
    """The diagnostics docs/benchmarks.md cites run to the end and report every case."""
    done = run_benchmark("diagnose.py", *args, timeout=110)
    for line in expected:
        assert line in done.stdout, done.stdout


@pytest.mark.bench
@pytest.mark.timeout(180)
def test_fastapi_benchmark_runs(tmp_path: Path) -> None:
    """``bench_fastapi.py`` measures every mode, its two references included, and says
    how each offload priority stands against the integration's goals."""
    out = tmp_path / "fastapi.json"
    done = run_benchmark(
        "bench_fastapi.py",
        *("--quick", "--duration", "0.4", "--seed", "3", "--json", str(out)),
        timeout=170,
    )
    report = json.loads(out.read_text())
    (only_round,) = report["rounds"]
    assert set(only_round["modes"]) == set(report["modes"])
    assert report["warnings"] == [], report["warnings"]
    floor = only_round["modes"]["floor: every CPU busy"]
    assert floor["pings"] > 0
    assert floor["p99_vs_idle"] > 0
    assert "req_per_s" not in floor  # a reference for the pings only
    assert only_round["modes"]["bare processes"]["req_per_s"] > 0
    # The work ran in the server, not in workers: how much CPU the server got depends
    # on the machine's load, the share between the two does not.
    blocking = only_round["modes"]["blocking"]
    assert blocking["server_cpu_pct"] / 100 > 4 * blocking["workers_cpus"], blocking
    for name, mode in only_round["modes"].items():
        if name.startswith("offload-process"):
            assert mode["errors"] == 0, name
            assert mode["done"] > 0, name
            assert mode["workers_cpus"] > 0, name  # the work ran in the workers
    assert "- floor: /ping p99" in done.stdout
    assert done.stdout.count("- goals, offload-process") == 3


@pytest.mark.bench
@pytest.mark.timeout(180)
def test_loop_benchmark_runs() -> None:
    """``bench_loop.py`` runs its offload scenarios and reports a lag for each."""
    scenarios = [
        "start and stop",
        "busy workers",
        "crash storm",
        "64 MiB payloads",
        "floor: first import of distributed",
    ]
    done = run_benchmark("bench_loop.py", "--rounds", "1", "--only", *scenarios, timeout=170)
    rows = {
        cells[0]: cells[1:]
        for line in done.stdout.splitlines()
        if line.startswith("| ") and not line.startswith(("| scenario", "| ---"))
        for cells in [[c.strip() for c in line.strip("|").split("|")]]
    }
    assert set(rows) == set(scenarios), done.stdout
    for name, (p99, median_max, worst, parts, longest_run, collections, steal) in rows.items():
        assert 0 <= float(p99) <= float(median_max) <= float(worst), name
        ran, waited, slept = (float(part) for part in parts.split(" + "))
        # the worst wake-up's 1 ms + lag, whole: on a CPU, waiting for one, or asleep
        assert ran + waited + slept == pytest.approx(1 + float(worst), abs=0.02), name
        assert 0 <= ran <= float(longest_run), name
        if name != "floor: first import of distributed":  # measured in a child
            assert int(collections.split()[0]) >= 0, name
            assert float(steal) >= 0, name


@pytest.mark.bench
@pytest.mark.timeout(120)
def test_loop_benchmark_under_idle_priority() -> None:
    """``--idle-priority`` runs the scenarios with their workers under SCHED_IDLE."""
    done = run_benchmark(
        "bench_loop.py", "--rounds", "1", "--only", "start and stop", "--idle-priority", timeout=110
    )
    assert "workers under SCHED_IDLE" in done.stdout.splitlines()[0]
    assert re.search(r"^\| start and stop \| \d", done.stdout, re.M), done.stdout


@pytest.mark.bench
@pytest.mark.timeout(120)
def test_logs_benchmark_runs(tmp_path: Path) -> None:
    """``bench_logs.py`` measures both pools in every round and accounts for every
    record of the burst."""
    out = tmp_path / "logs.json"
    done = run_benchmark("bench_logs.py", "--quick", "--json", str(out), timeout=110)
    report = json.loads(out.read_text())
    results = report["results"]
    assert len(results["on_us"]) == len(results["off_us"]) == report["rounds"] == 3
    for arrived, dropped in zip(results["arrived"], results["dropped"], strict=True):
        assert arrived + dropped == 10_000
    assert "| on |" in done.stdout
    assert "| off |" in done.stdout


@pytest.mark.bench
@pytest.mark.timeout(120)
def test_map_benchmark_runs() -> None:
    """``bench_map.py`` measures each mode on each kind and loop."""
    done = run_benchmark("bench_map.py", "--quick", timeout=110)
    for kind in ("thread", "process"):
        for loop in ("asyncio", "trio"):
            assert re.search(
                rf"^\| {kind} \| {loop} \| [\d.]+ \| [\d.]+ \| [\d.]+ \|$", done.stdout, re.M
            ), done.stdout


@pytest.mark.bench
@pytest.mark.timeout(180)
def test_map_peers_benchmark_runs(tmp_path: Path) -> None:
    """``bench_map_peers.py`` measures offload's map and every peer in every round of
    both scenarios, checks their results, and measures the machine's floor."""
    out = tmp_path / "map_peers.json"
    done = run_benchmark("bench_map_peers.py", "--quick", "--json", str(out), timeout=170)
    report = json.loads(out.read_text())
    assert report["errors"] == []
    assert report["leftover_children"] == []
    peers = {
        "ProcessPoolExecutor.map",
        "loky reusable executor map",
        "pebble.ProcessPool.map",
        "anyio.to_process, task per item",
    }
    for scenario in ("tiny", "cpu"):
        rows = report[scenario]["rows"]
        names = {row["contender"] for row in rows}
        assert peers | {"offload map"} <= names, scenario
        for row in rows:
            assert row["rounds"] == report["rounds"] == 2, (scenario, row)
            assert row["vs_best_peer"] is not None, (scenario, row)
    cpu = {row["contender"]: row for row in report["cpu"]["rows"]}
    for floor in ("bare processes (floor)", "bare processes, a session each"):
        assert cpu[floor]["of_ideal"] > 0
    assert all(row["vs_floor_sessions"] is not None for row in cpu.values())
    assert "- goal, tiny items: offload faster than the best peer" in done.stdout
    assert "- goal, 25 ms items: offload map" in done.stdout
