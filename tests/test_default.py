"""The default Offloader: a decorated function works with no Offloader running.

Each test runs a script in a fresh interpreter, so the default Offloader it
starts belongs to that script's own event loops.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent

#: seconds a script may run before it dumps its stacks and exits (a hang, not slowness:
#: a healthy script takes one or two seconds)
SCRIPT_DEADLINE = 12

PRELUDE = f"""
import asyncio, faulthandler, json, os, sys
import psutil
faulthandler.dump_traceback_later({SCRIPT_DEADLINE}, exit=True)
from tests import funcs


def gone(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def live_children():
    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            # not a worker's guard (offload/_pools/process/worker.py), which dies with it
            if p.status() != psutil.STATUS_ZOMBIE and "offload-guard" not in p.cmdline():
                out.append(p.pid)
        except psutil.NoSuchProcess:
            pass
    return out


async def calls():
    pids = set()
    for i in range(3):
        assert await funcs.double(i) == 2 * i
        pids.add(await funcs.process_pid())
    return sorted(pids)
"""


def run_script(tmp_path: Path, body: str) -> dict[str, object]:
    script = tmp_path / "script.py"
    script.write_text(PRELUDE + textwrap.dedent(body))
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("OFFLOAD_")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    env["OFFLOAD_PROCESS__MAX_WORKERS"] = "2"
    proc = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=SCRIPT_DEADLINE + 20,
        check=False,
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    result: dict[str, object] = json.loads(proc.stdout.strip().splitlines()[-1])
    pids = [pid for key in result if key.endswith("pids") for pid in result[key]]  # type: ignore[attr-defined]
    deadline = time.monotonic() + 5
    while any(map(is_live_worker, pids)) and time.monotonic() < deadline:
        time.sleep(0.05)  # workers of a dead parent die of PDEATHSIG, asynchronously
    assert [pid for pid in pids if is_live_worker(pid)] == []
    return result


def is_live_worker(pid: int) -> bool:
    try:
        p = psutil.Process(pid)
        return p.status() != psutil.STATUS_ZOMBIE and "offload._pools.process.worker" in " ".join(
            p.cmdline()
        )
    except psutil.Error:
        return False


def test_asyncio_run_without_offloader(tmp_path: Path) -> None:
    result = run_script(
        tmp_path,
        """
        pids = asyncio.run(calls())
        print(json.dumps({"pids": pids, "me": os.getpid(), "left": live_children()}))
        """,
    )
    assert result["pids"]
    assert result["me"] not in result["pids"]  # type: ignore[operator]
    assert result["left"] == []


def test_trio_run_without_offloader(tmp_path: Path) -> None:
    result = run_script(
        tmp_path,
        """
        import trio
        pids = trio.run(calls)
        gone_after = [gone(pid) for pid in pids]
        print(json.dumps({"pids": pids, "me": os.getpid(), "gone": gone_after,
                          "left": live_children()}))
        """,
    )
    assert result["pids"]
    assert result["me"] not in result["pids"]  # type: ignore[operator]
    assert result["gone"] == [True] * len(result["pids"])  # type: ignore[arg-type]
    assert result["left"] == []


def test_two_asyncio_runs_each_get_their_own_workers(tmp_path: Path) -> None:
    result = run_script(
        tmp_path,
        """
        first = asyncio.run(calls())
        # the first loop is over: its workers must be gone (reaped, not zombies)
        first_gone = [gone(pid) for pid in first]
        left_between = live_children()
        second = asyncio.run(calls())
        second_gone = [gone(pid) for pid in second]
        print(json.dumps({
            "first_pids": first, "second_pids": second,
            "first_gone": first_gone, "second_gone": second_gone,
            "left_between": left_between, "left": live_children(),
        }))
        """,
    )
    first, second = result["first_pids"], result["second_pids"]
    assert first
    assert second
    assert result["first_gone"] == [True] * len(first)  # type: ignore[arg-type]
    assert result["second_gone"] == [True] * len(second)  # type: ignore[arg-type]
    assert result["left_between"] == []
    assert isinstance(first, list)
    assert isinstance(second, list)
    assert not set(first) & set(second)
    assert result["left"] == []


def test_asyncio_then_trio_in_one_script(tmp_path: Path) -> None:
    result = run_script(
        tmp_path,
        """
        import trio
        first = asyncio.run(calls())
        second = trio.run(calls)
        print(json.dumps({"first_pids": first, "second_pids": second,
                          "gone": [gone(p) for p in first + second],
                          "left": live_children()}))
        """,
    )
    assert result["first_pids"]
    assert result["second_pids"]
    assert all(result["gone"])  # type: ignore[arg-type]
    assert result["left"] == []


def test_running_offloader_is_preferred_over_default(tmp_path: Path) -> None:
    result = run_script(
        tmp_path,
        """
        from offload import Offloader, OffloadSettings

        async def main():
            settings = OffloadSettings(default_pool="thread", process={"max_workers": 1})
            async with Offloader(settings) as ex:
                pid, _ = await funcs.bare_where()
                return pid, ex.offloader.stats()["thread"].completed, live_children()

        pid, completed, children = asyncio.run(main())
        print(json.dumps({"pid": pid, "me": os.getpid(), "completed": completed,
                          "children": len(children), "left": live_children()}))
        """,
    )
    assert result["pid"] == result["me"]  # the thread pool of the running Offloader
    assert result["completed"] == 1
    assert result["children"] == 1  # only that Offloader's one worker: no default one
    assert result["left"] == []
