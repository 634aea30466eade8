"""Functions that worker processes run to log (imported by name, as an application's)."""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger("app")


def log_warning() -> int:
    logger.warning("x %s", 1, extra={"request_id": "r-1", "size": 3, "tags": ["a"]})
    return os.getpid()


def log_exception() -> str:
    try:
        raise ValueError("boom")
    except ValueError:
        logger.exception("failed")
    return "done"


def log_many(n: int, level: int, name: str = "app", padding: int = 0) -> tuple[int, bool]:
    """Log ``n`` records at ``level``; also whether the worker's logger makes them."""
    target = logging.getLogger(name)
    pad = "." * padding
    for i in range(n):
        target.log(level, "record %d%s", i, pad)
    return n, target.isEnabledFor(level)


def log_many_then_touch(n: int, path: str, padding: int) -> int:
    """Log ``n`` large records, then create ``path``: the worker never waited for the
    parent to read them."""
    log_many(n, logging.WARNING, padding=padding)
    Path(path).write_text("logged")
    return n


class Unprintable:
    def __str__(self) -> str:
        raise RuntimeError("no str for you")

    def __repr__(self) -> str:
        raise SystemExit("no repr either")


def log_hostile() -> str:
    logger.warning("unprintable %s", Unprintable())
    logger.warning("a lock %s", threading.Lock())  # does not pickle: rendered first
    logger.warning("bad extra", extra={"thing": Unprintable(), "lock": threading.Lock()})
    logger.warning("%d wrong format", "not a number")
    return "intact"


def log_from_a_thread() -> str:
    thread = threading.Thread(target=lambda: logger.warning("from a thread"))
    thread.start()
    thread.join()
    return "joined"


def log_in_a_forked_child(n: int) -> str:
    """Fork a child that logs ``n`` records (to its stderr, not the channel) and waits
    for it; the parent logs one."""
    pid = os.fork()
    if pid == 0:
        try:
            for i in range(n):
                logger.warning("child %d", i)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    logger.warning("after the fork")
    return "forked"


def forwarding_loaded() -> bool:
    """Whether the worker loaded the forwarding handler."""
    return "offload._pools.process.worker_log_handler" in sys.modules


def log_at_start(message: str) -> None:
    """An initializer that logs."""
    logger.warning("initializer says %s", message)


def log_then_wait_for(path: str) -> bool:
    """Log a record, then wait (up to 30 s) for ``path``, which the parent's handler
    creates: whether it came while this call ran."""
    logger.warning("first")
    deadline = time.monotonic() + 30
    while not Path(path).exists() and time.monotonic() < deadline:
        time.sleep(0.005)
    logger.warning("second")
    return Path(path).exists()


def log_between_calls(go: str, done: str) -> str:
    """Start a thread that logs once ``go`` exists (after this call returned), then
    creates ``done``."""

    def later() -> None:
        deadline = time.monotonic() + 30
        while not Path(go).exists() and time.monotonic() < deadline:
            time.sleep(0.005)
        logger.warning("between calls")
        Path(done).write_text("logged")

    threading.Thread(target=later, daemon=True).start()
    return "started"


def log_large(size: int) -> int:
    """One record whose message is ``size`` characters: larger than a read."""
    logger.warning("%s", "x" * size)
    return size


def log_and_echo(data: bytes) -> bytes:
    """Log, then return ``data`` (large: it travels between memories)."""
    logger.warning("echoing %d bytes", len(data))
    return data


def log_then_exit(code: int) -> None:
    logger.warning("last words")
    os._exit(code)


def log_debug_below_a_worker_level(n: int) -> bool:
    """Give a logger a level of its own in the worker, below the parent's, and log
    ``n`` DEBUG records to it; whether the worker's logger makes them."""
    verbose = logging.getLogger("app.verbose")
    verbose.setLevel(logging.DEBUG)
    for i in range(n):
        verbose.debug("verbose %d", i)
    return verbose.isEnabledFor(logging.DEBUG)


def log_each_item(n: int) -> Iterator[tuple[int, bool, bool]]:
    """A stream: log ``debug i`` and ``info i`` before each item ``i``, which is ``(i,
    whether the worker's "app" logger makes DEBUG records, and INFO ones)``."""
    for i in range(n):
        logger.debug("debug %d", i)
        logger.info("info %d", i)
        yield i, logger.isEnabledFor(logging.DEBUG), logger.isEnabledFor(logging.INFO)


def log_items_then_closing(n: int) -> Iterator[int]:
    """A stream that logs each item, and once closed."""
    try:
        for i in range(n):
            logger.warning("item %d", i)
            yield i
    finally:
        logger.warning("closing")
