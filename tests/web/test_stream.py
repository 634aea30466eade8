"""A streamed response from an offloaded generator, under a real server: the client
that leaves stops the generator in its worker thread or process."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlencode, urlsplit

import anyio
import httpx
import pytest
from starlette.requests import ClientDisconnect

from offload import Offloader, OffloadSettings
from offload._disconnect import Watch
from offload.fastapi import RequestExecutor

from .. import stream_funcs
from ..processes import wait_until
from .conftest import Server, assert_gone, start_server

#: seconds the test waits for what it expects
WAIT = 20.0
#: bytes of a line that fills the connection and the server's socket buffers
CHUNK = 16 << 20


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    running = start_server("uvicorn")
    yield running
    pids = running.worker_pids()
    running.stop()
    assert_gone(pids)


def poll(cond: Callable[[], object], what: str | Callable[[], str]) -> None:
    """Poll ``cond`` every 10 ms (these tests block, as a client does); fail if it is
    not true within ``WAIT`` seconds."""
    deadline = time.monotonic() + WAIT
    while not cond():
        assert time.monotonic() < deadline, what() if callable(what) else what
        time.sleep(0.01)


def closed_by(marker: Path) -> str:
    """What the generator's ``finally`` wrote to ``marker``, once it has written it."""
    poll(lambda: marker.exists() and marker.read_text(), "the generator was not closed")
    return marker.read_text()


def test_client_leaving_closes_the_generator_in_its_worker(server: Server, tmp_path: Path) -> None:
    marker = tmp_path / "closed"
    with httpx.stream("GET", f"{server.url}/ticks", params={"marker": str(marker)}) as reply:
        assert reply.status_code == 200
        lines = reply.iter_lines()
        assert [next(lines) for _ in range(3)] == ["tick 0", "tick 1", "tick 2"]
    # The client hung up: the generator is closed in the server's worker thread.
    pid, thread = closed_by(marker).split()
    assert int(pid) == server.proc.pid != os.getpid()
    assert thread.startswith("offload-thread-")
    # The worker thread is free again: the server serves a plain call.
    assert httpx.post(f"{server.url}/add/2").status_code == 200


def tiny(server: Server) -> dict[str, int]:
    """The stats of the app's "tiny" pool: one worker process, no queue."""
    stats: dict[str, int] = httpx.get(f"{server.url}/workers").json()["tiny"]
    return stats


def wait_until_idle(server: Server) -> None:
    poll(
        lambda: tiny(server) == {"workers": 1, "busy": 0},
        lambda: f"the tiny pool stays {tiny(server)}",
    )


def produced(progress: Path) -> int:
    return stream_funcs.produced(str(progress))


def assert_closed_in_its_worker(
    server: Server, marker: Path, progress: Path, made: int, before: set[int]
) -> None:
    """Once the client has hung up: the generator was closed in the tiny pool's one
    worker after making ``made`` items, and that worker lives on, free for the next
    call (a busy one would refuse it: 503)."""
    pid = int(closed_by(marker))
    assert pid in before
    assert produced(progress) == made
    wait_until_idle(server)
    reply = httpx.get(f"{server.url}/tiny/pid")
    assert reply.status_code == 200
    assert reply.json() == {"pid": pid}
    assert server.worker_pids() == before


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
        poll(lambda: produced(progress) >= 5, "the generator did not run ahead")
    # The client hung up: the generator is closed in the worker, which lives on.
    assert_closed_in_its_worker(server, marker, progress, 5, before)


def test_client_leaving_a_full_connection_closes_a_process_generator_in_its_worker(
    server: Server, tmp_path: Path
) -> None:
    progress, marker = tmp_path / "progress", tmp_path / "closed"
    wait_until_idle(server)
    before = server.worker_pids()
    url = urlsplit(server.url)
    assert url.hostname is not None
    assert url.port is not None
    query = urlencode({"size": CHUNK, "progress": str(progress), "marker": str(marker)})
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as conn:
        # A fixed receive buffer (no autotuning): what the client does not read backs
        # up into the server.
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
        conn.connect((url.hostname, url.port))
        conn.sendall(f"GET /tiny/chunks?{query} HTTP/1.1\r\nHost: test\r\n\r\n".encode())
        # The client reads nothing: the first line fills the connection and the
        # server's buffers, and the second waits to be sent. The generator made a
        # third (its buffer, 2, ahead of the first), and waits at a yield while the
        # worker sends it: the parent reads no more of it.
        poll(lambda: produced(progress) >= 3, "the generator did not run ahead")
    # The client hung up: the server's send, which waited, returns, and the response
    # would take the next items (uvicorn drops what is sent to a client that left):
    # the stream ends instead, its generator closed where it waits, in the worker.
    assert_closed_in_its_worker(server, marker, progress, 3, before)


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


async def test_a_request_s_stream_ends_once_its_client_has_left(tmp_path: Path) -> None:
    progress, marker = tmp_path / "progress", tmp_path / "closed"

    async def receive() -> dict[str, str]:
        return {"type": "http.disconnect"}

    watch = Watch(receive, {"type": "http", "headers": []})
    async with Offloader(OffloadSettings(process={"max_workers": 1})) as plain:
        pid = await plain.pool("process").run(os.getpid)
        ex = RequestExecutor(plain.offloader, watch).pool("process").options(buffer=2)
        with anyio.fail_after(WAIT):
            async with ex.stream(stream_funcs.numbers, 100, str(progress), str(marker)) as items:
                assert await items.__anext__() == 0
                # Its buffer (2) ahead of the consumer, it waits at a yield.
                await wait_until(lambda: produced(progress) == 3, WAIT, "not run ahead")
                await watch.receive()  # the server tells that the client left
                with pytest.raises(ClientDisconnect):
                    await items.__anext__()
                # Closed where it waited, in its worker: no more items were made.
                await wait_until(lambda: marker.exists() and bool(marker.read_text()), WAIT, "open")
                assert marker.read_text() == str(pid)
                assert produced(progress) == 3
            assert await plain.pool("process").run(os.getpid) == pid
