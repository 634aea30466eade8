"""Where each setting of ``OffloadSettings()`` comes from: the default, an environment
variable, or the ``--env-file``.

pydantic-settings does not say: it merges what its sources return (``deep_update``,
the earlier source winning, leaf by leaf) before validation, and the model keeps no
trace of which source gave a value (``model_fields_set`` counts a value from the
environment as set, like one given in code). Each source is a public class, though,
and calling one returns the nested dict it contributes (``{"process": {"max_workers":
"3"}}``), and its ``env_vars`` the variables it read. So the sources are asked again
here, as ``OffloadSettings`` orders them: a leaf that the environment's dict holds
came from the environment (it wins over the file), else one that the file's holds
came from the file, else it is the default.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError
from pydantic_settings import DotEnvSettingsSource, EnvSettingsSource, SettingsError

from .._settings import ENV_PREFIX, OffloadSettings

__all__ = ("Origin", "Problem", "Sources", "read_settings")

DEFAULT = "default"
ENVIRONMENT = "environment"
FILE = "file"


@dataclass(frozen=True)
class Origin:
    """One setting's effective value and where it came from."""

    path: str  #: dotted, as in the settings: ``process.max_workers``, ``pools.ml.kind``
    value: Any  #: as JSON has it
    source: str  #: ``default``, ``environment`` or ``file``
    variable: str | None  #: the variable that set it (in the environment or the file)


@dataclass(frozen=True)
class Problem:
    """A setting that could not be read: the variable (when one is to blame) and why."""

    variable: str | None
    source: str | None  #: ``environment`` or ``file``: where the variable is
    path: str
    message: str


class Sources:
    """The environment's and the file's contributions, as ``OffloadSettings`` reads them."""

    def __init__(self, env_file: str | None) -> None:
        self.env_file = env_file
        self._layers: list[tuple[str, EnvSettingsSource]] = [
            (ENVIRONMENT, EnvSettingsSource(OffloadSettings))
        ]
        if env_file is not None:
            self._layers.append((FILE, DotEnvSettingsSource(OffloadSettings, env_file=env_file)))
        self._values: list[dict[str, Any]] | None = None

    def values(self) -> list[dict[str, Any]]:
        """Each layer's nested dict, the environment's first.

        :raises pydantic_settings.SettingsError: a variable holds JSON that does not parse
        """
        if self._values is None:
            self._values = [source() for _, source in self._layers]
        return self._values

    def origin_of(self, path: tuple[str, ...]) -> tuple[str, str | None]:
        """``(source, variable)`` of the value at ``path``, e.g. ``("process", "max_workers")``."""
        for (source, layer), values in zip(self._layers, self.values(), strict=True):
            if _holds(values, path):
                return source, self.variable_of(layer, path)
        return DEFAULT, None

    def blame(self, path: tuple[str, ...]) -> tuple[str, str] | None:
        """The variables that set ``path`` or settings under it, and where they are."""
        for source, layer in self._layers:
            if (name := self.variable_of(layer, path)) is not None:
                return name, source
            below = (ENV_PREFIX + "__".join(path) + "__").lower()
            found = sorted(n for n in layer.env_vars if n.lower().startswith(below))
            if found:
                return ", ".join(n.upper() for n in found), source
        return None

    @staticmethod
    def variable_of(layer: EnvSettingsSource, path: tuple[str, ...]) -> str | None:
        """The variable of ``layer`` that sets ``path``: its own, or the one holding
        the JSON of a pool, or of all the pools, that includes it."""
        names = {name.lower(): name for name in layer.env_vars}
        for end in range(len(path), 0, -1):
            name = (ENV_PREFIX + "__".join(path[:end])).lower()
            if name in names:
                return names[name].upper()
        return None


def _holds(values: Mapping[str, Any], path: tuple[str, ...]) -> bool:
    node: Any = values
    for key in path:
        if not isinstance(node, Mapping) or key not in node:
            return False
        node = node[key]
    return True


def _leaves(settings: OffloadSettings) -> Iterator[tuple[tuple[str, ...], Any]]:
    """Every setting's path and value (as JSON has it), the pools' fields one by one."""
    dumped = settings.model_dump(mode="json")
    for name, value in dumped.items():
        if name in ("thread", "process"):
            for field, leaf in value.items():
                yield (name, field), leaf
        elif name == "pools":
            for pool, fields in value.items():
                for field, leaf in fields.items():
                    yield ("pools", pool, field), leaf
        else:
            yield (name,), value


def read_settings(
    env_file: str | None,
) -> tuple[OffloadSettings | None, list[Origin], list[Problem]]:
    """``OffloadSettings()`` from the environment (and ``env_file``): the settings, each
    value's origin; or ``None`` and what is wrong, each problem naming its variable."""
    sources = Sources(env_file)
    try:
        sources.values()
        settings = OffloadSettings(_env_file=env_file)
    except SettingsError as exc:
        # "error parsing value for field "process" from source "EnvSettingsSource""
        field = re.search(r'field "([^"]+)"', str(exc))
        path: tuple[str, ...] = (field.group(1),) if field else ()
        blamed = sources.blame(path) if path else None
        variable, source = blamed if blamed is not None else (None, None)
        return None, [], [Problem(variable, source, ".".join(path), _cause(exc))]
    except ValidationError as exc:
        problems = []
        for error in exc.errors(include_url=False):
            loc = tuple(str(part) for part in error["loc"])
            message = error["msg"].removeprefix("Value error, ")
            if len(loc) == 1 and loc[0].upper().startswith(ENV_PREFIX):
                # An unknown variable: the location is its name.
                in_env = any(name.upper() == loc[0] for name in os.environ)
                problems.append(Problem(loc[0], ENVIRONMENT if in_env else FILE, "", message))
                continue
            variable, source, where = _blame(sources, loc, message)
            if variable is not None and not isinstance(
                error.get("input"), (dict, list, type(None))
            ):
                message += f" (got {error['input']!r})"
            problems.append(Problem(variable, source, where, message))
        return None, [], problems
    origins = []
    for path, value in _leaves(settings):
        source, variable = sources.origin_of(path)
        origins.append(Origin(".".join(path), value, source, variable))
    return settings, origins, []


def _blame(
    sources: Sources, path: tuple[str, ...], message: str
) -> tuple[str | None, str | None, str]:
    """The variable behind an error at ``path``, and the setting's path. offload's
    checks across fields fail at the pool, or at the root, with a message that starts
    with the setting's name (``thread.hard_cancel: a thread cannot ...``): that name,
    below ``path``, says more than ``path`` alone."""
    candidates = [path]
    named = re.match(r"([a-z_][a-z0-9_.]*)\b", message)
    if named is not None:
        candidates.insert(0, path + tuple(named.group(1).strip(".").split(".")))
    for candidate in candidates:
        for end in range(len(candidate), 0, -1):
            if (found := sources.blame(candidate[:end])) is not None:
                return *found, ".".join(candidate[:end])
    return None, None, ".".join(path)


def _cause(exc: BaseException) -> str:
    text = str(exc)
    if exc.__cause__ is not None:
        text += f": {exc.__cause__}"
    return text
