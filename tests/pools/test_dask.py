"""The dask pool on its embedded cluster: one cluster (one Offloader) for the module.

Dask's client runs on asyncio only, so these tests run on asyncio alone. The
module-scoped Offloader owns a LocalCluster of two single-threaded worker processes,
which runs in a host process of its own: the tests ask it about its scheduler and
workers through the client. Every wait is a bounded poll. How one call fails at each
stage (its exceptions, pickling, crashes) is tested with every kind in
``test_fault_matrix.py``; the cluster's start, stop and trust, each with a cluster of
its own, in ``test_dask_embedded.py``.
"""

from __future__ import annotations

import logging
import math
import os
import subprocess
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import anyio
import anyio.to_thread
import psutil
import pytest

pytest.importorskip("distributed")

from offload import (
    Executor,
    Offloader,
    OffloadSettings,
    OffloadTimeout,
    PoolOverloaded,
    PoolSettings,
    SerializationError,
    WorkerCrashed,
)
from offload._pools.dask import calls
from offload._pools.dask.calls import exit_status
from offload._pools.dask.pool import SCATTER_THRESHOLD, DaskPool
from offload._stats import RequestTimings, request_timings

from .. import funcs, funcs_context
from ..conftest import children
from ..processes import gone, wait_until, wait_until_async

WORKERS = 2
PENDING = 2
#: seconds a fault may take to be reported, or the cluster to heal
BOUND = 15.0
#: seconds an embedded cluster may take to start (interpreters, imports, on 2 busy CPUs)
BOOT = 60.0


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


def dask_settings(**pool: Any) -> OffloadSettings:
    return OffloadSettings(
        process={"max_workers": 1},
        thread={"max_workers": 1},
        pools={"dask": PoolSettings(kind="dask", **{"max_workers": WORKERS, **pool})},
        shutdown_timeout=5,
        context_vars=funcs_context.CONTEXT_VARS,
    )


@pytest.fixture(scope="module")
async def dask_ex() -> AsyncIterator[Executor]:
    before = {p.pid for p in children()}
    async with Offloader(dask_settings(max_pending=PENDING)) as ex:
        executor = ex.pool("dask")
        host = host_of(executor)
        cluster = [host, *host.children(recursive=True)]
        yield executor
    leftover = [p for p in children() if p.pid not in before]
    assert not leftover, f"the embedded cluster left processes behind: {leftover}"
    # the host, its workers and whatever else it started: all gone, not orphaned
    await wait_until(
        lambda: all(gone(p.pid) for p in cluster),
        BOUND,
        lambda: f"{[p for p in cluster if not gone(p.pid)]} outlived the pool",
    )


def pool_of(ex: Executor) -> DaskPool:
    pool = ex.offloader.get_pool(ex.pool_name)
    assert isinstance(pool, DaskPool)
    return pool


def client_of(ex: Executor) -> Any:
    client = pool_of(ex)._client
    assert client is not None
    return client


def host_popen(pool: DaskPool) -> subprocess.Popen[bytes] | None:
    """The pool's embedded cluster's host process, if it has one."""
    return None if pool._embedded is None else pool._embedded.process


def host_of(ex: Executor) -> psutil.Process:
    """The embedded cluster's host process: its scheduler and nannies run there."""
    host = host_popen(pool_of(ex))
    assert host is not None
    return psutil.Process(host.pid)


def cluster_pids(host: psutil.Process) -> set[int]:
    """The host and every process under it (workers, multiprocessing's helpers)."""
    try:
        return {host.pid} | {p.pid for p in host.children(recursive=True)}
    except psutil.NoSuchProcess:
        return set()


async def worker_pids(ex: Executor) -> set[int]:
    """The pids of the workers the scheduler knows now. Asked of the scheduler, not of
    the workers: ``client.run`` would also try a worker that has just died and that
    the scheduler still lists, and wait for it up to Dask's 30 s connect timeout."""
    pids: list[int] = await client_of(ex).run_on_scheduler(funcs.scheduler_worker_pids)
    return set(pids)


