"""The load generator of ``python -m offload demo``, run in a process of its own.

``python -m offload._demo_load --port P --steps N ...`` talks HTTP/1.1 with
keep-alive to the demo app on 127.0.0.1 (a minimal client on asyncio streams, no
dependency). It runs an idle phase, where a pinger requests ``/ping`` every 10 ms
alone, then one phase per mode, where ``--concurrency`` clients loop on
``/work/<mode>?steps=N`` for ``--duration`` seconds while the pinger goes on.

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
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

__all__ = ("Connection", "main")

HOST = "127.0.0.1"
#: seconds between two pings
PING_EVERY = 0.010


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


async def run_phase(
    phase: str, pinger: Connection, *, port: int, seconds: float, concurrency: int, steps: int
) -> None:
    """One phase: the pinger, plus ``concurrency`` clients unless ``phase`` is idle."""
    target = f"/work/{phase}?steps={steps}"
    clients = [] if phase == "idle" else [Connection(port) for _ in range(concurrency)]
    warm_up = await asyncio.gather(*(c.get(target) for c in clients), pinger.get("/ping"))
    for status, body in warm_up:
        if status != 200:
            raise RuntimeError(f"{phase}: HTTP {status}: {body.decode(errors='replace')}")
    emit(event="start", phase=phase, seconds=seconds)
    start = time.perf_counter()
    deadline = start + seconds
    pings: list[float] = []
    done = errors = 0

    async def client(conn: Connection) -> None:
        nonlocal done, errors
        while time.perf_counter() < deadline:
            try:
                status, _ = await conn.get(target)
            except (OSError, ValueError, asyncio.IncompleteReadError):
                errors += 1
                await asyncio.sleep(0.01)
                continue
            if time.perf_counter() <= deadline:
                if status == 200:
                    done += 1
                else:
                    errors += 1

    async def ping() -> None:
        nonlocal errors
        next_at = start
        while (now := time.perf_counter()) < deadline:
            if next_at > now:
                await asyncio.sleep(next_at - now)
            sent = time.perf_counter()
            try:
                status, _ = await pinger.get("/ping")
            except (OSError, ValueError, asyncio.IncompleteReadError):
                status = 0
            if status == 200:
                pings.append(time.perf_counter() - sent)
            else:
                errors += 1
            next_at = max(next_at + PING_EVERY, time.perf_counter())

    try:
        await asyncio.gather(ping(), *(client(c) for c in clients))
    finally:
        for conn in clients:
            conn.close()
    emit(
        event="result",
        phase=phase,
        ping_ms=[round(p * 1000, 3) for p in pings],
        done=done,
        errors=errors,
        seconds=seconds,
    )


async def run(args: argparse.Namespace) -> None:
    pinger = Connection(args.port)
    try:
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
    finally:
        pinger.close()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m offload._demo_load", description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--steps", type=int, required=True, help="steps of the work per request")
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per mode")
    parser.add_argument("--concurrency", type=int, default=8, help="clients per mode")
    parser.add_argument("--idle", type=float, default=2.0, help="seconds of the idle phase")
    parser.add_argument("--modes", default="blocking,thread,process")
    asyncio.run(run(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
