"""The load generator of ``python -m offload demo``, run in a process of its own.

``python -m offload.demo.load --port P --steps N ...`` talks HTTP/1.1 with
keep-alive to the demo app on 127.0.0.1 (a minimal client on asyncio streams, no
dependency). It runs an idle phase, where a pinger requests ``/ping`` every 10 ms
alone, then one phase per mode, where ``--concurrency`` clients loop on
``/work/<mode>?steps=N`` for ``--duration`` seconds while the pinger goes on.

The pinger is a process of its own (this module with ``--pinger``, started by the
load process and dying with it), like a health check from another machine: in the
clients' event loop, a ping's answer would wait behind the clients' own work, and
that measured 2-3x the idle p99 with a server that answered in time. Both processes
schedule on ``time.monotonic()``, one clock for the whole machine: the load process
tells the pinger when its window opens and how long it lasts.

It writes one JSON object per line on stdout: ``{"event": "start", "phase": ...,
"seconds": ...}`` when a phase's measured window opens, then ``{"event": "result",
"phase": ..., "ping_ms": [...], "done": ..., "errors": ..., "seconds": ...}`` when it
ends: the latency of every ping sent in the window, and the work requests answered
with 200 in it. Each client sends one request before the window opens, so the
window measures a warm server.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
import time
from collections.abc import Sequence
from typing import Any

__all__ = ("Connection", "main")

HOST = "127.0.0.1"
#: seconds between two pings
PING_EVERY = 0.010
#: seconds a ping may take before it counts as an error
PING_TIMEOUT = 10.0


class Connection:
    """One HTTP/1.1 keep-alive connection, for GET requests, one at a time."""

    def __init__(self, port: int) -> None:
        self.port = port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def get(self, target: str) -> tuple[int, bytes]:
        """GET ``target``; returns the status and the body. (Re)connects when needed."""
        if self._writer is None:
            await self.open()
        assert self._reader is not None
        assert self._writer is not None
        try:
            self._writer.write(
                f"GET {target} HTTP/1.1\r\nHost: {HOST}:{self.port}\r\n\r\n".encode("ascii")
            )
            await self._writer.drain()
            status, close, body = await self._response(self._reader)
        except BaseException:
            self.close()
            raise
        if close:
            self.close()
        return status, body

    async def open(self) -> None:
        self.close()
        self._reader, self._writer = await asyncio.open_connection(HOST, self.port)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None

    @staticmethod
    async def _response(reader: asyncio.StreamReader) -> tuple[int, bool, bytes]:
        status_line = await reader.readline()
        if not status_line:
            raise ConnectionError("the server closed the connection")
        status = int(status_line.split(None, 2)[1])
        length: int | None = None
        chunked = close = False
        while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding":
                chunked = b"chunked" in value.lower()
            elif name == b"connection":
                close = b"close" in value.lower()
        if chunked:
            parts = []
            while size := int((await reader.readline()).split(b";")[0], 16):
                parts.append(await reader.readexactly(size))
                await reader.readline()
            while await reader.readline() not in (b"\r\n", b"\n", b""):
                pass  # trailers
            return status, close, b"".join(parts)
        if length is None:
            return status, True, await reader.read()
        return status, close, await reader.readexactly(length)


def emit(**record: Any) -> None:
    """One JSON line on stdout, for the parent."""
    sys.stdout.write(json.dumps(record, separators=(",", ":")) + "\n")
    sys.stdout.flush()


#: seconds between telling the pinger of a window and the window's start
LEAD = 0.05
_NETWORK_ERRORS = (OSError, ValueError, asyncio.IncompleteReadError)


async def run_phase(
    phase: str, pinger: Pinger, *, port: int, seconds: float, concurrency: int, steps: int
) -> None:
    """One phase: the pinger, plus ``concurrency`` clients unless ``phase`` is idle."""
    target = f"/work/{phase}?steps={steps}"
    clients = [] if phase == "idle" else [Connection(port) for _ in range(concurrency)]
    warm_up = await asyncio.gather(*(c.get(target) for c in clients))
    for status, body in warm_up:
        if status != 200:
            raise RuntimeError(f"{phase}: HTTP {status}: {body.decode(errors='replace')}")
    start = time.monotonic() + LEAD
    deadline = start + seconds
    pinged = asyncio.ensure_future(pinger.window(start, seconds))
    await asyncio.sleep(LEAD)
    emit(event="start", phase=phase, seconds=seconds)
    done = errors = 0

    async def client(conn: Connection) -> None:
        nonlocal done, errors
        while time.monotonic() < deadline:
            try:
                status, _ = await conn.get(target)
            except _NETWORK_ERRORS:
                errors += 1
                await asyncio.sleep(0.01)
                continue
            if time.monotonic() <= deadline:
                if status == 200:
                    done += 1
                else:
                    errors += 1

    try:
        await asyncio.gather(*(client(c) for c in clients))
        ping_ms, ping_errors = await pinged
    finally:
        pinged.cancel()
        for conn in clients:
            conn.close()
    emit(
        event="result",
        phase=phase,
        ping_ms=ping_ms,
        done=done,
        errors=errors + ping_errors,
        seconds=seconds,
    )


class Pinger:
    """The pinger process, seen from the load process."""

    def __init__(self, port: int) -> None:
        self.port = port
        self._proc: asyncio.subprocess.Process | None = None

    async def __aenter__(self) -> Pinger:
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "offload.demo.load",
            "--pinger",
            "--port",
            str(self.port),
            "--parent",
            str(os.getpid()),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        # Its interpreter takes a while to start: a window opened before it listens
        # would be half empty.
        assert self._proc.stdout is not None
        if json.loads(await self._proc.stdout.readline() or b"{}").get("ready") is not True:
            raise RuntimeError(f"the pinger exited with code {await self._proc.wait()}")
        return self

    async def __aexit__(self, *exc: object) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.returncode is None:
            proc.kill()
        await proc.wait()

    async def window(self, start: float, seconds: float) -> tuple[list[float], int]:
        """Pings from ``start`` (``time.monotonic()``) for ``seconds``: ms each, errors."""
        assert self._proc is not None
        assert self._proc.stdin is not None
        assert self._proc.stdout is not None
        self._proc.stdin.write(json.dumps({"start": start, "seconds": seconds}).encode() + b"\n")
        await self._proc.stdin.drain()
        line = await self._proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the pinger exited with code {await self._proc.wait()}")
        record = json.loads(line)
        return record["ping_ms"], record["errors"]


class PingConnection:
    """A blocking keep-alive connection for ``GET /ping``: the pinger's whole client.

    A plain socket loop, not asyncio streams: the pinger's own CPU time is taken from
    the machine it measures, and a ping here costs a few syscalls (asyncio's stream
    client costs many times more: docs/benchmarks.md, "Figures behind the code").
    """

    def __init__(self, port: int) -> None:
        self.port = port
        self._request = f"GET /ping HTTP/1.1\r\nHost: {HOST}:{port}\r\n\r\n".encode("ascii")
        self._sock: socket.socket | None = None

    def get(self) -> int:
        """One ping; returns the status. (Re)connects when needed."""
        if self._sock is None:
            # a server that stops answering costs that ping, not the whole window
            self._sock = socket.create_connection((HOST, self.port), timeout=PING_TIMEOUT)
            self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            return self._exchange(self._sock)
        except BaseException:
            self.close()
            raise

    def _exchange(self, sock: socket.socket) -> int:
        sock.sendall(self._request)
        data = b""
        while (end := data.find(b"\r\n\r\n")) < 0:
            data += _recv(sock)
        status_line, *headers = data[:end].split(b"\r\n")
        for header in headers:
            name, _, value = header.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
                break
        else:
            raise ValueError("/ping answered without a Content-Length")
        while len(data) < end + 4 + length:
            data += _recv(sock)
        return int(status_line.split(None, 2)[1])

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _recv(sock: socket.socket) -> bytes:
    if not (chunk := sock.recv(65536)):
        raise ConnectionError("the server closed the connection")
    return chunk


def _ping_window(conn: PingConnection, start: float, seconds: float) -> dict[str, Any]:
    if conn.get() != 200:  # the connection is warm when the window opens
        raise RuntimeError("/ping did not answer 200")
    deadline = start + seconds
    pings: list[float] = []
    errors = 0
    next_at = start
    while (now := time.monotonic()) < deadline:
        if next_at > now:
            time.sleep(next_at - now)
        sent = time.perf_counter()
        try:
            status = conn.get()
        except (OSError, ValueError):
            status = 0
        if status == 200:
            pings.append(round((time.perf_counter() - sent) * 1000, 3))
        else:
            errors += 1
        next_at = max(next_at + PING_EVERY, time.monotonic())
    return {"ping_ms": pings, "errors": errors}


def run_pinger(port: int, parent: int) -> None:
    """The pinger process: one window per line of stdin, its pings as a line on stdout."""
    _die_with(parent)
    conn = PingConnection(port)
    try:
        conn.get()
        emit(ready=True)
        for line in sys.stdin:
            window = json.loads(line)
            emit(**_ping_window(conn, window["start"], window["seconds"]))
    finally:
        conn.close()


def _die_with(parent: int) -> None:
    """Linux: SIGKILL when ``parent`` dies, even in the middle of a window."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        with contextlib.suppress(OSError):
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # it died before prctl
        sys.exit(1)


async def run(args: argparse.Namespace) -> None:
    async with Pinger(args.port) as pinger:
        if args.idle > 0:
            await run_phase(
                "idle", pinger, port=args.port, seconds=args.idle, concurrency=0, steps=0
            )
        for mode in args.modes.split(","):
            await run_phase(
                mode,
                pinger,
                port=args.port,
                seconds=args.duration,
                concurrency=args.concurrency,
                steps=args.steps,
            )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m offload.demo.load", description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--pinger", action="store_true", help="be the pinger process")
    parser.add_argument("--parent", type=int, help="the pinger's parent process")
    parser.add_argument("--steps", type=int, help="steps of the work per request")
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per mode")
    parser.add_argument("--concurrency", type=int, default=8, help="clients per mode")
    parser.add_argument("--idle", type=float, default=2.0, help="seconds of the idle phase")
    parser.add_argument("--modes", default="blocking,thread,process")
    args = parser.parse_args(argv)
    if args.pinger:
        run_pinger(args.port, args.parent if args.parent is not None else os.getppid())
        return
    if args.steps is None:
        parser.error("--steps is required")
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
