"""The package versions a dask pool compares between its client, the scheduler and
the workers (``Client.get_versions``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ("MUST_AGREE", "version_mismatches")

#: packages that must be the same on the client, the scheduler and every worker:
#: they decide how tasks and results are pickled. Python is compared on major.minor.
MUST_AGREE = ("python", "cloudpickle", "dask", "distributed", "offload")


def _short(version: object, package: str) -> object:
    if package == "python" and isinstance(version, str):
        return ".".join(version.split(".")[:2])
    return version


def version_mismatches(versions: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """Compare the package versions of ``client.get_versions()``.

    :returns: ``(fatal, other)``: one line per package whose versions differ between
        the client, the scheduler and the workers; ``fatal`` for :data:`MUST_AGREE`
    """

    def packages(node: Any) -> dict[str, Any]:
        return dict(node.get("packages", {})) if isinstance(node, Mapping) else {}

    client = packages(versions.get("client"))
    scheduler = packages(versions.get("scheduler"))
    workers = {addr: packages(node) for addr, node in versions.get("workers", {}).items()}
    names = set(client) | set(scheduler)
    for worker in workers.values():
        names |= set(worker)
    fatal: list[str] = []
    other: list[str] = []
    for name in sorted(names):
        seen = {
            "client": _short(client.get(name), name),
            "scheduler": _short(scheduler.get(name), name),
        }
        for addr, worker in workers.items():
            seen[f"worker {addr}"] = _short(worker.get(name), name)
        if len(set(seen.values())) <= 1:
            continue
        line = f"{name}: " + ", ".join(
            f"{where} {'MISSING' if v is None else v}" for where, v in seen.items()
        )
        (fatal if name in MUST_AGREE else other).append(line)
    return fatal, other
