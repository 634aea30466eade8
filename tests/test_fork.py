"""A process that forks after using offload: the child gets fresh pools, never the
parent's, and nothing the child does reaches the parent's workers.

Each case runs a script on the test's event loop; the forked child has a deadline of
its own (SIGALRM), so a hang in it fails the test instead of stalling it.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import pytest

from .conftest import Backend, loop_name
from .processes import gone, run_script, wait_until

#: seconds a forked child may run before SIGALRM ends it (a healthy one takes one or two)
CHILD_DEADLINE = 20

PRELUDE = f"""
import json
import os
import signal
import sys
import threading

import anyio

from offload import Offloader, OffloadSettings, PoolClosed
from tests import funcs

BACKEND = sys.argv[1]


def run(fn, *args):
    if BACKEND == "trio":
        return anyio.run(fn, *args, backend="trio")
    options = {{"use_uvloop": BACKEND == "uvloop"}}
    return anyio.run(fn, *args, backend="asyncio", backend_options=options)


def settings():
    one = {{"max_workers": 1}}
    return OffloadSettings(process=one, thread=one, lag_probe=False)


async def use_new_offloader():
    async with Offloader(settings()) as ex:
        pid = await ex.pool("process").run(funcs.getpid)
        return [pid, await ex.pool("thread").run(funcs.add, 1, 2)]


async def use_default_offloader():
    return [await funcs.process_pid(), await funcs.thread_double(2)]


def fork(child):
    sys.stdout.flush()  # or the child would print the parent's buffer again
    pid = os.fork()
    if pid == 0:
        signal.alarm({CHILD_DEADLINE})
        print(json.dumps({{"child": child()}}), flush=True)
        sys.exit(0)  # the interpreter's own exit: atexit handlers run
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)
"""

FORK_AFTER_OFFLOADER = """
before = run(use_new_offloader)
status = fork(lambda: run(use_new_offloader))
print(json.dumps({"before": before, "status": status, "after": run(use_new_offloader)}))
"""

FORK_AFTER_DEFAULT = """
before = run(use_default_offloader)
status = fork(lambda: run(use_default_offloader))
print(json.dumps({"before": before, "status": status, "after": run(use_default_offloader)}))
"""

# Forked by multiprocessing from inside an Offloader's block (from a thread, as trio
# allows no new run in a process forked from its own run): the child's context still
# names the parent's Offloader, and its decorated calls must not use it.
MULTIPROCESSING_FORK = f"""
import multiprocessing


def child(queue):
    signal.alarm({CHILD_DEADLINE})
    queue.put(run(use_default_offloader))


def start_child():
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    process = context.Process(target=child, args=(queue,))
    process.start()
    process.join()
    return process.exitcode, queue.get(timeout=1) if process.exitcode == 0 else None


async def main():
    async with Offloader(settings()):
        before = await use_default_offloader()
        status, child_result = await anyio.to_thread.run_sync(start_child)
        after = await use_default_offloader()
    print(json.dumps({{"child": child_result}}))
    print(json.dumps({{"before": before, "status": status, "after": after}}))


run(main)
"""


def check_fresh_pools(done: Any) -> None:
    """The child's calls ran in workers of its own; the parent's still work."""
    stdout, stderr = done.stdout.decode(), done.stderr.decode()
    assert done.returncode == 0, stderr
    *_, parent = lines = [json.loads(line) for line in stdout.splitlines()]
    assert parent["status"] == 0, (
        f"the child {'hung' if parent['status'] == -signal.SIGALRM else 'failed'}: {stderr}"
    )
    assert len(lines) == 2, (stdout, stderr)
    child = lines[0]["child"]
    assert child[1] == parent["before"][1] == parent["after"][1], (child, parent)
    assert child[0] not in (parent["before"][0], parent["after"][0])


async def test_child_forked_after_an_offloader_starts_its_own(
    tmp_path: Path, anyio_backend: Backend
) -> None:
    done = await run_script(tmp_path, PRELUDE + FORK_AFTER_OFFLOADER, loop_name(anyio_backend))
    check_fresh_pools(done)


async def test_child_forked_after_the_default_offloader_starts_its_own(
    tmp_path: Path, anyio_backend: Backend
) -> None:
    done = await run_script(tmp_path, PRELUDE + FORK_AFTER_DEFAULT, loop_name(anyio_backend))
    check_fresh_pools(done)


async def test_multiprocessing_fork_child_starts_its_own(
    tmp_path: Path, anyio_backend: Backend
) -> None:
    done = await run_script(tmp_path, PRELUDE + MULTIPROCESSING_FORK, loop_name(anyio_backend))
    check_fresh_pools(done)


# The parent's Offloader runs (its loop in a thread) while the main thread forks.
INHERITED_OFFLOADER = """
ready = threading.Event()
forked = threading.Event()
parent = {}


