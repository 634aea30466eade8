"""What a dask pool's stream runs on a worker: its task, which runs the generator and
puts its items in the stream's queue on the scheduler (the pool's ``streams.py``
draws the exchange). Workers unpickle :func:`stream` by reference: as ``task.py``,
this module needs only distributed and cloudpickle.
"""

from __future__ import annotations

import contextvars
import time
from types import GeneratorType
from typing import Any

from distributed import get_worker
from distributed.utils import sync

from ..._context import enter_traced
from .task import (
    CannotSendResult,
    begin_call,
    end_call,
    load_call,
    pickled_item,
    pickled_result,
    stand_in_for,
)

__all__ = ("END", "ITEM", "PUT_WAIT", "stream")

#: the records of a stream's queue: ``[ITEM, pickled item]``, then ``[END, None]``
ITEM, END = 0, 1
#: seconds a generator waits at a ``yield`` (its queue full) before it looks again
#: (the consumer rings when it takes the items, or when it leaves): a safety net
PUT_WAIT = 5.0


def stream(
    topic: str,
    key: str,
    names: tuple[str, int],
    blob: bytes,
    *large: Any,
    labels: tuple[str, str] | None = None,
) -> tuple[bytes, list[memoryview], float]:
    """Run on a worker: as :func:`.task.invoke`, for a generator function, whose
    items this puts, pickled, in the stream's queue on the scheduler (``names``: its
    name and the stream's buffer), then an end marker once the generator is over and
    closed. The generator's exception is then raised, as ``invoke`` raises the
    function's (its stand-ins too). The pool's ``streams.py`` draws the exchange.

    A consumer that left sets the stream's stop event, seen before each item, as is
    the task's release by the scheduler (its client gone): the generator is closed
    here, its ``finally`` run in this thread, and the task ends, freeing the thread,
    after deleting the events it may have set on the scheduler.
    """
    labelled = begin_call(labels)
    try:
        fn, args, kwargs, ctx, carried = load_call(topic, key, blob, large)
        if carried is not None and carried[1] is not None:
            enter_traced(carried[1], ctx)  # for every item, and the close
        channel = _Channel(get_worker(), key, *names)
        begun = time.perf_counter()
        try:
            _run_generator(channel, ctx, fn, args, kwargs)
        except BaseException as exc:
            channel.end()
            stand_in = stand_in_for(exc) if not isinstance(exc, CannotSendResult) else None
            if stand_in is None:
                raise
        else:
            channel.end()
            return (*pickled_result(None), time.perf_counter() - begun)
        raise stand_in
    finally:
        end_call(labelled)


def _run_generator(
    channel: _Channel,
    ctx: contextvars.Context,
    fn: Any,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> None:
    """Put each item of ``fn(*args, **kwargs)`` in the queue, until its end or until
    its consumer left; close it here, where it ran (a no-op once it has finished)."""
    iterator: Any = None
    try:
        result = ctx.run(fn, *args, **kwargs)
        iterator = result if type(result) is GeneratorType else ctx.run(iter, result)
        del result
        # Room first, then the item: it runs at most ``buffer`` items ahead.
        while channel.wait_for_room():
            try:
                item = ctx.run(next, iterator)
            except StopIteration:
                return
            data = pickled_item(item)
            del item
            if not channel.put([ITEM, data]):
                return
            del data
    finally:
        close = getattr(iterator, "close", None)
        del iterator
        if close is not None:
            ctx.run(close)  # what closing raises fails the stream


class _Channel:
    """The worker's side of a stream's queue (see the pool's ``streams.py``)."""

    def __init__(self, worker: Any, key: str, queue: str, buffer: int) -> None:
        self.worker = worker
        self.key = key
        self.queue = queue
        self.buffer = buffer
        self.room = 0  # puts that cannot wait: this task is the queue's only producer
        self.left = False  # its consumer left, or the scheduler is out of reach

    def _ask(self, op: str, **kwargs: Any) -> Any:
        return sync(self.worker.loop, getattr(self.worker.scheduler, op), **kwargs)

    def wait_for_room(self) -> bool:
        """Wait until the queue has room for a record; False once the consumer has
        left (it set the stop event)."""
        queue = self.queue
        try:
            while True:
                if self._released() or self._ask("event_is_set", name=f"{queue}-stop"):
                    self.left = True
                    return False
                if self.room > 0:
                    return True
                self.room = self.buffer - self._ask("queue_qsize", name=queue)
                if self.room > 0:
                    return True
                # Full: wait until the consumer takes a record (it rings at each),
                # or closes the stream (it rings too).
                self._ask("event_clear", name=f"{queue}-room")
                self.room = self.buffer - self._ask("queue_qsize", name=queue)
                if self.room <= 0:
                    self._ask("event_wait", name=f"{queue}-room", timeout=PUT_WAIT)
        except Exception:
            self.left = True  # the queue is gone, or the scheduler
            return False

    def _released(self) -> bool:
        """Whether the scheduler released the task: its client is gone (or cancelled
        it), and nobody will read the queue or set the stop event. Read here, in the
        task's thread, from the worker's state: a look, not a question."""
        task = self.worker.state.tasks.get(self.key)
        return task is None or task.state not in ("executing", "long-running")

    def put(self, record: list[Any]) -> bool:
        """Put ``record`` in the queue, which has room (``wait_for_room``), and ring
        the consumer's bell; False if the queue is gone."""
        try:
            self._ask("queue_put", name=self.queue, data=record)
            self.room -= 1
            # Without waiting for an answer: the consumer asks the queue's size.
            self._ask("event_set", name=f"{self.queue}-items", reply=False)
        except Exception:
            self.left = True
            return False
        return True

    def end(self) -> None:
        """The generator is over and closed: the end marker for the consumer; or, if
        it left, delete the events this task may have set on the scheduler (the
        consumer deletes them too, and the queue, once this task is over: whichever
        comes last finds nothing). Not the queue: a worker cannot (its stream to the
        scheduler would pass the release a keyword it does not take, and break)."""
        if not self.left and self.wait_for_room() and self.put([END, None]):
            return
        try:
            for bell in ("stop", "room", "items"):
                self._ask("event_clear", name=f"{self.queue}-{bell}")
        except Exception:
            pass  # the scheduler is out of reach: the consumer deletes them
