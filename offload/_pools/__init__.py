"""Pool kinds by name. ``import offload`` imports none of them; the thread and process
kinds come with :class:`~offload.Offloader`, and an optional kind (dask) costs nothing
until a pool of that kind starts."""

from __future__ import annotations

from importlib import import_module

TYPE_CHECKING = False  # not typing's: workers import this package (see offload/__init__.py)

if TYPE_CHECKING:
    from .base import Pool

__all__ = ("pool_class",)

#: kind -> (module, class); the module is imported when a pool of that kind first starts
_KINDS: dict[str, tuple[str, str]] = {
    "thread": ("offload._pools.thread", "ThreadPool"),
    "process": ("offload._pools.process.pool", "ProcessPool"),
    "dask": ("offload._pools.dask.pool", "DaskPool"),
}


def pool_class(kind: str) -> type[Pool]:
    """The pool class of ``kind`` (one of the settings' validated kinds)."""
    module_name, attr = _KINDS[kind]
    module = import_module(module_name)
    cls: type[Pool] = getattr(module, attr)
    return cls