async def serve():
    async with Offloader(settings()) as ex:
        parent["ex"] = ex
        parent["before"] = await ex.pool("process").run(funcs.getpid)
        ready.set()
        await anyio.to_thread.run_sync(forked.wait)
        parent["after"] = await ex.pool("process").run(funcs.getpid)
        parent["thread"] = await ex.pool("thread").run(funcs.add, 2, 2)


def use_inherited():
    ex = parent["ex"]
    refused = {}
    for pool in ("process", "thread"):
        try:
            run(ex.pool(pool).run, funcs.getpid)
        except PoolClosed as exc:
            refused[pool] = str(exc)
    async def decorated():
        return await funcs.process_pid()
    # The parent's Offloader is not this process's: a decorated call starts a default.
    return {"refused": refused, "decorated": run(decorated)}


loop = threading.Thread(target=run, args=(serve,))
loop.start()
ready.wait(30)
status = fork(use_inherited)
forked.set()
loop.join()
print(json.dumps({"status": status, "before": parent["before"], "after": parent["after"],
                  "thread": parent["thread"]}))
"""


async def test_pools_inherited_through_fork_refuse_calls(
    tmp_path: Path, anyio_backend: Backend
) -> None:
    done = await run_script(tmp_path, PRELUDE + INHERITED_OFFLOADER, loop_name(anyio_backend))
    stdout, stderr = done.stdout.decode(), done.stderr.decode()
    assert done.returncode == 0, stderr
    *_, parent = lines = [json.loads(line) for line in stdout.splitlines()]
    assert parent["status"] == 0, stderr
    assert len(lines) == 2, (stdout, stderr)
    child = lines[0]["child"]
    # A clear refusal, naming the fork, for every kind: never a hang.
    assert set(child["refused"]) == {"process", "thread"}, child
    for message in child["refused"].values():
        assert "fork" in message, message
    assert child["decorated"] != parent["before"]
    # The child's exit (its atexit handlers) left the parent's worker alone.
    assert parent["after"] == parent["before"], stderr
    assert parent["thread"] == 4
    await wait_until(lambda: gone(parent["before"]), 5, "the parent's worker stopped with it")


# A Dask pool's embedded cluster runs in a host process that exits when its stdin
# reaches EOF; a child forked meanwhile must not hold that pipe open.
DASK_HOST_AFTER_FORK = """
import psutil

read_end, write_end = os.pipe()


async def serve():
    dask = OffloadSettings(
        pools={"dask": {"kind": "dask", "max_workers": 1}}, lag_probe=False, shutdown_timeout=5
    )
    async with Offloader(dask) as ex:
        assert await ex.pool("dask").run(funcs.add, 1, 2) == 3
        host = [p for p in psutil.Process().children() if "dask.host" in " ".join(p.cmdline())]
        assert len(host) == 1, host
        child = os.fork()
        if child == 0:  # lives on until the parent has stopped its pool
            os.close(write_end)
            os.read(read_end, 1)
            os._exit(0)
    gone = psutil.wait_procs(host, timeout=5)[0] == host
    os.close(write_end)
    os.waitpid(child, 0)
    return {"host_gone": gone}


print(json.dumps(run(serve)))
"""


async def test_child_does_not_keep_the_parents_dask_cluster_alive(
    tmp_path: Path, anyio_backend: Backend
) -> None:
    if loop_name(anyio_backend) == "trio":
        pytest.skip("the dask kind runs on asyncio only")
    done = await run_script(
        tmp_path, PRELUDE + DASK_HOST_AFTER_FORK, loop_name(anyio_backend), timeout=60
    )
    stdout, stderr = done.stdout.decode(), done.stderr.decode()
    assert done.returncode == 0, stderr
    assert json.loads(stdout.splitlines()[-1]) == {"host_gone": True}, stderr
    assert "did not exit" not in stderr, stderr
