"""The README's quickstart runs as written."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_quickstart_runs_as_written(tmp_path: Path) -> None:
    readme = (ROOT / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", readme, re.S)
    assert code is not None, "README has no python example"
    script = tmp_path / "quickstart.py"
    script.write_text(code.group(1))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60, env=env
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["75025", "3"]


def test_fastapi_example_builds_an_app(tmp_path: Path) -> None:
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    assert len(blocks) >= 2
    quickstart = blocks[0].replace("anyio.run(main)", "pass  #")
    module = tmp_path / "readme_app.py"
    module.write_text(quickstart + "\n" + blocks[1])
    check = (
        "import readme_app\n"
        "paths = {route.path for route in readme_app.app.routes}\n"
        "assert '/fib/{n}' in paths, paths\n"
        "print('ok')\n"
    )
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{tmp_path}"}
    result = subprocess.run(
        [sys.executable, "-c", check], capture_output=True, text=True, timeout=60, env=env
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
