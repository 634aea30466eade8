"""Functions run by the benchmarks' workers.

They live in their own small module (not in the benchmark script) so that worker
processes of every pool, whatever their start method, can import them by name.
"""

from __future__ import annotations


def noop() -> None:
    """Do nothing, so that calling it remotely costs only the round trip."""
