"""A failure at each stage of a call fails that call only, and clearly: one suite, run
against every kind that can meet the failure (helpers in ``matrix.py``).

The stages: pickling the arguments (parent), unpickling them (worker), running,
pickling the result (worker), unpickling it (parent), plus a worker killed while idle
and exceptions that will not travel. After every case the pool must be sound: a normal
call succeeds, ``stats()`` counts both calls where they belong, and the live workers
are back to ``max_workers`` within a bounded wait (``wait_until``).

Which kind meets which case (each skip says why):

- thread: the failures of running; nothing is pickled, and a crash would end this
  process;
- process: every case; dask: every case but three of its five crashes (a worker's death
  is reported alike whatever kills it), on asyncio only, its client's loop, with one
  embedded cluster for the module, since starting one takes seconds;
- the process kind's own cases (a deadline that kills its worker, initializers,
  ``start_timeout``, shutdown while a worker boots) are in
  ``test_fault_matrix_process.py``.
"""

from __future__ import annotations

import os
import re
import signal
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import psutil
import pytest

from offload import (
    CallAborted,
    Executor,
    Offloader,
    OffloadError,
    OffloadSettings,
    RemoteTraceback,
    SerializationError,
    WorkerCrashed,
)

from .. import funcs
from ..conftest import Backend, children, loop_name
from ..processes import gone, wait_until, worker_pids
from .matrix import (
    CALL_BOUND,
    KINDS,
    MAX_WORKERS,
    assert_pool_recovers,
    assert_remote_cause,
    counters,
    error_of,
    live_workers,
    matrix_settings,
    pid_pickling_result,
    pid_unpickling_args,
    serving_pids,
    settled,
)

# the contract every event loop keeps (see tests/conftest.py)
pytestmark = pytest.mark.all_loops

# -- one pool of each kind -------------------------------------------------------------


#: the processes of the module's dask cluster, once it runs (see no_leftover_children)
_cluster: set[int] = set()


@pytest.fixture(scope="module")
async def dask_pool() -> AsyncIterator[Executor]:
    # No process pool runs beside it (it would start at its first call): the process
    # cases count this process's worker processes.
    settings = OffloadSettings(
        thread={"max_workers": 1},
        pools={"dask": {"kind": "dask", "max_workers": MAX_WORKERS}},
        default_pool="dask",
        shutdown_timeout=5,
    )
    async with Offloader(settings) as ex:
        pool = ex.pool("dask")
        host = pool.offloader.get_pool("dask")._embedded.process  # type: ignore[attr-defined]
        tree = psutil.Process(host.pid)
        _cluster.update({tree.pid, *(p.pid for p in tree.children(recursive=True))})
        yield pool
    _cluster.clear()


@pytest.fixture
def shared_dask(kind: str, anyio_backend: Backend, request: pytest.FixtureRequest) -> Any:
    """The module's dask pool for a dask case; ``None`` for the other kinds."""
    if kind != "dask":
        return None
    pytest.importorskip("distributed")
    if loop_name(anyio_backend) != "asyncio":
        pytest.skip("dask: its client runs on asyncio only, and one cluster serves the module")
    return request.getfixturevalue("dask_pool")


@pytest.fixture(autouse=True)
def no_leftover_children() -> Iterator[None]:
    """As the suite's own, but the module's dask cluster may outlive a test: its host
    and whatever runs under it (its current workers)."""
    before = {p.pid for p in children()}
    yield
    allowed = before | _cluster
    if _cluster:
        host = psutil.Process(min(_cluster))
        allowed |= {p.pid for p in host.children(recursive=True)}
    leftover = [p for p in children() if p.pid not in allowed]
    for p in leftover:
        p.kill()
    assert not leftover, f"child processes left behind: {[p.pid for p in leftover]}"


@asynccontextmanager
async def pool_of(kind: str, shared_dask: Executor | None) -> AsyncIterator[Executor]:
    """A fresh pool of ``kind``; for dask, the module's."""
    if shared_dask is not None:
        yield shared_dask
        return
    settings = matrix_settings()
    if kind == "thread":  # the process pool, unused, would start on first use: never
        settings = OffloadSettings(thread=settings.thread, default_pool="thread")
    async with Offloader(settings) as ex:
        yield ex.pool(kind)


# -- the stages of one call, as a table ------------------------------------------------