async def keys_named(ex: Executor, prefix: str) -> list[str]:
    """The keys of the scheduler's tasks that start with ``prefix``."""
    keys = await client_of(ex).run_on_scheduler(funcs.scheduler_task_keys)
    return [k for k in keys if k.startswith(prefix)]


async def no_task_named(ex: Executor, prefix: str) -> None:
    """Wait until the scheduler has forgotten every task named ``prefix``..."""

    async def forgotten() -> bool:
        return not await keys_named(ex, prefix)

    await wait_until_async(forgotten, BOUND, f"the scheduler forgot {prefix}")


@pytest.fixture(autouse=True)
def no_leftover_children(dask_ex: Executor) -> Iterator[None]:
    """The module's cluster outlives each test: only its host and whatever runs under
    it (its current workers) may remain, among all the processes under this one."""
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    yield
    allowed = before | cluster_pids(host_of(dask_ex))
    leftover = [p for p in children() if p.pid not in allowed]
    for p in psutil.Process().children(recursive=True):
        if p.pid not in allowed and p not in leftover and not gone(p.pid):
            leftover.append(p)
    for p in leftover:
        p.kill()
    assert not leftover, f"processes left behind: {[p.pid for p in leftover]}"


async def healed(ex: Executor) -> None:
    """Wait until the cluster has its workers back, the pool sees them (its client's
    view of the scheduler is refreshed every 2 s), and nothing of ours is in flight."""
    workers: list[str] = []

    async def whole() -> bool:
        workers[:] = await client_of(ex).run_on_scheduler(funcs.scheduler_workers)
        return len(workers) == WORKERS == ex.stats().workers and not pool_of(ex)._calls

    await wait_until_async(
        whole,
        BOUND,
        lambda: f"workers={workers} seen={ex.stats().workers} in flight={len(pool_of(ex)._calls)}",
    )


# -- calls --------------------------------------------------------------------------


async def test_calls_return_results(dask_ex: Executor) -> None:
    assert await dask_ex.run(funcs.add, 1, 2) == 3
    assert await dask_ex.run(funcs.double, 21) == 42  # decorated: runs the original
    # keywords that are also Client.submit's own reach the function untouched
    assert await dask_ex.run(funcs.kw, key=1, pure=2, workers=3, retries=4) == {
        "key": 1,
        "pure": 2,
        "workers": 3,
        "retries": 4,
    }
    stats = dask_ex.stats()
    assert stats.kind == "dask"
    assert stats.workers == WORKERS
    assert stats.completed >= 3


async def test_run_and_queue_wait_are_measured_transfer_is_unknown(dask_ex: Executor) -> None:
    timings = RequestTimings()
    token = request_timings.set(timings)
    try:
        await dask_ex.run(funcs.sleep_then, 0.2, None)
    finally:
        request_timings.reset(token)
    assert timings.calls == 1
    assert timings.run is not None
    assert timings.run >= 0.2  # measured in the task, around the function
    assert timings.queue_wait is not None  # until the task's start event came
    assert timings.queue_wait >= 0
    assert timings.transfer is None
    stats = dask_ex.stats()
    assert stats.run_p50 is not None
    assert stats.queue_wait_p50 is not None
    assert (stats.transfer_p50, stats.transfer_p99) == (None, None)


async def test_lambdas_and_closures_travel_by_value(dask_ex: Executor) -> None:
    offset = 5

    def local(x: int) -> int:
        return x + offset

    assert await dask_ex.run(lambda x: x * 3, 4) == 12
    assert await dask_ex.run(local, 1) == 6
    assert await dask_ex.run(funcs.echo, lambda: 1) is not None  # a lambda argument


async def test_calls_run_in_the_cluster_workers(dask_ex: Executor) -> None:
    pid = await dask_ex.run(funcs.getpid)
    assert pid != os.getpid()
    assert pid in await worker_pids(dask_ex)
    # the workers are the host's children, not ours
    assert psutil.Process(pid).ppid() == host_of(dask_ex).pid


