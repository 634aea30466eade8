from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest

from offload import Executor, Offloader, OffloadSettings
from offload.prometheus import OffloadCollector

from . import funcs


async def test_exposition_reports_each_pool(settings: OffloadSettings) -> None:
    async with Offloader(settings) as ex:
        await ex.pool("process").run(funcs.add, 1, 2)
        await ex.pool("thread").run(funcs.add, 1, 2)
        registry = CollectorRegistry()
        registry.register(OffloadCollector())  # finds the running Offloader
        text = generate_latest(registry).decode()
    assert 'offload_calls_total{outcome="completed",pool="process"} 1.0' in text
    assert 'offload_calls_total{outcome="completed",pool="thread"} 1.0' in text
    assert 'offload_workers{pool="process"} 2.0' in text
    assert 'offload_slow_decodes_total{pool="process"} 0.0' in text
    assert 'offload_call_latency_seconds{pool="process",quantile="0.99"}' in text


async def test_explicit_offloader_and_none_running(ex: Executor) -> None:
    registry = CollectorRegistry()
    registry.register(OffloadCollector(ex.offloader))
    assert 'offload_queued_calls{pool="thread"} 0.0' in generate_latest(registry).decode()
    idle = CollectorRegistry()
    idle.register(OffloadCollector(get_offloader=lambda: None))
    assert "offload_workers{" not in generate_latest(idle).decode()
