"""How many processes the ASGI server running this app starts: asked of the server.

``uvicorn --workers N``, ``gunicorn -w N`` and ``hypercorn --workers N`` each run
the app in N processes, and each process has its own pools. Each server keeps its
configuration in an object that stays on the stack of the thread that runs the
event loop, below the loop itself, for as long as it serves:

- uvicorn: ``Server.run(self)`` (``self.config.workers``), in the single process and
  in each process that ``--workers`` spawns (the config travels pickled to it);
- gunicorn: the worker's ``init_process(self)`` and ``run(self)``
  (``self.cfg.workers``: the command line, the config file and
  ``GUNICORN_CMD_ARGS`` merged), in each forked worker;
- hypercorn: ``asyncio_worker``, ``uvloop_worker``, ``trio_worker``
  (``config.workers``; 0 means the app runs in the server's process).

:func:`server_processes` walks the calling thread's frames up to them; it imports
none of these servers, only looks at classes of those already imported. Called
from another thread (FastAPI's ``TestClient``) or under another server, it falls
back to ``WEB_CONCURRENCY``, which uvicorn and gunicorn read as their default.
"""

from __future__ import annotations

import os
import sys
from types import FrameType
from typing import Any

__all__ = ("server_processes",)


def server_processes() -> tuple[int, str]:
    """The number of processes the server running this code starts, and how it is known.

    Call it on the event loop's thread (a lifespan, a route).
    """
    found = _from_stack(sys._getframe(1))
    if found is not None:
        return found
    try:
        return max(1, int(os.environ["WEB_CONCURRENCY"])), "WEB_CONCURRENCY"
    except (KeyError, ValueError):
        return 1, "no server configuration found"


def _class(module: str, name: str) -> type | None:
    loaded = sys.modules.get(module)
    found = getattr(loaded, name, None)
    return found if isinstance(found, type) else None


def _instance(obj: Any, cls: type | None) -> bool:
    # A function, not an inline isinstance: mypy would narrow obj to object.
    return cls is not None and isinstance(obj, cls)


def _from_stack(frame: FrameType | None) -> tuple[int, str] | None:
    uvicorn_server = _class("uvicorn.server", "Server")
    gunicorn_worker = _class("gunicorn.workers.base", "Worker")
    hypercorn_config = _class("hypercorn.config", "Config")
    if uvicorn_server is None and gunicorn_worker is None and hypercorn_config is None:
        return None
    while frame is not None:
        local: dict[str, Any] = frame.f_locals
        this: Any = local.get("self")
        try:
            if _instance(this, uvicorn_server):
                # --reload runs one server process, whatever --workers says
                workers = 1 if this.config.reload else int(this.config.workers)
                return workers, "uvicorn --workers"
            if _instance(this, gunicorn_worker):
                return int(this.cfg.workers), "gunicorn --workers"
            config: Any = local.get("config")
            if _instance(config, hypercorn_config):
                return max(1, int(config.workers)), "hypercorn --workers"
        except (AttributeError, TypeError, ValueError):
            pass  # a server version that keeps it elsewhere: keep looking, then fall back
        frame = frame.f_back
    return None
