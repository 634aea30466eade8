"""A crashed process worker says what happened: how it ended, what it ran, and the
stack its fault handler caught (``crash_reports.py``), in ``WorkerCrashed`` and in
the logs, for the crashes the fault matrix does not make: a worker that dies idle,
in its initializer, after a forked child crashed, or that floods its report; and
the report's file never leaks.

The crashes of a call (segfault, abort, ``os._exit``, SIGKILL) are in the fault
matrix (``test_fault_matrix.py``, ``check_crash``).
"""

from __future__ import annotations

import logging
import os
import re
import signal
from pathlib import Path

import anyio
import pytest

from offload import Offloader, PoolStartError, WorkerCrashed
from offload._pools.process.crash_reports import READ_LIMIT

from .. import funcs
from ..processes import settings, wait_until, worker_pids, worker_procs

#: seconds the pool gets to be back at full strength after a crash
RECOVERY = 5.0


def crash_records(caplog: pytest.LogCaptureFixture, *needles: str) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.name == "offload"
        and r.levelno >= logging.WARNING
        and all(n in r.getMessage() for n in needles)
    ]


def frame(name: str) -> str:
    """faulthandler's line for a frame of ``name``: ``  File "...", line N in name``."""
    return rf'File "[^"]*", line \d+ in {name}\n'


async def test_idle_worker_killed_is_logged_with_its_last_call(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="offload")
    async with Offloader(settings(max_workers=1)) as ex:
        pool = ex.pool("process")
        victim = await pool.run(funcs.getpid)
        os.kill(victim, signal.SIGKILL)
        await wait_until(
            lambda: bool(crash_records(caplog, f"idle worker {victim}")), RECOVERY, "the log"
        )
        (record,) = crash_records(caplog, f"idle worker {victim}")
        message = record.getMessage()
        assert record.levelno == logging.WARNING
        assert "killed by SIGKILL" in message, message
        assert "out-of-memory killer" in message, message
        assert re.search(r"its last call, to tests\.funcs\.getpid, ended \d+\.\d s ago", message)
        assert "fault handler" not in message  # SIGKILL cannot be caught
        assert await pool.run(funcs.add, 1, 2) == 3


