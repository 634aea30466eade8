"""Payload round trip: bytes and NumPy arrays of 1, 16 and 64 MiB through an identity function.

Threads share memory, so only the process family is measured. Each round, each
contender makes a few untimed then a few timed calls per payload and reports the
p50; a contender that is very slow makes fewer timed calls (at least one) once it
has used its time budget.
"""

from __future__ import annotations

import gc
import statistics
import time
from typing import TYPE_CHECKING, Any

from _funcs import identity
from _lagprobe import LagProbe
from _scenario import Column, Measurement, Results, Table

if TYPE_CHECKING:
    from _contenders import Contender

MIB = 2**20
SIZES_MIB = (1, 16, 64)
KINDS = ("bytes", "numpy")
# size -> (untimed, timed calls) per round
CALLS = {
    "quick": {1: (2, 5), 16: (0, 2), 64: (0, 1)},
    "full": {1: (3, 20), 16: (1, 8), 64: (1, 4)},
}
BUDGET_S = {"quick": 1.0, "full": 4.0}  # timed calls stop once this is spent

_payloads: dict[tuple[str, int], Any] = {}


def payload(kind: str, size_mib: int) -> Any:
    """Random bytes, or a float64 array, of ``size_mib`` MiB; made once and kept.

    NumPy is imported here, after the fork-based pools started, not before.
    """
    key = (kind, size_mib)
    if key not in _payloads:
        import numpy as np

        rng = np.random.default_rng(size_mib)
        n = size_mib * MIB
        _payloads[key] = rng.bytes(n) if kind == "bytes" else rng.random(n // 8)
    return _payloads[key]


def key(kind: str, size_mib: int) -> str:
    return f"payload_{kind}_{size_mib}MiB"


def _check(sent: Any, got: Any) -> None:
    if type(got) is not type(sent) or len(got) != len(sent):
        raise AssertionError(f"identity returned {type(got).__name__} of length {len(got)}")


def measurement(kind: str, size_mib: int) -> Measurement:
    scenario = key(kind, size_mib)

    async def run(c: Contender, quick: bool) -> Results:
        mode = "quick" if quick else "full"
        untimed, timed = CALLS[mode][size_mib]
        data = payload(kind, size_mib)
        for _ in range(untimed):
            _check(data, await c.run(identity, data))
        gc.collect()
        samples: list[float] = []
        async with LagProbe() as lag:
            start = time.perf_counter()
            while len(samples) < timed:
                t0 = time.perf_counter()
                got = await c.run(identity, data)
                samples.append(time.perf_counter() - t0)
                _check(data, got)
                del got
                if time.perf_counter() - start > BUDGET_S[mode]:
                    break
        p50 = statistics.median(samples)
        metrics = {"p50_ms": p50 * 1e3, "mib_per_s": size_mib / p50, "calls": float(len(samples))}
        return {scenario: {**metrics, **lag.summary()}}

    what = "random bytes" if kind == "bytes" else "a float64 NumPy array"
    table = Table(
        scenario,
        f"Payload round trip, {kind} {size_mib} MiB",
        f"{what} of {size_mib} MiB sent to a worker and back (identity function); p50 ms",
        (
            Column("p50_ms", "p50 ms", "{:.2f}"),
            Column("mib_per_s", "MiB/s", "{:,.0f}"),
            Column("calls", "timed calls", "{:.0f}"),
        ),
        headline="p50_ms",
        lower_is_better=True,
    )
    # 64 MiB takes 0.2-1 s per call: with --quick, one round only.
    return Measurement(scenario, ("process",), (table,), run, 1 if size_mib >= 64 else None)


MEASUREMENTS = [measurement(kind, size) for kind in KINDS for size in SIZES_MIB]
