"""A client that goes away cancels its request's offloaded call, on real servers."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote, urlsplit

import anyio
import anyio.lowlevel
import httpx
import psutil
import pytest
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Request

from offload._disconnect import READ_AHEAD_MESSAGES, Watch

from .conftest import Server, assert_gone, start_server

SERVERS = [
    pytest.param(("uvicorn", {}), id="uvicorn"),
    pytest.param(("uvicorn-standard", {}), id="uvicorn-uvloop-httptools"),
    pytest.param(("uvicorn", {"TEST_BASE_HTTP_MIDDLEWARE": "1"}), id="uvicorn-basehttpmiddleware"),
    pytest.param(("hypercorn", {}), id="hypercorn"),
]


@pytest.fixture(scope="module", params=SERVERS)
def any_server(request: pytest.FixtureRequest) -> Iterator[Server]:
    kind, env = request.param
    running = start_server(kind, env)
    yield running
    pids = running.worker_pids()
    running.stop()
    assert_gone(pids)


#: the app's process pool (tests/web/app.py)
PROCESS_WORKERS = 2
#: seconds the calls of the clients that leave would compute, were they not stopped
SPIN = 30


def busy(server: Server) -> int:
    return int(httpx.get(f"{server.url}/workers").json()["process"]["busy"])


def ready(server: Server) -> int:
    return int(httpx.get(f"{server.url}/workers").json()["process"]["workers"])


def send_and_drop(server: Server, request: bytes) -> None:
    """Send a raw HTTP request, wait until a worker runs it, then hang up."""
    url = urlsplit(server.url)
    with socket.create_connection((url.hostname, url.port)) as conn:
        conn.sendall(request)
        deadline = time.monotonic() + 10
        while busy(server) != 1:
            assert time.monotonic() < deadline, "the call never reached a worker"
            time.sleep(0.02)


def cpu_seconds(pids: set[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            times = psutil.Process(pid).cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


def spin_for(seconds: float) -> float:
    """Compute for ``seconds`` of wall time; the CPU seconds this thread got meanwhile."""
    ran = time.thread_time()
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass
    return time.thread_time() - ran


def assert_workers_go_idle(server: Server, before: set[int]) -> None:
    # The calls spin for SPIN s: stopped, they end long before that, however loaded
    # the machine is.
    deadline = time.monotonic() + SPIN / 4
    while busy(server) != 0:
        assert time.monotonic() < deadline, "the call still runs long after the disconnect"
        time.sleep(0.02)
    # The spinning worker was killed; the rest burn no CPU, once its replacement
    # has booted (an interpreter start is CPU time too).
    assert_gone(before - server.worker_pids(), timeout=SPIN / 4)
    deadline = time.monotonic() + 10
    while ready(server) != PROCESS_WORKERS:
        assert time.monotonic() < deadline, "the killed worker was never replaced"
        time.sleep(0.02)
    pids = server.worker_pids()
    start = cpu_seconds(pids)
    # What a process that computes gets of the CPUs meanwhile, on this machine now:
    # the idle workers, all together, use a small share of it.
    spun = spin_for(0.3)
    used = cpu_seconds(pids) - start
    assert used < spun / 4, f"idle workers used {used:.3f} s of CPU, a spinner {spun:.3f} s"


def test_get_without_body(any_server: Server) -> None:
    before = any_server.worker_pids()
    send_and_drop(any_server, b"GET /spin/30 HTTP/1.1\r\nHost: test\r\n\r\n")
    assert_workers_go_idle(any_server, before)


def test_post_with_body_read_by_fastapi(any_server: Server) -> None:
    before = any_server.worker_pids()
    body = json.dumps({"hello": "world"}).encode()
    send_and_drop(
        any_server,
        b"POST /spin-body/30 HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body,
    )
    assert_workers_go_idle(any_server, before)


def test_body_still_reaches_the_endpoint(any_server: Server) -> None:
    response = httpx.post(f"{any_server.url}/spin-body/0.01", json={"a": 1}, timeout=10)
    assert response.status_code == 200
    assert response.json()["echo"] == {"a": 1}


def test_calls_of_connected_clients_are_untouched(any_server: Server) -> None:
    response = httpx.get(f"{any_server.url}/sleep/0.3", timeout=10)
    assert response.json() == {"result": "slept"}


def test_switched_off_in_settings(tmp_path: Path) -> None:
    server = start_server("uvicorn", {"TEST_NO_CANCEL": "1"})
    try:
        before = server.worker_pids()
        marker = tmp_path / "done"
        target = f"/sleep-then-touch/1?path={quote(str(marker))}"
        send_and_drop(server, f"GET {target} HTTP/1.1\r\nHost: test\r\n\r\n".encode())
        deadline = time.monotonic() + 10
        while not marker.exists():  # the call ran to its end: nobody cancelled it
            assert time.monotonic() < deadline, "the call of a client that left was cancelled"
            time.sleep(0.05)
        assert server.worker_pids() == before  # and no worker was killed
    finally:
        pids = server.worker_pids()
        server.stop()
        assert_gone(pids)


def test_unread_body_is_read_ahead_and_still_watched(any_server: Server) -> None:
    before = any_server.worker_pids()
    send_and_drop(
        any_server,
        b"POST /ignore-body/30 HTTP/1.1\r\nHost: test\r\nContent-Length: 5\r\n\r\nhello",
    )
    assert_workers_go_idle(any_server, before)


def test_background_call_after_the_response_is_not_cancelled(
    any_server: Server, tmp_path: Path
) -> None:
    marker = tmp_path / "done"
    response = httpx.get(f"{any_server.url}/background", params={"path": str(marker)})
    assert response.status_code == 200
    deadline = time.monotonic() + 10
    while not marker.exists():
        assert time.monotonic() < deadline, "the background call was cancelled"
        time.sleep(0.05)


def test_websocket_client_that_leaves(any_server: Server) -> None:
    before = any_server.worker_pids()
    url = urlsplit(any_server.url)
    assert url.hostname is not None
    assert url.port is not None
    with socket.create_connection((url.hostname, url.port)) as conn:
        client = WSConnection(ConnectionType.CLIENT)
        conn.sendall(client.send(Request(host="test", target="/ws-spin/30")))
        client.receive_data(conn.recv(4096))
        assert isinstance(next(client.events()), AcceptConnection)
        deadline = time.monotonic() + 10
        while busy(any_server) != 1:
            assert time.monotonic() < deadline, "the call never reached a worker"
            time.sleep(0.02)
        conn.sendall(client.send(CloseConnection(code=1001)))
    assert_workers_go_idle(any_server, before)


async def test_websocket_read_ahead_is_bounded_by_messages_too() -> None:
    # Empty messages weigh nothing: without a count, a chatty client would grow the
    # queue for as long as a call runs.
    pulled = 0

    async def receive() -> dict[str, str]:
        nonlocal pulled
        pulled += 1
        await anyio.lowlevel.checkpoint()
        return {"type": "websocket.receive", "text": ""}

    watch = Watch(receive, {"type": "websocket", "headers": []})
    async with anyio.create_task_group() as tg:
        tg.start_soon(watch.wait_until_client_leaves)
        # Each pull is a checkpoint: the watcher is blocked only once it stopped pulling.
        with anyio.fail_after(5):
            await anyio.wait_all_tasks_blocked()
        tg.cancel_scope.cancel()
    assert pulled == READ_AHEAD_MESSAGES
    received = [await watch.receive() for _ in range(READ_AHEAD_MESSAGES + 1)]
    assert pulled == READ_AHEAD_MESSAGES + 1  # the queue first, then the server again
    assert all(message["type"] == "websocket.receive" for message in received)
