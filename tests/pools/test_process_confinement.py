"""How worker processes are started and confined: what they import at start, what
they may use, and what becomes of the processes they start themselves."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from offload import Offloader, OffloadSettings

from .. import funcs
from .test_process_faults import script_env

# A module named like one the worker imports at start, in the directory the
# application runs in: if it is ever imported, it leaves a mark, then stands aside
# for the real module so that the worker still works and the test fails on the mark.
SHADOW = """
import os, sys
with open({mark!r}, "a") as f:
    f.write(__name__ + "\\n")
del sys.modules[__name__]
sys.path[:] = [p for p in sys.path if p not in ("", ".", os.getcwd())]
import {name} as _real
globals().update(vars(_real))
"""


@pytest.mark.parametrize("name", ["socket", "pickle", "threading", "offload"])
async def test_workers_never_import_from_the_current_directory(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mark = tmp_path / "imported"
    here = tmp_path / "cwd"
    here.mkdir()
    (here / f"{name}.py").write_text(SHADOW.format(mark=str(mark), name=name))
    monkeypatch.chdir(here)
    settings = OffloadSettings(process={"max_workers": 1}, shutdown_timeout=5)
    async with Offloader(settings) as ex:
        assert await ex.pool("process").run(funcs.add, 2, 3) == 5
    assert not mark.exists(), mark.read_text()


FLAGS_SCRIPT = """
import sys

import anyio

from offload import Offloader, OffloadSettings


def flags():
    return sys.flags.optimize, sys.flags.no_user_site, sys.flags.dont_write_bytecode


async def main():
    async with Offloader(OffloadSettings(process={"max_workers": 1})) as ex:
        print(await ex.pool("process").run(flags) == flags(), flags(), flush=True)


anyio.run(main)
"""


def test_workers_run_with_the_interpreter_options_of_the_parent(tmp_path: Path) -> None:
    # -s: a worker must not run the user site's .pth files that the parent refused.
    script = tmp_path / "flags.py"
    script.write_text(FLAGS_SCRIPT)
    done = subprocess.run(
        [sys.executable, "-O", "-s", "-B", str(script)],
        env=script_env(),
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert done.stdout.decode().split()[:1] == ["True"], done