#: why a kind does not meet a case
NOTHING_PICKLED = "thread: a call's objects are passed as they are; nothing is pickled"
THIS_PROCESS = "thread: the call runs in this process, which a crash would end"
ONE_DEATH = (
    "dask: the scheduler reports a worker's death alike whatever killed it (run-os-exit, "
    "run-sigkill-from-outside), and each costs a worker restart of seconds"
)


@dataclass(frozen=True)
class Case:
    """One way a call can fail.

    ``call`` builds ``(fn, args)`` from a scratch directory; ``check`` inspects the
    error (of a pool of the kind it is given); ``counter`` is where stats must count
    it; ``worker`` says what becomes of the worker that ran it: ``"reused"`` (the same
    processes serve on) or ``"replaced"`` (it died: a new process takes its place).
    ``not_for`` maps a kind that does not meet the case to the reason.
    """

    id: str
    call: Callable[[Path], tuple[Callable[..., Any], tuple[Any, ...]]]
    check: Callable[[Exception, str], None]
    counter: str
    worker: str
    kill_from_outside: bool = False
    #: reads, from the error, the pid of the worker that handled the call
    worker_pid: Callable[[Exception], int] | None = None
    not_for: dict[str, str] = field(default_factory=dict)


def check_unpickle_args(exc: Exception, kind: str) -> None:
    assert type(exc) is SerializationError, repr(exc)
    assert "tests.funcs.echo" in str(exc), str(exc)
    assert "unpickle" in str(exc), str(exc)
    if kind == "dask":  # the task unpickles its call: its error is in the message
        assert "UnpickleRefused" in str(exc), str(exc)
    else:
        assert_remote_cause(exc, kind, "UnpickleRefused", "refusing to unpickle")


def check_crash(
    exitcode: int, words: str, function: str, frame: str | None = None
) -> Callable[[Exception, str], None]:
    """A ``WorkerCrashed`` naming ``function`` and how its worker ended; with ``frame``,
    the worker's fault handler caught the crash there (the report's top frames are
    quoted in the message, the whole report is ``traceback``)."""

    def check(exc: Exception, kind: str) -> None:
        assert type(exc) is WorkerCrashed, repr(exc)
        message = str(exc)
        assert exc.function == function, (exc.function, message)
        assert function in message, message
        if kind == "dask":  # the scheduler tells which worker died; its nanny, how
            assert "died" in message, message
            assert exc.traceback is None
            if exc.exitcode is not None:  # the nanny told in time
                assert exc.exitcode == exitcode, (exc.exitcode, message)
                assert words in message, message
            return
        assert exc.exitcode == exitcode, (exc.exitcode, message)
        assert words in message, message
        assert exc.pid is not None
        assert str(exc.pid) in message
        if frame is None:
            assert exc.traceback is None, exc.traceback
            return
        assert exc.traceback is not None, message
        assert exc.traceback.startswith("Fatal Python error: "), exc.traceback
        # faulthandler's frame lines: ``  File "...", line N in name``
        assert re.search(rf'File ".*", line \d+ in {frame}\n', exc.traceback), exc.traceback
        assert f" in {frame}" in message, message

    return check


def check_boom(exc: Exception, kind: str) -> None:
    assert type(exc) is funcs.Boom, repr(exc)
    assert str(exc) == "kaboom"
    assert_remote_cause(exc, kind, "Boom", "kaboom")


def check_memory_error(exc: Exception, kind: str) -> None:
    assert type(exc) is MemoryError, repr(exc)
    assert str(exc) == "pretend the heap is full"
    assert_remote_cause(exc, kind, "MemoryError")


def check_result_pickling(exc: Exception, kind: str) -> None:
    assert type(exc) is SerializationError, repr(exc)
    assert "tests.funcs.return_lock" in str(exc), str(exc)
    if kind == "dask":  # Dask's own pickling error, as the cause
        assert "lock" in str(exc.__cause__), repr(exc.__cause__)
    else:
        assert_remote_cause(exc, kind, "lock")


def check_result_unpickling(exc: Exception, kind: str) -> None:
    assert type(exc) is SerializationError, repr(exc)
    message = str(exc)
    assert "tests.funcs.return_refusing" in message, message
    assert "refusing to unpickle" in message, message
    assert isinstance(exc.__cause__, funcs.UnpickleRefused), repr(exc.__cause__)


