"""OffloadSettings / PoolSettings: defaults, environment, .env, code, validation."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import loky
import pydantic
import pytest

from offload import OffloadSettings, PoolSettings
from offload._settings import usable_cpus


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No OFFLOAD_* variable from outside, and a cwd with no .env file."""
    for name in list(os.environ):
        if name.upper().startswith("OFFLOAD_"):
            monkeypatch.delenv(name)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return cwd


# -- defaults ----------------------------------------------------------------------------


def test_defaults() -> None:
    s = OffloadSettings()
    assert s.default_pool == "process"
    assert s.shutdown_timeout == 30
    assert s.pools == {}
    assert s.thread.kind == "thread"
    assert s.process.kind == "process"
    for pool in (s.thread, s.process):
        assert pool.max_pending == 1000
        assert pool.timeout is None
        assert pool.max_workers is None
        assert pool.initializer is None
        assert pool.max_memory_per_worker is None
    assert list(s.pool_settings()) == ["thread", "process"]


def test_default_max_workers_resolve() -> None:
    s = OffloadSettings()
    assert s.process.resolved_max_workers("process") == loky.cpu_count()
    assert s.thread.resolved_max_workers("thread") == min(32, (os.cpu_count() or 1) + 4)


def test_process_workers_follow_lokys_cpu_count(monkeypatch: pytest.MonkeyPatch) -> None:
    # loky's count, cgroup quota and affinity included; its own cap is honoured too
    monkeypatch.setenv("LOKY_MAX_CPU_COUNT", "1")
    usable_cpus.cache_clear()
    try:
        assert OffloadSettings().process.resolved_max_workers("process") == 1
    finally:
        usable_cpus.cache_clear()
    assert usable_cpus() == loky.cpu_count()


def test_settings_are_frozen() -> None:
    s = OffloadSettings()
    with pytest.raises(pydantic.ValidationError):
        s.default_pool = "thread"


# -- environment ---------------------------------------------------------------------------


def test_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OFFLOAD_PROCESS__MAX_WORKERS", "4")
    monkeypatch.setenv("OFFLOAD_PROCESS__TIMEOUT", "10")
    monkeypatch.setenv("OFFLOAD_PROCESS__MAX_PENDING", "100")
    monkeypatch.setenv("OFFLOAD_THREAD__MAX_WORKERS", "8")
    monkeypatch.setenv("OFFLOAD_SHUTDOWN_TIMEOUT", "30")
    monkeypatch.setenv("OFFLOAD_POOLS__ML__KIND", "process")
    monkeypatch.setenv("OFFLOAD_DEFAULT_POOL", "thread")
    s = OffloadSettings()
    assert s.process.max_workers == 4
    assert s.process.resolved_max_workers("process") == 4
    assert s.process.timeout == 10
    assert s.process.max_pending == 100
    assert s.process.kind == "process"
    assert s.thread.max_workers == 8
    assert s.thread.kind == "thread"
    assert s.shutdown_timeout == 30
    assert set(s.pools) == {"ml"}
    assert s.pools["ml"].kind == "process"
    assert s.default_pool == "thread"
    assert list(s.pool_settings()) == ["thread", "process", "ml"]


def test_environment_shutdown_timeout_changes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OFFLOAD_SHUTDOWN_TIMEOUT", "2.5")
    assert OffloadSettings().shutdown_timeout == 2.5


