"""The Offloader's event-loop lag probe: ``stats().loop`` and its exposition."""

from __future__ import annotations

import time
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


async def test_a_stall_of_the_loop_shows_as_lag() -> None:
    async with Offloader(fast()) as ex:
        before = await samples(ex.offloader, 3)
        assert before.interval == 0.005
        assert before.lag_max is not None
        assert before.lag_max < 0.15
        time.sleep(0.2)  # the point: hold the loop's thread
        after = await samples(ex.offloader, before.samples + 1)
    assert after.lag_max is not None
    assert after.lag_max >= 0.15
    assert after.lag_p50 is not None
    assert after.lag_p90 is not None
    assert after.lag_p50 <= after.lag_p90 <= after.lag_max


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
        assert "offload_event_loop_lag_seconds{" not in generate_latest(registry).decode()


async def test_prometheus_exports_the_lag() -> None:
    async with Offloader(fast()) as ex:
        await samples(ex.offloader, 2)
        registry = CollectorRegistry()
        registry.register(OffloadCollector(ex.offloader))
        text = generate_latest(registry).decode()
    for quantile in ("0.5", "0.9", "0.99", "1"):
        assert f'offload_event_loop_lag_seconds{{quantile="{quantile}"}}' in text


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