def check_unpicklable_exception(exc: Exception, kind: str) -> None:
    assert isinstance(exc, OffloadError), repr(exc)
    assert not isinstance(exc, funcs.LockedError)
    message = str(exc)
    assert "tests.funcs.LockedError" in message, message
    assert "the lock would not travel" in message, message
    assert_remote_cause(exc, kind, "LockedError", "the lock would not travel")


def check_unrebuildable_exception(exc: Exception, kind: str) -> None:
    # The worker round-trips the exception through pickle before sending it, so it
    # finds out that it cannot be rebuilt and sends its name and message instead.
    assert isinstance(exc, OffloadError), repr(exc)
    message = str(exc)
    assert "tests.funcs.TwoArgError" in message, message
    assert "first half" in message, message
    assert_remote_cause(exc, kind, "TwoArgError", "first half")


def check_aborted(original: type[BaseException]) -> Callable[[Exception, str], None]:
    """A ``BaseException`` that is not an ``Exception`` arrives as CallAborted, the
    original as its cause, rather than as itself (which would end the caller's task,
    or its program)."""

    def check(exc: Exception, kind: str) -> None:
        assert type(exc) is CallAborted, repr(exc)
        assert "tests.funcs.raise_base" in str(exc), str(exc)
        assert type(exc.__cause__) is original, repr(exc.__cause__)

    return check


def check_exit_in_pickling(function: str, cause: type[BaseException]) -> Callable[..., None]:
    """A pickling hook that calls ``sys.exit`` fails only its call, with a
    SerializationError: the SystemExit is its cause (or, raised in a worker, named
    in the worker's traceback), never raised as itself."""

    def check(exc: Exception, kind: str) -> None:
        assert type(exc) is SerializationError, repr(exc)
        assert function in str(exc), str(exc)
        if cause is RemoteTraceback:
            assert_remote_cause(exc, kind, "SystemExit")
        else:
            assert type(exc.__cause__) is cause, repr(exc.__cause__)

    return check


def check_exiting_exception(exc: Exception, kind: str) -> None:
    # Rebuilt from its __dict__ where it can be (kind process), else named.
    if type(exc) is not funcs.ExitingError:
        assert isinstance(exc, OffloadError), repr(exc)
        assert "tests.funcs.ExitingError" in str(exc), str(exc)


