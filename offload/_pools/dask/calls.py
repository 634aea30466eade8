"""A dask pool's calls: each is pickled into one task (its large arguments scattered
ahead of it), submitted, and awaited; Dask's failures become offload's errors here,
at one place (``_outcome``); a call its caller left is cancelled on the cluster."""

from __future__ import annotations

import logging
import pickle
import re
import traceback
import uuid
from typing import TYPE_CHECKING, Any

import anyio
import cloudpickle
from dask.sizeof import sizeof
from distributed import scheduler as _scheduler
from distributed.client import ClosedClientError, FutureCancelledError
from distributed.comm.core import CommClosedError
from distributed.scheduler import KilledWorker

from ..._errors import (
    CallAborted,
    ClusterUnavailable,
    OffloadError,
    PoolOverloaded,
    RemoteTraceback,
    SerializationError,
    WorkerCrashed,
    describe_error,
    describe_exit,
    unpickle,
)
from .connection import CANCEL_TIMEOUT, DaskConnection
from .task import (
    Aborted,
    CannotLoad,
    CannotReportStart,
    CannotSendException,
    CannotSendResult,
    invoke,
    kill_this_process,
)

if TYPE_CHECKING:
    from anyio.abc import TaskGroup

    from ..._call import Call
    from ..._settings import PoolSettings
    from .streams import DaskStream

__all__ = ("SCATTER_THRESHOLD", "DaskCalls", "exit_status")

logger = logging.getLogger("offload")

#: arguments larger than this (bytes, as ``dask.sizeof`` measures them) are scattered
#: to the workers ahead of the call instead of travelling inside the task
SCATTER_THRESHOLD = 1 << 20

#: what the scheduler fails a task with when no worker could take it for its
#: ``no-workers-timeout`` (the first is newer than the oldest distributed we support)
_NO_WORKER_ERRORS: tuple[type[Exception], ...] = tuple(
    cls
    for cls in (
        getattr(_scheduler, "NoWorkerError", None),
        getattr(_scheduler, "NoValidWorkerError", None),
    )
    if cls is not None
)

#: how a nanny logs its worker's death (distributed.nanny.WorkerProcess._death_message)
_DEATH = re.compile(
    r"Worker process (?P<pid>\d+) "
    r"(?:was killed by signal (?P<signal>\d+)|exited with status (?P<status>\d+)|"
    r"was killed by unknown signal)"
)
#: how many of each nanny's latest log lines are searched for a worker's death
_NANNY_LOG_LINES = 200
#: seconds a caller waits for a dead worker's nanny to log its exit status
EXIT_STATUS_WAIT = 2.0

#: what an attempt returns when its worker died before the task started
_NEVER_STARTED = object()


def _task_key(call: Call) -> str:
    """A key of its own for one attempt at ``call``, which the scheduler's task list
    names after the function."""
    name = getattr(call.target, "__name__", None) or "call"
    name = re.sub(r"\W", "_", name) or "call"
    return f"{name}-{uuid.uuid4().hex}"


async def exit_status(client: Any, worker: Any) -> tuple[int | None, int | None]:
    """The pid and exit status of a dead dask worker (``worker``, the scheduler's
    record of it), as its nanny logged them (``Worker process 4242 was killed by
    signal 11``), asked directly: the scheduler knows only that the worker left.
    ``(None, None)`` without a nanny, or when it says nothing within
    ``EXIT_STATUS_WAIT`` (it logs the death once it sees it, which may be after the
    scheduler failed the task)."""
    nanny = getattr(worker, "nanny", None)
    pid = getattr(worker, "pid", None)
    if not isinstance(nanny, str) or not isinstance(pid, int):
        return None, None
    with anyio.move_on_after(EXIT_STATUS_WAIT):
        while True:
            try:
                lines = await client.rpc(nanny).get_logs(n=_NANNY_LOG_LINES)
            except Exception:
                break
            for _, line in lines:  # the newest first
                found = _DEATH.search(str(line))
                if found is None or int(found["pid"]) != pid:
                    continue
                if found["signal"] is not None:
                    return pid, -int(found["signal"])
                if found["status"] is not None:
                    return pid, int(found["status"])
                return pid, None
            await anyio.sleep(0.05)
    return None, None


