"""What a change costs per call: offload against another version of itself.

    python benchmarks/ab_overhead.py OTHER_TREE [--rounds 6] [--calls 20000]

OTHER_TREE is a checkout of another version (``git worktree add /tmp/old v0.1`` or
``git archive REV | tar -x -C /tmp/old``). Each round runs the same no-op process
round trips under both versions, one after the other, each in a fresh interpreter
with its own worker, everything pinned to one CPU (on this kind of VM a worker that
wakes on the other CPU costs three times as much, for its whole life: pinning takes
that mode out). It prints each run's wall time per call and the CPU time the parent
and the worker spent per call, then the medians.

The CPU times are the steadier figure on a noisy machine; a run that lands in a slow
mode (a neighbour's load) shows in all three columns and is outvoted by the median.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

#: what one run does, in a fresh interpreter, under the tree on its PYTHONPATH
RUN = """
import os, sys, time
import anyio
from _funcs import add
import offload
from offload import Offloader, OffloadSettings

if not offload.__file__.startswith(sys.argv[2]):
    sys.exit(f"offload came from {offload.__file__}, not from {sys.argv[2]}")


def cpu_of(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def main(n):
    async with Offloader(OffloadSettings(process={"max_workers": 1})) as ex:
        pool = ex.pool("process")
        for _ in range(500):
            await pool.run(add, 1, 2)
        worker = int(await pool.run(os.getpid))
        w0, p0, t0 = cpu_of(worker), time.process_time(), time.perf_counter()
        for _ in range(n):
            await pool.run(add, 1, 2)
        t1, p1, w1 = time.perf_counter(), time.process_time(), cpu_of(worker)
        print((t1 - t0) / n * 1e6, (p1 - p0) / n * 1e6, (w1 - w0) / n * 1e6)


anyio.run(main, int(sys.argv[1]))
"""


def run(tree: Path, calls: int) -> tuple[float, float, float]:
    pin = ["taskset", "-c", "0"] if sys.platform == "linux" else []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tree), str(HERE)])}
    out = subprocess.run(
        [*pin, sys.executable, "-c", RUN, str(calls), str(tree)],
        # -c puts the working directory first on sys.path: the tree's, not ours
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    ).stdout
    wall, parent, worker = map(float, out.split())
    return wall, parent, worker


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("other", type=Path, help="a checkout of the version to compare")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--calls", type=int, default=20_000)
    args = parser.parse_args()
    trees = {"other": args.other.resolve(), "this": ROOT}
    figures: dict[str, list[tuple[float, float, float]]] = {name: [] for name in trees}
    print(f"{'':6} {'wall us':>8} {'parent us':>10} {'worker us':>10}")
    for _ in range(args.rounds):
        for name, tree in trees.items():
            figures[name].append(run(tree, args.calls))
            print(
                f"{name:6} {figures[name][-1][0]:8.1f} {figures[name][-1][1]:10.1f} "
                f"{figures[name][-1][2]:10.1f}"
            )
    print("medians")
    for name, rows in figures.items():
        medians = [statistics.median(column) for column in zip(*rows, strict=True)]
        print(f"{name:6} {medians[0]:8.1f} {medians[1]:10.1f} {medians[2]:10.1f}")


if __name__ == "__main__":
    main()
