"""A dask pool's streams: a generator run by one task (``stream_task.stream``), its
items carried to the consumer through a queue on the scheduler (Dask's ``Queue``
extension), with three events there as bells (Dask's ``Event`` extension): "items"
(the task put one), "room" (the consumer took one) and "stop" (the consumer left)::

    consumer (application's loop)        scheduler           worker: stream_task
    queue_create(name)             ──>   queue
    submit(stream, ...)            ──>                 ──>   before each item:
                                                               stop set? released? end
                                                               no room? ask the size;
                                                               still none: wait "room"
    queue_qsize, queue_get (one)   <──   [ITEM, b] ... <──   queue_put, ring "items"
      ring "room"                                            at the end: [END, None]
      empty: clear "items", ask the size again, wait "items"
    [END]: await the task's future <──   its outcome (None, or the generator's error)

What is bounded: the task is the queue's only producer and counts what it put; it
asks the generator for an item only when the queue holds fewer than ``buffer``
records, so it runs at most ``buffer`` items ahead of its consumer, which takes one
record at a time (what it has not taken stays in the queue, counted).

No put or get waits on the scheduler: each is made when the queue's size says it
will not wait. A waiting put or get would wait in its handler there, which logs its
timeout as an error, is not cancelled when its caller leaves, and waits for ever on
a queue deleted meanwhile. The waits are on the events instead, ``GET_WAIT`` /
``stream_task.PUT_WAIT`` seconds at a time: a wait that times out returns False.
Between two waits, the consumer looks at the task's future: a worker that died is
noticed within ``GET_WAIT`` seconds.

Closing early sets "stop" and rings "room": the task sees it before its next item,
closes the generator (its ``finally`` runs in the worker) and ends. The queue and the
events are deleted once the task is over (whichever of the task and the consumer
comes last finds nothing left), or at the pool's stop.
"""

from __future__ import annotations

import collections
import logging
import uuid
from typing import TYPE_CHECKING, Any

import anyio
from distributed.client import ClosedClientError

from ..._errors import PoolOverloaded, unpickle
from ..base import StreamSource
from .calls import _NEVER_STARTED, CallInFlight, _task_key
from .connection import CANCEL_TIMEOUT
from .stream_task import ITEM, stream

if TYPE_CHECKING:
    from ..._call import Call
    from .calls import DaskCalls

__all__ = ("GET_WAIT", "DaskStream", "open_stream")

logger = logging.getLogger("offload")

#: seconds a consumer waits for the "items" event at a time; between two waits, it
#: looks at the task's future: how long a dead worker may take to be noticed
GET_WAIT = 0.5
#: the stream's events on the scheduler, after its queue's name
BELLS = ("stop", "room", "items")


async def open_stream(pool: DaskCalls, call: Call, buffer: int) -> DaskStream:
    """Create the stream's queue on the scheduler and submit its task."""
    client = pool._ready_client()
    if len(pool._calls) >= pool._capacity:
        raise PoolOverloaded(
            f"pool {pool.name!r} is full: {pool._capacity} calls are in flight "
            f"on the dask cluster (max_workers + max_pending)"
        )
    blob, large = pool._pickle(call)
    entry = CallInFlight(anyio.CancelScope())
    queue = f"offload-stream-{uuid.uuid4().hex}"
    source = DaskStream(pool, call, entry, queue, buffer, blob, large)
    entry.stream = source
    pool._calls.add(entry)
    pool._streams.add(source)
    try:
        # Shielded: a create cancelled on its way could reach the scheduler after
        # the deletion that follows, and leave the queue there. Unbounded (maxsize
        # 0): the task counts, and a put never waits on the scheduler.
        with anyio.CancelScope(shield=True), anyio.fail_after(CANCEL_TIMEOUT):
            await client.scheduler.queue_create(name=queue, maxsize=0)
        await source.submit()
    except BaseException as exc:
        source.finish()
        if isinstance(exc, (OSError, ClosedClientError)):
            raise pool._unavailable(call, exc) from exc
        raise
    return source