def test_environment_invalid_value_names_field(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OFFLOAD_PROCESS__MAX_WORKERS", "0")
    with pytest.raises(pydantic.ValidationError, match="max_workers"):
        OffloadSettings()


def test_dotenv_file_is_not_read_unless_asked(clean_env: Path) -> None:
    # Whoever can write to the working directory must not steer the pools (an
    # initializer may name any importable function).
    (clean_env / ".env").write_text(
        "OFFLOAD_PROCESS__MAX_WORKERS=3\nOFFLOAD_PROCESS__INITIALIZER=os:system\n"
    )
    s = OffloadSettings()
    assert s.process.max_workers is None
    assert s.process.initializer is None


def test_dotenv_file_when_asked(clean_env: Path) -> None:
    (clean_env / "offload.env").write_text(
        "OFFLOAD_PROCESS__MAX_WORKERS=3\n"
        "OFFLOAD_DEFAULT_POOL=ml\n"
        "OFFLOAD_POOLS__ML__KIND=thread\n"
        "OFFLOAD_POOLS__ML__MAX_WORKERS=5\n"
    )
    s = OffloadSettings(_env_file="offload.env")
    assert s.process.max_workers == 3
    assert s.default_pool == "ml"
    assert s.pools["ml"].kind == "thread"
    assert s.pools["ml"].max_workers == 5


def test_environment_beats_dotenv(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (clean_env / ".env").write_text("OFFLOAD_PROCESS__MAX_WORKERS=3\n")
    monkeypatch.setenv("OFFLOAD_PROCESS__MAX_WORKERS", "6")
    assert OffloadSettings(_env_file=".env").process.max_workers == 6


@pytest.mark.parametrize(
    "name",
    [
        "OFFLOAD_PROCES__MAX_WORKERS",  # a misspelled pool
        "OFFLOAD_PROCESS__MAX_WORKRS",  # a misspelled field
        "OFFLOAD_POOLS__ML__MAX_WORKRS",
        "OFFLOAD_SHUTDOWN_TIMOUT",
        "offload_process__max_workrs",  # any case, as the variables that work
        "OFFLOAD_PROCESS__MAX_WORKERS__X",
        "OFFLOAD_POOLS__ML__KIND__X",
    ],
)
def test_unknown_variable_is_refused_by_name(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    monkeypatch.setenv("OFFLOAD_POOLS__ML__KIND", "process")
    monkeypatch.setenv(name, "3")
    with pytest.raises(pydantic.ValidationError) as info:
        OffloadSettings()
    assert name.upper() in str(info.value)
    assert len(info.value.errors()) == 1


def test_unknown_variable_in_dotenv_is_refused(clean_env: Path) -> None:
    (clean_env / "offload.env").write_text("OFFLOAD_PROCES__MAX_WORKERS=3\n")
    with pytest.raises(pydantic.ValidationError, match="OFFLOAD_PROCES__MAX_WORKERS"):
        OffloadSettings(_env_file="offload.env")


def test_every_known_variable_is_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OFFLOAD_POOLS__ML__KIND", "process")
    monkeypatch.setenv("OFFLOAD_POOLS__ML__START_TIMEOUT", "5")
    monkeypatch.setenv("OFFLOAD_POOLS__IO", '{"kind": "thread"}')
    monkeypatch.setenv("OFFLOAD_THREAD", '{"max_workers": 3}')
    monkeypatch.setenv("OFFLOAD_PROCESS__START_TIMEOUT", "7.5")
    monkeypatch.setenv("OFFLOAD_LAG_PROBE", "false")
    s = OffloadSettings()
    assert s.process.start_timeout == 7.5
    assert s.pools["ml"].start_timeout == 5
    assert s.pools["io"].kind == "thread"
    assert s.thread.max_workers == 3
    assert s.lag_probe is False


def test_start_timeout_default() -> None:
    assert OffloadSettings().process.start_timeout == 60


# -- in code --------------------------------------------------------------------------------


def test_in_code() -> None:
    s = OffloadSettings(process={"max_workers": 2}, pools={"ml": {"kind": "process"}})
    assert s.process.max_workers == 2
    assert s.process.kind == "process"
    assert s.process.resolved_max_workers("process") == 2
    assert s.thread.kind == "thread"
    assert s.pools["ml"] == PoolSettings(kind="process")
    assert s.default_pool == "process"


def test_in_code_beats_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OFFLOAD_PROCESS__MAX_WORKERS", "4")
    assert OffloadSettings(process={"max_workers": 2}).process.max_workers == 2


def test_in_code_pool_settings_objects() -> None:
    s = OffloadSettings(
        thread=PoolSettings(max_workers=3), pools={"io": PoolSettings(kind="thread")}
    )
    assert s.thread.kind == "thread"
    assert s.thread.max_workers == 3
    assert s.pools["io"].kind == "thread"


@pytest.mark.parametrize(
    ("value", "expected"),
    [("512MB", 512_000_000), ("512MiB", 512 * 1024**2), (1024, 1024), ("1GiB", 1024**3)],
)
def test_max_memory_per_worker_parses_to_bytes(value: Any, expected: int) -> None:
    s = OffloadSettings(process={"max_memory_per_worker": value})
    assert s.process.max_memory_per_worker == expected
    assert s.process.max_memory_per_worker is not None
    assert int(s.process.max_memory_per_worker) == expected


def test_initializer_accepted() -> None:
    s = OffloadSettings(process={"initializer": "tests.funcs:noop", "initializer_args": (1, "a")})
    assert s.process.initializer == "tests.funcs:noop"
    assert s.process.initializer_args == (1, "a")


# -- validation -----------------------------------------------------------------------------


def _error_text(kwargs: dict[str, Any]) -> str:
    with pytest.raises(pydantic.ValidationError) as info:
        OffloadSettings(**kwargs)
    return str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        pytest.param({"process": {"max_workers": 0}}, "process.max_workers", id="max_workers=0"),
        pytest.param({"thread": {"max_workers": -1}}, "thread.max_workers", id="max_workers=-1"),
        pytest.param({"process": {"timeout": 0}}, "process.timeout", id="timeout=0"),
        pytest.param({"process": {"timeout": "abc"}}, "process.timeout", id="timeout=abc"),
        pytest.param({"pools": {"ml": {"kind": "nope"}}}, "pools.ml.kind", id="kind=nope"),
        pytest.param(
            {"process": {"initializer": "no_colon"}}, "process.initializer", id="initializer"
        ),
        pytest.param({"process": {"max_pending": -1}}, "process.max_pending", id="max_pending=-1"),
        pytest.param({"shutdown_timeout": 0}, "shutdown_timeout", id="shutdown_timeout=0"),
        pytest.param({"process": {"bogus": 1}}, "process.bogus", id="unknown-pool-field"),
        pytest.param({"process": {"start_timeout": 0}}, "process.start_timeout", id="start=0"),
    ],
)
def test_invalid_field_value(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(pydantic.ValidationError) as info:
        OffloadSettings(**kwargs)
    locs = [".".join(str(p) for p in err["loc"]) for err in info.value.errors()]
    assert field in locs, locs
    assert field in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        pytest.param({"pools": {"ml": {}}}, ["pools.ml.kind", "required"], id="pool-without-kind"),
        pytest.param(
            {"pools": {"thread": {"kind": "thread"}}}, ["pools.thread", "reserved"], id="reserved"
        ),
        pytest.param(
            {"pools": {"process": {"kind": "process"}}}, ["pools.process"], id="reserved-process"
        ),
        pytest.param({"process": {"kind": "thread"}}, ["process.kind"], id="process-kind-thread"),
        pytest.param({"thread": {"kind": "process"}}, ["thread.kind"], id="thread-kind-process"),
        pytest.param({"default_pool": "gpu"}, ["default_pool", "gpu"], id="default-pool-missing"),
        pytest.param(
            {"thread": {"hard_cancel": True}}, ["thread.hard_cancel"], id="thread-hard-cancel"
        ),
        pytest.param(
            {"pools": {"io": {"kind": "thread", "hard_cancel": True}}},
            ["pools.io", "hard_cancel"],
            id="named-thread-hard-cancel",
        ),
    ],
)
def test_invalid_combination(kwargs: dict[str, Any], words: list[str]) -> None:
    text = _error_text(kwargs)
    for word in words:
        assert word in text, text


def test_default_pool_may_name_a_named_pool() -> None:
    s = OffloadSettings(default_pool="io", pools={"io": {"kind": "thread"}})
    assert s.default_pool == "io"


def test_default_pool_error_lists_pools() -> None:
    text = _error_text({"default_pool": "gpu", "pools": {"io": {"kind": "thread"}}})
    for name in ("thread", "process", "io"):
        assert name in text


def test_pool_settings_alone_validate() -> None:
    with pytest.raises(pydantic.ValidationError, match="max_workers"):
        PoolSettings(max_workers=0)
    with pytest.raises(pydantic.ValidationError, match="initializer"):
        PoolSettings(initializer="pkg.mod")
    with pytest.raises(pydantic.ValidationError, match="initializer"):
        PoolSettings(initializer=":fn")
    with pytest.raises(pydantic.ValidationError, match="kind"):
        PoolSettings(kind="nope")  # type: ignore[arg-type]
