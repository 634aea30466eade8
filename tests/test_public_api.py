"""The public names of ``offload``, and what ``import offload`` costs."""

from __future__ import annotations

import importlib
import inspect
import json
import subprocess
import sys
import typing
from pathlib import Path

import pytest

import offload

ROOT = Path(__file__).resolve().parent.parent

PUBLIC = (
    "CallAborted",
    "CallCancelled",
    "ClusterUnavailable",
    "Executor",
    "LoopStats",
    "MapResults",
    "OffloadError",
    "OffloadSettings",
    "OffloadTimeout",
    "OffloadedFunction",
    "OffloadedGenerator",
    "Offloader",
    "OffloaderStats",
    "PoolClosed",
    "PoolOverloaded",
    "PoolSettings",
    "PoolStartError",
    "PoolStats",
    "RemoteTraceback",
    "SerializationError",
    "Stream",
    "WorkerCrashed",
    "check_cancelled",
    "get_executor",
    "lifespan",
    "offload",
)
FASTAPI_NAMES = ("get_executor", "lifespan")

HEAVY = (
    "fastapi",
    "starlette",
    "pydantic",
    "pydantic_settings",
    "anyio",
    "loky",
    "dask",
    "distributed",
)


def test_all_is_a_sorted_tuple_of_the_pinned_names() -> None:
    assert isinstance(offload.__all__, tuple)
    assert offload.__all__ == PUBLIC
    assert list(offload.__all__) == sorted(set(offload.__all__))


@pytest.mark.parametrize("name", PUBLIC)
def test_every_name_resolves(name: str) -> None:
    value = getattr(offload, name)
    assert value is not None
    assert name in dir(offload)
    # the name is the object's own name, not something else
    assert getattr(value, "__name__", name) == name


def test_type_checkers_see_the_same_names() -> None:
    # The package's TYPE_CHECKING imports (what mypy and pyright read) and its
    # lazy-import table (what runs) name the same objects, from the same modules.
    import ast

    tree = ast.parse(Path(offload.__file__).read_text())
    seen: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            for stmt in node.body:
                if isinstance(stmt, ast.ImportFrom) and stmt.level == 1:
                    for alias in stmt.names:
                        assert alias.asname == alias.name, f"re-export {alias.name} as itself"
                        seen[alias.name] = f".{stmt.module}"
    assert seen == offload._MODULE_OF


@pytest.mark.parametrize("name", PUBLIC)
def test_public_objects_name_the_package_as_their_module(name: str) -> None:
    value = getattr(offload, name)
    if isinstance(value, type) or inspect.isfunction(value):
        assert value.__module__ == "offload"
        assert repr(value).startswith(("<class 'offload.", "<function "))


