"""The standing checks: mypy --strict and ruff, run as part of the suite so CI enforces them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=600
    )


@pytest.mark.parametrize(
    "command",
    [
        pytest.param(("mypy", "--strict", "offload", "tests", "benchmarks"), id="mypy"),
        pytest.param(("ruff", "check", "offload", "tests", "benchmarks"), id="ruff-check"),
        pytest.param(
            ("ruff", "format", "--check", "offload", "tests", "benchmarks"), id="ruff-format"
        ),
    ],
)
def test_clean(command: tuple[str, ...]) -> None:
    result = run(*command)
    assert result.returncode == 0, result.stdout + result.stderr
