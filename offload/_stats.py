"""Statistics: the immutable records callers see (a pool's, the event loop's) and the
counters pools keep.

Where a call's time went, three phases that add up to its latency (seconds):

- *queue wait*: from the call to a worker taking it (kind process: a worker is handed
  the call; thread: a thread starts it; dask: the pool hears the task's start);
- *run*: the function itself, measured where it runs, around the call alone;
- *transfer*: the rest: encoding, the copies both ways, decoding, the event loop's
  hops (kind process); 0 for a thread call, which copies nothing; unknown (None) for
  kind dask.

A call has them once its worker reported back (it returned or raised); a call that
timed out, crashed, was cancelled or refused has none.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections import deque
from contextvars import ContextVar
from dataclasses import dataclass
from itertools import islice
from typing import Any, Protocol, cast

__all__ = (
    "BUCKETS",
    "Counters",
    "Histogram",
    "LoopStats",
    "OffloaderStats",
    "Phases",
    "PoolStats",
    "RequestTimings",
    "Timed",
    "per_function",
    "request_timings",
)

#: how many recent call latencies (and phases) the percentiles are computed over
LATENCY_WINDOW = 1024
#: the histograms' upper bounds (seconds), for calls from 10 us to a minute; past the
#: last, +Inf
BUCKETS: tuple[float, ...] = (
    0.00001,
    0.000025,
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
#: the label of the calls of functions past :data:`per_function`'s limit
OTHER_FUNCTIONS = "other"


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
    ``logs_dropped`` (kind process, ``forward_logs``) counts log records made in a
    worker during a call that never reached this process's logging: the worker's
    channel to it was full (a call logging faster than the records are handled here,
    or an event loop held up), or a record could not be rendered.
    Latencies (seconds, from the call to its outcome, queue wait included) cover the
    last 1024 calls.

    Where the time of those calls went, each phase's percentiles (seconds; None while
    no call of the window has it; see docs/observability.md, "Where the time went"):

    - ``queue_wait_p50``, ``queue_wait_p90``, ``queue_wait_p99``: from the call to a
      worker taking it;
    - ``transfer_p50``, ``transfer_p90``, ``transfer_p99``: encoding, copying both
      ways and decoding (kind process: the latency less queue wait and run); 0 for a
      thread pool, which copies nothing; None for kind dask;
    - ``run_p50``, ``run_p90``, ``run_p99``: the function itself, measured by the
      worker that ran it.

    Only calls whose worker reported back (the function returned or raised) have
    phases: the last 1024 of them.
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
    queue_wait_p50: float | None = None
    queue_wait_p90: float | None = None
    queue_wait_p99: float | None = None
    transfer_p50: float | None = None
    transfer_p90: float | None = None
    transfer_p99: float | None = None
    run_p50: float | None = None
    run_p90: float | None = None
    run_p99: float | None = None
    logs_dropped: int = 0


class Histogram:
    """Counts of observations by bucket of :data:`BUCKETS` (not cumulative: the last
    count is past the last bound), and their sum."""

    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(BUCKETS, value)] += 1
        self.sum += value

    def add(self, values: list[float | None]) -> None:
        """Count ``values`` (None: unknown, left out) at once: sorted, in C, they cost
        a fraction of one :meth:`observe` each."""
        if None in values:
            values = [value for value in values if value is not None]
        known = sorted(cast("list[float]", values))
        counts = self.counts
        below = 0
        for i, bound in enumerate(BUCKETS):
            upto = bisect_right(known, bound, below)
            counts[i] += upto - below
            below = upto
        counts[-1] += len(known) - below
        self.sum += sum(known)

    def copy(self) -> Histogram:
        twin = Histogram()
        twin.counts = self.counts.copy()
        twin.sum = self.sum
        return twin


class Phases:
    """One histogram per measure of a call: its latency and each of its phases."""

    __slots__ = ("latency", "queue_wait", "run", "transfer")

    def __init__(self) -> None:
        self.latency = Histogram()
        self.queue_wait = Histogram()
        self.transfer = Histogram()
        self.run = Histogram()

    def copy(self) -> Phases:
        twin = Phases()
        for name in self.__slots__:
            setattr(twin, name, getattr(self, name).copy())
        return twin


class _PerFunction:
    """Up to how many functions' calls get histograms of their own (0: none)."""

    __slots__ = ("limit",)

    def __init__(self) -> None:
        self.limit = 0


