"""Functions run by the benchmarks' workers.

They live in their own small module (not in the benchmark script) so that worker
processes of every pool, whatever their start method, can import them by name.
"""

from __future__ import annotations


def noop() -> None:
    """Do nothing, so that calling it remotely costs only the round trip."""


# --- the soak (benchmarks/soak.py) -----------------------------------------------------


def add(a: int, b: int) -> int:
    return a + b


class Boom(Exception):
    """What ``boom`` raises: a user exception that must reach the caller as itself."""


def boom(message: str) -> None:
    raise Boom(message)


def sleep_then(seconds: float, value: object) -> object:
    import time

    time.sleep(seconds)
    return value


def exit_now(code: int = 3) -> None:
    import os

    os._exit(code)


# --- the suite (benchmarks/suite.py) ---------------------------------------------------


def identity(x: object) -> object:
    """Hand the argument back: a payload's round trip, both ways."""
    return x


def spin(iterations: int) -> float:
    """Pure-Python work; returns the CPU seconds this thread spent on it."""
    import time

    t0 = time.thread_time()
    total = 0
    for i in range(iterations):
        total += i * i % 7
    return time.thread_time() - t0


# --- diagnostics (benchmarks/diagnose.py) ----------------------------------------------


def timed_spin(iterations: int) -> tuple[int, float, float, float]:
    """``spin`` with where and when it ran: (pid, start, end on ``time.time()``, CPU s)."""
    import os
    import time

    start = time.time()
    cpu = spin(iterations)
    return os.getpid(), start, time.time(), cpu


# --- log forwarding (benchmarks/bench_logs.py) ----------------------------------------


def log_records(n: int, name: str) -> int:
    """Log ``n`` INFO records of ~100 characters to the logger ``name``."""
    import logging

    logger = logging.getLogger(name)
    for i in range(n):
        logger.info("record %d of a burst, with enough text to look like a real one: %s", i, "ok")
    return n
