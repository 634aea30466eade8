"""This process's children: helpers that may outlive a pool, and processes left behind."""

from __future__ import annotations

import time
from typing import Any

#: processes that live until their parent exits, by design: not left behind (a
#: worker's guard ends its process group when it exits: offload/_pools/process/worker.py)
HELPERS = ("resource_tracker", "semaphore_tracker", "forkserver", "offload-guard")


def is_helper(proc: Any) -> bool:
    """A resource tracker or forkserver (loky's or multiprocessing's)."""
    import psutil

    try:
        return any(h in " ".join(proc.cmdline()) for h in HELPERS)
    except psutil.Error:
        return False


def leftovers(wait_s: float = 2.0) -> list[str]:
    """Live descendants that are not helpers, after giving them ``wait_s`` to exit."""
    import psutil

    deadline = time.monotonic() + wait_s
    while True:
        left = []
        for p in psutil.Process().children(recursive=True):
            try:
                if p.status() != psutil.STATUS_ZOMBIE and not is_helper(p):
                    left.append(f"{p.pid} {' '.join(p.cmdline())[:100]}")
            except psutil.Error:  # gone meanwhile
                pass
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)