#: set by an exporter that reports per function (``OffloadCollector(per_function=...)``);
#: pools count per function from then on
per_function = _PerFunction()


class RequestTimings:
    """The summed phases of the calls one request made (``OffloadSettings.server_timing``);
    a phase no call measured stays None."""

    __slots__ = ("calls", "queue_wait", "run", "transfer")

    def __init__(self) -> None:
        self.calls = 0
        self.queue_wait: float | None = None
        self.transfer: float | None = None
        self.run: float | None = None

    def add(self, queue_wait: float | None, transfer: float | None, run: float) -> None:
        self.calls += 1
        if queue_wait is not None:
            self.queue_wait = (self.queue_wait or 0.0) + queue_wait
        if transfer is not None:
            self.transfer = (self.transfer or 0.0) + transfer
        self.run = (self.run or 0.0) + run


#: the current request's :class:`RequestTimings`, set by the FastAPI integration
request_timings: ContextVar[RequestTimings | None] = ContextVar(
    "offload_request_timings", default=None
)


class Timed(Protocol):
    """What :meth:`Counters.record` reads of a call (``offload._call.Call``)."""

    @property
    def name(self) -> str: ...

    #: seconds the function ran, as its worker measured; None: it did not report
    ran: float | None
    #: seconds from the call to a worker taking it; None: unknown
    queue_wait: float | None


