"""The process pool: calls run on supervised worker processes, one socket each.

:class:`ProcessPool` runs each call on one of the workers that its base,
:class:`~.supervision.WorkerSupervisor`, keeps running, through ``handoff.py`` and
``exchange.py``. The data flow is drawn in ``__init__.py``.
"""

from __future__ import annotations

import logging
import time
from types import BuiltinFunctionType, FunctionType, ModuleType
from typing import TYPE_CHECKING, Any

import anyio
import anyio.lowlevel

from ..._errors import OffloadError
from ..._helper_threads import run_in_helper_thread
from .buffers import slow_to_decode
from .call_encoding import decode_reply, encode_request
from .exchange import WaitingCall, deliver_then_receive, fetch_results
from .framing import SCRATCH_SIZE
from .remote_buffers import has_remote, inline_buffers
from .streams import ProcessStream
from .supervision import WorkerSupervisor, report_suffix
from .worker_handle import EXIT_STATUS_WAIT, WorkerHandle

if TYPE_CHECKING:
    from ..._call import Call
    from ..base import StreamSource

__all__ = ("ProcessPool",)

logger = logging.getLogger("offload")


class ProcessPool(WorkerSupervisor):
    kind = "process"
    transfer = True

    async def _execute(self, call: Call) -> Any:
        if self._not_here is not None:
            # Refused to start after run() looked (a pool started by its first call):
            # with no worker to come, the call would wait for ever.
            raise self._refusal()
        request = encode_request(call, self.settings.max_payload, self._cross_memory)
        waiting = None
        if not self._handoff.idle and not request.remote and request.size <= SCRATCH_SIZE:
            # It will wait: whoever frees a worker may send it.
            waiting = WaitingCall(call, request)
        while True:
            if self._forced:
                raise self._closed_error()
            if self._given_up and not self._ready:
                raise self._no_worker_error()
            worker = self._handoff.take()
            sent_early = False
            if worker is None:
                # Only a call that waits pays for the clock: queue_wait stays 0 else.
                waited = time.perf_counter()
                worker, sent_early = await self._handoff.get(waiting)
                taken = waiting.taken if sent_early and waiting is not None else 0.0
                call.queue_wait = (call.queue_wait or 0.0) + (taken or time.perf_counter()) - waited
            if not sent_early:
                if worker.exited.is_set():
                    # Handed over, then seen dead (and its channel closed) before this
                    # task ran: the call never reached it, so it waits for another.
                    continue
                self._claim(worker, call)
            try:
                try:
                    if not sent_early:
                        if unsent := worker.send_some(worker.with_levels(request)):
                            await worker.send(unsent)
                    elif waiting is not None and waiting.unsent:
                        await worker.send(waiting.unsent)
                except (BrokenPipeError, ConnectionResetError):
                    # It died while idle (its end of the channel is closed), before
                    # reading this call, and its watcher has not run yet: try another.
                    continue
                if request.remote:
                    data, buffers = await deliver_then_receive(worker, request, self._stop_worker)
                else:
                    data, received = await worker.recv()
                    if has_remote(received):
                        buffers = await fetch_results(worker, received, self._stop_worker)
                    else:
                        buffers = inline_buffers(received)
            except (EOFError, OSError, ValueError, anyio.ClosedResourceError) as exc:
                if self._forced:  # killed by _abort
                    raise self._closed_error() from None
                if (
                    isinstance(exc, (OSError, ValueError))
                    and not isinstance(exc, ConnectionError)
                    and worker in self._ready
                    and worker.proc.poll() is None
                ):
                    # The channel failed (or carried a frame that makes no sense), not
                    # the worker, which may hold half a frame: it goes, and only this
                    # call fails.
                    failure = f"the channel to worker {worker.pid} failed while running {call.name}"
                    self._stop_worker(worker, f"{failure} ({exc})")
                    raise OffloadError(f"{failure}: {exc}") from exc
                with anyio.move_on_after(EXIT_STATUS_WAIT):
                    await worker.exited.wait()
                name = call.name
                crash = worker.crashed(f"running {name}", name)
                if not worker.exited.is_set():
                    # Its channel is gone, its process not (yet): of no more use. Its
                    # watcher logs the exit status once it comes.
                    worker.crash_told = True
                    self._kill(worker)
                logger.error(
                    "pool %r: worker %d %s while running %s%s",
                    self.name,
                    worker.pid,
                    worker.ending(crash.traceback),
                    name,
                    report_suffix(crash.traceback),
                )
                raise crash from None
            except BaseException:
                # Cancelled mid-call (deadline, caller, shutdown): the worker is
                # somewhere in the call, so it cannot be reused.
                passed = anyio.current_time() >= call.deadline
                self._kill_running(worker, "deadline passed" if passed else "cancelled")
                raise
            finally:
                self._unclaim(worker)
            self._release(worker)
            if buffers and slow_to_decode((data, *buffers)):
                # A large ``bytes`` is one copy, made by os.pread in a thread without
                # the GIL; arrays are views on the received buffers.
                return await run_in_helper_thread(decode_reply, call, data, buffers)
            # On the loop: a thread would not help, unpickling Python objects holds
            # the GIL. A result that takes long to decode is counted and named.
            return self._decoder.decode(call, data, buffers)

    async def _open_stream(self, call: Call, buffer: int) -> StreamSource:
        if self._not_here is not None:
            raise self._refusal()
        # Without REMOTE buffers: a stream's exchange is its own (streams.py).
        request = encode_request(call, self.settings.max_payload, False, buffer)
        while True:
            if self._forced:
                raise self._closed_error()
            if self._given_up and not self._ready:
                raise self._no_worker_error()
            worker = self._handoff.take()
            if worker is None:
                waited = time.perf_counter()
                worker, _ = await self._handoff.get()
                call.queue_wait = time.perf_counter() - waited
            if worker.exited.is_set():
                continue
            self._claim(worker, call)
            try:
                if unsent := worker.send_some(worker.with_levels(request)):
                    await worker.send(unsent)
            except (BrokenPipeError, ConnectionResetError):
                self._unclaim(worker)
                continue  # it died idle: another
            except BaseException:
                self._kill_running(worker, "cancelled")
                self._unclaim(worker)
                raise
            stream = ProcessStream(self, worker, call)
            self._streams.add(stream)
            return stream

    def _claim(self, worker: WorkerHandle, call: Call) -> None:
        worker.in_use = True
        worker.call = call
        self._busy += 1

    def _unclaim(self, worker: WorkerHandle) -> None:
        self._busy -= 1
        worker.in_use = False
        call = worker.call
        worker.call = None
        if call is not None:
            # Named, should the worker die idle. A plain function (a module's built-in, a
            # decorated one) is kept and named then; another callable may hold state (a
            # closure, a bound method, ``[].append``): its name is kept instead.
            fn = call.fn
            kind = type(fn)
            if (
                (kind is BuiltinFunctionType and type(fn.__self__) is ModuleType)  # type: ignore[attr-defined]
                or (kind is FunctionType and fn.__closure__ is None)
                or getattr(kind, "__offload_function__", False)
            ):
                worker.last_function = fn
            else:
                worker.last_function = call.name
            worker.last_ended = time.monotonic()
        if worker.exited.is_set():
            worker.close()

    def _send_on_handoff(self, worker: WorkerHandle, waiting: WaitingCall) -> bool:
        """Send a waiting call's frame to the worker it is handed, now: its caller's
        task runs a loop turn later, and the worker would idle until then (a third more
        calls a second with many callers: docs/benchmarks.md, "Figures behind the
        code"). Whether the call is on its way."""
        try:
            waiting.unsent = worker.send_some(worker.with_levels(waiting.request))
        except OSError:  # BrokenPipeError (dead): the caller will see
            return False
        waiting.taken = time.perf_counter()
        self._claim(worker, waiting.call)
        return True

    def _abandon_sent_call(self, worker: WorkerHandle) -> None:
        """The call sent by :meth:`_send_on_handoff` was cancelled before its task ran."""
        self._kill_running(worker, "cancelled")
        self._unclaim(worker)

    def _kill_running(self, worker: WorkerHandle, why: str) -> None:
        name = worker.call.name if worker.call is not None else "a call"
        logger.info("pool %r: killing worker %d running %s (%s)", self.name, worker.pid, name, why)
        self._kill(worker)

    def _stop_worker(self, worker: WorkerHandle, reason: str) -> None:
        """Stop a worker whose channel can no longer be trusted, and say why."""
        logger.error("pool %r: %s: stopping it", self.name, reason)
        self._kill(worker)

    def _release(self, worker: WorkerHandle) -> None:
        if worker not in self._ready:
            return  # died or was stopped while the caller read its answer
        worker.calls += 1
        if worker.due_for_recycling(self.settings, self.name):
            # The limits hold while the pool drains too; a replacement then starts
            # only for calls still waiting.
            self.counters.recycled += 1
            self._retire(worker)
            if not worker.replacement_started and (not self._closing or self._handoff.queued):
                self._task_group.start_soon(self._replace)
        else:
            limit = self.settings.max_tasks_per_worker
            if limit is not None and worker.calls == limit - 1 and not self._closing:
                # One call to go: start its successor now, so that it is ready
                # (or nearly) when this one retires, and capacity has no gap.
                worker.replacement_started = True
                self._task_group.start_soon(self._replace)
            self._handoff.put(worker)