def test_public_errors_pickle_across_processes() -> None:
    # An error made in one process is rebuilt in another from its public path
    # ("offload.WorkerCrashed"), which a fresh interpreter resolves lazily.
    import pickle

    errors = [
        getattr(offload, name)("boom")
        for name in PUBLIC
        if isinstance(getattr(offload, name), type)
        and issubclass(getattr(offload, name), Exception)
        and name != "WorkerCrashed"
    ]
    errors.append(
        offload.WorkerCrashed(
            "died", pid=12, exitcode=-11, function="m.f", traceback="Fatal Python error: ..."
        )
    )
    script = (
        "import pickle, sys\n"
        "errors = pickle.loads(sys.stdin.buffer.read())\n"
        "sys.stdout.buffer.write(pickle.dumps([(type(e).__module__, e) for e in errors]))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script],
        input=pickle.dumps(errors),
        cwd=ROOT,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    back = pickle.loads(proc.stdout)
    assert [type(e) for _, e in back] == [type(e) for e in errors]
    assert {module for module, _ in back} == {"offload"}
    assert [e.args for _, e in back] == [e.args for e in errors]
    crash = back[-1][1]
    assert (crash.pid, crash.exitcode) == (12, -11)
    assert (crash.function, crash.traceback) == ("m.f", "Fatal Python error: ...")


def test_error_hierarchy() -> None:
    for name in (
        "CallAborted",
        "CallCancelled",
        "ClusterUnavailable",
        "OffloadTimeout",
        "PoolClosed",
        "PoolOverloaded",
        "PoolStartError",
        "SerializationError",
        "WorkerCrashed",
    ):
        assert issubclass(getattr(offload, name), offload.OffloadError), name
    assert issubclass(offload.OffloadTimeout, TimeoutError)
    # an outage is retried like a closed pool (503), and is a connection error
    assert issubclass(offload.ClusterUnavailable, offload.PoolClosed)
    assert issubclass(offload.ClusterUnavailable, ConnectionError)
    assert issubclass(offload.OffloadError, Exception)


def test_unknown_name_raises_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no_such_name"):
        getattr(offload, "no_such_name")  # noqa: B009
    assert not hasattr(offload, "_WHERE_NOT")


def test_version() -> None:
    assert isinstance(offload.__version__, str)
    assert offload.__version__.count(".") >= 1


def test_py_typed_marker() -> None:
    package_dir = Path(offload.__file__).parent
    assert (package_dir / "py.typed").is_file()


def _loaded_after(code: str) -> list[str]:
    """Run ``code`` in a fresh interpreter; which HEAVY modules are then loaded."""
    script = (
        f"import json, sys\n{code}\nprint(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    loaded: list[str] = json.loads(proc.stdout.strip().splitlines()[-1])
    return loaded


def test_import_is_light() -> None:
    assert _loaded_after("import offload") == []


def test_names_load_lazily() -> None:
    loaded = _loaded_after(
        "import offload\nassert 'pydantic' not in sys.modules\noffload.OffloadSettings\n"
    )
    assert "pydantic" in loaded
    assert "pydantic_settings" in loaded
    loaded = _loaded_after("from offload import Offloader")
    assert "anyio" in loaded


def test_core_names_never_import_web_frameworks() -> None:
    loaded = _loaded_after(
        "import offload\n"
        f"for n in offload.__all__:\n    if n not in {FASTAPI_NAMES!r}: getattr(offload, n)"
    )
    assert "fastapi" not in loaded
    assert "starlette" not in loaded
    assert "dask" not in loaded  # only a pool of kind dask imports it, when it starts
    assert "distributed" not in loaded
    assert "fastapi" in _loaded_after("from offload import lifespan")


def test_decorator_import_is_light() -> None:
    # a worker imports the user's module, hence @offload: it must stay cheap there
    assert _loaded_after("from offload import offload") == []


def test_errors_load_without_pydantic_or_anyio() -> None:
    loaded = _loaded_after("from offload import OffloadError, WorkerCrashed, PoolClosed")
    assert loaded == []


def test_worker_module_is_light() -> None:
    # a process worker starts with this module; it must not pay for pydantic or anyio
    assert _loaded_after("import offload._pools.process.worker") == []


# Names of offload's private modules that public signatures may show, and why: each
# is a type its caller never has to name or build (a literal, a dict, a function),
# or an object only offload's own code asks for.
PUBLIC_MODULES = ("offload", "offload.fastapi", "offload.prometheus")
SHOWN_PRIVATE_NAMES = {
    "offload._settings.Kind": 'a Literal: callers write "thread", "process" or "dask"',
    "offload._settings.PoolSettingsDict": "a TypedDict: callers write a plain dict",
    "offload._pools.base.Pool": "Offloader.get_pool: the pool itself, for offload's own code",
    "offload._disconnect.Watch": "RequestExecutor's, built by get_executor, never by callers",
    "offload._types.Offloaded": "Executor.run's overload for an OffloadedFunction, matched "
    "structurally (the decorator sits above the executor); docs/api.md hides it",
    "offload._decorator._Decorate": "what @offload(...) returns, applied at once to the "
    "function; an overloaded __call__ types generator functions apart",
}


def _public_objects() -> list[tuple[str, object]]:
    found: list[tuple[str, object]] = []
    for module in map(importlib.import_module, PUBLIC_MODULES):
        for name in module.__all__:
            found.append((f"{module.__name__}.{name}", getattr(module, name)))
    return found


def test_public_signatures_show_no_private_name() -> None:
    # What mkdocstrings renders (griffe reads the source, TYPE_CHECKING imports and
    # overloads included): every name in a public function's or method's parameters,
    # defaults and return must be importable from a public module, or be a type
    # variable. A private sentinel as a default (``timeout: float | Unset = UNSET``)
    # would tell the reader to pass something they cannot name.
    griffe = pytest.importorskip("griffe")

    package = griffe.load("offload", search_paths=[str(ROOT)])
    public = {path.rsplit(".", 1)[1] for path, _ in _public_objects()}

    def private(path: str) -> bool:
        if not path.startswith("offload.") or path in SHOWN_PRIVATE_NAMES:
            return False
        module, _, name = path.removesuffix(".args").removesuffix(".kwargs").rpartition(".")
        if name in public or (module in PUBLIC_MODULES and not name.startswith("_")):
            return False
        try:
            value = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):  # a member of a private class, say
            return True
        return not isinstance(value, (typing.TypeVar, typing.ParamSpec))

    def names(expr: object) -> list[str]:
        if not isinstance(expr, griffe.Expr):
            return []
        return [p.canonical_path for p in expr.iterate(flat=True) if isinstance(p, griffe.ExprName)]

    shown: list[str] = []
    for path, _ in _public_objects():
        obj = package[path.removeprefix("offload.")]
        obj = obj.final_target if isinstance(obj, griffe.Alias) else obj
        members = [obj]
        if isinstance(obj, griffe.Class):
            members += [
                m.final_target if isinstance(m, griffe.Alias) else m
                for name, m in obj.all_members.items()
                if not name.startswith("_") or name in ("__init__", "__call__", "__aenter__")
            ]
        for member in members:
            if isinstance(member, griffe.Attribute):
                shown += [f"{member.path}: {n}" for n in names(member.annotation) if private(n)]
            if not isinstance(member, griffe.Function):
                continue
            for function in (member, *(member.overloads or ())):
                for p in function.parameters:
                    for n in names(p.annotation) + names(p.default):
                        if private(n):
                            shown.append(f"{function.path}({p.name}): {n}")
                shown += [f"{function.path} -> {n}" for n in names(function.returns) if private(n)]
    assert shown == []


def test_public_defaults_are_plain_values() -> None:
    # At run time too (help(), IDEs, inspect.signature): no default is an object of
    # offload's own, such as a private "not given" sentinel.
    checked = 0
    for path, value in _public_objects():
        targets = [value]
        if isinstance(value, type):
            targets += [
                getattr(value, name)
                for name in dir(value)
                if (not name.startswith("_") or name in ("__init__", "__call__"))
                and callable(getattr(value, name))
                and not isinstance(getattr(value, name), type)
            ]
        for target in targets:
            try:
                signature = inspect.signature(target)  # type: ignore[arg-type]
            except (TypeError, ValueError):
                continue
            checked += 1
            for p in signature.parameters.values():
                kind = type(p.default)
                assert not kind.__module__.startswith("offload"), (path, target, p)
            assert "Unset" not in str(signature), (path, signature)
    assert checked > 20
    timeout = inspect.signature(offload.Executor.options).parameters["timeout"]
    assert timeout.default is ...  # "not given": the pool's own timeout; None: no deadline