class Counters:
    """What a pool counts as calls end; turned into a :class:`PoolStats` on demand.

    Besides the counts: the recent latencies and phases (for percentiles), and
    histograms of them since the pool started, of the whole pool (:meth:`histograms`)
    and, when an exporter asks for them, per function (``functions``, by name, at most
    ``per_function.limit`` of them, the rest under ``"other"``).

    A call only appends to the windows: the pool's histograms take in the values a
    window holds, sorted at once, when it is full (on the event loop's thread), and
    a reader (a scrape, on another thread) adds those not taken in yet to a copy. The
    ``_folds`` count, odd while they are taken in, tells the reader to read again.
    """

    __slots__ = (
        "_fold_at",
        "_folds",
        "_pending",
        "_pending_phases",
        "_phases",
        "cancelled",
        "closed",
        "completed",
        "crashed",
        "failed",
        "functions",
        "latencies",
        "logs_dropped",
        "queue_waits",
        "recycled",
        "rejected",
        "runs",
        "slow_decodes",
        "timed_out",
        "transfers",
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
        self.logs_dropped = 0
        self.latencies: deque[float] = deque(maxlen=LATENCY_WINDOW)
        # None where a call's phase is unknown (kind dask)
        self.queue_waits: deque[float | None] = deque(maxlen=LATENCY_WINDOW)
        self.transfers: deque[float | None] = deque(maxlen=LATENCY_WINDOW)
        self.runs: deque[float] = deque(maxlen=LATENCY_WINDOW)
        self.functions: dict[str, Phases] = {}
        self._phases = Phases()
        self._fold_at = LATENCY_WINDOW
        self._pending = 0  # the newest latencies not in the histograms yet
        self._pending_phases = 0  # the newest phases not in them yet
        self._folds = 0

    def record(self, call: Timed, latency: float, transfer: bool | None) -> None:
        """A call ended after ``latency`` seconds; its phases, if its worker reported.

        ``transfer``: how the pool knows a call's transfer: True, as what is left of
        the latency; False, it has none (0); None, it does not know.
        """
        self.latencies.append(latency)
        self._pending += 1
        run = call.ran
        if run is not None:
            queue_wait = call.queue_wait
            moved: float | None = None
            if transfer:
                moved = latency - run - (queue_wait or 0.0)
                if moved < 0.0:
                    moved = 0.0
            elif transfer is not None:
                moved = 0.0
            self.runs.append(run)
            self.queue_waits.append(queue_wait)
            self.transfers.append(moved)
            self._pending_phases += 1
            timings = request_timings.get()
            if timings is not None:
                timings.add(queue_wait, moved, run)
        if per_function.limit:
            self._record_function(call, latency)
        if self._pending >= self._fold_at:
            self._fold()

    def _fold(self) -> None:
        """Take the windows' pending values into the histograms (the loop's thread)."""
        self._folds += 1
        latencies, self._pending = self._pending, 0
        phases, self._pending_phases = self._pending_phases, 0
        _take_in(self._phases, self._windows(), latencies, phases)
        self._folds += 1

    def _windows(self) -> tuple[deque[Any], ...]:
        return self.latencies, self.queue_waits, self.transfers, self.runs

    def histograms(self) -> Phases:
        """The pool's histograms since it started: a copy, from any thread."""
        for _ in range(100):
            folds = self._folds
            if folds % 2:
                continue  # being taken in
            copy = self._phases.copy()
            # The counts before the windows: a call ending meanwhile appends first.
            latencies, phases = self._pending, self._pending_phases
            windows = tuple(window.copy() for window in self._windows())
            if self._folds == folds:
                _take_in(copy, windows, latencies, phases)
                return copy
        return self._phases.copy()  # the loop's thread kept folding: without the newest

    def _record_function(self, call: Timed, latency: float) -> None:
        own = self._function_phases(call, per_function.limit)
        own.latency.observe(latency)
        if call.ran is None:
            return
        own.run.observe(call.ran)
        queue_wait, moved = self.queue_waits[-1], self.transfers[-1]
        if queue_wait is not None:
            own.queue_wait.observe(queue_wait)
        if moved is not None:
            own.transfer.observe(moved)

    def _function_phases(self, call: Timed, limit: int) -> Phases:
        name = call.name
        found = self.functions.get(name)
        if found is None:
            if len(self.functions) >= limit:
                name = OTHER_FUNCTIONS
                found = self.functions.get(name)
            if found is None:
                found = self.functions[name] = Phases()
        return found

    def snapshot(self, *, name: str, kind: str, workers: int, busy: int, queued: int) -> PoolStats:
        latency = _percentiles(self.latencies)
        queue_wait = _percentiles(self.queue_waits)
        transfer = _percentiles(self.transfers)
        run = _percentiles(self.runs)
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
            latency_p50=latency[0],
            latency_p90=latency[1],
            latency_p99=latency[2],
            slow_decodes=self.slow_decodes,
            queue_wait_p50=queue_wait[0],
            queue_wait_p90=queue_wait[1],
            queue_wait_p99=queue_wait[2],
            transfer_p50=transfer[0],
            transfer_p90=transfer[1],
            transfer_p99=transfer[2],
            run_p50=run[0],
            run_p90=run[1],
            run_p99=run[2],
            logs_dropped=self.logs_dropped,
        )


def _take_in(into: Phases, windows: tuple[deque[Any], ...], latencies: int, phases: int) -> None:
    """Add the ``latencies`` newest latencies and ``phases`` newest phases of
    ``windows`` (as ``Counters._windows`` gives them) to ``into``."""
    latency, queue_wait, transfer, run = windows
    into.latency.add(_newest(latency, latencies))
    if phases:
        into.queue_wait.add(_newest(queue_wait, phases))
        into.transfer.add(_newest(transfer, phases))
        into.run.add(_newest(run, phases))


def _newest(window: deque[Any], count: int) -> list[Any]:
    """The ``count`` newest values of ``window``."""
    if count >= len(window):  # a fold's usual case: the whole window
        return list(window)
    return list(islice(reversed(window), count))


def _percentiles(
    window: deque[float] | deque[float | None],
) -> tuple[float | None, float | None, float | None]:
    """The 50th, 90th and 99th percentiles of ``window``'s known values; None when
    there is none."""
    values = list(window)
    if None in values:
        values = [value for value in values if value is not None]
    if not values:
        return None, None, None
    ordered = sorted(cast("list[float]", values))
    last = len(ordered) - 1
    return (
        ordered[min(last, int(0.5 * len(ordered)))],
        ordered[min(last, int(0.9 * len(ordered)))],
        ordered[min(last, int(0.99 * len(ordered)))],
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
