"""The demo's child processes: started in a session of their own, stopped in order.

:func:`start_server` runs uvicorn serving :mod:`offload.demo.app` in one of them.
"""

from __future__ import annotations

import contextlib
import ctypes
import http.client
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

__all__ = ("Children", "DemoError", "in_main_thread", "signals_ignored", "start_server")

#: seconds a child gets to stop after SIGTERM, before SIGKILL
STOP_TIMEOUT = {"load": 5.0, "server": 10.0}
#: seconds the server gets to start
START_TIMEOUT = 60.0
PR_SET_PDEATHSIG = 1
#: the directory holding the ``offload`` package: the children run from there
ROOT = Path(__file__).resolve().parent.parent.parent


class DemoError(Exception):
    """The demo cannot go on; the message says why."""


class Children:
    """The demo's child processes: on exit, each is stopped (SIGTERM, then SIGKILL) and reaped.

    Children start in a session of their own, so a Ctrl-C at the terminal reaches only
    this process, which stops them in order (the load, then the server); on Linux they
    also get SIGTERM if this process dies without stopping them.
    """

    def __init__(self) -> None:
        self._procs: list[tuple[str, subprocess.Popen[bytes]]] = []
        self._libc: Any = None
        if sys.platform.startswith("linux"):
            with contextlib.suppress(OSError):
                self._libc = ctypes.CDLL(None, use_errno=True)

    def __enter__(self) -> Children:
        return self

    def __exit__(self, *exc: object) -> None:
        with signals_ignored():
            for name, proc in reversed(self._procs):
                _stop(proc, STOP_TIMEOUT.get(name, 5.0))
            self._procs.clear()

    def start(self, name: str, args: Sequence[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        """``python args...`` from the package's root, with ``offload`` importable."""
        path = os.environ.get("PYTHONPATH")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), path]))}
        with _signals_deferred():  # a Ctrl-C now would leave it running unrecorded
            proc = subprocess.Popen(
                [sys.executable, *args],
                cwd=ROOT,
                env=env,
                start_new_session=True,
                preexec_fn=self._child_setup(os.getpid()),
                **kwargs,
            )
            self._procs.append((name, proc))
        return proc

    def _child_setup(self, parent: int) -> Callable[[], None]:
        libc = self._libc

        def setup() -> None:  # in the child, between fork and exec
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _DEFERRED)
            if libc is not None:
                libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
                if os.getppid() != parent:  # the parent died before prctl
                    os._exit(1)

        return setup


_DEFERRED = {signal.SIGINT, signal.SIGTERM}


def _stop(proc: subprocess.Popen[bytes], timeout: float) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


def in_main_thread() -> bool:
    """Whether this is the main thread, the only one that may handle signals."""
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    if not in_main_thread():
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _DEFERRED)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


@contextlib.contextmanager
def signals_ignored() -> Iterator[None]:
    """Ctrl-C ignored in the block: what stops the children is not interrupted."""
    if not in_main_thread():
        yield
        return
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


def start_server(
    children: Children, uvicorn_args: Sequence[str] = ()
) -> tuple[subprocess.Popen[bytes], int]:
    """Uvicorn serving the demo app on a listening socket bound here; returns it and the port.

    uvicorn picks uvloop and httptools when they are installed (the ``demo`` extra
    has them): they cost the server 25-40% less CPU per request than asyncio and h11
    here. ``uvicorn_args`` are added to its command line.
    """
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # uvicorn sees an --fd socket as AF_UNIX, so asyncio does not set TCP_NODELAY on
        # the connections; Linux copies it from the listener. Without it, Nagle holds the
        # response body until the client's delayed ACK of the headers: 40 ms per request.
        listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen(128)
        port = int(listener.getsockname()[1])
        fd = listener.fileno()
        proc = children.start(
            "server",
            [
                "-m",
                "uvicorn",
                "offload.demo.app:app",
                "--fd",
                str(fd),
                "--app-dir",
                str(ROOT),
                "--lifespan",
                "on",
                "--log-level",
                "warning",
                "--no-access-log",
                "--timeout-graceful-shutdown",
                "3",
                *uvicorn_args,
            ],
            pass_fds=(fd,),
        )
    _wait_ready(proc, port)
    return proc, port


def _wait_ready(proc: subprocess.Popen[bytes], port: int) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        try:
            conn.request("GET", "/ping")
            if conn.getresponse().status == 200:
                return
        except (OSError, http.client.HTTPException):
            pass
        finally:
            conn.close()
        if proc.poll() is not None:
            raise DemoError(f"the server exited with code {proc.returncode} while starting")
        if time.monotonic() > deadline:
            raise DemoError(f"the server did not answer within {START_TIMEOUT:g} s")
        time.sleep(0.05)
