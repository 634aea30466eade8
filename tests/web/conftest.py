from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
import pytest

ROOT = Path(__file__).resolve().parent.parent.parent


@dataclass
class Server:
    """A real ASGI server process serving tests/web/app.py on 127.0.0.1."""

    proc: subprocess.Popen[bytes]
    url: str
    workers_seen: set[int] = field(default_factory=set)

    def worker_pids(self) -> set[int]:
        pids = set()
        for child in psutil.Process(self.proc.pid).children(recursive=True):
            try:
                if "offload._pools.process.worker" in " ".join(child.cmdline()):
                    pids.add(child.pid)
            except psutil.NoSuchProcess:
                pass
        self.workers_seen |= pids
        return pids

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise


def start_server(
    server: str = "uvicorn",
    env: dict[str, str] | None = None,
    app: str = "tests.web.app:app",
    *,
    args: tuple[str, ...] = (),
    log: Path | None = None,
    cpus: set[int] | None = None,
) -> Server:
    """Serve ``app``; ``args`` go to the server's command line, its stderr to ``log``;
    ``cpus``: the only CPUs it (and its workers) may run on."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # uvicorn takes an --fd socket for AF_UNIX and never sets TCP_NODELAY on its
    # connections; Linux copies it from the listening socket, so set it here.
    listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    port = listener.getsockname()[1]
    fd = listener.fileno()
    if server.startswith("uvicorn"):
        # plain: h11 on asyncio; "uvicorn-standard": what uvicorn[standard] picks
        loop, http = ("uvloop", "httptools") if server == "uvicorn-standard" else ("asyncio", "h11")
        cmd = ["-m", "uvicorn", app, "--fd", str(fd), "--log-level", "warning"]
        cmd += ["--loop", loop, "--http", http]
    elif server == "gunicorn":
        cmd = ["-m", "gunicorn", app, "--bind", f"fd://{fd}", "--log-level", "warning"]
        cmd += ["--worker-class", "uvicorn_worker.UvicornWorker"]
    else:
        cmd = ["-m", "hypercorn", app, "--bind", f"fd://{fd}", "--log-level", "warning"]
    with contextlib.ExitStack() as stack:
        stderr = stack.enter_context(log.open("wb")) if log is not None else None
        proc = subprocess.Popen(
            [sys.executable, *cmd, *args],
            cwd=ROOT,
            pass_fds=(fd,),
            env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
            stderr=stderr,
            preexec_fn=None if cpus is None else lambda: os.sched_setaffinity(0, cpus),
        )
    listener.close()
    running = Server(proc, f"http://127.0.0.1:{port}")
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(f"{running.url}/health", timeout=1).status_code == 200:
                return running
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            running.stop(signal.SIGKILL)
            raise RuntimeError(f"{server} did not start (exit {proc.returncode})")
        time.sleep(0.05)


def assert_gone(pids: set[int], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while True:
        alive = []
        for pid in pids:
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    alive.append(pid)
            except psutil.NoSuchProcess:
                pass
        if not alive:
            return
        assert time.monotonic() < deadline, f"processes still alive: {alive}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    running = start_server()
    yield running
    pids = running.worker_pids()
    assert running.stop() in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once done
    assert_gone(pids)
