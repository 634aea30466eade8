"""The CPU-bound work the demo app serves, and its calibration.

A module that imports nothing heavy: offload's workers import :func:`burn` by name,
so their first call starts fast.
"""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ("burn", "calibrate", "timed")


def burn(steps: int) -> int:
    """A fixed amount of pure-Python CPU work; returns a checksum."""
    total = 0
    for n in range(steps):
        total = (total * 31 + n) % 1_000_003
    return total


def calibrate(ms: float) -> tuple[int, float]:
    """Steps of :func:`burn` that take about ``ms`` alone, and their measured time (s)."""
    probe = 10_000
    while (took := timed(burn, probe)) < 0.02:
        probe *= 2
    # The fastest run of half a second's worth: CPUs may take a while to speed up.
    until = time.perf_counter() + 0.5
    while time.perf_counter() < until:
        took = min(took, timed(burn, probe))
    steps = max(1, round(probe * ms / 1000 / took))
    return steps, min(timed(burn, steps) for _ in range(5))


def timed(fn: Callable[[int], object], arg: int) -> float:
    """Seconds ``fn(arg)`` took."""
    start = time.perf_counter()
    fn(arg)
    return time.perf_counter() - start
