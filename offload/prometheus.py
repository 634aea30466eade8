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
- ``offload_logs_dropped_total``: log records made in a worker during a call that
  never reached the parent's logging (``PoolStats.logs_dropped``);
- ``offload_workers``, ``offload_busy_workers``, ``offload_queued_calls``: gauges;
- ``offload_call_latency_seconds{quantile=...}``: recent call latencies;
- histograms since the pool started (buckets from 10 us to 60 s): of the calls'
  latencies, ``offload_call_duration_seconds``, and of where their time went,
  ``offload_call_queue_wait_seconds`` (from the call to a worker taking it),
  ``offload_call_transfer_seconds`` (encoding, copies both ways, decoding; 0 for a
  thread pool, none for kind dask) and ``offload_call_run_seconds`` (the function
  itself, measured by its worker); with ``per_function=True`` also labelled
  ``function`` (see :class:`OffloadCollector`);

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

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from ._stats import BUCKETS, per_function

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from ._offloader import Offloader
    from ._stats import Histogram

__all__ = ("OffloadCollector",)

_OUTCOMES = ("completed", "failed", "timed_out", "cancelled", "crashed", "rejected", "closed")
#: the histograms: metric name, help, and the attribute of ``Phases`` they show
_HISTOGRAMS = (
    (
        "offload_call_duration_seconds",
        "Calls from the call to their outcome (queue wait included), since the pool started.",
        "latency",
    ),
    (
        "offload_call_queue_wait_seconds",
        "Time from the call to a worker taking it, since the pool started.",
        "queue_wait",
    ),
    (
        "offload_call_transfer_seconds",
        "Time spent encoding, copying both ways and decoding calls, since the pool started.",
        "transfer",
    ),
    (
        "offload_call_run_seconds",
        "Time the functions ran, measured by their workers, since the pool started.",
        "run",
    ),
)
#: ``le`` labels of the buckets, +Inf last
_BOUNDS = (*(repr(bound) for bound in BUCKETS), "+Inf")


class OffloadCollector(Collector):
    """Collects the statistics of one Offloader's pools at each scrape.

    :param offloader: the Offloader to report on; by default the one returned by
        ``get_offloader`` at scrape time
    :param get_offloader: how to find it when ``offloader`` is not given; default:
        the running Offloader that started last in this process
    :param per_function: also label the histograms with ``function``, the function's
        ``module.qualname``: each pool then counts its calls by function (about a
        microsecond a call), in every Offloader of this process, from when this
        collector is made
    :param max_functions: with ``per_function``, how many functions a pool labels
        (the first that come); the calls of the others are under
        ``function="other"``. With several collectors, the largest of theirs.
    :raises ValueError: ``max_functions`` is not positive
    """

    def __init__(
        self,
        offloader: Offloader | None = None,
        *,
        get_offloader: Callable[[], Offloader | None] | None = None,
        per_function: bool = False,
        max_functions: int = 50,
    ) -> None:
        if max_functions < 1:
            raise ValueError(f"max_functions must be at least 1, not {max_functions}")
        self._offloader = offloader
        self._get_offloader = get_offloader
        self._per_function = per_function
        if per_function:
            _count_per_function(max_functions)

    def _find(self) -> Offloader | None:
        offloader = self._offloader
        if offloader is None:
            from ._offloader import newest_offloader

            offloader = (self._get_offloader or newest_offloader)()
        return offloader

    def collect(self) -> Iterator[Metric]:
        offloader = self._find()
        stats = offloader.stats() if offloader is not None else None
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
        dropped = CounterMetricFamily(
            "offload_logs_dropped",
            "Log records made in a worker during a call that never reached this process's logging.",
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
            dropped.add_metric((name,), s.logs_dropped)
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
        yield from (calls, recycled, slow, dropped, workers, busy, queued, latency, lag, *shares)
        yield from self._histograms(offloader)

    def _histograms(self, offloader: Offloader | None) -> Iterator[Metric]:
        from ._offloader import histograms

        by_pool = histograms(offloader) if offloader is not None else {}
        labels = ("pool", "function") if self._per_function else ("pool",)
        for metric, help_text, attribute in _HISTOGRAMS:
            family = HistogramMetricFamily(metric, help_text, labels=labels)
            for pool, (phases, functions) in by_pool.items():
                if not self._per_function:
                    _add(family, (pool,), getattr(phases, attribute))
                    continue
                for function, own in functions.items():
                    _add(family, (pool, function), getattr(own, attribute))
            yield family


def _count_per_function(limit: int) -> None:
    per_function.limit = max(per_function.limit, limit)


def _add(family: HistogramMetricFamily, labels: tuple[str, ...], histogram: Histogram) -> None:
    cumulative = 0
    buckets = []
    for bound, count in zip(_BOUNDS, histogram.counts, strict=True):
        cumulative += count
        buckets.append((bound, float(cumulative)))
    if cumulative:
        family.add_metric(labels, buckets, histogram.sum)
