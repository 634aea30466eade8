"""Where a call's time went: queue wait, transfer and run, per call and in stats().

A call's own phases are read from a :class:`RequestTimings` set for it alone (what
the Server-Timing header sums); the pool's, from ``stats()``. No figure is compared
with a fixed duration, only with what the test made happen: a sleep of known length
in the worker, a worker held by an event or a file while the next call waits.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from offload import Executor, Offloader, OffloadSettings, WorkerCrashed, _stats
from offload._stats import RequestTimings, request_timings

from .. import funcs
from ..processes import wait_until

KINDS = ["process", "thread"]
#: what a test's call sleeps in the worker, in seconds
NAP = 0.2


def one_worker() -> OffloadSettings:
    return OffloadSettings(
        process={"max_workers": 1}, thread={"max_workers": 1}, shutdown_timeout=5
    )


async def timed(pool: Executor, fn: Callable[..., Any], *args: Any) -> RequestTimings:
    """Run ``fn(*args)`` in ``pool``; the phases of this call alone."""
    timings = RequestTimings()
    token = request_timings.set(timings)
    try:
        await pool.run(fn, *args)
    finally:
        request_timings.reset(token)
    assert timings.calls == 1
    return timings


@pytest.mark.parametrize("kind", KINDS)
async def test_run_is_measured_by_the_worker(kind: str) -> None:
    async with Offloader(one_worker()) as ex:
        pool = ex.pool(kind)
        quick = await timed(pool, funcs.add, 1, 2)
        napping = await timed(pool, funcs.sleep_then, NAP, None)
        stats = pool.stats()
    assert quick.run is not None
    assert napping.run is not None
    assert napping.run >= NAP
    assert quick.run < napping.run
    # The phases split the latency: nothing of the nap is counted twice.
    assert napping.queue_wait is not None
    assert napping.transfer is not None
    assert stats.latency_p99 is not None
    assert napping.queue_wait + napping.transfer + napping.run <= stats.latency_p99 + 1e-9
    assert stats.run_p99 is not None
    assert stats.run_p99 >= NAP


@pytest.mark.parametrize("kind", KINDS)
async def test_queue_wait_is_the_wait_for_a_held_worker(kind: str, tmp_path: Path) -> None:
    release = threading.Event()
    go = tmp_path / "go"
    holder: tuple[Callable[..., Any], tuple[Any, ...]] = (
        (funcs.wait_for_file, (str(go),)) if kind == "process" else (funcs.block_on, (release,))
    )
    async with Offloader(one_worker()) as ex:
        pool = ex.pool(kind)
        alone = await timed(pool, funcs.add, 1, 2)
        queued: list[RequestTimings] = []

        async def wait_in_line() -> None:
            queued.append(await timed(pool, funcs.add, 3, 4))

        async with anyio.create_task_group() as tg:
            tg.start_soon(pool.run, holder[0], *holder[1])
            await wait_until(lambda: pool.stats().busy == 1, 10, "the holder runs")
            tg.start_soon(wait_in_line)
            await wait_until(lambda: pool.stats().queued == 1, 10, "a call waits")
            # The next call waits at least this long, behind the held worker.
            await anyio.sleep(NAP)
            go.touch()
            release.set()
    (waited,) = queued
    assert alone.queue_wait is not None
    assert waited.queue_wait is not None
    assert waited.queue_wait >= NAP
    assert alone.queue_wait < waited.queue_wait
    # It waited for the worker, and ran as quickly as the call that did not.
    assert waited.run is not None
    assert waited.run < waited.queue_wait


async def test_phases_add_up_to_the_latency_of_a_process_call() -> None:
    async with Offloader(one_worker()) as ex:
        pool = ex.pool("process")
        await pool.run(funcs.sleep_then, NAP, b"x" * 100_000)
        stats = pool.stats()
    parts = [stats.queue_wait_p50, stats.transfer_p50, stats.run_p50]
    transfer = stats.transfer_p50
    assert None not in parts
    assert stats.latency_p50 is not None
    assert math.isclose(sum(p for p in parts if p is not None), stats.latency_p50, rel_tol=1e-9)
    assert transfer is not None
    assert transfer > 0


async def test_a_thread_call_transfers_nothing() -> None:
    async with Offloader(one_worker()) as ex:
        pool = ex.pool("thread")
        call = await timed(pool, funcs.echo, b"x" * 100_000)
        stats = pool.stats()
    assert call.transfer == 0.0
    assert (stats.transfer_p50, stats.transfer_p90, stats.transfer_p99) == (0.0, 0.0, 0.0)


@pytest.mark.parametrize("kind", KINDS)
async def test_percentiles_in_stats(kind: str) -> None:
    async with Offloader(one_worker()) as ex:
        pool = ex.pool(kind)
        before = pool.stats()
        for value in range(20):
            await pool.run(funcs.echo, value)
        stats = pool.stats()
    phases = ("queue_wait", "transfer", "run")
    names = [f"{phase}_p{q}" for phase in phases for q in (50, 90, 99)]
    assert all(getattr(before, name) is None for name in names)
    for phase in phases:
        p50, p90, p99 = (getattr(stats, f"{phase}_p{q}") for q in (50, 90, 99))
        assert p50 is not None, phase
        assert p50 <= p90 <= p99, phase


async def test_calls_that_raise_have_phases_crashes_have_none() -> None:
    async with Offloader(one_worker()) as ex:
        pool = ex.pool("process")
        with pytest.raises(funcs.Boom):
            await pool.run(funcs.boom, "no")
        raised = pool.stats()
        crash = RequestTimings()
        token = request_timings.set(crash)
        try:
            with pytest.raises(WorkerCrashed):
                await pool.run(funcs.exit_now)
        finally:
            request_timings.reset(token)
        crashed = pool.stats()
    # The function ran and raised: its worker says how long.
    assert raised.run_p50 is not None
    # A crash tells nothing: it is in the latencies, not in the phases.
    assert crash.calls == 0
    assert crashed.crashed == 1
    assert crashed.run_p99 == raised.run_p99


async def test_a_result_that_will_not_pickle_still_reports_its_run() -> None:
    async with Offloader(one_worker()) as ex:
        pool = ex.pool("process")
        with pytest.raises(Exception, match="cannot be pickled"):
            await pool.run(funcs.return_lock)
        assert pool.stats().run_p50 is not None


@pytest.mark.parametrize("kind", KINDS)
async def test_decorated_calls_count_in_the_current_timings(kind: str) -> None:
    async with Offloader(one_worker()):
        timings = RequestTimings()
        token = request_timings.set(timings)
        try:
            await (funcs.double if kind == "process" else funcs.thread_double)(2)
            async with anyio.create_task_group() as tg:  # a task of its own shares them
                tg.start_soon(funcs.double, 3)
        finally:
            request_timings.reset(token)
    assert timings.calls == 2
    assert timings.run is not None
    assert timings.queue_wait is not None


class _Ended:
    """What ``Counters.record`` reads of a call."""

    def __init__(self, ran: float | None, queue_wait: float | None) -> None:
        self.name = "f"
        self.ran = ran
        self.queue_wait = queue_wait


def test_histograms_take_in_every_call_across_folds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_stats, "LATENCY_WINDOW", 8)
    counters = _stats.Counters()
    expected = _stats.Phases()
    for i in range(29):  # three folds, and five calls past the last
        latency = 10.0 ** (i % 7 - 6)  # 1 us .. 1 s
        ran = None if i % 5 == 0 else latency / 4  # some calls have no phases
        queue_wait = None if i % 3 == 0 else latency / 8
        counters.record(_Ended(ran, queue_wait), latency, True)
        expected.latency.observe(latency)
        if ran is not None:
            expected.run.observe(ran)
            expected.transfer.observe(latency - ran - (queue_wait or 0.0))
            if queue_wait is not None:
                expected.queue_wait.observe(queue_wait)
    found = counters.histograms()
    for phase in ("latency", "queue_wait", "transfer", "run"):
        mine, theirs = getattr(found, phase), getattr(expected, phase)
        assert mine.counts == theirs.counts, phase
        assert math.isclose(mine.sum, theirs.sum), phase
    # Reading them takes nothing in: a second read gives the same.
    assert counters.histograms().latency.counts == found.latency.counts
