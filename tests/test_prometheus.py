from __future__ import annotations

from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from offload import Executor, Offloader, OffloadSettings, _stats
from offload._stats import per_function
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


# -- histograms ------------------------------------------------------------------------

PHASES = (
    "offload_call_duration_seconds",
    "offload_call_queue_wait_seconds",
    "offload_call_transfer_seconds",
    "offload_call_run_seconds",
)


@pytest.fixture
def per_function_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """The process-wide switch that a per-function collector turns on, off again after."""
    monkeypatch.setattr(per_function, "limit", 0)


def histograms(text: str) -> dict[str, dict[tuple[tuple[str, str], ...], dict[str, Any]]]:
    """Every histogram of an exposition: by name, then by labels (``le`` aside), its
    buckets ({le: count}), sum and count."""
    found: dict[str, dict[tuple[tuple[str, str], ...], dict[str, Any]]] = {}
    for family in text_string_to_metric_families(text):
        if family.type != "histogram":
            continue
        series = found.setdefault(family.name, {})
        for sample in family.samples:
            labels = tuple(sorted((k, v) for k, v in sample.labels.items() if k != "le"))
            entry = series.setdefault(labels, {"buckets": {}})
            if sample.name.endswith("_bucket"):
                entry["buckets"][sample.labels["le"]] = sample.value
            elif sample.name.endswith("_sum"):
                entry["sum"] = sample.value
            elif sample.name.endswith("_count"):
                entry["count"] = sample.value
    return found


def check_histogram(entry: dict[str, Any], count: int) -> None:
    buckets = entry["buckets"]
    counts = list(buckets.values())
    assert counts == sorted(counts)  # cumulative
    assert buckets["+Inf"] == entry["count"] == count
    assert float(min(buckets, key=float)) == 1e-05
    assert float(max((b for b in buckets if b != "+Inf"), key=float)) == 60
    assert entry["sum"] >= 0


async def test_histograms_of_each_pool(settings: OffloadSettings, per_function_off: None) -> None:
    async with Offloader(settings) as ex:
        for _ in range(3):
            await ex.pool("process").run(funcs.add, 1, 2)
        await ex.pool("thread").run(funcs.sleep_then, 0.1, None)
        registry = CollectorRegistry()
        registry.register(OffloadCollector(ex.offloader))
        text = generate_latest(registry).decode()
    found = histograms(text)
    for name in PHASES:
        series = found[name]
        check_histogram(series[(("pool", "process"),)], 3)
        check_histogram(series[(("pool", "thread"),)], 1)
    # The thread's call slept 0.1 s in its run: past the 0.05 bucket, within 0.1's...
    run = found["offload_call_run_seconds"][(("pool", "thread"),)]["buckets"]
    assert run["0.05"] == 0
    assert run["+Inf"] == 1
    # ...and it copied nothing.
    transfer = found["offload_call_transfer_seconds"][(("pool", "thread"),)]
    assert transfer["buckets"]["1e-05"] == 1
    assert transfer["sum"] == 0
    assert "offload_call_run_seconds_bucket{" in text
    assert 'le="+Inf",pool="process"} 3.0' in text


async def test_histograms_count_since_start_past_the_window(
    settings: OffloadSettings, per_function_off: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_stats, "LATENCY_WINDOW", 4)
    async with Offloader(settings) as ex:
        pool = ex.pool("thread")
        for value in range(10):
            await pool.run(funcs.echo, value)
        registry = CollectorRegistry()
        registry.register(OffloadCollector(ex.offloader))
        found = histograms(generate_latest(registry).decode())
    assert found["offload_call_run_seconds"][(("pool", "thread"),)]["count"] == 10


async def test_histograms_per_function_are_bounded(
    settings: OffloadSettings, per_function_off: None
) -> None:
    collector = OffloadCollector(per_function=True, max_functions=2)
    async with Offloader(settings) as ex:
        pool = ex.pool("process")
        await pool.run(funcs.add, 1, 2)
        await pool.run(funcs.add, 3, 4)
        await pool.run(funcs.echo, 1)
        await pool.run(funcs.noop)  # past the bound
        await pool.run(funcs.getpid)  # and another
        registry = CollectorRegistry()
        registry.register(collector)
        found = histograms(generate_latest(registry).decode())
    for name in PHASES:
        series = found[name]
        assert set(series) == {
            (("function", "tests.funcs.add"), ("pool", "process")),
            (("function", "tests.funcs.echo"), ("pool", "process")),
            (("function", "other"), ("pool", "process")),
        }, name
        check_histogram(series[(("function", "tests.funcs.add"), ("pool", "process"))], 2)
        check_histogram(series[(("function", "other"), ("pool", "process"))], 2)


def test_max_functions_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_functions"):
        OffloadCollector(per_function=True, max_functions=0)