async def test_a_decorated_function_calls_itself_in_a_dask_worker(dask_ex: Executor) -> None:
    assert await dask_ex.run(funcs.fib, 12) == 144


async def test_chosen_context_variables_reach_a_dask_worker(dask_ex: Executor) -> None:
    funcs_context.request_id.set("r-dask")
    funcs_context.secret.set("stays here")
    assert await dask_ex.run(funcs_context.set_and_see, "set in the worker") == {
        "request_id": "r-dask",
        "tenant": "no tenant",
        "secret": "not sent",
    }
    funcs_context.request_id.set("next")
    for _ in range(WORKERS * 2):  # on each worker: nothing left by the call above
        assert await dask_ex.run(funcs_context.seen) == {
            "request_id": "next",
            "tenant": "no tenant",
            "secret": "not sent",
        }


async def test_an_unpicklable_context_value_fails_only_its_dask_call(dask_ex: Executor) -> None:
    funcs_context.request_id.set(threading.Lock())  # type: ignore[arg-type]
    with pytest.raises(SerializationError, match=r"variable tests\.funcs_context:request_id"):
        await dask_ex.run(funcs_context.seen)
    funcs_context.request_id.set("fine")
    assert (await dask_ex.run(funcs_context.seen))["request_id"] == "fine"


async def test_a_dask_call_runs_in_the_callers_trace(dask_ex: Executor) -> None:
    from opentelemetry.sdk.trace import TracerProvider

    provider = TracerProvider()
    with provider.get_tracer("tests").start_as_current_span("route") as span:
        ids = await dask_ex.run(funcs_context.current_span_ids)
    assert ids == (span.get_span_context().trace_id, span.get_span_context().span_id)
    assert await dask_ex.run(funcs_context.current_span_ids) is None


async def test_identical_calls_are_separate_calls(dask_ex: Executor) -> None:
    async def one(results: list[str]) -> None:
        results.append(await dask_ex.run(funcs.random_token))

    results: list[str] = []
    async with anyio.create_task_group() as tg:
        for _ in range(4):
            tg.start_soon(one, results)
    results.append(await dask_ex.run(funcs.random_token))
    assert len(set(results)) == 5  # never deduplicated as Dask's pure calls would be


