"""A streamed response from an offloaded generator, under a real server: the client
that leaves stops the generator in its worker."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

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
