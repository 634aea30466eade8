"""One call's exchange with the worker that holds it, beyond the usual round trip.

The caller's task does the socket I/O itself (``worker_handle.py``), waiting on the
event loop: a round trip costs no thread hop. ``ProcessPool._execute`` sends the
frame and reads a reply without REMOTE buffers itself, the path of every small call.
This module holds the rest:

- :class:`WaitingCall`: a call waiting for a worker, whose frame whoever frees one
  sends at once; its task then sends what did not fit, if anything;
- the steps of a call with REMOTE buffers (``remote_buffers.py``)::

      parent                                         worker
      call frame (REMOTE arguments)            ──>
                                               <──   (WRITE_TO, addresses)
      copy the arguments in (deliver), GO_AHEAD ──>
                                               <──   reply frame (REMOTE results)
      copy the results out (fetch), GO_AHEAD   ──>

  The copies run in a helper thread (``cross_memory.py`` releases the GIL);
- :class:`LoopDecoder`: decoding a reply on the loop, and counting the slow ones.

What fails here raises to the pool (``pool.py``), which decides what becomes of the
worker.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from ..._helper_threads import run_in_helper_thread
from . import framing, remote_buffers
from .call_encoding import decode_reply
from .remote_buffers import GO_AHEAD, has_remote, inline_buffers

if TYPE_CHECKING:
    from ..._call import Call
    from ..._stats import Counters
    from .buffers import Buffer, Received
    from .framing import Frame, Remote
    from .worker_handle import WorkerHandle

__all__ = ("LoopDecoder", "WaitingCall", "deliver_then_receive", "fetch_results")

logger = logging.getLogger("offload")

#: seconds of unpickling a result on the event loop past which the call is counted
#: (``PoolStats.slow_decodes``) and named in a warning: a stall the lag probe, which
#: wakes every 100 ms by default, sees every other time
SLOW_DECODE = 0.05
#: seconds between two such warnings of a pool, at least
SLOW_DECODE_LOG_EVERY = 60.0

T = TypeVar("T")
#: ``stop(worker, reason)``: how the pool stops a worker it can no longer trust
StopWorker = Callable[["WorkerHandle", str], None]


class WaitingCall:
    """A call waiting for a free worker, small enough to be sent by whoever frees one
    (``ProcessPool._send_on_handoff``); ``unsent``: what of its frame is left for its
    own task to send; ``taken``: when it was sent (``time.perf_counter()``), the end
    of its queue wait."""

    __slots__ = ("call", "request", "taken", "unsent")

    def __init__(self, call: Call, request: Frame) -> None:
        self.call = call
        self.request = request
        self.unsent: Sequence[Buffer] = ()
        self.taken = 0.0


async def deliver_then_receive(
    worker: WorkerHandle, request: Frame, stop: StopWorker
) -> tuple[Received, list[Received]]:
    """The rest of a call with REMOTE arguments once its frame is sent: they are
    copied into the worker, and its reply read, its REMOTE buffers copied out.

    ``stop(worker, reason)`` stops the worker when a copy fails while it is still there.
    """
    data, received = await worker.recv()
    status, addresses = framing.decode(data, inline_buffers(received))
    if status != framing.WRITE_TO:  # a channel out of step: fails as a channel error
        raise ValueError(f"expected WRITE_TO from worker {worker.pid}, got {status}")
    await _copy(
        worker,
        functools.partial(remote_buffers.deliver, worker.pid, request.remote, addresses),
        stop,
    )
    await worker.send(GO_AHEAD)
    data, received = await worker.recv()
    if not has_remote(received):
        return data, inline_buffers(received)
    return data, await fetch_results(worker, received, stop)


async def fetch_results(
    worker: WorkerHandle, received: list[Received | Remote], stop: StopWorker
) -> list[Received]:
    """A reply's buffers, the REMOTE ones read out of the worker's memory (``stop``:
    see :func:`deliver_then_receive`)."""
    buffers = await _copy(
        worker, functools.partial(remote_buffers.fetch, worker.pid, received), stop
    )
    await worker.send(GO_AHEAD)
    return buffers


async def _copy(worker: WorkerHandle, copy: Callable[[], T], stop: StopWorker) -> T:
    """Run a copy between memories (milliseconds per 64 MiB, without the GIL) in a
    thread.

    :raises OSError: the copy failed; the worker, if still there, waits for a
        go-ahead that will not come: it is stopped, and the call fails as a crash
    """
    try:
        return await run_in_helper_thread(copy)
    except OSError as exc:
        if worker.proc.poll() is None:
            stop(worker, f"copying buffers to or from worker {worker.pid} failed ({exc})")
        raise


class LoopDecoder:
    """Decodes replies on the event loop, and counts those whose decoding held it,
    naming them in a warning now and then (a pool's, at most every
    :data:`SLOW_DECODE_LOG_EVERY` s)."""

    __slots__ = ("_counters", "_pool_name", "_quiet_until")

    def __init__(self, pool_name: str, counters: Counters) -> None:
        self._pool_name = pool_name
        self._counters = counters
        self._quiet_until = 0.0  # no warning before then

    def decode(self, call: Call, data: Received, buffers: list[Received]) -> Any:
        """The call's result, or its exception raised (``call_encoding.decode_reply``)."""
        decoding = time.perf_counter()
        try:
            return decode_reply(call, data, buffers)
        finally:
            held = time.perf_counter() - decoding
            if held >= SLOW_DECODE:
                self._note(call, held)

    def _note(self, call: Call, held: float) -> None:
        counters = self._counters
        counters.slow_decodes += 1
        now = time.monotonic()
        if now < self._quiet_until:
            return
        self._quiet_until = now + SLOW_DECODE_LOG_EVERY
        logger.warning(
            "pool %r: decoding the result of %s held the event loop for %.0f ms (%d such "
            "results so far): unpickling Python objects holds the GIL; return arrays, bytes "
            "or Arrow data instead (docs: troubleshooting, large arguments and results)",
            self._pool_name,
            call.name,
            held * 1000,
            counters.slow_decodes,
        )