class CallInFlight:
    """One call between submit and outcome: what ``_end_calls`` needs to end it."""

    __slots__ = ("future", "lost", "scope", "stream")

    def __init__(self, scope: anyio.CancelScope) -> None:
        # A stream's: the scope of its consumer's wait for the next record.
        self.scope = scope
        self.future: Any = None
        self.stream: DaskStream | None = None
        # Why the scope was cancelled, when it was not a shutdown.
        self.lost: ClusterUnavailable | None = None


class DaskCalls(DaskConnection):
    """The part of :class:`~.pool.DaskPool` that runs calls, at most
    ``max_workers + max_pending`` in flight."""

    def __init__(self, name: str, settings: PoolSettings, task_group: TaskGroup) -> None:
        super().__init__(name, settings, task_group)
        self._calls: set[CallInFlight] = set()
        # Streams whose queue is still on the scheduler (streams.py).
        self._streams: set[DaskStream] = set()

    def _end_calls(self, lost: str | None) -> None:
        for entry in list(self._calls):
            if lost is not None:  # one error each: they are raised in separate tasks
                entry.lost = ClusterUnavailable(lost)
            entry.scope.cancel()

    async def _execute(self, call: Call) -> Any:
        self._ready_client()
        if len(self._calls) >= self._capacity:
            raise PoolOverloaded(
                f"pool {self.name!r} is full: {self._capacity} calls are in flight "
                f"on the dask cluster (max_workers + max_pending)"
            )
        entry = CallInFlight(anyio.CancelScope())
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
                self._task_group.start_soon(self._cancel_task, future, call)
            raise
        finally:
            self._calls.discard(entry)

    @staticmethod
    def _pickle(call: Call) -> tuple[bytes, list[Any]]:
        """The call pickled for :func:`~.task.invoke`, its large arguments apart (they
        are scattered to the workers ahead of the task).

        :raises SerializationError: the function, an argument or a context value does
            not pickle, or its pickling hook raised (a ``SystemExit`` too)
        """
        values = [*call.args, *call.kwargs.values()]
        holes = tuple(i for i, value in enumerate(values) if _large(value))
        large = [values[i] for i in holes]
        for i in holes:
            values[i] = None
        request = (call.fn, len(call.args), tuple(call.kwargs), values, holes, call.context)
        try:
            blob = cloudpickle.dumps(request)
        except BaseException as exc:  # the user's pickling hooks: SystemExit too
            if isinstance(exc, KeyboardInterrupt):
                raise  # meant for this process
            failure = exc
        else:
            return blob, large
        for name, value in call.context[0] if call.context is not None else ():
            try:
                cloudpickle.dumps(value)
            except BaseException as value_exc:
                if isinstance(value_exc, KeyboardInterrupt):
                    raise
                raise SerializationError(
                    f"cannot send {call.name} to the dask cluster: the value of the context "
                    f"variable {name} (context_vars) cannot be pickled: {describe_error(value_exc)}"
                ) from value_exc
        raise SerializationError(
            f"cannot send {call.name} or its arguments to the dask cluster: "
            f"{describe_error(failure)}"
        ) from failure

    async def _attempt(self, call: Call, entry: CallInFlight, blob: bytes, large: list[Any]) -> Any:
        """Send the call as one task; its outcome, or ``_NEVER_STARTED``."""
        client = self._ready_client()
        key = _task_key(call)
        scattered: list[Any] = []
        self._task_started[key] = 0.0
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
                    labels=(self.name, call.name) if self.settings.forward_logs else None,
                    key=key,
                    pure=False,
                    retries=0,
                )
            except ClosedClientError as exc:
                raise self._unavailable(call, exc) from exc
            return await self._outcome(call, client, entry.future)
        finally:
            if began := self._task_started.pop(key):
                call.queue_wait = max(0.0, began - call.started)
            else:
                call.queue_wait = None
            for future in scattered:
                future.release()

    def _unavailable(self, call: Call, exc: BaseException) -> ClusterUnavailable:
        return ClusterUnavailable(
            f"pool {self.name!r} lost the dask scheduler at {self._address} "
            f"while running {call.name} (it may have run): {exc}"
        )

    async def _outcome(self, call: Call, client: Any, future: Any, what: str = "the result") -> Any:
        """The task's result; its failure mapped to offload's errors (``what``, what
        it sends back that could not be pickled: a stream's items)."""
        try:
            payload, buffers, call.ran = await future
        except Exception as exc:
            status = future.status
            if isinstance(exc, KilledWorker):
                if not await self._did_start(client, future.key):
                    return _NEVER_STARTED
                last = getattr(exc, "last_worker", None)
                worker = getattr(last, "address", "?")
                name = call.name
                pid, exitcode = await exit_status(client, last)
                died = "died" if pid is None else f"died: process {pid} {describe_exit(exitcode)}"
                logger.error(
                    "pool %r: dask worker %s %s while running %s", self.name, worker, died, name
                )
                raise WorkerCrashed(
                    f"the dask worker {worker} running {name} {died}",
                    pid=pid,
                    exitcode=exitcode,
                    function=name,
                ) from None
            if status == "error" and isinstance(exc, CannotLoad):
                raise SerializationError(
                    f"the dask worker cannot load {call.name} or its arguments: {exc}; "
                    "install the module on the workers (docs/dask.md, "
                    '"Ship your code to the cluster")'
                ) from None
            if status == "error" and isinstance(exc, CannotReportStart):
                raise ClusterUnavailable(
                    f"pool {self.name!r}: the dask worker could not reach the scheduler "
                    f"to start {call.name}, which did not run: {exc}"
                ) from None
            if status == "error" and isinstance(exc, _NO_WORKER_ERRORS):
                raise ClusterUnavailable(
                    f"pool {self.name!r}: the dask cluster has no worker that could run "
                    f"{call.name} within the scheduler's no-workers-timeout: {exc}"
                ) from None
            if status == "error" and isinstance(exc, Aborted):
                raise CallAborted(
                    f"{call.name} raised {exc.type_name}: {exc.message}; it is not "
                    "re-raised as such, which would end this program"
                ) from _aborted_cause(exc)
            if status == "error" and isinstance(exc, CannotSendResult):
                raise SerializationError(
                    f"{what} of {call.name} cannot be pickled: {exc.description}"
                ) from RemoteTraceback(exc.tb)
            if status == "error" and isinstance(exc, CannotSendException):
                raise OffloadError(
                    f"{call.name} raised {exc.type_name}: {exc.message} (the exception "
                    "could not be sent from the dask worker: it does not pickle and unpickle)"
                ) from RemoteTraceback(exc.tb)
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
                    f"{call.name} was lost on the dask cluster (cancelled: {exc.reason})",
                    function=call.name,
                ) from exc
            if isinstance(exc, (CommClosedError, OSError, ClosedClientError)):
                raise self._unavailable(call, exc) from exc
            if status == "finished":  # it ran; its result did not travel back
                raise SerializationError(
                    f"the result of {call.name} cannot be sent back from the dask worker: {exc}"
                ) from exc
            raise
        return unpickle(payload, f"the result of {call.name}", buffers)

    async def _did_start(self, client: Any, key: str) -> bool:
        """Whether the task ``key`` started before its worker died: its event came
        with the task's reports; else the scheduler's log of the topic says (it
        keeps the last ``distributed.admin.low-level-log-length`` events). In doubt,
        it started: a call is never run twice."""
        if self._task_started.get(key):
            return True
        try:
            with anyio.fail_after(CANCEL_TIMEOUT):
                events = await client.get_events(self._topic)
        except Exception:
            return True
        return any(msg == key for _, msg in events)

    async def _cancel_task(self, future: Any, call: Call) -> None:
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


def _aborted_cause(exc: Aborted) -> BaseException:
    """The cause of the CallAborted a caller gets for a ``SystemExit``,
    ``KeyboardInterrupt``... raised by the function on a dask worker, as a process pool
    gives it: the original, whose cause is the worker's traceback; the traceback alone
    when the original did not travel."""
    tb = RemoteTraceback(exc.tb)
    if exc.original is not None:
        try:
            original = pickle.loads(exc.original)
        except Exception:
            return tb
        if isinstance(original, BaseException):
            original.__cause__ = tb
            return original
    return tb


def _large(value: Any) -> bool:
    """Whether an argument is scattered apart; ``dask.sizeof`` may call the user's
    ``__sizeof__``, which may raise: such an argument travels in the task."""
    try:
        return bool(sizeof(value) > SCATTER_THRESHOLD)
    except Exception:
        return False
