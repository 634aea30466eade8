"""``python -m offload info``: run as a user runs it, in a fresh interpreter, with the
environment each test chooses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import pytest

from .extras import command
from .processes import script_env

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "observability.md"

#: the JSON output's keys, as docs/observability.md lists them
KEYS = {
    "": {"schema", "platform", "settings", "cpus", "fast_paths", "server", "versions",
         "dask_must_agree"},
    "platform": {"system", "release", "machine", "python", "implementation"},
    "settings": {"env_file", "valid", "values", "errors", "max_workers"},
    "cpus": {"usable", "cpu_count", "affinity", "cgroup_version", "cgroup_quota",
             "loky_max_cpu_count", "limited_by"},
    "fast_paths": {"death_signal", "cross_memory", "niceness", "long_time_slice",
                   "idle_priority", "hard_memory_limit", "pidfd", "group_guard"},
    "server": {"server_processes", "source", "process_pools", "started_on_first_use",
               "workers_per_server", "worker_processes", "processes", "guard_processes",
               "cpus", "oversubscribed"},
    "versions": {"python", "offload", "anyio", "loky", "cloudpickle", "pydantic",
                 "pydantic-settings", "fastapi", "dask", "distributed"},
}  # fmt: skip


def info(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "offload", "info", *args],
        env={**script_env(), **env},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


def info_json(*args: str, cwd: Path, **env: str) -> dict[str, Any]:
    result = info("--json", *args, cwd=cwd, **env)
    assert result.returncode == 0, result.stderr
    report: dict[str, Any] = json.loads(result.stdout)
    return report


def test_each_setting_says_where_it_comes_from(tmp_path: Path) -> None:
    (tmp_path / "app.env").write_text(
        "OFFLOAD_PROCESS__TIMEOUT=5\nOFFLOAD_PROCESS__MAX_WORKERS=7\nOFFLOAD_POOLS__ML__KIND=thread\n"
    )
    report = info_json("--env-file", "app.env", cwd=tmp_path, OFFLOAD_PROCESS__MAX_WORKERS="3")
    values = report["settings"]["values"]
    # The environment wins over the file, as in OffloadSettings.
    assert values["process.max_workers"] == {
        "value": 3,
        "source": "environment",
        "variable": "OFFLOAD_PROCESS__MAX_WORKERS",
    }
    assert values["process.timeout"] == {
        "value": 5.0,
        "source": "file",
        "variable": "OFFLOAD_PROCESS__TIMEOUT",
    }
    assert values["pools.ml.kind"]["source"] == "file"
    assert values["process.max_pending"] == {"value": 1000, "source": "default", "variable": None}
    assert values["shutdown_timeout"]["source"] == "default"
    assert report["settings"]["valid"] is True
    assert report["server"]["process_pools"] == {"process": 3}


def test_a_pool_given_as_json_names_its_variable(tmp_path: Path) -> None:
    report = info_json(cwd=tmp_path, OFFLOAD_THREAD='{"max_workers": 4}')
    assert report["settings"]["values"]["thread.max_workers"] == {
        "value": 4,
        "source": "environment",
        "variable": "OFFLOAD_THREAD",
    }
    assert report["settings"]["values"]["thread.timeout"]["source"] == "default"


def test_without_the_file_its_values_are_defaults(tmp_path: Path) -> None:
    (tmp_path / "app.env").write_text("OFFLOAD_PROCESS__TIMEOUT=5\n")
    report = info_json(cwd=tmp_path)
    assert report["settings"]["env_file"] is None
    assert report["settings"]["values"]["process.timeout"]["source"] == "default"


def test_human_output(tmp_path: Path) -> None:
    result = info(cwd=tmp_path, OFFLOAD_PROCESS__MAX_WORKERS="3")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert max(map(len, lines)) <= 88  # a laptop's terminal, the docs' code blocks
    row = next(line.split() for line in lines if line.strip().startswith("max_workers"))
    assert row[-1] == "3*"  # the process pool's, from a variable; the thread pool's auto
    assert any(
        line.split() == ["process.max_workers", "OFFLOAD_PROCESS__MAX_WORKERS", "(environment)"]
        for line in lines
    )
    for section in ("Settings", "CPUs for the pools", "Process pool", "Web server", "Versions"):
        assert any(line.startswith(section) for line in lines), section


@pytest.mark.parametrize("json_output", [False, True], ids=["text", "json"])
def test_an_invalid_variable_is_named_and_exits_1(tmp_path: Path, json_output: bool) -> None:
    args = ("--json",) if json_output else ()
    result = info(*args, cwd=tmp_path, OFFLOAD_PROCESS__MAX_WORKERS="0")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    if json_output:
        settings = json.loads(result.stdout)["settings"]
        assert settings["valid"] is False
        [error] = settings["errors"]
        assert error["variable"] == "OFFLOAD_PROCESS__MAX_WORKERS"
        assert error["source"] == "environment"
        assert "greater than 0" in error["message"]
    else:
        assert "error: OFFLOAD_PROCESS__MAX_WORKERS: Input should be greater than 0" in (
            result.stdout
        )
        assert max(map(len, result.stdout.splitlines())) <= 88
        assert "Versions" in result.stdout  # the rest of the report is still there


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("OFFLOAD_PROCES__MAX_WORKERS", "3", "not an offload setting"),
        ("OFFLOAD_THREAD__HARD_CANCEL", "true", "a thread cannot be stopped"),
        ("OFFLOAD_PROCESS", "{not json", "error parsing value"),
    ],
)
def test_other_invalid_variables_are_named(
    tmp_path: Path, variable: str, value: str, expected: str
) -> None:
    result = info("--json", cwd=tmp_path, **{variable: value})
    assert result.returncode == 1, result.stderr
    [error] = json.loads(result.stdout)["settings"]["errors"]
    assert error["variable"] == variable
    assert expected in error["message"]


def test_an_invalid_value_in_the_file_is_named(tmp_path: Path) -> None:
    (tmp_path / "app.env").write_text("OFFLOAD_PROCESS__NICENESS=99\n")
    result = info("--env-file", "app.env", cwd=tmp_path)
    assert result.returncode == 1
    assert "error: OFFLOAD_PROCESS__NICENESS (in the file): " in result.stdout


def test_a_missing_env_file_is_refused(tmp_path: Path) -> None:
    result = info("--env-file", "nowhere.env", cwd=tmp_path)
    assert result.returncode == 2
    assert "nowhere.env" in result.stderr


def test_the_json_keys_are_the_documented_ones(tmp_path: Path) -> None:
    report = info_json(cwd=tmp_path)
    assert set(report) == KEYS[""]
    for part, keys in KEYS.items():
        if part:
            assert set(report[part]) == keys, part
    documented = DOCS.read_text()
    for part, keys in KEYS.items():
        for key in {part} | keys if part else keys:
            assert f"`{key}`" in documented, f"docs/observability.md does not name `{key}`"
    for feature in report["fast_paths"].values():
        assert set(feature) == {"on", "detail"}
    cpus = report["cpus"]
    assert cpus["usable"] >= 1
    assert cpus["usable"] <= min(c for c in (cpus["cpu_count"], cpus["affinity"]) if c)


def test_with_other_threads_running_nothing_is_forked_and_the_keys_stay() -> None:
    from offload.info.machine import TRIED_ON_A_CHILD, features

    release = threading.Event()
    other = threading.Thread(target=release.wait)
    other.start()
    try:
        found = features()
    finally:
        release.set()
        other.join()
    assert set(found) == KEYS["fast_paths"]
    for name in set(TRIED_ON_A_CHILD) - {"cross_memory"}:
        assert found[name].detail == "not tried: other threads run"


# Runs ``python -m offload info --json`` as the base install has it (no FastAPI, no
# Dask); then says what it imported, what threads run and whether a child is left.
WITHOUT_EXTRAS = """\
import json
import os
import sys
import threading

