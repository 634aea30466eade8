"""The Offloader's event-loop lag probe: ``stats().loop`` and its exposition."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from blockbuster import BlockingError
from prometheus_client import CollectorRegistry, generate_latest

from offload import LoopStats, Offloader, OffloaderStats, OffloadSettings
from offload._settings import usable_cpus
from offload.prometheus import OffloadCollector


def fast(**settings: Any) -> OffloadSettings:
    """Small pools and a probe that wakes every 5 ms."""
    return OffloadSettings(
        default_pool="thread",
        lag_probe_interval=0.005,
        thread={"max_workers": 1},
        process={"max_workers": 1},
        **settings,
    )


async def samples(offloader: Offloader, at_least: int) -> LoopStats:
    """The loop stats once the probe has woken ``at_least`` times (within 5 s)."""
    with anyio.fail_after(5):
        while True:
            loop = offloader.stats().loop
            assert loop is not None
            if loop.samples >= at_least:
                return loop
            await anyio.sleep(0.005)


#: slack for the clocks' rounding (uvloop's counts whole ms) against an exact bound
CLOCKS = 1e-3


async def test_a_stall_of_the_loop_shows_as_lag() -> None:
    started = time.monotonic()
    async with Offloader(fast()) as ex:
        before = await samples(ex.offloader, 3)
        assert before.interval == 0.005
        assert before.lag_max is not None
        time.sleep(0.2)  # the point: hold the loop's thread
        after = await samples(ex.offloader, before.samples + 1)
    elapsed = time.monotonic() - started  # more than the time the probe's figures span
    # The wake-up due during the stall came at least the stall's length, less one
    # interval, late: a bound from below, whatever else the machine runs.
    assert after.lag_max is not None
    assert after.lag_max >= 0.2 - 0.005 - CLOCKS
    assert after.lag_max >= before.lag_max
    assert after.lag_p50 is not None
    assert after.lag_p90 is not None
    assert after.lag_p50 <= after.lag_p90 <= after.lag_max
    # A sleep holds the loop's thread off the CPU, neither running nor waiting for one:
    # of the time the figures span, at least the stall's share is counted in neither.
    assert after.busy is not None
    off_cpu = 0.2 / elapsed
    assert after.busy + (after.cpu_wait or 0.0) <= 1 - off_cpu + CLOCKS, (after, elapsed)


def spin(seconds: float) -> None:
    """Run on this thread's CPU for ``seconds`` of its CPU time."""
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


async def test_code_on_the_loop_shows_as_busy() -> None:
    started = time.monotonic()
    async with Offloader(fast()) as ex:
        before = await samples(ex.offloader, 3)
        spin(0.3)  # the point: compute on the loop's thread
        after = await samples(ex.offloader, before.samples + 1)
    elapsed = time.monotonic() - started  # more than the time the probe's figures span
    assert after.lag_max is not None
    assert after.lag_max >= 0.25
    assert after.busy is not None
    assert 0.3 / elapsed <= after.busy <= 1.0


SCHEDSTAT = Path("/proc/thread-self/schedstat")


@contextmanager
def sharing_one_cpu() -> Iterator[None]:
    """This thread and a process that computes without end, on one CPU."""
    cpu = min(os.sched_getaffinity(0))
    allowed = os.sched_getaffinity(0)
    with subprocess.Popen(
        [sys.executable, "-c", "print('ready', flush=True)\nwhile True: pass"],
        stdout=subprocess.PIPE,
    ) as rival:
        try:
            os.sched_setaffinity(rival.pid, {cpu})
            os.sched_setaffinity(0, {cpu})  # 0: the calling thread, here the loop's
            assert rival.stdout is not None
            assert rival.stdout.readline() == b"ready\n"
            yield
        finally:
            os.sched_setaffinity(0, allowed)
            rival.kill()


@pytest.mark.skipif(not SCHEDSTAT.exists(), reason="the kernel does not count CPU waits")
async def test_a_loop_without_a_cpu_shows_as_cpu_wait() -> None:
    started = time.monotonic()
    async with Offloader(fast()) as ex:
        before = await samples(ex.offloader, 3)
        assert before.cpu_wait is not None
        # Running and waiting for a CPU are apart: together, never more than the time.
        assert before.busy is not None
        assert before.busy + before.cpu_wait <= 1 + CLOCKS, before
        with sharing_one_cpu():
            # Both want the one CPU all along: the loop's thread gets about half of
            # the time, and waits for the CPU the other half.
            spin(0.3)
            after = await samples(ex.offloader, before.samples + 1)
    elapsed = time.monotonic() - started
    # Against one rival that never yields, the loop's thread waits about as long as
    # it runs; more, when other processes share that CPU too: a bound from below.
    assert after.cpu_wait is not None
    assert after.cpu_wait >= 0.1 / elapsed
    assert after.busy is not None
    assert after.busy + after.cpu_wait <= 1 + CLOCKS, after


async def test_stats_is_still_a_mapping_of_pools() -> None:
    async with Offloader(fast()) as ex:
        stats = ex.offloader.stats()
    assert isinstance(stats, OffloaderStats)
    assert set(stats) == {"thread", "process"}
    assert stats["thread"].kind == "thread"


async def test_the_probe_can_be_turned_off() -> None:
    async with Offloader(fast(lag_probe=False)) as ex:
        await ex.run(sum, [1, 2])
        assert ex.offloader.stats().loop is None
        registry = CollectorRegistry()
        registry.register(OffloadCollector(ex.offloader))
        text = generate_latest(registry).decode()
    assert "offload_event_loop_lag_seconds{" not in text
    assert "offload_event_loop_busy_ratio" not in text


async def test_prometheus_exports_the_lag() -> None:
    async with Offloader(fast()) as ex:
        await samples(ex.offloader, 2)
        registry = CollectorRegistry()
        registry.register(OffloadCollector(ex.offloader))
        text = generate_latest(registry).decode()
    for quantile in ("0.5", "0.9", "0.99", "1"):
        assert f'offload_event_loop_lag_seconds{{quantile="{quantile}"}}' in text
    assert "\noffload_event_loop_busy_ratio " in text
    assert ("\noffload_event_loop_cpu_wait_ratio " in text) == SCHEDSTAT.exists()


def test_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OFFLOAD_LAG_PROBE", "false")
    monkeypatch.setenv("OFFLOAD_LAG_PROBE_INTERVAL", "0.2")
    settings = OffloadSettings()
    assert (settings.lag_probe, settings.lag_probe_interval) == (False, 0.2)


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_the_suite_fails_blocking_calls_made_by_offload_on_the_loop() -> None:
    # conftest's blockbuster guard: what offload's code calls on the loop's thread
    # is checked, so a blocking call there fails the test that made it.
    with pytest.raises(BlockingError):
        usable_cpus.__wrapped__()  # reads cgroup files: offload makes it in a thread
