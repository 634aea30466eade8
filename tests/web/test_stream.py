"""A streamed response from an offloaded generator, under a real server: the client
that leaves stops the generator in its worker thread or process."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from .. import stream_funcs
from .conftest import Server, assert_gone, start_server

#: seconds the test waits for what it expects
WAIT = 20.0


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    running = start_server("uvicorn")
    yield running
    pids = running.worker_pids()
    running.stop()
    assert_gone(pids)


def test_client_leaving_closes_the_generator_in_its_worker(server: Server, tmp_path: Path) -> None:
    marker = tmp_path / "closed"
    with httpx.stream("GET", f"{server.url}/ticks", params={"marker": str(marker)}) as reply:
        assert reply.status_code == 200
        lines = reply.iter_lines()
        assert [next(lines) for _ in range(3)] == ["tick 0", "tick 1", "tick 2"]
    # The client hung up: the generator is closed in the server's worker thread.
    deadline = time.monotonic() + WAIT
    while not marker.exists():
        assert time.monotonic() < deadline, "the generator was not closed"
        time.sleep(0.01)
    pid, thread = marker.read_text().split()
    assert int(pid) == server.proc.pid != os.getpid()
    assert thread.startswith("offload-thread-")
    # The worker thread is free again: the server serves a plain call.
    assert httpx.post(f"{server.url}/add/2").status_code == 200


def tiny(server: Server) -> dict[str, int]:
    """The stats of the app's "tiny" pool: one worker process, no queue."""
    stats: dict[str, int] = httpx.get(f"{server.url}/workers").json()["tiny"]
    return stats


def wait_until_idle(server: Server) -> None:
    deadline = time.monotonic() + WAIT
    while tiny(server) != {"workers": 1, "busy": 0}:
        assert time.monotonic() < deadline, f"the tiny pool stays {tiny(server)}"
        time.sleep(0.01)


def produced(progress: Path) -> int:
    return stream_funcs.produced(str(progress))


def test_client_leaving_closes_a_process_generator_in_its_worker(
    server: Server, tmp_path: Path
) -> None:
    progress, marker = tmp_path / "progress", tmp_path / "closed"
    wait_until_idle(server)
    before = server.worker_pids()
    params = {"progress": str(progress), "marker": str(marker), "hold": "3"}
    with httpx.stream("GET", f"{server.url}/tiny/numbers", params=params) as reply:
        assert reply.status_code == 200
        lines = reply.iter_lines()
        assert [next(lines) for _ in range(3)] == ["0", "1", "2"]
        # The response waits: the generator runs its buffer (2) ahead, then waits
        # at a yield in the worker.
        deadline = time.monotonic() + WAIT
        while produced(progress) < 5:
            assert time.monotonic() < deadline, "the generator did not run ahead"
            time.sleep(0.01)
    # The client hung up: the generator is closed in the worker, which lives on.
    deadline = time.monotonic() + WAIT
    while not marker.exists():
        assert time.monotonic() < deadline, "the generator was not closed"
        time.sleep(0.01)
    pid = int(marker.read_text())
    assert pid in before
    assert produced(progress) == 5
    wait_until_idle(server)
    # Free for the next call: the only worker, no queue (a busy one refuses: 503).
    reply = httpx.get(f"{server.url}/tiny/pid")
    assert reply.status_code == 200
    assert reply.json() == {"pid": pid}
    assert server.worker_pids() == before


def test_client_leaving_while_an_item_is_computed_kills_its_worker(
    server: Server, tmp_path: Path
) -> None:
    marker = tmp_path / "closed"
    wait_until_idle(server)
    old = httpx.get(f"{server.url}/tiny/pid").json()["pid"]
    with httpx.stream("GET", f"{server.url}/tiny/stuck", params={"marker": str(marker)}) as reply:
        assert reply.status_code == 200
        assert next(reply.iter_lines()) == "0"
    # The client hung up while the worker computes the next item (for a minute): it
    # is killed, its generator's finally never runs, and a new worker takes its place.
    assert_gone({old}, timeout=WAIT)
    wait_until_idle(server)
    reply = httpx.get(f"{server.url}/tiny/pid")
    assert reply.status_code == 200
    assert reply.json()["pid"] not in (old, server.proc.pid)
    assert reply.json()["pid"] in server.worker_pids()
    assert not marker.exists()
