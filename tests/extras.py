"""Run a sample as if only offload and some of its extras were installed.

A sample that says ``pip install 'offload[fastapi]'`` must run with exactly what that
installs. Building a virtual environment per extra takes a minute each; instead,
:func:`command` runs the sample in this environment with every module of the
distributions that the extras do not pull in made unimportable (as ``pip`` would have
left them out): the closure of ``pyproject.toml``'s requirements, followed through the
installed distributions' metadata.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from functools import cache
from importlib.metadata import PackageNotFoundError, distribution, packages_distributions
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
#: what a fresh virtual environment holds before anything is installed in it
BASELINE = frozenset({"pip", "setuptools"})

# Runs the script as __main__ after installing the finder, so that its line numbers
# are its own. The finder only refuses: whatever it lets through is found as usual.
PRELUDE = """\
import runpy, sys

class _NotInstalled:
    blocked = frozenset({blocked!r})

    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name.partition(".")[0] in cls.blocked:
            raise ModuleNotFoundError(
                f"No module named {{name!r}} (not installed by {installs})", name=name
            )
        return None

sys.meta_path.insert(0, _NotInstalled)
script = sys.argv[1]
sys.argv[:] = sys.argv[1:]
runpy.run_path(script, run_name="__main__")
"""


def _pyproject() -> dict[str, object]:
    import tomllib

    with (ROOT / "pyproject.toml").open("rb") as file:
        project: dict[str, object] = tomllib.load(file)["project"]
    return project


def requirements(extras: Iterable[str]) -> list[Requirement]:
    """offload's own requirements with ``extras``, as pyproject.toml states them today."""
    project = _pyproject()
    declared: dict[str, list[str]] = project["optional-dependencies"]  # type: ignore[assignment]
    lines: list[str] = list(project["dependencies"])  # type: ignore[call-overload]
    for extra in extras:
        assert extra in declared, f"pyproject.toml has no extra {extra!r}"
        lines += declared[extra]
    return [Requirement(line) for line in lines]


def installed_by(extras: Iterable[str], also: Iterable[str] = ()) -> frozenset[str]:
    """The distributions ``pip install offload[extras] also...`` installs, by canonical name."""
    found: set[str] = set(BASELINE)
    todo = [*requirements(extras), *map(Requirement, also)]
    while todo:
        requirement = todo.pop()
        if requirement.marker is not None and not any(
            requirement.marker.evaluate({"extra": extra}) for extra in requirement.extras or {""}
        ):
            continue
        name = canonicalize_name(requirement.name)
        key = f"{name}[{','.join(sorted(requirement.extras))}]"
        if key in found:
            continue
        found |= {key, name}
        for line in _requires(name):
            dependency = Requirement(line)
            marker = dependency.marker
            if marker is None or any(
                marker.evaluate({"extra": extra}) for extra in {"", *requirement.extras}
            ):
                dependency.marker = None
                todo.append(dependency)
    return frozenset(name for name in found if "[" not in name)


@cache
def _requires(name: str) -> tuple[str, ...]:
    try:
        return tuple(distribution(name).requires or ())
    except PackageNotFoundError:
        # Not installed here (websockets, of uvicorn[standard]): nothing of it can be
        # imported, so nothing of it needs blocking.
        return ()


def blocked_modules(extras: Iterable[str], also: Iterable[str] = ()) -> frozenset[str]:
    """Top-level modules of installed distributions that ``extras`` would not install."""
    allowed = installed_by(extras, also)
    blocked = set()
    for module, dists in packages_distributions().items():
        if module == "offload":
            continue
        if not any(canonicalize_name(dist) in allowed for dist in dists):
            blocked.add(module)
    return frozenset(blocked)


def command(script: Path, extras: Iterable[str] = (), also: Iterable[str] = ()) -> list[str]:
    """``python script``, with only offload, ``extras`` and ``also`` importable."""
    extras = sorted(extras)
    installs = f"offload[{','.join(extras)}]" if extras else "offload"
    if also:
        installs += " " + " ".join(sorted(also))
    prelude = PRELUDE.format(blocked=sorted(blocked_modules(extras, also)), installs=installs)
    return [sys.executable, "-c", prelude, str(script)]
