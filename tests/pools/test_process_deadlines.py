"""Deadlines and cancellation in the process pool, with real worker processes: a
running call's worker is killed and replaced, a queued call never runs.

Every wait is a bounded poll on a condition (``wait_until``); no test sleeps and hopes.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from offload import (
    Executor,
    Offloader,
    OffloadTimeout,
)

from .. import funcs
from ..processes import (
    cpu_seconds,
    gone,
    pids_of_concurrent_calls,
    settings,
    wait_until,
    worker_pids,
    worker_procs,
)

# -- 1. deadline -----------------------------------------------------------------------


async def test_deadline_stops_cpu_bound_call_and_kills_its_worker(ex: Executor) -> None:
    pool = ex.pool("process")
    original = {p.pid: p for p in worker_procs()}
    assert len(original) == 2

    # What each worker had used before the call: its share of the call is the rest.
    cpu = {pid: cpu_seconds(proc) or 0.0 for pid, proc in original.items()}
    start_cpu = dict(cpu)
    outcome: dict[str, Any] = {}
    done = anyio.Event()
    spin = 30  # seconds the call would compute, were it not stopped

    async def call() -> None:
        started = time.perf_counter()
        try:
            outcome["result"] = await pool.options(timeout=0.5).run(funcs.spin, spin)
        except BaseException as exc:
            outcome["error"] = exc
        finally:
            outcome["elapsed"] = time.perf_counter() - started
            done.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(call)
        # Sample the workers' CPU time while the call runs, to tell which one spun.
        while not done.is_set():
            for pid, proc in original.items():
                seconds = cpu_seconds(proc)
                if seconds is not None:
                    cpu[pid] = seconds
            await anyio.sleep(0.02)

    assert isinstance(outcome.get("error"), OffloadTimeout), outcome
    # Not before the deadline (less a tick: uvloop's clock counts whole ms), and far
    # sooner than the call would have ended.
    assert 0.5 - 0.001 <= outcome["elapsed"] < spin / 4, outcome
    used = {pid: cpu[pid] - start_cpu[pid] for pid in original}
    busy = max(used, key=lambda pid: used[pid])
    (idle,) = set(original) - {busy}
    # One worker computed while the other idled: how much depends on the CPUs' load,
    # their ratio does not. The computing one was stopped far short of the call's end.
    assert used[busy] > 2 * used[idle], used
    assert used[busy] < spin / 4, used

    # The spinning worker is killed; the idle one is left alone.
    await wait_until(lambda: gone(busy), 3, f"worker {busy} that ran the timed-out call exited")
    assert not gone(idle)

    # A replacement joins, and both workers serve calls.
    await wait_until(
        lambda: pool.stats().workers == 2 and len(worker_procs()) == 2,
        5,
        lambda: f"pool back to 2 workers: {pool.stats()}, {worker_pids()}",
    )
    pids = await pids_of_concurrent_calls(pool, 2)
    assert len(set(pids)) == 2
    assert busy not in pids
    assert set(pids) == worker_pids()
    stats = pool.stats()
    assert stats.timed_out == 1
    assert stats.cancelled == 0


# -- 2. cancellation -------------------------------------------------------------------


async def test_cancel_scope_stops_running_call_and_kills_its_worker(ex: Executor) -> None:
    pool = ex.pool("process")
    original = worker_pids()
    assert len(original) == 2
    returned = False

    async def call() -> None:
        nonlocal returned
        await pool.run(funcs.spin, 30)
        returned = True

    # Cancelled once the call runs on a worker, however long it took to get there.
    async with anyio.create_task_group() as tg:
        tg.start_soon(call)
        await wait_until(lambda: pool.stats().busy == 1, 5, "the call reached a worker")
        tg.cancel_scope.cancel()
    assert not returned

    # Exactly one worker, the one that was spinning, is killed.
    await wait_until(
        lambda: sum(gone(pid) for pid in original) == 1,
        3,
        lambda: f"one of {original} killed; alive: {worker_pids()}",
    )
    stats = pool.stats()
    assert stats.cancelled == 1
    assert stats.timed_out == 0
    assert stats.failed == 0

    assert await pool.run(funcs.add, 2, 3) == 5
    await wait_until(
        lambda: pool.stats().workers == 2 and len(worker_procs()) == 2,
        5,
        lambda: f"pool back to 2 workers: {pool.stats()}",
    )
    assert await pool.run(funcs.add, 3, 4) == 7


async def test_call_started_on_hand_off_then_cancelled_kills_its_worker(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A waiting call's frame is sent by whoever frees a worker (``_send_on_handoff``);
    cancelled before its own task runs, the call is stopped like a running one."""
    async with Offloader(settings(max_workers=1)) as ex:
        pool = ex.pool("process")
        impl = ex.offloader.get_pool("process")
        first = await pool.run(funcs.getpid)
        scope = anyio.CancelScope()
        handoff = impl._handoff  # type: ignore[attr-defined]
        real = handoff._send_early

        def start_then_cancel(worker: Any, job: Any) -> bool:
            started: bool = real(worker, job)
            scope.cancel()  # the waiting caller, before it runs again
            return started

        monkeypatch.setattr(handoff, "_send_early", start_then_cancel)
        async with anyio.create_task_group() as tg:
            tg.start_soon(pool.run, funcs.sleep_getpid, 0.2)  # holds the only worker
            await wait_until(lambda: pool.stats().busy == 1, 5, "the worker busy")

            async def waiter() -> None:
                with scope:
                    await pool.run(funcs.spin, 30)  # would burn 30 s of CPU

            tg.start_soon(waiter)
        assert scope.cancelled_caught
        await wait_until(lambda: gone(first), 5, f"worker {first} stopped")
        assert await pool.run(funcs.getpid) != first  # a new worker serves
        stats = pool.stats()
    assert (stats.cancelled, stats.completed, stats.crashed) == (1, 3, 0)


# -- 3. a queued call past its deadline ------------------------------------------------


async def test_queued_call_past_deadline_never_runs(ex: Executor, tmp_path: Path) -> None:
    pool = ex.pool("process")
    marker = tmp_path / "f"
    release = tmp_path / "release"
    results: list[str] = []

    async def occupy(i: int) -> None:
        results.append(await pool.run(funcs.wait_for_file, str(release), f"busy{i}"))

    async with anyio.create_task_group() as tg:
        try:
            tg.start_soon(occupy, 0)
            tg.start_soon(occupy, 1)
            await wait_until(lambda: pool.stats().busy == 2, 5, "both workers busy")
            with pytest.raises(OffloadTimeout):
                await pool.options(timeout=0.3).run(funcs.touch_then, str(marker))
            # Both workers are held until the release: it timed out in the queue, not
            # after a worker freed up.
            assert results == []
            assert pool.stats().busy == 2
            assert pool.stats().queued == 0
        finally:
            release.write_text("")
    assert sorted(results) == ["busy0", "busy1"]

    # Had the call reached a worker after all, it would run before any later call
    # on that worker: one call on each worker is a barrier.
    pids = await pids_of_concurrent_calls(pool, 2)
    assert len(set(pids)) == 2
    assert not marker.exists()
    assert pool.stats().timed_out == 1
