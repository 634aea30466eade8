"""The embedded cluster, seen from the pool: its host process (see :mod:`.host`), the
scheduler address and TLS credentials that the host reports, and its stop."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import signal
import subprocess
from typing import TYPE_CHECKING, Any

import anyio
from distributed.security import Security as _Security

from ..._errors import PoolStartError
from ..._helper_threads import run_in_helper_thread
from ..process.scheduling import start_at_lower_priority
from ..process.spawner import spawner, wait_future
from .host import host_command, host_config

if TYPE_CHECKING:
    from ..._settings import PoolSettings

__all__ = ("HOST_CLOSE_TIMEOUT", "EmbeddedCluster", "host_command", "spawn_host")

logger = logging.getLogger("offload")

#: seconds the host may take to close its cluster and exit once told to; then it is
#: killed (its workers die with it)
HOST_CLOSE_TIMEOUT = 10.0


def spawn_host(args: list[str], report_fd: int, settings: PoolSettings) -> subprocess.Popen[bytes]:
    """Start the embedded cluster's host (on the spawner thread): stdin a pipe that
    only we hold, the report fd its own, stdout and stderr ours; below the event loop
    from its start (``process/scheduling.py``), as its scheduler, nannies and workers then are:
    the seconds of CPU they take to start must not compete with the event loop."""
    return start_at_lower_priority(args, settings, stdin=subprocess.PIPE, pass_fds=(report_fd,))


class CachedSecurity(_Security):
    """The embedded cluster's client credentials, their SSL context made once, in a
    thread: ``Security`` makes one for every client it is given to, writing the key
    it holds in memory to a temporary directory, on the event loop."""

    # No __slots__ of its own: Security checks its fields against self.__slots__.
    args: dict[str, Any]

    def __init__(self, **fields: Any) -> None:
        super().__init__(**fields)  # type: ignore[no-untyped-call]

    def get_connection_args(self, role: str) -> dict[str, Any]:
        args: dict[str, Any] = self.args
        return args


class EmbeddedCluster:
    """A ``LocalCluster`` of ``n_workers`` single-threaded worker processes on
    127.0.0.1, in a host process of its own, for the pool ``pool_name``."""

    #: whether ``cryptography`` can be imported, which the cluster's TLS certificate
    #: needs (:meth:`prepare` looks)
    can_make_certificate = True

    def __init__(self, pool_name: str, settings: PoolSettings, n_workers: int) -> None:
        self.pool_name = pool_name
        self.settings = settings
        self.n_workers = n_workers
        #: the host process, as soon as it exists: :meth:`stop` ends it whatever happens
        self.process: subprocess.Popen[bytes] | None = None
        #: what clients of this cluster need: its scheduler's address and credentials
        self.address: str | None = None
        self.security: CachedSecurity | None = None

    @classmethod
    def prepare(cls) -> None:
        """Once per process, in a thread: look for ``cryptography``; start the spawner
        thread, whose start (Thread.start waits for the thread to run) must not be on
        the event loop."""
        cls.can_make_certificate = importlib.util.find_spec("cryptography") is not None
        spawner().submit(int).result()

    async def start(self) -> None:
        """Start the host process; return once it reports the scheduler's address.

        Nothing here runs on the event loop for long: the fork happens on the spawner
        thread, and the address is read from a non-blocking pipe.
        """
        if not self.can_make_certificate:
            raise PoolStartError(
                f"pool {self.pool_name!r}: the embedded dask cluster needs the cryptography "
                "package for its TLS certificate: pip install 'offload[dask]'"
            )
        report_r, report_w = os.pipe()
        try:
            config = host_config(
                n_workers=self.n_workers,
                report_fd=report_w,
                close_timeout=HOST_CLOSE_TIMEOUT,
            )
            args = host_command(config)
            try:
                # On the spawner thread (see process/spawner.py); waited for even when
                # cancelled, so that a started host always reaches us.
                future = spawner().submit(spawn_host, args, report_w, self.settings)
                host = self.process = await wait_future(future)
            finally:
                os.close(report_w)  # the host's copy is its own: EOF when it exits
            line = await self._read_report(host, report_r)
        finally:
            os.close(report_r)
        if not line:
            status = await self._exit_status(host)
            raise PoolStartError(
                f"pool {self.pool_name!r}: the embedded dask cluster did not start: its host "
                f"process {host.pid} exited with status {status} (its error is on stderr)"
            )
        report = json.loads(line)
        # The cluster accepts only clients with its certificate (see host.py).
        security = CachedSecurity(
            require_encryption=True,
            tls_ca_file=report["ca"],
            tls_client_cert=report["cert"],
            tls_client_key=report["key"],
        )
        security.args = await run_in_helper_thread(
            _Security.get_connection_args, security, "client"
        )
        self.security = security
        self.address = str(report["address"])

    @staticmethod
    async def _read_report(host: subprocess.Popen[bytes], fd: int) -> bytes:
        """The host's report line; b"" if the host exits first. Cancelled (our caller,
        or start's timeout), the host is killed: it has not reported, so nothing of
        it is ours to stop cleanly yet."""
        os.set_blocking(fd, False)
        line = b""
        try:
            while not line.endswith(b"\n"):
                await anyio.wait_readable(fd)
                try:
                    chunk = os.read(fd, 4096)
                except BlockingIOError:
                    continue
                if not chunk:
                    break  # EOF: the host exited
                line += chunk
        except BaseException:
            host.kill()
            raise
        return line

    @staticmethod
    async def _exit_status(host: subprocess.Popen[bytes]) -> int | None:
        """The host's exit status, waited for in a thread: it has closed its report fd,
        so it is exiting; ``None`` if it takes more than a few seconds."""
        try:
            return await run_in_helper_thread(host.wait, 5.0)
        except subprocess.TimeoutExpired:
            return None

    def gone(self) -> str | None:
        """Why calls cannot run: the host process has exited; else ``None``."""
        host = self.process
        if host is None or host.poll() is None:
            return None
        return (
            f"pool {self.pool_name!r}: the embedded dask cluster is gone: its host process "
            f"{host.pid} exited with status {host.returncode}; restart the Offloader"
        )

    def forget(self) -> None:
        """In a forked child: its copy of the host's stdin would keep the host waiting
        for EOF once the parent closed its own (:meth:`stop`), until this child exits."""
        host, self.process = self.process, None
        if host is not None and host.stdin is not None:
            with contextlib.suppress(OSError):
                host.stdin.close()  # nothing is ever written to it: nothing to flush

    async def stop(self) -> None:
        """Close the host's stdin, its signal to close the cluster and exit; wait for
        that in a thread, and kill it past the time it may take. Its workers die
        with it in any case (see host.py)."""
        host, self.process = self.process, None
        if host is None:
            return
        if host.stdin is not None:
            with contextlib.suppress(OSError):
                host.stdin.close()
        try:
            status = await run_in_helper_thread(host.wait, HOST_CLOSE_TIMEOUT + 5.0)
        except subprocess.TimeoutExpired:
            logger.warning(
                "pool %r: the embedded dask cluster's host process %d did not exit "
                "within %.0f s: killed",
                self.pool_name,
                host.pid,
                HOST_CLOSE_TIMEOUT + 5.0,
            )
            host.kill()
            status = await run_in_helper_thread(host.wait)
        if status not in (0, -signal.SIGKILL):
            logger.warning(
                "pool %r: the embedded dask cluster's host process %d exited with status %d",
                self.pool_name,
                host.pid,
                status,
            )