from offload.__main__ import main

main(["info", "--json"])
try:
    os.waitpid(-1, os.WNOHANG)
    left = True
except ChildProcessError:
    left = False
loaded = sorted({name.partition(".")[0] for name in sys.modules})
print(json.dumps({"threads": threading.active_count(), "child_left": left,
                  "modules": loaded}), file=sys.stderr)
"""


def test_works_without_fastapi_and_dask_and_leaves_nothing(tmp_path: Path) -> None:
    script = tmp_path / "probe.py"
    script.write_text(textwrap.dedent(WITHOUT_EXTRAS))
    env = {**script_env(), "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        command(script), capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["versions"]["fastapi"] is None
    assert report["versions"]["dask"] is None
    assert report["versions"]["distributed"] is None
    assert report["versions"]["offload"] is not None
    after = json.loads(result.stderr.strip().splitlines()[-1])
    assert after["threads"] == 1
    assert after["child_left"] is False
    assert not {"fastapi", "starlette", "dask", "distributed"} & set(after["modules"])


def test_imports_neither_dask_nor_fastapi_when_installed(tmp_path: Path) -> None:
    # Installed here: still not imported (distributed alone takes about a second).
    code = (
        "import sys; from offload.__main__ import main; main(['info']); "
        "print(sorted(m for m in ('dask', 'distributed', 'fastapi') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        env=script_env(),
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "[]"


def test_the_cli_lists_the_command() -> None:
    from offload.__main__ import COMMANDS

    assert COMMANDS["info"][0] == "offload.info.command"
    assert os.path.exists(ROOT / "offload" / "info" / "command.py")
