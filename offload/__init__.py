"""offload: run blocking, CPU-bound functions from async code without stalling the event loop.

The names below are the whole public API. They load on first use, so a worker
process (or ``import offload`` alone) does not pay for pydantic or anyio, and only
``lifespan`` and ``get_executor`` import FastAPI. More in the public modules
``offload.fastapi`` and ``offload.prometheus``.
"""

from __future__ import annotations

from importlib import import_module

# Not typing.TYPE_CHECKING: importing typing is a large part of a worker process's
# start (docs/benchmarks.md, "Figures behind the code"), and workers import this
# package.
TYPE_CHECKING = False

if TYPE_CHECKING:
    from typing import Any

    from ._decorator import OffloadedFunction as OffloadedFunction
    from ._decorator import OffloadedGenerator as OffloadedGenerator
    from ._decorator import offload as offload
    from ._errors import CallAborted as CallAborted
    from ._errors import CallCancelled as CallCancelled
    from ._errors import ClusterUnavailable as ClusterUnavailable
    from ._errors import OffloadError as OffloadError
    from ._errors import OffloadTimeout as OffloadTimeout
    from ._errors import PoolClosed as PoolClosed
    from ._errors import PoolOverloaded as PoolOverloaded
    from ._errors import PoolStartError as PoolStartError
    from ._errors import RemoteTraceback as RemoteTraceback
    from ._errors import SerializationError as SerializationError
    from ._errors import WorkerCrashed as WorkerCrashed
    from ._executor import Executor as Executor
    from ._map_results import MapResults as MapResults
    from ._offloader import Offloader as Offloader
    from ._pools.thread import check_cancelled as check_cancelled
    from ._settings import OffloadSettings as OffloadSettings
    from ._settings import PoolSettings as PoolSettings
    from ._stats import LoopStats as LoopStats
    from ._stats import OffloaderStats as OffloaderStats
    from ._stats import PoolStats as PoolStats
    from ._stream import Stream as Stream
    from .fastapi import get_executor as get_executor
    from .fastapi import lifespan as lifespan

__version__ = "0.1.0"

# The public names, each once, with the module that defines it: ``__all__`` and the
# lazy loading below come from it. The imports above are the same names for type
# checkers, which cannot follow ``__getattr__``; tests/test_public_api.py checks that
# both say the same.
_MODULE_OF = {
    "CallAborted": "._errors",
    "CallCancelled": "._errors",
    "ClusterUnavailable": "._errors",
    "Executor": "._executor",
    "LoopStats": "._stats",
    "MapResults": "._map_results",
    "OffloadError": "._errors",
    "OffloadSettings": "._settings",
    "OffloadTimeout": "._errors",
    "OffloadedFunction": "._decorator",
    "OffloadedGenerator": "._decorator",
    "Offloader": "._offloader",
    "OffloaderStats": "._stats",
    "PoolClosed": "._errors",
    "PoolOverloaded": "._errors",
    "PoolSettings": "._settings",
    "PoolStartError": "._errors",
    "PoolStats": "._stats",
    "RemoteTraceback": "._errors",
    "SerializationError": "._errors",
    "Stream": "._stream",
    "WorkerCrashed": "._errors",
    "check_cancelled": "._pools.thread",
    "get_executor": ".fastapi",
    "lifespan": ".fastapi",
    "offload": "._decorator",
}

__all__ = tuple(sorted(_MODULE_OF))


def __getattr__(name: str) -> Any:
    try:
        module = _MODULE_OF[name]
    except KeyError:
        raise AttributeError(f"module 'offload' has no attribute {name!r}") from None
    value = getattr(import_module(module, __name__), name)
    globals()[name] = value
    _name_public_objects()
    return value


def _name_public_objects() -> None:
    """Give the public classes and functions of every module loaded so far the module
    ``offload``, where users import them from: reprs, tracebacks, pickles and the API
    reference then show ``offload.Offloader``, not its private module. A pickle still
    loads anywhere: ``offload.Offloader`` resolves through ``__getattr__``."""
    import sys
    import types

    for name, module in _MODULE_OF.items():
        value = getattr(sys.modules.get(__name__ + module), name, None)
        if isinstance(value, (type, types.FunctionType)):
            value.__module__ = __name__


def __dir__() -> list[str]:
    return sorted((*globals(), *__all__))