CASES = [
    Case(
        "unpickle-args-in-worker-reduce",
        lambda _: (funcs.echo, (funcs.RefusesForeignReduce(),)),
        check_unpickle_args,
        "failed",
        "reused",
        worker_pid=pid_unpickling_args,
        not_for={"thread": NOTHING_PICKLED},
    ),
    Case(
        "unpickle-args-in-worker-setstate",
        lambda _: (funcs.echo, (funcs.RefusesForeignSetstate(),)),
        check_unpickle_args,
        "failed",
        "reused",
        worker_pid=pid_unpickling_args,
        not_for={"thread": NOTHING_PICKLED},
    ),
    Case(
        "unpickle-args-in-worker-segfault",
        lambda _: (funcs.echo, (funcs.SegfaultsForeignUnpickle(),)),
        check_crash(-signal.SIGSEGV, "killed by SIGSEGV", "tests.funcs.echo", "string_at"),
        "crashed",
        "replaced",
        not_for={"thread": NOTHING_PICKLED, "dask": ONE_DEATH},
    ),
    Case("run-raises", lambda _: (funcs.boom, ("kaboom",)), check_boom, "failed", "reused"),
    Case(
        "run-os-exit",
        lambda _: (funcs.exit_now, (3,)),
        check_crash(3, "exited with code 3", "tests.funcs.exit_now"),
        "crashed",
        "replaced",
        not_for={"thread": THIS_PROCESS},
    ),
    Case(
        "run-segfault",
        lambda _: (funcs.segfault, ()),
        check_crash(-signal.SIGSEGV, "killed by SIGSEGV", "tests.funcs.segfault", "segfault"),
        "crashed",
        "replaced",
        not_for={"thread": THIS_PROCESS, "dask": ONE_DEATH},
    ),
    Case(
        "run-abort",
        lambda _: (funcs.abort_now, ()),
        check_crash(-signal.SIGABRT, "killed by SIGABRT", "tests.funcs.abort_now", "abort_now"),
        "crashed",
        "replaced",
        not_for={"thread": THIS_PROCESS, "dask": ONE_DEATH},
    ),
    Case(
        "run-sigkill-from-outside",
        lambda tmp: (funcs.write_pid_then_spin, (str(tmp / "pid"), 30)),
        check_crash(-signal.SIGKILL, "killed by SIGKILL", "tests.funcs.write_pid_then_spin"),
        "crashed",
        "replaced",
        kill_from_outside=True,
        not_for={"thread": THIS_PROCESS},
    ),
    Case(
        "run-memory-error",
        lambda _: (funcs.raise_memory_error, ("pretend the heap is full",)),
        check_memory_error,
        "failed",
        "reused",
    ),
    Case(
        "pickle-result-in-worker",
        lambda _: (funcs.return_lock, ()),
        check_result_pickling,
        "failed",
        "reused",
        not_for={"thread": NOTHING_PICKLED},
    ),
    Case(
        "unpickle-result-in-parent",
        lambda _: (funcs.return_refusing, ()),
        check_result_unpickling,
        "failed",
        "reused",
        worker_pid=pid_pickling_result,
        not_for={"thread": NOTHING_PICKLED},
    ),
    Case(
        "run-system-exit",
        lambda _: (funcs.raise_base, ("exit",)),
        check_aborted(SystemExit),
        "failed",
        "reused",
    ),
    Case(
        "run-keyboard-interrupt",
        lambda _: (funcs.raise_base, ("interrupt",)),
        check_aborted(KeyboardInterrupt),
        "failed",
        "reused",
    ),
    Case(
        "run-generator-exit",
        lambda _: (funcs.raise_base, ("generator-exit",)),
        check_aborted(GeneratorExit),
        "failed",
        "reused",
    ),
    Case(
        "pickle-args-exits",
        lambda _: (funcs.echo, (funcs.ExitsWhenPickled(),)),
        check_exit_in_pickling("tests.funcs.echo", SystemExit),
        "failed",
        "reused",
        not_for={"thread": NOTHING_PICKLED},
    ),
    Case(
        "pickle-result-exits",
        lambda _: (funcs.return_exits_when_pickled, ()),
        check_exit_in_pickling("tests.funcs.return_exits_when_pickled", RemoteTraceback),
        "failed",
        "reused",
        not_for={"thread": NOTHING_PICKLED},
    ),
    Case(
        "result-hostile",
        lambda _: (funcs.return_hostile, ()),
        check_exit_in_pickling("tests.funcs.return_hostile", RemoteTraceback),
        "failed",
        "reused",
        not_for={"thread": NOTHING_PICKLED},
    ),
    Case(
        "unpickle-result-exits",
        lambda _: (funcs.return_exits_when_unpickled, ()),
        check_exit_in_pickling("tests.funcs.return_exits_when_unpickled", SystemExit),
        "failed",
        "reused",
        not_for={"thread": NOTHING_PICKLED},
    ),
    Case(
        "exception-exits-when-pickled",
        lambda _: (funcs.raise_hostile, ("exiting",)),
        check_exiting_exception,
        "failed",
        "reused",
        not_for={"thread": NOTHING_PICKLED},
    ),
    Case(
        "exception-unpicklable",
        lambda _: (funcs.raise_locked, ("the lock would not travel",)),
        check_unpicklable_exception,
        "failed",
        "reused",
        not_for={"thread": NOTHING_PICKLED},
    ),
    Case(
        "exception-unrebuildable",
        lambda _: (funcs.raise_two_arg, ("first half", "second half")),
        check_unrebuildable_exception,
        "failed",
        "reused",
        not_for={"thread": NOTHING_PICKLED},
    ),
]


def case_params() -> list[Any]:
    params = []
    for case in CASES:
        for kind in KINDS:
            marks: list[pytest.MarkDecorator] = []
            if kind in case.not_for:
                marks.append(pytest.mark.skip(reason=case.not_for[kind]))
            params.append(pytest.param(case, kind, id=f"{case.id}-{kind}", marks=marks))
    return params


