"""Whether the running code is inside one of offload's workers.

Several rules depend on it: a decorated function called inside a worker runs inline
(there is no event loop to await it on), and a worker must not start process pools of
its own. Light enough for a worker process to import at start (no typing).
"""

from __future__ import annotations

import threading

__all__ = (
    "in_worker",
    "in_worker_process",
    "mark_worker_process",
    "mark_worker_thread",
    "unmark_worker_thread",
)

_in_process = False
_thread = threading.local()


def mark_worker_process() -> None:
    """Called once by a worker process's main, before it runs anything of the user's."""
    global _in_process
    _in_process = True


def mark_worker_thread() -> None:
    """Called by each worker thread of a thread pool before it runs calls, and by a Dask
    task for its own run (:func:`unmark_worker_thread` after: the thread is Dask's)."""
    _thread.worker = True


def unmark_worker_thread() -> None:
    """Undo :func:`mark_worker_thread`."""
    _thread.worker = False


def in_worker_process() -> bool:
    """Whether this process is one of offload's worker processes."""
    return _in_process


def in_worker() -> bool:
    """Whether this code runs in an offload worker: a worker process, or a pool's thread."""
    return _in_process or getattr(_thread, "worker", False)
