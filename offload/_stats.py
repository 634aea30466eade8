"""Statistics: the immutable records callers see (a pool's, the event loop's) and the
counters pools keep."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

__all__ = ("Counters", "LoopStats", "OffloaderStats", "PoolStats")

#: how many recent call latencies the percentiles are computed over
LATENCY_WINDOW = 1024


@dataclass(frozen=True, slots=True)
class PoolStats:
    """A snapshot of one pool.

    ``workers`` are the workers ready to take calls, ``busy`` those running one (an
    abandoned thread counts until it ends), ``queued`` the calls waiting for one.
    Counts are totals since the pool started: a call ends ``completed``, ``failed``
    (it raised, or would not pickle), ``timed_out``, ``cancelled`` (by its caller),
    ``crashed`` (its worker died), ``rejected`` (``PoolOverloaded``; or
    ``PoolStartError``: the pool had no worker for too long) or ``closed``
    (``PoolClosed``: refused by a stopped pool, or ended by a shutdown out of time);
    ``recycled`` counts workers replaced on purpose: after ``max_tasks_per_worker``
    calls, past ``max_memory_per_worker``, or (kind dask) restarted by ``hard_cancel``.
    ``slow_decodes`` (kind process) counts results whose unpickling held the event loop
    for 50 ms or more: large results made of Python objects (see the troubleshooting
    page); each is also named in a warning, at most one a minute.
    Latencies (seconds, from the call to its outcome, queue wait included) cover the
    last 1024 calls.
    """

    name: str
    kind: str
    workers: int
    busy: int
    queued: int
    completed: int
    failed: int
    timed_out: int
    cancelled: int
    crashed: int
    recycled: int
    rejected: int
    closed: int
    latency_p50: float | None
    latency_p90: float | None
    latency_p99: float | None
    slow_decodes: int = 0


class Counters:
    """What a pool counts as calls end; turned into a :class:`PoolStats` on demand."""

    __slots__ = (
        "cancelled",
        "closed",
        "completed",
        "crashed",
        "failed",
        "latencies",
        "recycled",
        "rejected",
        "slow_decodes",
        "timed_out",
    )

    def __init__(self) -> None:
        self.completed = 0
        self.failed = 0
        self.timed_out = 0
        self.cancelled = 0
        self.crashed = 0
        self.recycled = 0
        self.rejected = 0
        self.closed = 0
        self.slow_decodes = 0
        self.latencies: deque[float] = deque(maxlen=LATENCY_WINDOW)

    def snapshot(self, *, name: str, kind: str, workers: int, busy: int, queued: int) -> PoolStats:
        ordered = sorted(self.latencies)

        def pct(q: float) -> float | None:
            if not ordered:
                return None
            return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

        return PoolStats(
            name=name,
            kind=kind,
            workers=workers,
            busy=busy,
            queued=queued,
            completed=self.completed,
            failed=self.failed,
            timed_out=self.timed_out,
            cancelled=self.cancelled,
            crashed=self.crashed,
            recycled=self.recycled,
            rejected=self.rejected,
            closed=self.closed,
            latency_p50=pct(0.50),
            latency_p90=pct(0.90),
            latency_p99=pct(0.99),
            slow_decodes=self.slow_decodes,
        )


@dataclass(frozen=True, slots=True)
class LoopStats:
    """Event-loop lag seen by the Offloader's probe (seconds, over recent samples).

    ``samples`` is how many wake-ups the figures cover (the last 1024), ``interval``
    the probe's sleep. A healthy loop shows a p99 well under a millisecond; a p99 or
    a max of tens of milliseconds means something holds the loop's thread.

    Over the time those wake-ups span, ``busy`` is the fraction the loop's thread ran
    on a CPU, and ``cpu_wait`` the fraction it was ready to run without one (Linux;
    None elsewhere): lag with a high ``busy`` is code on the loop, lag with a high
    ``cpu_wait`` is a machine whose CPUs are all taken, lag with neither is a
    blocking call or another thread holding the GIL.
    """

    interval: float
    samples: int
    lag_p50: float | None
    lag_p90: float | None
    lag_p99: float | None
    lag_max: float | None
    busy: float | None = None
    cpu_wait: float | None = None


class OffloaderStats(dict[str, "PoolStats"]):
    """:meth:`Offloader.stats() <offload.Offloader.stats>`: every pool's
    :class:`PoolStats` by name, and ``loop``, the event loop's lag
    (:class:`~offload.LoopStats`; None with ``lag_probe=False``)."""

    __slots__ = ("loop",)

    def __init__(self, pools: dict[str, PoolStats], loop: LoopStats | None) -> None:
        super().__init__(pools)
        self.loop = loop
