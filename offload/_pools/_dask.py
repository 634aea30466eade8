"""The dask pool: calls run as tasks on a Dask distributed cluster.

::

    caller task ── scatter large arguments (one round trip, only when there are some)
        │
        ├─ client.submit(_invoke, fn, ...) ──> scheduler ──> a worker runs it
        └─ await the future <── scheduler: done ── gather the result
    cancelled or past its deadline: the future is cancelled in the background; with
    hard_cancel, the worker running it is restarted too

The asynchronous client lives on the Offloader's event loop: it is created in
:meth:`DaskPool.start` and closed in :meth:`DaskPool._stop`. With no scheduler address
the pool first starts an embedded ``LocalCluster`` of ``max_workers`` single-threaded
worker processes on 127.0.0.1 in a host process of its own (``_dask_host``), so that
its scheduler and nannies never run on the application's event loop; the client then
connects to it by address, as to any cluster, and the host stops with the pool::

    application (event loop: the client) ── stdin, report fd ──> host process
                                                                  (scheduler, nannies)
                                                                   └─> worker processes

What Dask cannot do, and what the pool does instead (see docs/dask.md):

- a running task cannot be interrupted: cancelling its future only drops its result;
  ``hard_cancel`` restarts the worker process running it;
- a task whose worker dies is retried elsewhere up to the scheduler's
  ``allowed-failures`` times: the embedded cluster allows none, so a crash reaches the
  caller at once as :class:`WorkerCrashed`; an external scheduler is the operator's,
  and the pool warns at start when it retries.

This module is imported only when a pool of kind dask starts, and on Dask workers
(which unpickle :func:`_invoke` by reference): nothing else imports distributed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import traceback
import uuid
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import anyio

from .._errors import (
    PoolOverloaded,
    PoolStartError,
    RemoteTraceback,
    SerializationError,
    WorkerCrashed,
)
from .._helper_threads import run_in_helper_thread
from .._where import mark_worker_thread
from ._base import Pool
from ._dask_host import host_config
from ._nesting import refusal
from ._sched import start_below
from ._spawner import spawner, wait_future

try:
    import dask.config
    from dask.sizeof import sizeof
    from distributed import Client as _Client
    from distributed.client import FutureCancelledError
    from distributed.comm.core import CommClosedError
    from distributed.scheduler import KilledWorker
    from distributed.versions import get_versions
except ImportError as exc:  # pragma: no cover - exercised without the extra
    raise ImportError(
        "pools of kind 'dask' need Dask distributed: pip install 'offload[dask]'"
    ) from exc

# Its constructor is untyped: called through Any.
Client: Any = _Client

if TYPE_CHECKING:
    from anyio.abc import TaskGroup

    from .._call import Call
    from .._settings import PoolSettings

__all__ = ("SCATTER_THRESHOLD", "DaskPool", "version_mismatches")

logger = logging.getLogger("offload")

#: arguments larger than this (bytes, as ``dask.sizeof`` measures them) are scattered
#: to the workers ahead of the call instead of travelling inside the task
SCATTER_THRESHOLD = 1 << 20
#: seconds to connect to a scheduler, or to start the embedded cluster
CONNECT_TIMEOUT = 60.0
#: seconds the embedded cluster's host may take to close it and exit once told to;
#: then it is killed (its workers die with it)
HOST_CLOSE_TIMEOUT = 10.0
#: seconds the background clean-up of a cancelled call (cancel, restart) may take
CANCEL_TIMEOUT = 30.0
#: packages that must be the same on the client, the scheduler and every worker:
#: they decide how tasks and results are pickled. Python is compared on major.minor.
MUST_AGREE = ("python", "cloudpickle", "dask", "distributed", "offload")


def _invoke(fn: Callable[..., Any], npos: int, names: tuple[str, ...], *values: Any) -> Any:
    """Run on a worker: call ``fn``, the original of a decorated function.

    Every argument is positional in the task, so that none of the user's keywords
    can clash with ``Client.submit``'s own (``key``, ``workers``, ``pure``...).
    """
    mark_worker_thread()  # a decorated function called in here runs inline
    if getattr(type(fn), "__offload_function__", False):
        fn = getattr(fn, "__wrapped__")  # noqa: B009
    return fn(*values[:npos], **dict(zip(names, values[npos:], strict=True)))


async def _kill_this_process() -> None:
    """Run on a worker by ``hard_cancel``: end the worker process at once. A
    coroutine function, as Dask requires of one that is run without waiting."""
    os.kill(os.getpid(), signal.SIGKILL)


def _allowed_failures(dask_scheduler: Any) -> int:
    """Run on the scheduler: how often it retries a task whose worker died."""
    return int(dask_scheduler.allowed_failures)


def _host_command(config: dict[str, Any]) -> list[str]:
    return [sys.executable, "-m", "offload._pools._dask_host", json.dumps(config)]


def _spawn_host(args: list[str], report_fd: int, settings: PoolSettings) -> subprocess.Popen[bytes]:
    """Start the embedded cluster's host (on the spawner thread): stdin a pipe that
    only we hold, the report fd its own, stdout and stderr ours; below the event loop
    from its start (``_sched.py``), as its scheduler, nannies and workers then are:
    the seconds of CPU they take to start must not compete with the event loop."""
    return start_below(args, settings, stdin=subprocess.PIPE, pass_fds=(report_fd,))


def _short(version: object, package: str) -> object:
    if package == "python" and isinstance(version, str):
        return ".".join(version.split(".")[:2])
    return version


def version_mismatches(versions: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """Compare the package versions of ``client.get_versions()``.

    :returns: ``(fatal, other)``: one line per package whose versions differ between
        the client, the scheduler and the workers; ``fatal`` for :data:`MUST_AGREE`
    """

    def packages(node: Any) -> dict[str, Any]:
        return dict(node.get("packages", {})) if isinstance(node, Mapping) else {}

    client = packages(versions.get("client"))
    scheduler = packages(versions.get("scheduler"))
    workers = {addr: packages(node) for addr, node in versions.get("workers", {}).items()}
    names = set(client) | set(scheduler)
    for worker in workers.values():
        names |= set(worker)
    fatal: list[str] = []
    other: list[str] = []
    for name in sorted(names):
        seen = {
            "client": _short(client.get(name), name),
            "scheduler": _short(scheduler.get(name), name),
        }
        for addr, worker in workers.items():
            seen[f"worker {addr}"] = _short(worker.get(name), name)
        if len(set(seen.values())) <= 1:
            continue
        line = f"{name}: " + ", ".join(
            f"{where} {'MISSING' if v is None else v}" for where, v in seen.items()
        )
        (fatal if name in MUST_AGREE else other).append(line)
    return fatal, other


def _safe_key_name(call: Call) -> str:
    name = getattr(call.target, "__name__", None) or "call"
    return re.sub(r"\W", "_", name) or "call"


class _InFlight:
    """One call between submit and outcome: what ``_abort`` needs to end it."""

    __slots__ = ("future", "scope")

    def __init__(self, scope: anyio.CancelScope) -> None:
        self.scope = scope
        self.future: Any = None


class DaskPool(Pool):
    """Calls run as Dask tasks; at most ``max_workers + max_pending`` in flight.

    ``max_workers`` is the number of worker processes of the embedded cluster; on an
    external cluster it defaults to the cluster's thread count at connection, and
    only sizes the backpressure: the scheduler decides where each task runs.
    """

    kind = "dask"

    def __init__(self, name: str, settings: PoolSettings, task_group: TaskGroup) -> None:
        super().__init__(name, settings, task_group)
        # distributed is only partly typed: its client and futures are handled as Any.
        self._client: Any = None
        # The embedded cluster's host process; None for an external cluster.
        self._host: subprocess.Popen[bytes] | None = None
        self._calls: set[_InFlight] = set()
        self._capacity = self.max_workers + settings.max_pending

    # -- lifecycle -------------------------------------------------------------

    def scheduler_address(self) -> str | None:
        """The configured scheduler: the ``address`` setting, else
        ``DASK_SCHEDULER_ADDRESS`` or Dask's ``scheduler-address`` config; ``None``
        for an embedded cluster."""
        return (
            self.settings.address
            or os.environ.get("DASK_SCHEDULER_ADDRESS")
            or dask.config.get("scheduler-address", None)
        )

    @classmethod
    def prepare(cls) -> None:
        # The embedded cluster's host is started from the spawner thread, whose
        # start (Thread.start waits for the thread to run) must not be on the loop.
        spawner().submit(int).result()
        # The client sends its package versions when it connects, and _check_cluster
        # asks for offload's: importlib.metadata reads and parses files (and imports
        # email's parser the first time), ~30 ms on the loop; distributed caches them.
        get_versions(packages=["offload"])

    async def start(self) -> None:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            raise PoolStartError(
                f"pool {self.name!r} is of kind dask, whose client runs on asyncio only; "
                "run the Offloader under asyncio, or give this pool another kind"
            ) from None
        address = self.scheduler_address()
        # An embedded cluster is processes too, whose workers import the user's modules.
        if address is None and (reason := refusal(self.name)) is not None:
            self._refuse_to_start(reason)
            return
        try:
            with anyio.fail_after(CONNECT_TIMEOUT):
                if address is None:
                    address = await self._start_host()
                self._client = await Client(
                    address,
                    asynchronous=True,
                    set_as_default=False,
                    timeout=CONNECT_TIMEOUT,
                )
                await self._check_cluster()
        except BaseException as exc:
            with anyio.CancelScope(shield=True):
                await self._stop()
            if isinstance(exc, (OSError, TimeoutError)):
                raise PoolStartError(
                    f"pool {self.name!r} could not connect to the dask scheduler "
                    f"at {address or '(embedded cluster)'}: "
                    f"{exc or f'no answer within {CONNECT_TIMEOUT:.0f} s'}"
                ) from exc
            raise
        logger.info(
            "pool %r: connected to the dask scheduler at %s (%s, %d calls in flight at most)",
            self.name,
            address,
            "external cluster"
            if self._host is None
            else f"embedded cluster in process {self._host.pid}",
            self._capacity,
        )

    async def _start_host(self) -> str:
        """Start the embedded cluster's host process; return its scheduler's address.

        Nothing here runs on the event loop for long: the fork happens on the spawner
        thread, and the address is read from a non-blocking pipe. The host is
        ``self._host`` as soon as it exists, so that ``_stop`` ends it whatever happens
        next.
        """
        report_r, report_w = os.pipe()
        try:
            config = host_config(
                n_workers=self.max_workers,
                hard_cancel=self.settings.hard_cancel,
                report_fd=report_w,
                close_timeout=HOST_CLOSE_TIMEOUT,
            )
            args = _host_command(config)
            try:
                # On the spawner thread (see _spawner.py); waited for even when
                # cancelled, so that a started host always reaches us.
                future = spawner().submit(_spawn_host, args, report_w, self.settings)
                host = self._host = await wait_future(future)
            finally:
                os.close(report_w)  # the host's copy is its own: EOF when it exits
            line = await self._read_report(host, report_r)
        finally:
            os.close(report_r)
        if not line:
            status = await self._exit_status(host)
            raise PoolStartError(
                f"pool {self.name!r}: the embedded dask cluster did not start: its host "
                f"process {host.pid} exited with status {status} (its error is on stderr)"
            )
        return str(json.loads(line)["address"])

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

    async def _check_cluster(self) -> None:
        """Refuse a cluster whose versions differ from ours; warn about retries."""
        client = self._client
        assert client is not None
        versions = await client.get_versions(check=False, packages=["offload"])
        fatal, other = version_mismatches(versions)
        if fatal:
            raise PoolStartError(
                f"pool {self.name!r}: the dask client and cluster versions do not agree; "
                "install the same versions everywhere (offload must be installed on the "
                "scheduler and the workers too):\n  " + "\n  ".join(fatal)
            )
        if other:
            logger.warning(
                "pool %r: package versions differ on the dask cluster:\n  %s",
                self.name,
                "\n  ".join(other),
            )
        if self._host is None:  # an external cluster
            if self.settings.max_workers is None:
                info = client.scheduler_info()
                self.max_workers = max(1, int(info.get("total_threads") or 0))
                self._capacity = self.max_workers + self.settings.max_pending
            try:
                retries = await client.run_on_scheduler(_allowed_failures)
            except Exception as exc:  # pickled functions refused, say
                logger.debug("pool %r: cannot read allowed-failures: %s", self.name, exc)
            else:
                if retries:
                    logger.warning(
                        "pool %r: the scheduler retries a task whose worker dies %d times "
                        "before reporting it; set DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES=0 "
                        "on the scheduler for WorkerCrashed at the first crash",
                        self.name,
                        retries,
                    )

    def _forget(self) -> None:
        # In a forked child: its copy of the host's stdin would keep the host waiting
        # for EOF once the parent closed its own (_stop_host), until this child exits.
        host, self._host = self._host, None
        if host is not None and host.stdin is not None:
            with contextlib.suppress(OSError):
                host.stdin.close()  # nothing is ever written to it: nothing to flush

    async def _stop(self) -> None:
        client, self._client = self._client, None
        host, self._host = self._host, None
        with anyio.CancelScope(shield=True):
            if client is not None:
                with anyio.move_on_after(CONNECT_TIMEOUT):
                    await client.close()
            if host is not None:
                await self._stop_host(host)

    async def _stop_host(self, host: subprocess.Popen[bytes]) -> None:
        """Close the host's stdin, its signal to close the cluster and exit; wait for
        that in a thread, and kill it past the time it may take. Its workers die
        with it in any case (see ``_dask_host``)."""
        if host.stdin is not None:
            with contextlib.suppress(OSError):
                host.stdin.close()
        try:
            status = await run_in_helper_thread(host.wait, HOST_CLOSE_TIMEOUT + 5.0)
        except subprocess.TimeoutExpired:
            logger.warning(
                "pool %r: the embedded dask cluster's host process %d did not exit "
                "within %.0f s: killed",
                self.name,
                host.pid,
                HOST_CLOSE_TIMEOUT + 5.0,
            )
            host.kill()
            status = await run_in_helper_thread(host.wait)
        if status not in (0, -signal.SIGKILL):
            logger.warning(
                "pool %r: the embedded dask cluster's host process %d exited with status %d",
                self.name,
                host.pid,
                status,
            )

    def _abort(self) -> None:
        self._forced = True
        for entry in list(self._calls):
            entry.scope.cancel()

    def _occupancy(self) -> tuple[int, int, int]:
        workers = self.max_workers
        if self._client is not None:
            threads = self._client.scheduler_info().get("total_threads")
            if isinstance(threads, int) and threads > 0:
                workers = threads
        inflight = len(self._calls)
        busy = min(inflight, workers)  # an estimate: only the scheduler knows
        return workers, busy, inflight - busy

    # -- calls -----------------------------------------------------------------

    async def _execute(self, call: Call) -> Any:
        if self._forced or self._client is None:
            raise self._closed_error()
        if len(self._calls) >= self._capacity:
            raise PoolOverloaded(
                f"pool {self.name!r} is full: {self._capacity} calls are in flight "
                f"on the dask cluster (max_workers + max_pending)"
            )
        client = self._client
        entry = _InFlight(anyio.CancelScope())
        self._calls.add(entry)
        scattered: list[Any] = []
        try:
            with entry.scope:
                values = [*call.args, *call.kwargs.values()]
                scattered = await self._scatter_large(client, values)
                try:
                    entry.future = client.submit(
                        _invoke,
                        call.fn,
                        len(call.args),
                        tuple(call.kwargs),
                        *values,
                        key=f"{_safe_key_name(call)}-{uuid.uuid4().hex}",
                        pure=False,
                        retries=0,
                    )
                except Exception as exc:
                    raise SerializationError(
                        f"cannot send {call.name} or its arguments to the dask cluster: {exc}"
                    ) from exc
                return await self._outcome(call, entry.future)
            raise self._closed_error()  # the scope was cancelled by _abort
        except BaseException:
            future = entry.future
            if future is not None and not future.done():
                self._task_group.start_soon(self._stop_remote, future, call)
            raise
        finally:
            self._calls.discard(entry)
            for future in scattered:
                future.release()

    async def _scatter_large(self, client: Any, values: list[Any]) -> list[Any]:
        """Replace the large values in ``values`` by futures of data on the workers."""
        large = [i for i, value in enumerate(values) if sizeof(value) > SCATTER_THRESHOLD]
        if not large:
            return []
        # In a list, so that a list or dict argument is scattered whole, not by item.
        futures: list[Any] = await client.scatter([values[i] for i in large], hash=False)
        for i, future in zip(large, futures, strict=True):
            values[i] = future
        return futures

    async def _outcome(self, call: Call, future: Any) -> Any:
        try:
            return await future
        except Exception as exc:
            status = future.status
            if isinstance(exc, KilledWorker):
                worker = getattr(getattr(exc, "last_worker", None), "address", "?")
                logger.error(
                    "pool %r: dask worker %s died while running %s", self.name, worker, call.name
                )
                raise WorkerCrashed(f"the dask worker {worker} running {call.name} died") from None
            if status == "error":  # the function raised: its own exception, as is
                tb = await future.traceback()
                text = "".join(traceback.format_exception(type(exc), exc, tb))
                raise exc from RemoteTraceback(text)
            if isinstance(exc, FutureCancelledError):
                if self._forced:
                    raise self._closed_error() from None
                raise WorkerCrashed(
                    f"{call.name} was lost on the dask cluster (cancelled: {exc.reason})"
                ) from exc
            if isinstance(exc, (CommClosedError, OSError)):
                raise WorkerCrashed(
                    f"lost contact with the dask cluster while running {call.name}: {exc}"
                ) from exc
            if status == "finished":  # it ran; its result did not travel back
                raise SerializationError(
                    f"the result of {call.name} cannot be sent back from the dask worker: {exc}"
                ) from exc
            raise

    async def _stop_remote(self, future: Any, call: Call) -> None:
        """Cancel a call whose caller left; with hard_cancel, restart its worker."""
        client = self._client
        if client is None:
            return
        with anyio.CancelScope(shield=True), anyio.move_on_after(CANCEL_TIMEOUT):
            try:
                worker = None
                if self.settings.hard_cancel:
                    processing = await client.processing()
                    worker = next(
                        (addr for addr, keys in processing.items() if future.key in keys), None
                    )
                await client.cancel([future])
                if worker is not None:
                    await self._restart_worker(client, worker, call)
            except Exception as exc:
                logger.warning(
                    "pool %r: could not cancel %s on the dask cluster: %s",
                    self.name,
                    call.name,
                    exc,
                )

    async def _restart_worker(self, client: Any, worker: str, call: Call) -> None:
        logger.info(
            "pool %r: restarting dask worker %s running %s (%s)",
            self.name,
            worker,
            call.name,
            "deadline passed" if anyio.current_time() >= call.deadline else "cancelled",
        )
        self.counters.recycled += 1
        # The worker kills itself from its event loop, which is free while the task
        # runs in its thread; its nanny starts a new one. The same on the embedded
        # cluster, whose workers are children of its host, not of this process.
        # (Dask's own restart_workers first waits up to 4 s for the task to end.)
        await client.run(_kill_this_process, workers=[worker], wait=False)