class DaskStream(StreamSource):
    """The consumer's side of a stream whose task runs on the cluster."""

    def __init__(
        self,
        pool: DaskCalls,
        call: Call,
        entry: CallInFlight,
        queue: str,
        buffer: int,
        blob: bytes,
        large: list[Any],
    ) -> None:
        self.pool = pool
        self.call = call
        self.entry = entry  # in pool._calls until finish()
        self.queue = queue
        self.buffer = buffer
        self.blob = blob
        self.large = large
        self.scattered: list[Any] = []
        self.client: Any = pool._client  # the one that submitted the task
        self.future: Any = None
        self.key = ""
        self.records: collections.deque[list[Any]] = collections.deque()
        self.available = 0  # records in the queue, at least
        self.drained = False  # the task is over: nothing more comes than ``records``
        self.over = False  # its end reached, or closed: finish() ran
        self.waiting = False  # for an item, which the generator may be computing
        self.deleted = False  # its queue and events on the scheduler

    async def submit(self) -> None:
        """Send the stream's task (again, after a worker died before starting it)."""
        pool, call = self.pool, self.call
        client = self.client = pool._ready_client()
        self.key = _task_key(call)
        pool._task_started[self.key] = 0.0
        if self.large and not self.scattered:
            # In a list, so that a list or dict argument is scattered whole.
            self.scattered = await client.scatter(self.large, hash=False)
        self.future = self.entry.future = client.submit(
            stream,
            pool._topic,
            self.key,
            (self.queue, self.buffer),
            self.blob,
            *self.scattered,
            labels=(pool.name, call.name) if pool.settings.forward_logs else None,
            key=self.key,
            pure=False,
            retries=0,
        )

    async def get(self) -> Any:
        pool, entry = self.pool, self.entry
        while True:
            if pool._forced:
                raise pool._closed_error()
            if entry.lost is not None:
                raise entry.lost
            if self.records:
                status, data = self.records.popleft()
                if status == ITEM:
                    return self._unpickle(data)
                if await self._settled():  # raises the generator's error, if any
                    raise StopAsyncIteration
            elif self.drained:  # the task ended without its end marker (it died)
                if await self._settled():
                    raise StopAsyncIteration
            else:
                await self._receive()

    async def _receive(self) -> None:
        """Take the next record from the queue; none there, wait ``GET_WAIT`` seconds
        at most for the task to put one."""
        entry = self.entry
        entry.scope = scope = anyio.CancelScope()
        # Until a record is taken: left so by the consumer's cancellation or its
        # deadline, whose close() then sees that the item may be being computed.
        self.waiting = True
        with scope:
            try:
                record = await self._take()
            except Exception as exc:
                self.waiting = False
                if self.future.done():
                    self.drained = True
                    return
                raise self.pool._unavailable(self.call, exc) from exc
            if record is not None:
                self.records.append(record["value"])
        # Taken, or none yet; or cancelled by _end_calls (shutdown, an outage).
        self.waiting = False

    async def _take(self) -> Any:
        """The next record, or None. One at a time, for what the consumer has not
        taken must stay in the queue, where the task counts it."""
        queue = self.queue
        ask = self.client.scheduler
        if not self.available:
            self.available = await ask.queue_qsize(name=queue)
        if not self.available:
            if self.future.done():
                # Each of its puts was done before it ended; one may have been done
                # since the first look.
                self.available = await ask.queue_qsize(name=queue)
                self.drained = not self.available
            else:
                await ask.event_clear(name=f"{queue}-items")
                self.available = await ask.queue_qsize(name=queue)
                if not self.available:
                    await ask.event_wait(name=f"{queue}-items", timeout=GET_WAIT)
            if not self.available:
                return None
        # There: the get does not wait (the consumer is the queue's only one).
        record = await ask.queue_get(name=queue)
        self.available -= 1
        # Room made: the task may wait for it. Without waiting for an answer.
        await ask.event_set(name=f"{queue}-room", reply=False)
        return record

    async def _settled(self) -> bool:
        """The generator is over: True once its task's outcome says it finished, its
        error raised if it failed; False if its worker died before it started, and
        it was sent again."""
        pool = self.pool
        try:
            outcome = await pool._outcome(self.call, self.client, self.future, "an item")
        except BaseException:
            self.finish()
            raise
        if outcome is not _NEVER_STARTED:
            self.finish()
            return True
        logger.info(
            "pool %r: %s never started on a dask worker that died: sent again",
            pool.name,
            self.call.name,
        )
        pool._task_started.pop(self.key, None)
        self.drained = False
        await self.submit()
        return False

    def _unpickle(self, data: bytes) -> Any:
        return unpickle(data, f"an item of {self.call.name}")

    def close(self) -> bool:
        if self.over:
            return True
        future = self.future
        running = future is not None and not future.done()
        self.finish(running)
        if not running:
            return True
        pool = self.pool
        if self.waiting and pool.settings.hard_cancel:
            # Its consumer left (cancelled, or past its deadline) while the generator
            # computes an item: as a call's, its worker is restarted.
            pool._task_group.start_soon(pool._cancel_task, future, self.call)
        # Without waiting: only the task knows when it reaches its next item.
        return False

    async def wait_closed(self) -> None:
        future = self.future
        if future is not None and not future.done():
            try:
                await future
            except Exception:
                pass

    def finish(self, running: bool = False) -> None:
        """The stream is over for its consumer: free what it holds here, and delete
        what it has on the scheduler, once its task is over (``running``: stop it
        first). Once."""
        if self.over:
            return
        self.over = True
        pool = self.pool
        pool._calls.discard(self.entry)
        began = pool._task_started.pop(self.key, 0.0)
        self.call.queue_wait = max(0.0, began - self.call.started) if began else None
        self.records.clear()
        if pool._forced:
            return  # the pool's stop deletes it
        pool._task_group.start_soon(self._stop_and_delete, running, name="offload-stream-close")

    async def _stop_and_delete(self, running: bool) -> None:
        try:
            if running:
                ask = self.client.scheduler
                await ask.event_set(name=f"{self.queue}-stop")
                await ask.event_set(name=f"{self.queue}-room")  # if it waits for room
                await self.wait_closed()
        except Exception as exc:
            logger.debug("pool %r: cannot stop a stream's task: %s", self.pool.name, exc)
        finally:
            await self.delete()

    async def delete(self) -> None:
        """Delete the stream's queue and events on the scheduler; once."""
        if self.deleted:
            return
        self.deleted = True
        pool = self.pool
        pool._streams.discard(self)
        for future in self.scattered:
            future.release()
        self.scattered = []
        client = self.client
        if client is None or client.status != "running":
            return  # its scheduler is gone, or the embedded cluster with it
        with anyio.CancelScope(shield=True), anyio.move_on_after(CANCEL_TIMEOUT):
            try:
                client._send_to_scheduler({"op": "queue_release", "name": self.queue})
                for bell in BELLS:
                    await client.scheduler.event_clear(name=f"{self.queue}-{bell}")
            except Exception as exc:
                logger.debug("pool %r: cannot delete a stream's queue: %s", pool.name, exc)
