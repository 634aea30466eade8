"""``python -m offload info [--json] [--env-file PATH]``: what this machine and
environment give the pools.

It prints the effective settings, each with where it came from; the CPUs the pools
may use and what limits them; which fast paths and safeguards of the process pool
work here (tried on a forked child, see :mod:`.machine`); how many processes a web
server with these settings makes; and the versions of what offload runs on. With
``--json``, one JSON object whose keys are listed in docs/observability.md. It starts
no pool and no thread, imports neither FastAPI nor Dask, and leaves no process
behind. An invalid setting is reported with its variable's name, and the exit status
is 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import textwrap
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .machine import cpu_budget, describe_platform, features
from .origins import read_settings
from .packages import MUST_AGREE, versions

if TYPE_CHECKING:
    from .._settings import OffloadSettings
    from .machine import CpuBudget, Feature

__all__ = ("gather", "main", "parser", "render")

#: bumped when a key of the JSON output changes meaning or goes away
SCHEMA = 1
#: the width of the human output, at most: a laptop's terminal, the docs' code blocks
WIDTH = 88


def parser(prog: str = "python -m offload info") -> argparse.ArgumentParser:
    command = argparse.ArgumentParser(
        prog=prog,
        description="What this machine and environment give offload's pools: the settings "
        "and where each comes from, CPUs, fast paths, versions.",
    )
    command.add_argument("--json", action="store_true", help="one JSON object, for machines")
    command.add_argument(
        "--env-file",
        metavar="PATH",
        help="read the settings from this file too, as OffloadSettings(_env_file=PATH) does",
    )
    return command


def gather(env_file: str | None) -> dict[str, Any]:
    """Everything the command reports, as its JSON output has it."""
    settings, origins, problems = read_settings(env_file)
    budget = cpu_budget()
    fast = features()
    return {
        "schema": SCHEMA,
        "platform": describe_platform(),
        "settings": {
            "env_file": env_file,
            "valid": not problems,
            "values": {o.path: _without(dataclasses.asdict(o), "path") for o in origins},
            "errors": [dataclasses.asdict(p) for p in problems],
            "max_workers": {}
            if settings is None
            else {
                name: pool.resolved_max_workers(pool.kind or "process")
                for name, pool in settings.pool_settings().items()
            },
        },
        "cpus": dataclasses.asdict(budget),
        "fast_paths": {name: dataclasses.asdict(f) for name, f in fast.items()},
        "server": None if settings is None else _server(settings, budget, fast),
        "versions": versions(),
        "dask_must_agree": list(MUST_AGREE),
    }


def _without(record: dict[str, Any], key: str) -> dict[str, Any]:
    record.pop(key)
    return record


def _server(
    settings: OffloadSettings, budget: CpuBudget, fast: dict[str, Feature]
) -> dict[str, Any]:
    """The processes that a web server of this environment makes with these settings."""
    from .._offloader import starts_on_first_use
    from .._servers import server_processes

    lazy = starts_on_first_use(settings)
    pools = {
        name: pool.resolved_max_workers("process")
        for name, pool in settings.pool_settings().items()
        if pool.kind == "process"
    }
    per_server = sum(n for name, n in pools.items() if name not in lazy)
    servers, source = server_processes()
    guard = fast.get("group_guard")
    return {
        "server_processes": servers,
        "source": source,
        "process_pools": pools,
        "started_on_first_use": sorted(lazy),
        "workers_per_server": per_server,
        "worker_processes": servers * per_server,
        "processes": servers * (1 + per_server),
        "guard_processes": servers * per_server if guard is not None and guard.on else 0,
        "cpus": budget.usable,
        "oversubscribed": servers * per_server > budget.usable,
    }


# -- the human output --------------------------------------------------------------


def _row(name: str, value: str, note: str = "", *, indent: int = 2) -> str:
    left = f"{' ' * indent}{name:<{30 - indent}} "
    room = WIDTH - len(left)
    text = f"{value:<22} {note}".rstrip() if note else value
    if len(text) > room:
        text = text[: room - 3] + "..."
    return left + text


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, list):
        return ",".join(map(str, value)) or "()"
    return str(value)


def _settings_lines(report: dict[str, Any]) -> list[str]:
    part = report["settings"]
    where = "environment" + (f" and {part['env_file']}" if part["env_file"] else "")
    lines = [f"Settings, from the {where}"]
    if part["errors"]:
        lines.append("  invalid: OffloadSettings() fails; the pools would not start")
        for error in part["errors"]:
            variable = error["variable"] or error["path"] or "settings"
            place = " (in the file)" if error["source"] == "file" else ""
            text = f"error: {variable}{place}: {error['message']}"
            lines += textwrap.wrap(text, WIDTH, initial_indent="  ", subsequent_indent="    ")
        return lines
    values: dict[str, dict[str, Any]] = part["values"]
    # The pools side by side, one row per field; the other settings one per line.
    pools: dict[str, dict[str, dict[str, Any]]] = {}
    for path, origin in values.items():
        *pool, field = path.split(".")
        if pool:
            pools.setdefault(pool[-1], {})[field] = origin
        else:
            lines.append(_row(path, _cell(origin["value"]), _source(origin)))
    resolved = part["max_workers"]
    names = list(pools)
    per_table = max(1, (WIDTH - 30) // 16)
    for first in range(0, len(names), per_table):
        group = names[first : first + per_table]
        lines.append(_row("pool", "".join(f"{name[:15]:<16}" for name in group).rstrip()))
        for field in pools[group[0]]:
            cells = []
            for name in group:
                origin = pools[name][field]
                text = _cell(origin["value"])
                if field == "max_workers" and origin["value"] is None:
                    text = f"{resolved[name]} (auto)"
                if origin["source"] != "default":
                    text += "*"
                cells.append(f"{text[:15]:<16}")
            lines.append(_row(field, "".join(cells).rstrip(), indent=4))
    chosen = [(path, o) for path, o in values.items() if o["source"] != "default"]
    if chosen:
        lines.append("  * set by:")
        lines += [_row(path, _source(origin), indent=4) for path, origin in chosen]
    return lines


def _source(origin: dict[str, Any]) -> str:
    if origin["source"] == "default":
        return "default"
    return f"{origin['variable']} ({origin['source']})"


def _cpu_lines(report: dict[str, Any]) -> list[str]:
    cpus = report["cpus"]
    limits = ", ".join(cpus["limited_by"])
    why = f"limited by: {limits}" if limits else "every CPU of the machine"
    quota = cpus["cgroup_quota"]
    return [
        f"CPUs for the pools: {cpus['usable']} (loky.cpu_count()); {why}",
        _row("os.cpu_count()", str(cpus["cpu_count"])),
        _row(
            "affinity",
            "unknown" if cpus["affinity"] is None else str(cpus["affinity"]),
            "os.sched_getaffinity(0)",
        ),
        _row(
            "cgroup CPU quota",
            "none" if quota is None else f"{quota:g} CPUs",
            "" if quota is None else f"cgroup v{cpus['cgroup_version']}",
        ),
        _row(
            "LOKY_MAX_CPU_COUNT",
            "unset" if cpus["loky_max_cpu_count"] is None else str(cpus["loky_max_cpu_count"]),
        ),
    ]


def _fast_lines(report: dict[str, Any]) -> list[str]:
    lines = ["Process pool: fast paths and safeguards (tried on a forked child)"]
    for name, feature in report["fast_paths"].items():
        line = f"  {name:<18} {'on' if feature['on'] else 'OFF':<4} {feature['detail']}"
        lines.append(line if len(line) <= WIDTH else line[: WIDTH - 3] + "...")
    return lines


def _server_lines(report: dict[str, Any]) -> list[str]:
    server = report["server"]
    if server is None:
        return []
    per = server["workers_per_server"]
    lines = [
        "Web server",
        _row("server processes", str(server["server_processes"]), server["source"]),
        _row(
            "process pools' workers",
            f"{per} per server process",
            ", ".join(f"{name} {n}" for name, n in server["process_pools"].items())
            + (
                f"; on first use: {', '.join(server['started_on_first_use'])}"
                if server["started_on_first_use"]
                else ""
            ),
        ),
        _row(
            "processes in all",
            f"{server['server_processes']} x (1 + {per}) = {server['processes']}",
            f"+ {server['guard_processes']} sleeping guards" if server["guard_processes"] else "",
        ),
    ]
    if server["oversubscribed"]:
        lines.append(
            f"  warning: {server['worker_processes']} worker processes for {server['cpus']} "
            "CPUs: CPU-bound calls will compete"
        )
    return lines


def _version_lines(report: dict[str, Any]) -> list[str]:
    lines = ["Versions (* must be the same on a Dask cluster's scheduler and workers)"]
    for name, version in report["versions"].items():
        mark = " *" if name in report["dask_must_agree"] else ""
        lines.append(_row(name + mark, version or "not installed"))
    return lines


def render(report: dict[str, Any]) -> str:
    """The report for people: compact sections, at most :data:`WIDTH` columns."""
    system = report["platform"]
    head = (
        f"offload {report['versions']['offload'] or '?'}, {system['implementation']} "
        f"{system['python']} on {system['system']} {system['release']} {system['machine']}"
    )
    sections = [
        [head[:WIDTH]],
        _settings_lines(report),
        _cpu_lines(report),
        _fast_lines(report),
        _server_lines(report),
        _version_lines(report),
    ]
    return "\n\n".join("\n".join(lines) for lines in sections if lines)


def main(argv: Sequence[str] | None = None, prog: str = "python -m offload info") -> None:
    """Print the report; exit with status 1 if the settings are invalid."""
    command = parser(prog)
    args = command.parse_args(argv)
    if args.env_file is not None and not os.path.isfile(args.env_file):
        # OffloadSettings would read nothing from it, and say nothing.
        command.error(f"--env-file {args.env_file}: no such file")
    report = gather(args.env_file)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(render(report))
    if not report["settings"]["valid"]:
        sys.exit(1)
