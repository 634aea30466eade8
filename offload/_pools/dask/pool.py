"""The dask pool: calls run as tasks on a Dask distributed cluster.

::

    caller task ── pickle the call (fn, arguments) into one blob
        ├─ scatter large arguments (one round trip, only when there are some)
        ├─ client.submit(invoke, topic, key, blob, ...) ──> scheduler ──> a worker:
        │      invoke (_dask_task) logs "key started" on the scheduler, unpickles
        │      the blob, runs it
        └─ await the future <── scheduler: "started" event, then done ── the result
    cancelled or past its deadline: the future is cancelled in the background; with
    hard_cancel, the worker running it is restarted too
    its worker died before it started (it waited there behind another task): sent again

The asynchronous client lives on the Offloader's event loop: it is created in
:meth:`DaskPool.start` and closed in :meth:`DaskPool._stop`. With no scheduler address
the pool first starts an embedded ``LocalCluster`` of ``max_workers`` single-threaded
worker processes on 127.0.0.1 in a host process of its own (``_dask_host``), so that
its scheduler and nannies never run on the application's event loop; the client then
connects to it by address, as to any cluster, and the host stops with the pool::

    application (event loop: the client) ── stdin, report fd ──> host process
                                                                  (scheduler, nannies)
                                                                   └─> worker processes

The embedded cluster speaks TLS with a certificate made for it at start, which the
host hands to the pool through the report pipe: no other client gets in.

Failures are mapped at one place, :meth:`DaskPool._outcome`; the scheduler gone (or
the embedded host) is :class:`ClusterUnavailable`, at once, never a wait: while the
client is not connected, calls are refused, and once Dask's client has given up
reconnecting (after its connect timeout), the pool connects a new one in the
background.

What Dask cannot do, and what the pool does instead (see docs/dask.md):

- a running task cannot be interrupted: cancelling its future only drops its result;
  ``hard_cancel`` restarts the worker process running it;
- a task whose worker dies is retried elsewhere up to the scheduler's
  ``allowed-failures`` times: the embedded cluster allows none, so a crash reaches the
  caller at once as :class:`WorkerCrashed`; an external scheduler is the operator's,
  and the pool warns at start when it retries;
- a worker is handed more tasks than it has threads, and when it dies the scheduler
  fails them all alike: the "started" events tell the pool which of them ran, and
  it sends the others again;
- a worker that cannot unpickle a task breaks its connection to the scheduler: the
  call travels pickled inside the task, and is unpickled by the task itself
  (``_dask_task.invoke``), where a missing module fails that call alone.

This module is imported only when a pool of kind dask starts; Dask workers import
``_dask_task``, whose :func:`invoke` they unpickle by reference. Nothing else
imports distributed.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import logging
import os
import re
import signal
import subprocess
import traceback
import uuid
from typing import TYPE_CHECKING, Any

import anyio
import cloudpickle

from ..._errors import (
    ClusterUnavailable,
    PoolOverloaded,
    PoolStartError,
    RemoteTraceback,
    SerializationError,
    WorkerCrashed,
)
from ..._helper_threads import run_in_helper_thread
from ..base import Pool
from ..process.nesting import refusal
from ..process.sched import start_below
from ..process.spawner import spawner, wait_future
from .host import host_command as _host_command
from .host import host_config
from .task import CannotLoad, Unannounced, allowed_failures, invoke, kill_this_process
from .versions import version_mismatches

try:
    import dask.config
    from dask.sizeof import sizeof
    from dask.utils import parse_timedelta
    from distributed import Client as _Client
    from distributed import scheduler as _scheduler
    from distributed.client import ClosedClientError, FutureCancelledError
    from distributed.comm.core import CommClosedError
    from distributed.scheduler import KilledWorker
    from distributed.security import Security as _Security
    from distributed.versions import get_versions
except ImportError as exc:  # pragma: no cover - exercised without the extra
    raise ImportError(
        "pools of kind 'dask' need Dask distributed: pip install 'offload[dask]'"
    ) from exc

#: what the scheduler fails a task with when no worker could take it for its
#: ``no-workers-timeout`` (the first is newer than the oldest distributed we support)
_NO_WORKER: tuple[type[Exception], ...] = tuple(
    cls
    for cls in (
        getattr(_scheduler, "NoWorkerError", None),
        getattr(_scheduler, "NoValidWorkerError", None),
    )
    if cls is not None
)

# Their constructors are untyped: called through Any.
Client: Any = _Client
Security: Any = _Security

if TYPE_CHECKING:
    from anyio.abc import TaskGroup

    from ..._call import Call
    from ..._settings import PoolSettings

__all__ = ("SCATTER_THRESHOLD", "DaskPool")

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
#: seconds between two attempts to connect again to a scheduler that is gone
RECONNECT_INTERVAL = 1.0
#: seconds between two questions to the scheduler, at most (see DaskPool._watch)
PING_INTERVAL = 5.0


def _spawn_host(args: list[str], report_fd: int, settings: PoolSettings) -> subprocess.Popen[bytes]:
    """Start the embedded cluster's host (on the spawner thread): stdin a pipe that
    only we hold, the report fd its own, stdout and stderr ours; below the event loop
    from its start (``process/sched.py``), as its scheduler, nannies and workers then are:
    the seconds of CPU they take to start must not compete with the event loop."""
    return start_below(args, settings, stdin=subprocess.PIPE, pass_fds=(report_fd,))


def _safe_key_name(call: Call) -> str:
    name = getattr(call.target, "__name__", None) or "call"
    return re.sub(r"\W", "_", name) or "call"


class _Credentials(_Security):
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


class _InFlight:
    """One call between submit and outcome: what ``_abort`` needs to end it."""

    __slots__ = ("future", "lost", "scope")

    def __init__(self, scope: anyio.CancelScope) -> None:
        self.scope = scope
        self.future: Any = None
        # Why the scope was cancelled, when it was not a shutdown.
        self.lost: ClusterUnavailable | None = None


#: what an attempt returns when its worker died before the task started
_NEVER_STARTED = object()


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
        self._address: str | None = None
        # The embedded cluster's credentials; None for an external cluster, whose
        # client reads them from Dask's configuration.
        self._security: Any = None
        # The embedded cluster's host process; None for an external cluster.
        self._host: subprocess.Popen[bytes] | None = None
        self._calls: set[_InFlight] = set()
        self._capacity = self.max_workers + settings.max_pending
        # The tasks' "started" events (see _dask_task.say_started): their topic, the stream
        # to the scheduler that carries our subscription, and the keys in flight,
        # True once started.
        self._topic = f"offload-started-{uuid.uuid4().hex}"
        self._subscribed: Any = None
        self._attempts: dict[str, bool] = {}
        self._reconnecting: anyio.CancelScope | None = None
        self._watching = anyio.CancelScope()
        # Why calls are refused while the scheduler keeps its connections open but
        # does not answer; None when it answers.
        self._silent: str | None = None

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

    #: whether ``cryptography`` can be imported, which the embedded cluster's TLS
    #: certificate needs (``prepare`` looks)
    _can_certify = True

    @classmethod
    def prepare(cls) -> None:
        cls._can_certify = importlib.util.find_spec("cryptography") is not None
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
        if address is not None:
            self._refuse_tls_without_credentials(address)
        try:
            with anyio.fail_after(CONNECT_TIMEOUT):
                if address is None:
                    address = await self._start_host()
                self._address = address
                self._client = await self._connect()
                await self._check_cluster()
            self._task_group.start_soon(self._watch, self._watching)
        except BaseException as exc:
            with anyio.CancelScope(shield=True):
                await self._stop()
            if isinstance(exc, PoolStartError) or not isinstance(exc, Exception):
                raise
            where = address or "(embedded cluster)"
            if isinstance(exc, (OSError, TimeoutError)):
                raise PoolStartError(
                    f"pool {self.name!r} could not connect to the dask scheduler "
                    f"at {where}: {exc or f'no answer within {CONNECT_TIMEOUT:.0f} s'}"
                ) from exc
            raise PoolStartError(
                f"pool {self.name!r} could not start its dask client for {where}: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        logger.info(
            "pool %r: connected to the dask scheduler at %s (%s, %d calls in flight at most)",
            self.name,
            address,
            "external cluster"
            if self._host is None
            else f"embedded cluster in process {self._host.pid}",
            self._capacity,
        )

    def _refuse_tls_without_credentials(self, address: str) -> None:
        """distributed fails a ``tls://`` address without TLS settings with a bare
        TypeError (no ``ssl_context``): say what to set instead."""
        if not address.startswith("tls://"):
            return
        tls = Security().get_tls_config_for_role("client")
        if tls["ca_file"] and tls["cert"]:
            return
        raise PoolStartError(
            f"pool {self.name!r}: the scheduler address {address} asks for TLS, but "
            "Dask's configuration gives the client no certificate: set "
            "DASK_DISTRIBUTED__COMM__TLS__CA_FILE, DASK_DISTRIBUTED__COMM__TLS__CLIENT__CERT "
            "and DASK_DISTRIBUTED__COMM__TLS__CLIENT__KEY (distributed.comm.tls in Dask's "
            "configuration), or use the tcp:// address"
        )

    async def _connect(self) -> Any:
        """A client of ``self._address``, subscribed to its tasks' "started" events.
        It waits for the scheduler, and later reconnects to it, for Dask's connect
        timeout (``distributed.comm.timeouts.connect``, 30 s by default)."""
        client = await Client(
            self._address, asynchronous=True, set_as_default=False, security=self._security
        )
        self._subscribe(client)
        return client

    def _subscribe(self, client: Any) -> None:
        # A client that reconnects by itself does not subscribe again: we do, on
        # the new stream, ahead of the next task.
        client.subscribe_topic(self._topic, self._on_started)
        self._subscribed = client.scheduler_comm

    def _on_started(self, event: tuple[float, Any]) -> None:
        key = event[1]
        if key in self._attempts:
            self._attempts[key] = True

    async def _start_host(self) -> str:
        """Start the embedded cluster's host process; return its scheduler's address.

        Nothing here runs on the event loop for long: the fork happens on the spawner
        thread, and the address is read from a non-blocking pipe. The host is
        ``self._host`` as soon as it exists, so that ``_stop`` ends it whatever happens
        next.
        """
        if not self._can_certify:
            raise PoolStartError(
                f"pool {self.name!r}: the embedded dask cluster needs the cryptography "
                "package for its TLS certificate: pip install 'offload[dask]'"
            )
        report_r, report_w = os.pipe()
        try:
            config = host_config(
                n_workers=self.max_workers,
                report_fd=report_w,
                close_timeout=HOST_CLOSE_TIMEOUT,
            )
            args = _host_command(config)
            try:
                # On the spawner thread (see process/spawner.py); waited for even when
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
        report = json.loads(line)
        # The cluster accepts only clients with its certificate (see _dask_host).
        security = _Credentials(
            require_encryption=True,
            tls_ca_file=report["ca"],
            tls_client_cert=report["cert"],
            tls_client_key=report["key"],
        )
        security.args = await run_in_helper_thread(
            _Security.get_connection_args, security, "client"
        )
        self._security = security
        return str(report["address"])

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
                retries = await client.run_on_scheduler(allowed_failures)
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
        self._watching.cancel()
        if self._reconnecting is not None:
            self._reconnecting.cancel()
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

    def _ready_client(self) -> Any:
        """The client, if it is connected to its scheduler; else an error at once,
        never a wait: an outage lasts as long as it lasts."""
        client = self._client
        if self._forced or client is None:
            raise self._closed_error()
        host = self._host
        if host is not None and host.poll() is not None:
            raise ClusterUnavailable(
                f"pool {self.name!r}: the embedded dask cluster is gone: its host process "
                f"{host.pid} exited with status {host.returncode}; restart the Offloader"
            )
        if self._silent is not None:
            raise ClusterUnavailable(self._silent)
        if client.status != "running":
            if client.status in ("closing", "closed"):
                self._reconnect_soon()
            raise ClusterUnavailable(
                f"pool {self.name!r}: the dask scheduler at {self._address} cannot be "
                f"reached (the client is {client.status}); calls fail at once until "
                "the pool is connected again"
            )
        if client.scheduler_comm is not self._subscribed:
            self._subscribe(client)  # it reconnected by itself
        return client

    async def _watch(self, scope: anyio.CancelScope) -> None:
        """Ask the scheduler who it is every few seconds. One that keeps its
        connections open but does not answer within Dask's TCP timeout
        (``distributed.comm.timeouts.tcp``, 30 s by default: a frozen process, or
        one stuck for that long) is taken as gone: the calls in flight fail with
        :class:`ClusterUnavailable`, and new ones at once, until it answers again.
        Dask's client would wait for it for ever: the kernel of a stopped process
        still acknowledges what is sent to it, so no TCP timeout ever fires."""
        timeout = float(parse_timedelta(dask.config.get("distributed.comm.timeouts.tcp")))
        interval = min(PING_INTERVAL, timeout / 4)
        with scope:
            while True:
                await anyio.sleep(interval)
                client = self._client
                if client is None or client.status != "running":
                    continue
                try:
                    with anyio.fail_after(timeout):
                        await client.scheduler.identity(n_workers=0)
                except TimeoutError:
                    if self._silent is None:
                        self._went_silent(timeout)
                except Exception as exc:  # lost: the client's own reconnection handles it
                    logger.debug("pool %r: asking the scheduler: %s", self.name, exc)
                else:
                    if self._silent is not None:
                        logger.warning(
                            "pool %r: the dask scheduler at %s answers again",
                            self.name,
                            self._address,
                        )
                        self._silent = None

    def _went_silent(self, timeout: float) -> None:
        message = (
            f"pool {self.name!r}: the dask scheduler at {self._address} has not answered "
            f"for {timeout:g} s (distributed.comm.timeouts.tcp); calls fail at once "
            "until it answers again"
        )
        logger.error("%s", message)
        self._silent = message
        for entry in list(self._calls):
            entry.lost = ClusterUnavailable(f"{message}; a call in flight may have run")
            entry.scope.cancel()

    def _reconnect_soon(self) -> None:
        if self._reconnecting is None and not self._closing:
            self._reconnecting = anyio.CancelScope()
            self._task_group.start_soon(self._reconnect, self._reconnecting)

    async def _reconnect(self, scope: anyio.CancelScope) -> None:
        """Connect a new client once the scheduler is back: Dask's own client gives
        up after its connect timeout, and stays closed for good."""
        logger.warning(
            "pool %r: lost the dask scheduler at %s; reconnecting", self.name, self._address
        )
        try:
            with scope:
                while True:
                    try:
                        with anyio.fail_after(CONNECT_TIMEOUT):
                            client = await self._connect()
                    except (OSError, TimeoutError) as exc:
                        logger.debug("pool %r: reconnecting: %s", self.name, exc)
                        await anyio.sleep(RECONNECT_INTERVAL)
                        continue
                    old, self._client = self._client, client
                    logger.warning(
                        "pool %r: connected again to the dask scheduler at %s",
                        self.name,
                        self._address,
                    )
                    if old is not None:
                        with anyio.CancelScope(shield=True), anyio.move_on_after(CANCEL_TIMEOUT):
                            await old.close()
                    return
        finally:
            self._reconnecting = None

    async def _execute(self, call: Call) -> Any:
        self._ready_client()
        if len(self._calls) >= self._capacity:
            raise PoolOverloaded(
                f"pool {self.name!r} is full: {self._capacity} calls are in flight "
                f"on the dask cluster (max_workers + max_pending)"
            )
        entry = _InFlight(anyio.CancelScope())
        self._calls.add(entry)
        try:
            with entry.scope:
                blob, large = self._pickle(call)
                while True:
                    outcome = await self._attempt(call, entry, blob, large)
                    if outcome is not _NEVER_STARTED:
                        return outcome
                    logger.info(
                        "pool %r: %s never started on a dask worker that died: sent again",
                        self.name,
                        call.name,
                    )
            if entry.lost is not None:  # the scope was cancelled by _went_silent
                raise entry.lost
            raise self._closed_error()  # the scope was cancelled by _abort
        except BaseException:
            future = entry.future
            if future is not None and not future.done():
                self._task_group.start_soon(self._stop_remote, future, call)
            raise
        finally:
            self._calls.discard(entry)

    @staticmethod
    def _pickle(call: Call) -> tuple[bytes, list[Any]]:
        """The call pickled for :func:`~._dask_task.invoke`, its large arguments apart (they are
        scattered to the workers ahead of the task)."""
        values = [*call.args, *call.kwargs.values()]
        holes = tuple(i for i, value in enumerate(values) if sizeof(value) > SCATTER_THRESHOLD)
        large = [values[i] for i in holes]
        for i in holes:
            values[i] = None
        try:
            blob = cloudpickle.dumps((call.fn, len(call.args), tuple(call.kwargs), values, holes))
        except Exception as exc:
            raise SerializationError(
                f"cannot send {call.name} or its arguments to the dask cluster: {exc}"
            ) from exc
        return blob, large

    async def _attempt(self, call: Call, entry: _InFlight, blob: bytes, large: list[Any]) -> Any:
        """Send the call as one task; its outcome, or ``_NEVER_STARTED``."""
        client = self._ready_client()
        key = f"{_safe_key_name(call)}-{uuid.uuid4().hex}"
        scattered: list[Any] = []
        self._attempts[key] = False
        try:
            if large:
                try:
                    # In a list, so that a list or dict argument is scattered whole.
                    scattered = await client.scatter(large, hash=False)
                except (OSError, ClosedClientError) as exc:
                    raise self._unavailable(call, exc) from exc
            try:
                entry.future = client.submit(
                    invoke,
                    self._topic,
                    key,
                    blob,
                    *scattered,
                    key=key,
                    pure=False,
                    retries=0,
                )
            except ClosedClientError as exc:
                raise self._unavailable(call, exc) from exc
            return await self._outcome(call, client, entry.future)
        finally:
            del self._attempts[key]
            for future in scattered:
                future.release()

    def _unavailable(self, call: Call, exc: BaseException) -> ClusterUnavailable:
        return ClusterUnavailable(
            f"pool {self.name!r} lost the dask scheduler at {self._address} "
            f"while running {call.name} (it may have run): {exc}"
        )

    async def _outcome(self, call: Call, client: Any, future: Any) -> Any:
        try:
            return await future
        except Exception as exc:
            status = future.status
            if isinstance(exc, KilledWorker):
                if not await self._started(client, future.key):
                    return _NEVER_STARTED
                worker = getattr(getattr(exc, "last_worker", None), "address", "?")
                logger.error(
                    "pool %r: dask worker %s died while running %s", self.name, worker, call.name
                )
                raise WorkerCrashed(f"the dask worker {worker} running {call.name} died") from None
            if status == "error" and isinstance(exc, CannotLoad):
                raise SerializationError(
                    f"the dask worker cannot load {call.name} or its arguments: {exc}; "
                    "install the module on the workers (docs/dask.md, "
                    '"Ship your code to the cluster")'
                ) from None
            if status == "error" and isinstance(exc, Unannounced):
                raise ClusterUnavailable(
                    f"pool {self.name!r}: the dask worker could not reach the scheduler "
                    f"to start {call.name}, which did not run: {exc}"
                ) from None
            if status == "error" and isinstance(exc, _NO_WORKER):
                raise ClusterUnavailable(
                    f"pool {self.name!r}: the dask cluster has no worker that could run "
                    f"{call.name} within the scheduler's no-workers-timeout: {exc}"
                ) from None
            if status == "error":  # the function raised: its own exception, as is
                tb = await future.traceback()
                text = "".join(traceback.format_exception(type(exc), exc, tb))
                raise exc from RemoteTraceback(text)
            if isinstance(exc, FutureCancelledError):
                if self._forced:
                    raise self._closed_error() from None
                if exc.reason == "scheduler-connection-lost":
                    raise self._unavailable(call, exc) from exc
                raise WorkerCrashed(
                    f"{call.name} was lost on the dask cluster (cancelled: {exc.reason})"
                ) from exc
            if isinstance(exc, (CommClosedError, OSError, ClosedClientError)):
                raise self._unavailable(call, exc) from exc
            if status == "finished":  # it ran; its result did not travel back
                raise SerializationError(
                    f"the result of {call.name} cannot be sent back from the dask worker: {exc}"
                ) from exc
            raise

    async def _started(self, client: Any, key: str) -> bool:
        """Whether the task ``key`` started before its worker died: its event came
        with the task's reports; else the scheduler's log of the topic says (it
        keeps the last ``distributed.admin.low-level-log-length`` events). In doubt,
        it started: a call is never run twice."""
        if self._attempts.get(key):
            return True
        try:
            with anyio.fail_after(CANCEL_TIMEOUT):
                events = await client.get_events(self._topic)
        except Exception:
            return True
        return any(msg == key for _, msg in events)

    async def _stop_remote(self, future: Any, call: Call) -> None:
        """Cancel a call whose caller left; with hard_cancel, restart its worker."""
        # The client that submitted it: after a reconnection, not the pool's.
        client = future.client
        if self._client is None or client.status != "running" or self._silent is not None:
            return  # no answer to wait for: the future, released, frees the task later
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
        await client.run(kill_this_process, workers=[worker], wait=False)
