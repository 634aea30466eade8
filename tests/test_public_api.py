"""The public names of ``offload``, and what ``import offload`` costs."""

from __future__ import annotations

import json
import subprocess
import sys
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
    "OffloadError",
    "OffloadSettings",
    "OffloadTimeout",
    "OffloadedFunction",
    "Offloader",
    "OffloaderStats",
    "PoolClosed",
    "PoolOverloaded",
    "PoolSettings",
    "PoolStartError",
    "PoolStats",
    "RemoteTraceback",
    "SerializationError",
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
