"""The documentation site: it builds with ``mkdocs build --strict``, every Python
sample in it runs, and its generated parts match the code.

Samples: every fenced ```python block of a page in ``docs/`` runs, the page's blocks in
order in one fresh interpreter (a later block may use what an earlier one defined), as
``__main__``. A block that cannot run here (it needs a server, a model file, or is a
fragment) is preceded by the line ``<!-- no-run: why -->``; it must still compile.
The script keeps each block on the line it has in the page, so a traceback's line
numbers are the page's. A page's samples run with only offload and the extras the page
names importable (``EXTRAS``, tests/extras.py): what its reader has installed.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from .extras import command

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = sorted(p for p in DOCS.rglob("*.md") if "tools" not in p.relative_to(DOCS).parts)

FENCE = re.compile(r"^```python([^\n]*)\n(.*?)^```[ \t]*$", re.M | re.S)
TITLE = re.compile(r'title="([\w.]+\.py)"')
NO_RUN = "<!-- no-run"
#: a sample's allowance; the whole file stays well under 30 s
SAMPLE_TIMEOUT = 60
#: the extras a page tells its reader to install (``pip install 'offload[fastapi]'``),
#: and other packages it names (the guide's trio sample); other pages: offload alone
EXTRAS: dict[str, tuple[str, ...]] = {
    "dask.md": ("dask",),
    "errors.md": ("fastapi",),
    "fastapi.md": ("fastapi", "metrics"),
    "guide.md": ("metrics",),
    "index.md": ("fastapi",),
    "observability.md": ("fastapi",),
    "quickstart.md": ("fastapi",),
}
ALSO: dict[str, tuple[str, ...]] = {"guide.md": ("trio",)}


class Block:
    def __init__(self, page: Path, text: str, match: re.Match[str]) -> None:
        self.page = page
        self.code = match.group(2)
        self.line = text.count("\n", 0, match.start(2)) + 1  # first line of the code
        title = TITLE.search(match.group(1))
        self.file = title.group(1) if title else None
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        self.runs = not before.startswith(NO_RUN)


def blocks(page: Path) -> list[Block]:
    text = page.read_text()
    return [Block(page, text, m) for m in FENCE.finditer(text)]


def page_id(page: Path) -> str:
    return str(page.relative_to(DOCS))


def test_python_fences_are_found() -> None:
    # A ```python fence that is indented (in a list, an admonition) would escape
    # FENCE and never run: keep them at the start of a line.
    for page in PAGES:
        for number, line in enumerate(page.read_text().splitlines(), 1):
            if line.lstrip().startswith("```python"):
                assert line.startswith("```python"), f"{page_id(page)}:{number}: indented fence"
    assert sum(len(blocks(page)) for page in PAGES) >= 20


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_samples_compile(page: Path) -> None:
    for block in blocks(page):
        source = "\n" * (block.line - 1) + block.code
        # Top-level await allowed: fragments show what goes in an async function.
        compile(source, str(page), "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)


RUNNABLE = [page for page in PAGES if any(block.runs for block in blocks(page))]


@pytest.mark.parametrize("page", RUNNABLE, ids=page_id)
def test_samples_run(page: Path, tmp_path: Path) -> None:
    lines: list[str] = []
    for block in blocks(page):
        if block.runs and block.file is not None:
            (tmp_path / block.file).write_text(block.code)
        elif block.runs:
            lines += [""] * (block.line - 1 - len(lines))
            lines += block.code.splitlines()
    script = tmp_path / f"{page.stem}.md.py"
    script.write_text("\n".join(lines) + "\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env = {k: v for k, v in env.items() if not k.startswith("OFFLOAD_")}
    name = page_id(page)
    result = subprocess.run(
        command(script, EXTRAS.get(name, ()), ALSO.get(name, ())),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=SAMPLE_TIMEOUT,
        env=env,
    )
    assert result.returncode == 0, (
        f"a sample of docs/{page_id(page)} failed (line numbers are the page's):\n"
        + result.stderr.replace(str(script), f"docs/{page_id(page)}")
    )
    # A sample shows settings to copy: none that oversubscribes the CPUs (2 here).
    assert "worker processes per server" not in result.stderr, result.stderr


def test_mkdocs_build_strict(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "WARNING" not in output, output
    assert 'not included in the "nav"' not in output, output
    assert (tmp_path / "api" / "index.html").exists()


def _settings_tool() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "settings_table", DOCS / "tools" / "settings_table.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_settings_reference_matches_the_models() -> None:
    tool = _settings_tool()
    page = (DOCS / "settings.md").read_text()
    assert tool.rendered_page(page) == page, (
        "docs/settings.md is stale: run python docs/tools/settings_table.py --write"
    )


def test_settings_reference_names_every_field() -> None:
    from offload import OffloadSettings, PoolSettings

    page = (DOCS / "settings.md").read_text()
    for name in (*OffloadSettings.model_fields, *PoolSettings.model_fields):
        assert f"| `{name}` |" in page, name
    assert "`OFFLOAD_PROCESS__MAX_WORKERS=4`" in page
    assert "`OFFLOAD_POOLS__<NAME>__FIELD`" in page


def test_readme_links_resolve() -> None:
    readme = (ROOT / "README.md").read_text()
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", readme)
    local = [link for link in links if "://" not in link]
    assert local, "the README links to no page"
    for link in local:
        assert (ROOT / link).exists(), link


# What fits the site's text column on a laptop screen (1,280 px and wider: the table of
# contents sits in the left sidebar, `toc.integrate`, leaving a column of about 930 px):
# code at 13.6 px is about 8 px a character, and a table's cells at 12.8 px wrap at
# spaces only, so a table needs room for the longest word of each column plus padding.
CODE_COLUMNS = 88
TABLE_COLUMNS = 150  # characters of the longest words, plus 4 a column for padding


def _fenced_lines(text: str) -> list[tuple[int, str]]:
    lines, inside = [], False
    for number, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            inside = not inside
        elif inside:
            lines.append((number, line))
    return lines


def _tables(text: str) -> list[tuple[int, list[list[str]]]]:
    found: list[tuple[int, list[list[str]]]] = []
    rows: list[list[str]] = []
    for number, line in enumerate([*text.splitlines(), ""], 1):
        if line.startswith("|"):
            cells = re.split(r"(?<!\\)\|", line.strip().strip("|"))
            if not set("".join(cells)) <= set("-: "):  # not the delimiter row
                rows.append([c.strip() for c in cells])
        elif rows:
            found.append((number - len(rows) - 1, rows))
            rows = []
    return found


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_code_blocks_fit_a_laptop_column(page: Path) -> None:
    text = page.read_text()
    long = [f"{page.name}:{n}" for n, line in _fenced_lines(text) if len(line) > CODE_COLUMNS]
    assert not long, f"code lines over {CODE_COLUMNS} characters: {long}"


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_tables_fit_a_laptop_column(page: Path) -> None:
    wide = []
    for number, rows in _tables(page.read_text()):
        columns = max(len(r) for r in rows)
        longest = [0] * columns
        for row in rows:
            for i, cell in enumerate(row):
                words = re.sub(r"<br>|`|\*\*", " ", cell).split()
                longest[i] = max(longest[i], *(len(w) for w in words), 0)
        if sum(longest) + 4 * columns > TABLE_COLUMNS:
            wide.append(f"{page.name}:{number} ({sum(longest)} + 4 x {columns})")
    assert not wide, f"tables too wide for a laptop's column: {wide}"
