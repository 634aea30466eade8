"""Why a worker process starts no process pool of its own, and the error that says so.

A worker imports the module of each function it runs. A module that starts an
``Offloader`` when imported (a warm-up ``anyio.run(...)`` at module level, served with
``gunicorn --preload``) would start a pool in every worker, whose workers would import
the module again, and so on without end: about 100 nested processes in 30 s, tried.
``multiprocessing`` refuses a new process during a child's bootstrapping for the same
reason. Thread pools start no process: a worker may use them.
"""

from __future__ import annotations

import sys
from types import FrameType

from ..._where import in_worker_process

__all__ = ("refusal",)


def refusal(pool_name: str) -> str | None:
    """Why pool ``pool_name`` must not start processes here, or ``None`` if it may.

    Call it from the code that starts the pool, so that the stack shows which module
    is being imported, if one is.
    """
    if not in_worker_process():
        return None
    start = f"pool {pool_name!r} cannot start in one of offload's worker processes: "
    module = _module_being_imported()
    if module is None:
        return start + (
            "its workers could start pools of their own, without end. A function that "
            'runs in a worker may use thread pools (kind="thread"), not process pools'
        )
    return start + (
        f"module {module!r} starts it while being imported, and every worker that "
        "imports the module would start one again, without end. Start it where the "
        "application starts instead (in FastAPI, its lifespan), or guard that code with "
        "`if __name__ == '__main__':`"
    )


def _module_being_imported() -> str | None:
    """The innermost module whose top-level code is running on this thread's stack."""
    frame: FrameType | None = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "<module>":
            name = frame.f_globals.get("__name__")
            if isinstance(name, str) and name != "__main__":  # the worker's own boot
                return name
        frame = frame.f_back
    return None
