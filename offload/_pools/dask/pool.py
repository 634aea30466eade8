"""The dask pool: its start (connecting to a scheduler, or first starting the embedded
cluster), its stop, and its occupancy. The package's docstring draws how a call
travels; :mod:`.calls` runs calls, over the client of :mod:`.connection`."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

import anyio

try:  # distributed first: the modules below need it, and a missing extra says so
    from distributed.versions import get_versions
except ImportError as exc:  # pragma: no cover - exercised without the extra
    raise ImportError(
        "pools of kind 'dask' need Dask distributed: pip install 'offload[dask]'"
    ) from exc

from ..._errors import PoolStartError
from ..process.nested_pools import refusal
from .calls import SCATTER_THRESHOLD, DaskCalls
from .connection import CONNECT_TIMEOUT
from .embedded import EmbeddedCluster
from .streams import open_stream

if TYPE_CHECKING:
    from ..._call import Call
    from ..base import StreamSource

__all__ = ("SCATTER_THRESHOLD", "DaskPool")

logger = logging.getLogger("offload")


class DaskPool(DaskCalls):
    """Calls run as Dask tasks; at most ``max_workers + max_pending`` in flight.

    ``max_workers`` is the number of worker processes of the embedded cluster; on an
    external cluster it defaults to the cluster's thread count at connection, and
    only sizes the backpressure: the scheduler decides where each task runs.
    """

    kind = "dask"

    @classmethod
    def prepare(cls) -> None:
        EmbeddedCluster.prepare()
        # The client sends its package versions when it connects, and _check_cluster
        # asks for offload's: importlib.metadata reads and parses files (and imports
        # email's parser the first time), which would hold the loop (docs/benchmarks.md,
        # "Figures behind the code"); distributed caches them.
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
                    # Ours as soon as it exists, so that _stop ends it whatever happens.
                    embedded = self._embedded = EmbeddedCluster(
                        self.name, self.settings, self.max_workers
                    )
                    await embedded.start()
                    address = embedded.address
                self._address = address
                self._client = await self._connect()
                await self._check_cluster()
            self._task_group.start_soon(self._watch_scheduler, self._watching)
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
        host = None if self._embedded is None else self._embedded.process
        logger.info(
            "pool %r: connected to the dask scheduler at %s (%s, %d calls in flight at most)",
            self.name,
            address,
            "external cluster" if host is None else f"embedded cluster in process {host.pid}",
            self._capacity,
        )

    def _forget(self) -> None:
        embedded, self._embedded = self._embedded, None
        if embedded is not None:
            embedded.forget()

    async def _stop(self) -> None:
        self._watching.cancel()
        if self._reconnecting is not None:
            self._reconnecting.cancel()
        with anyio.CancelScope(shield=True):
            # Before the client closes: a stream's task that still runs finds its
            # queue gone at its next put, and ends.
            for source in list(self._streams):
                await source.delete()
        client, self._client = self._client, None
        embedded, self._embedded = self._embedded, None
        with anyio.CancelScope(shield=True):
            if client is not None:
                with anyio.move_on_after(CONNECT_TIMEOUT):
                    await client.close()
            if embedded is not None:
                await embedded.stop()

    async def _open_stream(self, call: Call, buffer: int) -> StreamSource:
        return await open_stream(self, call, buffer)

    def _abort(self) -> None:
        self._forced = True
        self._end_calls(None)
        for entry in list(self._calls):
            if entry.stream is not None:
                # Its queue deleted, the generator is closed at its next put; the
                # stream is over for the drain now: its consumer may never ask for
                # an item again (and gets PoolClosed if it does).
                entry.stream.finish()
                self.end_stream(entry.stream, self._closed_error())

    def _occupancy(self) -> tuple[int, int, int]:
        workers = self.max_workers
        if self._client is not None:
            threads = self._client.scheduler_info().get("total_threads")
            if isinstance(threads, int) and threads > 0:
                workers = threads
        inflight = len(self._calls)
        busy = min(inflight, workers)  # an estimate: only the scheduler knows
        return workers, busy, inflight - busy
