"""offload's modules import one way: each only from the layers below its own.

The order is written once, in ``LAYERS``, bottom first (docs/design.md, "Layers").
A module imports at run time (at its top, or inside a function) only modules listed
before it; for type checkers (under ``TYPE_CHECKING``) it may also name a module of
its own layer. So a reader can tell the foundation from what stands on it, and an
import that goes the wrong way, even one made only for a type, fails here.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import offload

PACKAGE = Path(offload.__file__).parent

#: bottom first; an entry covers the module and everything under it (a subpackage),
#: but ``offload`` only the package's ``__init__.py``
LAYERS: tuple[tuple[str, ...], ...] = (
    # settings, errors, types, statistics, what a call carries: import nothing of offload's
    (
        "offload._errors",
        "offload._settings",
        "offload._types",
        "offload._stats",
        "offload._where",
        "offload._context",
    ),
    # small helpers shared by the pools and what runs them
    ("offload._helper_threads", "offload._lag", "offload._call"),
    # the pools: thread, process, dask
    ("offload._pools",),
    # a stream's iteration over what its pool hands over, for the executor
    ("offload._stream",),
    # the Offloader, which owns the pools, and the Executors it hands out: each names
    # the other's type (``async with Offloader() as ex`` is an Executor, and
    # ``ex.offloader`` the Offloader); only _offloader imports _executor at run time;
    # _mapping (a map's feeder and calls) runs its calls through an Executor, and
    # _map_results (what Executor.map returns) holds a _mapping
    (
        "offload._chunking",
        "offload._mapping",
        "offload._map_results",
        "offload._executor",
        "offload._offloader",
    ),
    # views over a running Offloader: the default one, the decorator
    ("offload._default",),
    ("offload._decorator",),
    # integrations
    (
        "offload._disconnect",
        "offload._servers",
        "offload._server_timing",
        "offload.fastapi",
        "offload.prometheus",
    ),
    # the public names: loads any of the above on first use
    ("offload",),
    # python -m offload: the demo, an application of the public names, and info;
    # the core never imports them
    ("offload.demo", "offload.info", "offload.__main__"),
)

ORDER = [entry for layer in LAYERS for entry in layer]


def entry_of(module: str) -> str | None:
    """The entry of ``LAYERS`` that covers ``module``: the longest that prefixes it
    (``offload`` itself covers the package's ``__init__.py`` only)."""
    found = [e for e in ORDER if module == e or (e != "offload" and module.startswith(e + "."))]
    return max(found, key=len) if found else None


def layer_of(entry: str) -> int:
    return next(i for i, layer in enumerate(LAYERS) if entry in layer)


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports(path: Path) -> list[tuple[str, int, bool]]:
    """Each module of offload's that ``path`` imports: (module, line, for types only)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[tuple[str, int, bool]] = []

    def visit(node: ast.AST, typing_only: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and is_type_checking(child.test):
                for stmt in child.body:
                    visit_one(stmt, True)
                for stmt in child.orelse:
                    visit_one(stmt, typing_only)
            else:
                visit_one(child, typing_only)

    def visit_one(node: ast.AST, typing_only: bool) -> None:
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.append((alias.name, node.lineno, typing_only))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            for alias in node.names:
                # ``from . import framing`` imports the module offload._pools.process.framing
                sub = f"{target}.{alias.name}"
                is_module = (PACKAGE.parent / Path(*sub.split("."))).with_suffix(".py").exists()
                is_package = (PACKAGE.parent / Path(*sub.split(".")) / "__init__.py").exists()
                found.append((sub if is_module or is_package else target, node.lineno, typing_only))
        else:
            visit(node, typing_only)

    visit(ast.parse(path.read_text(), str(path)), False)
    return [(m, line, t) for m, line, t in found if m == "offload" or m.startswith("offload.")]


SOURCES = sorted(PACKAGE.rglob("*.py"))


def test_every_module_has_a_layer() -> None:
    missing = [module_name(p) for p in SOURCES if entry_of(module_name(p)) is None]
    assert missing == [], f"add these modules to a layer of LAYERS: {missing}"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: module_name(p))
def test_imports_go_down(path: Path) -> None:
    name = module_name(path)
    own = entry_of(name)
    assert own is not None
    wrong = []
    for target, line, typing_only in imports(path):
        entry = entry_of(target)
        if entry is None or entry == own:
            continue  # not a module of offload's, or inside one entry (a subpackage)
        if ORDER.index(entry) < ORDER.index(own):
            continue
        if typing_only and layer_of(entry) == layer_of(own):
            continue
        how = "for types" if typing_only else "at run time"
        wrong.append(f"{name}:{line} imports {target} ({entry}) {how}")
    assert wrong == [], "imports that go up the layers (tests/test_layers.py): " + "; ".join(wrong)


def test_the_check_sees_a_wrong_import(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The check itself: a bottom module naming the Offloader, even for types only,
    # is refused; the same import from above is not.
    errors = PACKAGE / "_errors.py"
    source = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ._offloader import X\n"
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: source)
    assert imports(errors) == [("offload._offloader", 3, True)]
    with pytest.raises(AssertionError, match=r"offload._errors:3 imports offload._offloader"):
        test_imports_go_down(errors)
    test_imports_go_down(PACKAGE / "fastapi.py")
