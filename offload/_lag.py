"""How late the event loop runs timers: a light probe, and its statistics.

A task sleeps ``interval`` seconds in a loop and records how much later than asked
it woke up. Anything that holds the loop's thread (a CPU-bound route, a blocking
call, a long pickle) delays every timer and every ready callback behind it, so a
wake-up that falls inside such a stall measures what a request arriving then would
have waited. With the default 100 ms interval a stall of S ms is seen with
probability S/100: the percentiles describe lag as a request arriving at a random
moment meets it. Each wake-up costs what any timer does: an idle Offloader uses a
fraction of a percent of a CPU with the probe (docs/benchmarks.md, "Figures behind
the code").

A late wake-up alone does not say who made it late. So the probe also keeps, over the
same wake-ups, how much of the time the loop's thread ran on a CPU (``busy``: code on
the loop, the application's or a library's) and, on Linux, how much it was ready to
run but had no CPU (``cpu_wait``: other threads and processes had them all). Lag with
neither means the thread was off the CPU, not waiting for one: a blocking call, or
another thread holding the GIL. They cost two reads per wake-up, ~3.5 µs together
here (``timeit``): the thread's CPU clock, and the kernel's count of its waits in
``/proc/thread-self/schedstat``, a file the kernel formats from memory (it never
touches a disk, so reading it on the loop blocks nothing).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections import deque

import anyio

from ._stats import LoopStats

__all__ = ("LagProbe",)

#: how many recent samples the percentiles are computed over
LAG_WINDOW = 1024
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)  # not on Windows, where the open fails anyway


class LagProbe:
    """Sleeps ``interval`` seconds in a loop and keeps how late each wake-up was, and
    how the loop's thread spent the time."""

    __slots__ = ("interval", "lags", "spans")

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.lags: deque[float] = deque(maxlen=LAG_WINDOW)
        #: per wake-up since the one before: seconds elapsed, on a CPU, waiting for one
        self.spans: deque[tuple[float, float, float | None]] = deque(maxlen=LAG_WINDOW)

    async def run(self) -> None:
        interval = self.interval
        clock = anyio.current_time
        with _CpuWait() as cpu_wait:  # opened here, by the loop's thread: it is per thread
            then, ran, waited = clock(), time.thread_time(), cpu_wait.read()
            while True:
                asked = clock() + interval
                await anyio.sleep(interval)
                now, ran_now, waited_now = clock(), time.thread_time(), cpu_wait.read()
                self.lags.append(max(0.0, now - asked))
                self.spans.append(
                    (
                        now - then,
                        ran_now - ran,
                        None if waited is None or waited_now is None else waited_now - waited,
                    )
                )
                then, ran, waited = now, ran_now, waited_now

    def stats(self) -> LoopStats:
        ordered = sorted(self.lags)

        def pct(q: float) -> float | None:
            return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else None

        elapsed = sum(span[0] for span in self.spans)
        busy = cpu_wait = None
        if elapsed > 0:
            busy = min(1.0, sum(span[1] for span in self.spans) / elapsed)
            waits = [span[2] for span in self.spans]
            if None not in waits:
                cpu_wait = min(1.0, sum(w for w in waits if w is not None) / elapsed)
        return LoopStats(
            interval=self.interval,
            samples=len(ordered),
            lag_p50=pct(0.50),
            lag_p90=pct(0.90),
            lag_p99=pct(0.99),
            lag_max=ordered[-1] if ordered else None,
            busy=busy,
            cpu_wait=cpu_wait,
        )


class _CpuWait:
    """Seconds the thread that made it has waited for a CPU, in all (the kernel's
    ``run_delay``); ``read()`` gives None where the kernel does not say (not Linux,
    or no scheduler statistics)."""

    def __init__(self) -> None:
        self._fd: int | None = None

    def __enter__(self) -> _CpuWait:
        with contextlib.suppress(OSError):
            self._fd = os.open("/proc/thread-self/schedstat", os.O_RDONLY | _O_CLOEXEC)
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def read(self) -> float | None:
        if self._fd is None:
            return None
        try:
            # "<ns on a CPU> <ns waiting for one> <timeslices>"
            return int(os.pread(self._fd, 128, 0).split()[1]) / 1e9
        except (OSError, IndexError, ValueError):
            return None
