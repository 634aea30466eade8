"""A dask pool's client and its connection to the scheduler: connecting (and refusing a
cluster whose versions differ), the tasks' "started" events, and outages: a scheduler
that is gone, or that does not answer, fails calls at once until it is back."""

from __future__ import annotations

import logging
import os
import time
import uuid
from abc import abstractmethod
from typing import TYPE_CHECKING, Any

import anyio
import dask.config
from dask.utils import parse_timedelta
from distributed import Client as _Client
from distributed.security import Security as _Security

from ..._errors import ClusterUnavailable, PoolStartError
from ..base import Pool
from .task import allowed_failures
from .versions import version_mismatches

if TYPE_CHECKING:
    from anyio.abc import TaskGroup

    from ..._settings import PoolSettings
    from .embedded import EmbeddedCluster

__all__ = ("CANCEL_TIMEOUT", "CONNECT_TIMEOUT", "DaskConnection")

logger = logging.getLogger("offload")

# Their constructors are untyped: called through Any.
Client: Any = _Client
Security: Any = _Security

#: seconds to connect to a scheduler, or to start the embedded cluster
CONNECT_TIMEOUT = 60.0
#: seconds the background clean-up of a cancelled call (cancel, restart) may take
CANCEL_TIMEOUT = 30.0
#: seconds between two attempts to connect again to a scheduler that is gone
RECONNECT_INTERVAL = 1.0
#: seconds between two questions to the scheduler, at most (see ``_watch_scheduler``)
PING_INTERVAL = 5.0


class DaskConnection(Pool):
    """The part of :class:`~.pool.DaskPool` that holds its client: what the calls
    (:mod:`.calls`) and the pool's start and stop (:mod:`.pool`) build on."""

    def __init__(self, name: str, settings: PoolSettings, task_group: TaskGroup) -> None:
        super().__init__(name, settings, task_group)
        # distributed is only partly typed: its client and futures are handled as Any.
        self._client: Any = None
        self._address: str | None = None
        # The embedded cluster; None for an external cluster, whose client reads its
        # credentials from Dask's configuration.
        self._embedded: EmbeddedCluster | None = None
        self._capacity = self.max_workers + settings.max_pending
        # The tasks' "started" events (see task.report_start): their topic, the
        # stream to the scheduler that carries our subscription, and the keys in
        # flight, with when their event came (time.perf_counter(); 0.0: not yet).
        self._topic = f"offload-started-{uuid.uuid4().hex}"
        self._subscribed: Any = None
        self._task_started: dict[str, float] = {}
        self._reconnecting: anyio.CancelScope | None = None
        self._watching = anyio.CancelScope()
        # Why calls are refused while the scheduler keeps its connections open but
        # does not answer; None when it answers.
        self._silent: str | None = None

    def scheduler_address(self) -> str | None:
        """The configured scheduler: the ``address`` setting, else
        ``DASK_SCHEDULER_ADDRESS`` or Dask's ``scheduler-address`` config; ``None``
        for an embedded cluster."""
        return (
            self.settings.address
            or os.environ.get("DASK_SCHEDULER_ADDRESS")
            or dask.config.get("scheduler-address", None)
        )

    @abstractmethod
    def _end_calls(self, lost: str | None) -> None:
        """End every call in flight at once: with :class:`ClusterUnavailable` for
        ``lost``, the scheduler's silence; with ``None``, the pool forced shut."""

    # -- connecting -----------------------------------------------------------------

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
        embedded = self._embedded
        client = await Client(
            self._address,
            asynchronous=True,
            set_as_default=False,
            security=None if embedded is None else embedded.security,
        )
        self._subscribe(client)
        await self._forward_logs(client)
        return client

    async def _forward_logs(self, client: Any) -> None:
        """With ``forward_logs``, ask Dask to forward what its workers' root loggers
        handle to this process, where each record goes to the logger of its name
        (``Client.forward_logging``: a worker plugin, and a subscription of this client
        to its topic). Refused, the pool runs on: its records stay in the workers."""
        if not self.settings.forward_logs:
            return
        try:
            await client.forward_logging()
        except Exception as exc:  # plugins refused by the cluster, say
            logger.warning(
                "pool %r: cannot forward the dask workers' log records: %s; they stay "
                "in the workers",
                self.name,
                exc,
            )

    def _subscribe(self, client: Any) -> None:
        # A client that reconnects by itself does not subscribe again: we do, on
        # the new stream, ahead of the next task.
        client.subscribe_topic(self._topic, self._on_started)
        self._subscribed = client.scheduler_comm

    def _on_started(self, event: tuple[float, Any]) -> None:
        key = event[1]
        if key in self._task_started:
            self._task_started[key] = time.perf_counter()

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
        if self._embedded is None:  # an external cluster
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

    # -- outages --------------------------------------------------------------------

    def _ready_client(self) -> Any:
        """The client, if it is connected to its scheduler; else an error at once,
        never a wait: an outage lasts as long as it lasts."""
        client = self._client
        if self._forced or client is None:
            raise self._closed_error()
        if self._embedded is not None and (gone := self._embedded.gone()) is not None:
            raise ClusterUnavailable(gone)
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
            # Neither is the forwarding's subscription made again; nor its plugin,
            # should the scheduler be a new one.
            self._task_group.start_soon(self._forward_logs, client)
        return client

    async def _watch_scheduler(self, scope: anyio.CancelScope) -> None:
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
        self._end_calls(f"{message}; a call in flight may have run")

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