async def test_idle_worker_crash_in_a_thread_is_logged_with_its_stack(
    caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    """A thread the last call left behind segfaults while the worker idles: the log
    shows that thread's stack (every thread's is in the report)."""
    caplog.set_level(logging.WARNING, logger="offload")
    trigger = tmp_path / "crash"
    async with Offloader(settings(max_workers=1)) as ex:
        pool = ex.pool("process")
        victim = await pool.run(funcs.getpid)
        await pool.run(funcs.segfault_when_exists, str(trigger))
        trigger.touch()
        await wait_until(
            lambda: bool(crash_records(caplog, f"idle worker {victim}")), RECOVERY, "the log"
        )
        (record,) = crash_records(caplog, f"idle worker {victim}")
        message = record.getMessage()
        assert "killed by SIGSEGV" in message, message
        assert "its last call, to tests.funcs.segfault_when_exists" in message, message
        assert "Fatal Python error: Segmentation fault" in message, message
        assert re.search(frame("crash_in_background"), message), message
        assert await pool.run(funcs.add, 1, 2) == 3


async def test_initializer_crash_names_the_initializer_and_its_stack() -> None:
    offloader = Offloader(
        settings(max_workers=1, initializer="tests.funcs:segfaulting_initializer")
    )
    with anyio.fail_after(15), pytest.raises(PoolStartError) as info:
        async with offloader:
            pytest.fail("the block ran though the pool could not start")
    message = str(info.value)
    assert "killed by SIGSEGV" in message, message
    assert "tests.funcs:segfaulting_initializer" in message, message
    crash = info.value.__cause__
    assert isinstance(crash, WorkerCrashed), repr(crash)
    assert crash.function == "tests.funcs:segfaulting_initializer"
    assert crash.exitcode == -signal.SIGSEGV
    assert crash.traceback is not None
    assert re.search(frame("segfaulting_initializer"), crash.traceback), crash.traceback
    assert worker_procs() == [], worker_pids()


async def test_report_without_memfd(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where memfd_create is refused (a seccomp profile), the report goes to an
    unlinked temporary file, and reads the same."""

    def refused(*args: object) -> int:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "memfd_create", refused)
    async with Offloader(settings(max_workers=1)) as ex:
        pool = ex.pool("process")
        with pytest.raises(WorkerCrashed) as info:
            await pool.run(funcs.segfault)
        report = info.value.traceback
        assert report is not None, str(info.value)
        assert re.search(frame("segfault"), report), report
        assert await pool.run(funcs.add, 1, 2) == 3


async def test_interpreter_fatal_error_says_where_its_stack_went() -> None:
    async with Offloader(settings(max_workers=1)) as ex:
        pool = ex.pool("process")
        with pytest.raises(WorkerCrashed) as info:
            await pool.run(funcs.fatal_python_error)
        crash = info.value
        assert crash.exitcode == -signal.SIGABRT
        assert crash.function == "tests.funcs.fatal_python_error"
        assert crash.traceback is None
        assert "killed by SIGABRT" in str(crash), str(crash)
        assert "on the worker's stderr" in str(crash), str(crash)
        assert await pool.run(funcs.add, 1, 2) == 3


async def test_forked_child_cannot_write_into_the_report() -> None:
    """A child the function forks crashes first: its report goes to stderr, not into
    the worker's; the worker's own crash is the only one there."""
    async with Offloader(settings(max_workers=1)) as ex:
        pool = ex.pool("process")
        with pytest.raises(WorkerCrashed) as info:
            await pool.run(funcs.segfault_after_child_segfaults)
        report = info.value.traceback
        assert report is not None, str(info.value)
        assert report.count("Fatal Python error") == 1, report
        assert re.search(frame("segfault_after_child_segfaults"), report), report
        assert "_crash_in_child" not in report, report
        assert await pool.run(funcs.add, 1, 2) == 3


async def test_a_flooded_report_is_read_bounded() -> None:
    """A hostile function writes 8 MiB into its report before it crashes: the parent
    reads at most READ_LIMIT bytes of it."""
    async with Offloader(settings(max_workers=1)) as ex:
        pool = ex.pool("process")
        with pytest.raises(WorkerCrashed) as info:
            await pool.run(funcs.flood_crash_report_then_segfault, 8)
        report = info.value.traceback
        assert report is not None
        assert len(report.encode()) <= READ_LIMIT + 100, len(report)
        assert report.endswith("KiB)\n"), report[-100:]
        assert len(str(info.value)) < 2 * 1024, len(str(info.value))  # a readable message
        assert await pool.run(funcs.add, 1, 2) == 3


async def test_channel_gone_while_worker_lives_gets_its_status_logged_later(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The function closes its channel and runs on: the caller gets WorkerCrashed
    after waiting for an exit status that does not come; the pool stops that worker,
    logs the status once it comes, and carries on at full strength."""
    caplog.set_level(logging.WARNING, logger="offload")
    async with Offloader(settings(max_workers=1)) as ex:
        pool = ex.pool("process")
        with anyio.fail_after(15), pytest.raises(WorkerCrashed) as info:
            await pool.run(funcs.close_channel_then_sleep, 60)
        crash = info.value
        assert crash.exitcode is None
        assert crash.function == "tests.funcs.close_channel_then_sleep"
        assert "exit status unknown (not there after" in str(crash), str(crash)
        await wait_until(
            lambda: bool(crash_records(caplog, "before its exit status came")),
            RECOVERY,
            "the late status logged",
        )
        (record,) = crash_records(caplog, "before its exit status came")
        assert "tests.funcs.close_channel_then_sleep" in record.getMessage()
        assert "killed by SIGTERM" in record.getMessage(), record.getMessage()
        await wait_until(
            lambda: pool.stats().workers == 1 and len(worker_procs()) == 1,
            RECOVERY,
            lambda: f"back to one worker: {pool.stats()}",
        )
        assert await pool.run(funcs.add, 1, 2) == 3


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="no /proc/self/fd here")
async def test_crashes_and_replacements_leak_no_descriptor() -> None:
    async with Offloader(settings(max_workers=2)) as ex:
        pool = ex.pool("process")
        assert await pool.run(funcs.add, 1, 1) == 2
        before = open_fds()
        for fn in (funcs.segfault, funcs.abort_now, funcs.segfault, funcs.exit_now):
            with pytest.raises(WorkerCrashed):
                await pool.run(fn)
        await wait_until(
            lambda: pool.stats().workers == 2 and len(worker_procs()) == 2,
            RECOVERY,
            lambda: f"back to two workers: {pool.stats()}",
        )
        assert await pool.run(funcs.add, 1, 1) == 2
        # Each worker holds as many as the ones it replaced: none is left of the dead.
        assert len(open_fds()) == len(before), (sorted(before), sorted(open_fds()))