async def test_large_arguments_are_scattered(
    dask_ex: Executor, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = pool_of(dask_ex)._client
    scattered: list[int] = []
    original = client.scatter

    async def spy(data: list[Any], **kwargs: Any) -> Any:
        scattered.append(len(data))
        return await original(data, **kwargs)

    monkeypatch.setattr(client, "scatter", spy)
    big = b"x" * (SCATTER_THRESHOLD + 1)
    small = [1, 2, 3]
    assert await dask_ex.run(funcs.echo, small) == small
    assert scattered == []
    # a large positional and a large keyword argument, in one scatter
    result = await dask_ex.run(funcs.kw, a=big, b=small, c=bytearray(big))
    assert result == {"a": big, "b": small, "c": bytearray(big)}
    assert scattered == [2]
    assert await dask_ex.run(len, big) == len(big)
    assert scattered == [2, 1]


async def test_large_and_many_buffer_results_come_back_whole(dask_ex: Executor) -> None:
    """A result's buffers travel out of band, as Dask frames of their own: one large
    array, and many small ones."""
    size = 64 << 20
    array = await dask_ex.run(funcs.make_array, size)
    assert array.nbytes == size
    assert int(array[-1]) == 1
    arrays = await dask_ex.run(funcs.many_arrays, 1000)
    assert [int(a[0]) for a in arrays] == list(range(1000))


# -- deadline, cancellation, crash --------------------------------------------------


async def test_deadline_gives_offload_timeout_and_cancels_the_task(
    dask_ex: Executor, tmp_path: Path
) -> None:
    marker = tmp_path / "ran"
    release = tmp_path / "release"
    before = dask_ex.stats().timed_out
    try:
        with pytest.raises(OffloadTimeout, match="wait_for_file_then_touch"):
            await dask_ex.options(timeout=0.5).run(
                funcs.wait_for_file_then_touch, str(release), str(marker)
            )
        # The task ends only after the release: the caller did not wait for it.
        assert not marker.exists()
        assert dask_ex.stats().timed_out == before + 1
        # the future is cancelled: the scheduler forgets the task...
        await no_task_named(dask_ex, "wait_for_file_then_touch")
    finally:
        release.write_text("")
    # ...but Dask cannot interrupt a running task: without hard_cancel it runs on.
    await wait_until(marker.exists, BOUND, "the abandoned task finished on its worker")
    await healed(dask_ex)
    assert await dask_ex.run(funcs.add, 1, 2) == 3


async def test_hard_cancel_restarts_the_worker_running_the_call(
    dask_ex: Executor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pool = pool_of(dask_ex)
    monkeypatch.setattr(pool, "settings", pool.settings.model_copy(update={"hard_cancel": True}))
    pidfile = tmp_path / "pid"
    pids = await worker_pids(dask_ex)
    assert len(pids) == WORKERS
    with pytest.raises(OffloadTimeout):
        await dask_ex.options(timeout=1.0).run(funcs.write_pid_then_sleep, str(pidfile), 60)
    timed_out = anyio.current_time()
    running = int(pidfile.read_text())  # the worker process that ran the task
    assert running in pids
    await wait_until(lambda: gone(running), BOUND, "the worker running the call was killed")
    # killed through the scheduler, from its own event loop: long before the task's end
    assert anyio.current_time() - timed_out < 60 / 4

    async def replaced() -> bool:
        now = await worker_pids(dask_ex)
        return len(now) == WORKERS and len(now - pids) == 1

    await wait_until_async(replaced, BOUND, "its nanny started a new worker")
    await healed(dask_ex)
    assert dask_ex.stats().recycled >= 1
    assert await dask_ex.run(funcs.add, 1, 2) == 3


async def test_caller_cancellation_cancels_the_task(dask_ex: Executor, tmp_path: Path) -> None:
    before = dask_ex.stats().cancelled
    async with anyio.create_task_group() as tg:
        tg.start_soon(dask_ex.run, funcs.wait_for_file, str(tmp_path / "never"))

        async def submitted() -> bool:
            return bool(await keys_named(dask_ex, "wait_for_file"))

        await wait_until_async(submitted, BOUND, "submitted")
        tg.cancel_scope.cancel()
    assert dask_ex.stats().cancelled == before + 1
    await no_task_named(dask_ex, "wait_for_file")
    (tmp_path / "never").write_text("")  # let the abandoned task end
    await healed(dask_ex)


async def test_backpressure_refuses_past_workers_plus_pending(
    dask_ex: Executor, tmp_path: Path
) -> None:
    release = tmp_path / "release"
    capacity = WORKERS + PENDING
    results: list[Any] = []

    async def hold(i: int) -> None:
        results.append(await dask_ex.run(funcs.wait_for_file, str(release), i))

    async with anyio.create_task_group() as tg:
        for i in range(capacity):
            tg.start_soon(hold, i)
        await wait_until(lambda: len(pool_of(dask_ex)._calls) == capacity, BOUND, "all in flight")
        stats = dask_ex.stats()
        assert (stats.busy, stats.queued) == (WORKERS, PENDING)
        with pytest.raises(PoolOverloaded, match="max_pending"):
            await dask_ex.run(funcs.add, 1, 1)
        release.write_text("")
    assert sorted(results) == list(range(capacity))
    assert await dask_ex.run(funcs.add, 1, 1) == 2


# -- a crash fails its own call only -----------------------------------------------


def decide(folder: Path, pid: int, verdict: str) -> None:
    """Tell the held call on worker ``pid`` what to do (see funcs.wait_for_verdict)."""
    part = folder / f"{pid}.part"
    part.write_text(verdict)
    os.replace(part, folder / str(pid))


async def crash_fails_only_its_own_call(ex: Executor, client: Any, folder: Path) -> None:
    """Each worker runs a held call and has a second call waiting behind it, on the
    worker (Dask hands a worker more tasks than it has threads); one held call
    crashes: it alone fails, the call waiting behind it on its worker runs."""
    n = len(await client.run_on_scheduler(funcs.scheduler_workers))
    assert n >= 1
    processing: dict[int, list[str]] = {}

    async def placed(prefix: str, count: int) -> bool:
        processing.update(await client.run_on_scheduler(funcs.scheduler_processing))
        keys = [k for ks in processing.values() for k in ks if k.startswith(prefix)]
        return len(keys) == count

    held: dict[int, Any] = {}
    after: dict[int, Any] = {}

    async def hold(i: int) -> None:
        try:
            held[i] = await ex.run(funcs.wait_for_verdict, str(folder))
        except Exception as exc:
            held[i] = exc

    async def follow(i: int) -> None:
        try:
            after[i] = await ex.run(funcs.add, i, i)
        except Exception as exc:
            after[i] = exc

    with anyio.fail_after(BOOT):
        async with anyio.create_task_group() as tg:
            for i in range(n):
                tg.start_soon(hold, i)
            await wait_until_async(lambda: placed("wait_for_verdict", n), BOUND, "held")
            assert all(
                sum(k.startswith("wait_for_verdict") for k in keys) == 1
                for keys in processing.values()
            ), processing
            for i in range(n):
                tg.start_soon(follow, i)
            await wait_until_async(lambda: placed("add", n), BOUND, lambda: f"{processing}")
            # a worker with a call waiting behind its held one: that held one crashes
            doomed = next(
                pid for pid, keys in processing.items() if any(k.startswith("add") for k in keys)
            )
            for pid in processing:
                decide(folder, pid, "crash" if pid == doomed else "ok")
    crashed = [r for r in held.values() if isinstance(r, WorkerCrashed)]
    assert len(crashed) == 1, held
    assert sorted(r for r in held.values() if r == "ok") == ["ok"] * (n - 1), held
    assert after == {i: 2 * i for i in range(n)}


async def test_a_crash_fails_its_own_call_only(dask_ex: Executor, tmp_path: Path) -> None:
    await crash_fails_only_its_own_call(dask_ex, client_of(dask_ex), tmp_path)
    await healed(dask_ex)


# -- trust ----------------------------------------------------------------------------


async def outsider_runs(address: str, **client: Any) -> int:
    """Connect an outside client to ``address`` and run a task with it."""
    from distributed import Client

    outsider = await Client(address, asynchronous=True, set_as_default=False, timeout=3, **client)
    try:
        pid: int = await outsider.submit(os.getpid, pure=False)
        return pid
    finally:
        await outsider.close()


async def raw_identity(address: str) -> Any:
    """Ask ``address`` who it is over a plain connection speaking Dask's protocol."""
    from distributed.comm.core import connect

    comm = await connect(address, timeout=3)
    try:
        await comm.write({"op": "identity", "reply": True})
        with anyio.fail_after(BOUND):
            return await comm.read()
    finally:
        comm.abort()


async def test_an_outside_client_is_refused(dask_ex: Executor) -> None:
    from distributed.security import Security

    client = client_of(dask_ex)
    scheduler = client.scheduler.address
    workers = await client.run_on_scheduler(funcs.scheduler_workers)
    here = scheduler.split("://", 1)[1]
    # a client without the cluster's certificate (plain, or with a certificate of its
    # own) is refused, or gets no handshake before its timeout
    with pytest.raises(OSError):
        await outsider_runs(f"tcp://{here}")
    with pytest.raises(OSError):
        await outsider_runs(f"tls://{here}", security=Security.temporary())
    # a raw connection gets no answer, from the scheduler nor from any worker
    for address in [scheduler, *workers]:
        with pytest.raises(OSError):
            await raw_identity(f"tcp://{address.split('://', 1)[1]}")
    assert await dask_ex.run(funcs.add, 1, 2) == 3  # the pool's own client still works


# -- code the cluster cannot import --------------------------------------------------


async def test_a_function_the_cluster_cannot_import_is_a_serialization_error(
    dask_ex: Executor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A module only this process can import: the cluster started before it existed.
    (tmp_path / "only_here_mod.py").write_text("def inc(x):\n    return x + 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import only_here_mod  # type: ignore[import-not-found]

    with anyio.fail_after(BOUND):
        with pytest.raises(SerializationError, match="only_here_mod"):
            await dask_ex.run(only_here_mod.inc, 1)
        with pytest.raises(SerializationError, match="only_here_mod"):
            await dask_ex.run(funcs.echo, only_here_mod.inc)  # as an argument too
    assert await dask_ex.run(funcs.add, 1, 2) == 3


# -- log records -----------------------------------------------------------------------


class Kept(logging.Handler):
    """Keeps the records it handles; wakes a waiter at each (on the loop's thread,
    where Dask's client hands forwarded records to their logger)."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []
        self.arrived = anyio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        self.arrived.set()


@pytest.fixture
def kept() -> Iterator[Kept]:
    handler = Kept()
    logger = logging.getLogger("app.dask")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


async def test_a_record_logged_in_a_task_reaches_the_parents_logger(
    dask_ex: Executor, kept: Kept
) -> None:
    await dask_ex.run(funcs.log_on_worker, "app.dask", logging.WARNING, "hello %s", "dask")
    with anyio.fail_after(BOUND):
        await kept.arrived.wait()
    [record] = kept.records
    assert (record.name, record.levelno, record.getMessage()) == (
        "app.dask",
        logging.WARNING,
        "hello dask",
    )
    assert record.process != os.getpid()  # made in a worker
    assert record.offload_pool == "dask"  # type: ignore[attr-defined]
    assert record.offload_call == "tests.funcs.log_on_worker"  # type: ignore[attr-defined]


async def test_records_carry_labels_only_while_a_call_runs(dask_ex: Executor) -> None:
    handlers, pool, call = await dask_ex.run(funcs.worker_logging)
    assert "_ForwardingLogHandler" in handlers  # Dask's, on the worker's root logger
    assert (pool, call) == ("dask", "tests.funcs.worker_logging")
    # The same thread, outside a call: a Dask task of another client, say.
    assert await client_of(dask_ex).submit(funcs.worker_logging, pure=False) == (
        handlers,
        None,
        None,
    )


async def test_an_attribute_that_cannot_travel_travels_as_its_repr(
    dask_ex: Executor, kept: Kept
) -> None:
    # Dask's handler would raise TypeError out of the logging call, failing the task.
    await dask_ex.run(funcs.log_on_worker, "app.dask", logging.ERROR, "odd", thing=object())
    await dask_ex.run(funcs.log_on_worker, "app.dask", logging.ERROR, "plain", n=[1, "2"])
    # Nor does an attribute whose repr() exits fail the call that logged it.
    await dask_ex.run(funcs.log_hostile_attribute, "app.dask")
    with anyio.fail_after(BOUND):
        while len(kept.records) < 3:
            kept.arrived = anyio.Event()
            await kept.arrived.wait()
    exiting, odd, plain = sorted(kept.records, key=lambda r: r.getMessage())
    assert exiting.thing == "<HostileResult object>"  # type: ignore[attr-defined]
    assert odd.thing.startswith("<object object at ")  # type: ignore[attr-defined]
    assert list(plain.n) == [1, "2"]  # type: ignore[attr-defined]


# -- how a dead worker ended, from its nanny's log --------------------------------------


class FakeNanny:
    """A nanny's ``get_logs`` (the newest line first), one list of lines per ask."""

    def __init__(self, *answers: list[tuple[str, str]]) -> None:
        self.answers = list(answers)
        self.asked: list[str] = []

    def rpc(self, address: str) -> FakeNanny:
        self.asked.append(address)
        return self

    async def get_logs(self, n: int) -> list[tuple[str, str]]:
        if not self.answers:
            raise OSError("the nanny is gone")
        return self.answers[0] if len(self.answers) == 1 else self.answers.pop(0)


def nanny_line(message: str) -> tuple[str, str]:
    return ("INFO", f"2026-01-01 00:00:00,000 - distributed.nanny - INFO - {message}")


DEAD = SimpleNamespace(address="tls://127.0.0.1:1", nanny="tls://127.0.0.1:2", pid=4242)


@pytest.mark.parametrize(
    ("line", "status"),
    [
        ("Worker process 4242 was killed by signal 11", (4242, -11)),
        ("Worker process 4242 exited with status 3", (4242, 3)),
        ("Worker process 4242 was killed by unknown signal", (4242, None)),
    ],
)
async def test_exit_status_is_read_from_the_nanny(
    line: str, status: tuple[int, int | None]
) -> None:
    # An older death of another worker of the same nanny is not this one's.
    nanny = FakeNanny([nanny_line(line), nanny_line("Worker process 1111 was killed by signal 9")])
    assert await exit_status(nanny, DEAD) == status
    assert nanny.asked == [DEAD.nanny]


async def test_exit_status_waits_for_the_nanny_to_see_the_death() -> None:
    unaware = [nanny_line("Worker process 1111 was killed by signal 9")]
    aware = [nanny_line("Worker process 4242 was killed by signal 6"), *unaware]
    nanny = FakeNanny(unaware, unaware, aware)
    assert await exit_status(nanny, DEAD) == (4242, -6)
    assert len(nanny.asked) == 3


async def test_exit_status_unknown_is_no_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(calls, "EXIT_STATUS_WAIT", 0.3)
    silent = FakeNanny([nanny_line("Restarting worker")])
    with anyio.fail_after(BOUND):
        assert await exit_status(silent, DEAD) == (None, None)
    assert await exit_status(FakeNanny(), DEAD) == (None, None)  # unreachable
    no_nanny = SimpleNamespace(address="tls://127.0.0.1:1", nanny=None, pid=4242)
    assert await exit_status(FakeNanny(), no_nanny) == (None, None)


async def collect(results: AsyncIterator[Any], into: list[Any]) -> None:
    async for r in results:
        into.append(r)


async def test_map(dask_ex: Executor) -> None:
    assert [r async for r in dask_ex.map(abs, range(-3, 3))] == [3, 2, 1, 0, 1, 2]
    unordered = [r async for r in dask_ex.map(abs, range(-3, 3), ordered=False)]
    assert sorted(unordered) == [0, 1, 1, 2, 2, 3]
    got: list[float] = []
    with pytest.raises(ValueError, match="math domain error"):
        await collect(dask_ex.map(math.sqrt, [4, 9, -1, 16]), got)
    assert got == [2.0, 3.0]


async def test_map_in_chunks(dask_ex: Executor) -> None:
    before = dask_ex.stats().completed
    assert [r async for r in dask_ex.map(abs, range(-200, 0), chunksize=50)] == list(
        range(200, 0, -1)
    )
    assert dask_ex.stats().completed - before == 4
    # An item's error is its own: the items before it in its chunk are delivered.
    got: list[float] = []
    with pytest.raises(ValueError, match="math domain error"):
        await collect(dask_ex.map(math.sqrt, [4, 9, -1, 16], chunksize=4), got)
    assert got == [2.0, 3.0]
    # The automatic size batches tiny items on Dask too, whose calls cost the most.
    before = dask_ex.stats().completed
    assert [r async for r in dask_ex.map(abs, range(300))] == list(range(300))
    assert dask_ex.stats().completed - before < 300 / 4
