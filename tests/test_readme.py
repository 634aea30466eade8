"""The README's samples run as written, each on its own, with what it says to install.

A reader copies one block: each ```python block runs alone in a fresh interpreter,
with only offload and the extras named (``offload[fastapi]``) in the text between the
previous block and this one importable (see tests/extras.py).
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from .extras import command

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
FENCE = re.compile(r"^```python\n(.*?)^```[ \t]*$", re.M | re.S)
EXTRA = re.compile(r"offload\[([\w,]+)\]")


def samples() -> list[tuple[list[str], str]]:
    """Each python block with the extras named in the text just before it."""
    found = []
    end = 0
    for match in FENCE.finditer(README):
        named = [
            e for group in EXTRA.findall(README[end : match.start()]) for e in group.split(",")
        ]
        found.append((named, match.group(1)))
        end = match.end()
    return found


#: what each block prints, in order
OUTPUT = [["75025", "3"], ["{'fib':", "75025}"]]


def test_every_block_is_checked() -> None:
    assert len(samples()) == len(OUTPUT)
    assert samples()[1][0] == ["fastapi"], "the FastAPI sample names the extra it needs"


@pytest.mark.parametrize(("index", "expected"), list(enumerate(OUTPUT)))
def test_block_runs_alone(tmp_path: Path, index: int, expected: list[str]) -> None:
    extras, code = samples()[index]
    script = tmp_path / "sample.py"
    script.write_text(code)
    env = {k: v for k, v in os.environ.items() if not k.startswith("OFFLOAD_")}
    env["PYTHONPATH"] = str(ROOT)
    result = subprocess.run(
        command(script, extras),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert result.returncode == 0, f"README block {index + 1}:\n{result.stderr}"
    assert result.stdout.split() == expected, result.stdout