@pytest.mark.parametrize(("case", "kind"), case_params())
async def test_stage_fault_fails_only_its_call(
    case: Case, kind: str, shared_dask: Executor | None, tmp_path: Path
) -> None:
    async with pool_of(kind, shared_dask) as pool:
        original = await settled(pool)
        before = counters(pool)
        fn, args = case.call(tmp_path)

        async with anyio.create_task_group() as tg:
            if case.kill_from_outside:
                pidfile = tmp_path / "pid"

                async def killer() -> None:
                    await wait_until(pidfile.exists, 5, "the spinning worker wrote its pid")
                    os.kill(int(pidfile.read_text()), signal.SIGKILL)

                tg.start_soon(killer)
            error = await error_of(pool, fn, *args)
        case.check(error, kind)

        served = 0  # calls made by serving_pids
        if case.worker == "reused":
            # No process died or was started: the same ones serve the next calls,
            # among them the one that handled the faulty call.
            assert await live_workers(pool) == original
            if kind == "process":
                assert await serving_pids(pool) == original
                assert worker_pids() == original
                served = MAX_WORKERS
            if case.worker_pid is not None:
                assert case.worker_pid(error) in original
        else:
            assert isinstance(error, WorkerCrashed)
            if kind == "process":
                dead = error.pid
                assert dead in original
                await wait_until(lambda: gone(dead), 3, f"crashed worker {dead} gone")
            now = await settled(pool)
            # one worker replaced: the call was not retried on another
            assert len(now - original) == 1, (original, now)
            if kind == "process":
                assert dead not in now
                assert await serving_pids(pool) == now
                served = MAX_WORKERS
        await assert_pool_recovers(pool, before, **{case.counter: 1, "completed": served})


@pytest.mark.parametrize(
    "kind",
    [pytest.param("thread", marks=pytest.mark.skip(reason=NOTHING_PICKLED)), "process", "dask"],
)
async def test_unpicklable_argument_is_refused_before_dispatch(
    kind: str, shared_dask: Executor | None, tmp_path: Path
) -> None:
    """Pickling the arguments fails in the parent: SerializationError, nothing sent.

    Both workers are held while the call is made: a call that got as far as a worker
    would wait in line, so an error while they are still held (and no call queued)
    shows it never did.
    """
    async with pool_of(kind, shared_dask) as pool:
        original = await settled(pool)
        before = counters(pool)
        marker = tmp_path / "ran"
        release = tmp_path / "release"
        occupied: list[str] = []

        async def occupy() -> None:
            occupied.append(await pool.run(funcs.wait_for_file, str(release), "ok"))

        async with anyio.create_task_group() as tg:
            try:
                for _ in range(MAX_WORKERS):
                    tg.start_soon(occupy)
                await wait_until(lambda: pool.stats().busy == MAX_WORKERS, 5, "all workers busy")
                error = await error_of(pool, funcs.touch_then, str(marker), threading.Lock())
                # Every worker is held until the release: refused while they still are,
                # the call never waited in line for one.
                assert occupied == []
                assert pool.stats().busy == MAX_WORKERS
                assert pool.stats().queued == 0
            finally:
                release.write_text("")
        assert occupied == ["ok"] * MAX_WORKERS

        assert type(error) is SerializationError, repr(error)
        assert "tests.funcs.touch_then" in str(error), str(error)
        assert "lock" in str(error), str(error)
        assert not marker.exists()
        assert await live_workers(pool) == original
        served = 0
        if kind == "process":
            assert await serving_pids(pool) == original
            served = MAX_WORKERS
        assert not marker.exists()
        await assert_pool_recovers(pool, before, failed=1, completed=MAX_WORKERS + served)


@pytest.mark.parametrize(
    "kind",
    [pytest.param("thread", marks=pytest.mark.skip(reason=THIS_PROCESS)), "process", "dask"],
)
async def test_worker_killed_while_idle_fails_no_call(
    kind: str, shared_dask: Executor | None
) -> None:
    """SIGKILL to an idle worker: no call fails, a new worker takes its place."""
    async with pool_of(kind, shared_dask) as pool:
        original = await settled(pool)
        before = counters(pool)
        victim = min(original)
        os.kill(victim, signal.SIGKILL)
        await wait_until(lambda: gone(victim), 3, f"worker {victim} dead")

        # Calls made at once, before the replacement can be ready: the dead worker
        # must not take any of them down.
        results: list[int] = []

        async def call(i: int) -> None:
            results.append(await pool.run(funcs.add, i, 1000))

        with anyio.fail_after(CALL_BOUND):
            async with anyio.create_task_group() as tg:
                for i in range(8):
                    tg.start_soon(call, i)
        assert sorted(results) == [1000 + i for i in range(8)]

        now = await settled(pool)
        assert victim not in now
        assert len(now - original) == 1, (original, now)
        served = 0
        if kind == "process":
            assert await serving_pids(pool) == now
            served = MAX_WORKERS
        assert pool.stats().crashed == before["crashed"]
        await assert_pool_recovers(pool, before, completed=8 + served)
