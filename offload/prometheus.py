"""Prometheus exposition of pool statistics (``pip install 'offload[metrics]'``).

::

    from prometheus_client import REGISTRY
    from offload.prometheus import OffloadCollector

    REGISTRY.register(OffloadCollector())     # the newest Offloader, at each scrape

Metrics, each labelled with ``pool``:

- ``offload_calls_total{outcome=...}``: calls that ended, by outcome (completed,
  failed, timed_out, cancelled, crashed, rejected, closed);
- ``offload_workers_recycled_total``: workers replaced on purpose (limits, ``hard_cancel``);
- ``offload_slow_decodes_total``: results whose unpickling held the event loop for
  50 ms or more (``PoolStats.slow_decodes``);
- ``offload_workers``, ``offload_busy_workers``, ``offload_queued_calls``: gauges;
- ``offload_call_latency_seconds{quantile=...}``: recent call latencies;

and, without a ``pool`` label, from the Offloader's lag probe:

- ``offload_event_loop_lag_seconds{quantile=...}``: how late the event loop ran a
  timer, recently (quantiles 0.5, 0.9, 0.99 and 1, the max);
- ``offload_event_loop_busy_ratio``: the fraction of that time the loop's thread ran
  on a CPU;
- ``offload_event_loop_cpu_wait_ratio``: the fraction it waited for a CPU (Linux).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from ._offloader import Offloader
    from ._stats import OffloaderStats

__all__ = ("OffloadCollector",)

_OUTCOMES = ("completed", "failed", "timed_out", "cancelled", "crashed", "rejected", "closed")


class OffloadCollector(Collector):
    """Collects the statistics of one Offloader's pools at each scrape.

    :param offloader: the Offloader to report on; by default the one returned by
        ``get_offloader`` at scrape time
    :param get_offloader: how to find it when ``offloader`` is not given; default:
        the running Offloader that started last in this process
    """

    def __init__(
        self,
        offloader: Offloader | None = None,
        *,
        get_offloader: Callable[[], Offloader | None] | None = None,
    ) -> None:
        self._offloader = offloader
        self._get_offloader = get_offloader

    def _stats(self) -> OffloaderStats | None:
        offloader = self._offloader
        if offloader is None:
            from ._offloader import newest_offloader

            offloader = (self._get_offloader or newest_offloader)()
        return offloader.stats() if offloader is not None else None

    def collect(self) -> Iterator[Metric]:
        stats = self._stats()
        lag = GaugeMetricFamily(
            "offload_event_loop_lag_seconds",
            "How late the event loop ran the lag probe's timer, recently, by quantile.",
            labels=("quantile",),
        )
        loop = stats.loop if stats is not None else None
        if loop is not None and loop.samples:
            for quantile, value in (
                ("0.5", loop.lag_p50),
                ("0.9", loop.lag_p90),
                ("0.99", loop.lag_p99),
                ("1", loop.lag_max),
            ):
                assert value is not None
                lag.add_metric((quantile,), value)
        shares: list[Metric] = []
        if loop is not None and loop.busy is not None:
            shares.append(
                GaugeMetricFamily(
                    "offload_event_loop_busy_ratio",
                    "Fraction of the lag probe's recent time the event loop's thread ran on a CPU.",
                    value=loop.busy,
                )
            )
        if loop is not None and loop.cpu_wait is not None:
            shares.append(
                GaugeMetricFamily(
                    "offload_event_loop_cpu_wait_ratio",
                    "Fraction of the lag probe's recent time the event loop's thread was "
                    "ready to run and had no CPU.",
                    value=loop.cpu_wait,
                )
            )
        calls = CounterMetricFamily(
            "offload_calls", "Calls that ended, by outcome.", labels=("pool", "outcome")
        )
        recycled = CounterMetricFamily(
            "offload_workers_recycled",
            "Workers replaced on purpose: past their limits, or by hard_cancel.",
            labels=("pool",),
        )
        slow = CounterMetricFamily(
            "offload_slow_decodes",
            "Results whose unpickling held the event loop for 50 ms or more.",
            labels=("pool",),
        )
        workers = GaugeMetricFamily("offload_workers", "Workers ready.", labels=("pool",))
        busy = GaugeMetricFamily(
            "offload_busy_workers", "Workers running a call.", labels=("pool",)
        )
        queued = GaugeMetricFamily(
            "offload_queued_calls", "Calls waiting for a worker.", labels=("pool",)
        )
        latency = GaugeMetricFamily(
            "offload_call_latency_seconds",
            "Latency of recent calls (queue wait included), by quantile.",
            labels=("pool", "quantile"),
        )
        for name, s in (stats or {}).items():
            for outcome in _OUTCOMES:
                calls.add_metric((name, outcome), getattr(s, outcome))
            recycled.add_metric((name,), s.recycled)
            slow.add_metric((name,), s.slow_decodes)
            workers.add_metric((name,), s.workers)
            busy.add_metric((name,), s.busy)
            queued.add_metric((name,), s.queued)
            for quantile, value in (
                ("0.5", s.latency_p50),
                ("0.9", s.latency_p90),
                ("0.99", s.latency_p99),
            ):
                if value is not None:
                    latency.add_metric((name, quantile), value)
        yield from (calls, recycled, slow, workers, busy, queued, latency, lag, *shares)
