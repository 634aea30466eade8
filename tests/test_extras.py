"""Each optional module imports with only the extra that names it installed."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from .extras import ROOT, command, installed_by


@pytest.mark.parametrize(
    ("module", "extras"),
    [
        ("offload", ()),
        ("offload.fastapi", ("fastapi",)),
        ("offload.prometheus", ("metrics",)),
        ("offload._pools.dask.pool", ("dask",)),
        ("offload.demo.command", ("demo",)),
        ("offload.demo.app", ("demo",)),
        ("offload.demo.load", ("demo",)),
    ],
)
def test_module_imports_with_its_extra(
    tmp_path: Path, module: str, extras: tuple[str, ...]
) -> None:
    script = tmp_path / "probe.py"
    script.write_text(f"import {module}\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        command(script, extras), capture_output=True, text=True, timeout=60, env=env
    )
    assert result.returncode == 0, result.stderr


def test_the_closure_follows_extras_of_dependencies() -> None:
    # uvicorn[standard] brings uvloop and httptools; the core alone brings neither.
    assert {"uvloop", "httptools", "httpx2", "python-multipart"} <= installed_by(["fastapi"])
    assert not {"uvloop", "fastapi", "httpx"} & installed_by([])
