"""The event loop's lag while a scenario runs: how late a 1 ms sleep wakes up.

``async with LagProbe() as probe:`` starts a task on the running loop that sleeps
1 ms in a loop and records, each time, how much later than asked it woke. A sleep
still pending when the block ends counts for the time it has already overrun, so a
stall that covers the whole measurement (a blocking call in the loop's thread) is
seen even if the probe never got to run. Its own cost, one wake-up per millisecond,
is paid by every contender alike.
"""

from __future__ import annotations

import asyncio
import time
from types import TracebackType

INTERVAL = 0.001


def percentile(sorted_values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) of sorted values, nearest rank."""
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


class LagProbe:
    def __init__(self, interval: float = INTERVAL) -> None:
        self.interval = interval
        self.lateness: list[float] = []  # seconds late, one per wake-up
        self._since = 0.0  # when the pending sleep started
        self._task: asyncio.Task[None] | None = None

    async def _probe(self) -> None:
        clock, interval, lateness = time.perf_counter, self.interval, self.lateness
        while True:
            self._since = t = clock()
            await asyncio.sleep(interval)
            lateness.append(clock() - t - interval)

    async def __aenter__(self) -> LagProbe:
        self._since = time.perf_counter()
        self._task = asyncio.get_running_loop().create_task(self._probe())
        await asyncio.sleep(0)  # let it take its first timestamp
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        overrun = time.perf_counter() - self._since - self.interval
        if overrun > 0:
            self.lateness.append(overrun)
        assert self._task is not None
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass

    def summary(self) -> dict[str, float]:
        """p99 and max lateness in ms, and the number of wake-ups."""
        late = sorted(self.lateness) or [0.0]
        return {
            "lag_p99_ms": percentile(late, 0.99) * 1e3,
            "lag_max_ms": late[-1] * 1e3,
            "lag_samples": float(len(self.lateness)),
        }
