"""The installed versions of the packages offload runs on, read from their metadata:
none is imported (importing distributed alone takes about a second)."""

from __future__ import annotations

import importlib.util
import platform
from importlib import metadata

from .._pools.dask.versions import MUST_AGREE

__all__ = ("MUST_AGREE", "PACKAGES", "versions")

#: distribution -> the module it installs, in the order shown
PACKAGES = {
    "offload": "offload",
    "anyio": "anyio",
    "loky": "loky",
    "cloudpickle": "cloudpickle",
    "pydantic": "pydantic",
    "pydantic-settings": "pydantic_settings",
    "fastapi": "fastapi",
    "dask": "dask",
    "distributed": "distributed",
}


def _version(distribution: str, module: str) -> str | None:
    """The installed version, or None where the module cannot be imported (missing,
    or hidden: ``sys.modules[module] = None``)."""
    try:
        if importlib.util.find_spec(module) is None:
            return None
    except (ImportError, ValueError):
        return None
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "unknown"  # importable, but installed without metadata (a checkout on PYTHONPATH)


def versions() -> dict[str, str | None]:
    """Python's version and each package's: None for one not installed."""
    return {
        "python": platform.python_version(),
        **{name: _version(name, module) for name, module in PACKAGES.items()},
    }
