"""Configuration: ``OffloadSettings`` (environment, a ``.env`` file on request) and
``PoolSettings``."""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal, TypedDict

from pydantic import (
    BaseModel,
    ByteSize,
    ConfigDict,
    Field,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError, ValidationError
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

if TYPE_CHECKING:
    from pydantic.fields import FieldInfo

__all__ = ("Kind", "OffloadSettings", "PoolSettings", "PoolSettingsDict")

ENV_PREFIX = "OFFLOAD_"

Kind = Literal["thread", "process", "dask"]

#: the two pools every Offloader has; their kind is their name
BUILTIN_POOLS: tuple[Kind, ...] = ("thread", "process")


class PoolSettings(BaseModel):
    """Settings of one pool.

    Every field can come from the environment, e.g. ``OFFLOAD_PROCESS__MAX_WORKERS=4``
    or, for a named pool, ``OFFLOAD_POOLS__ML__KIND=process``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Kind | None = Field(
        default=None,
        description="thread, process or dask; implied for the built-in thread and process pools",
    )
    max_workers: PositiveInt | None = Field(
        default=None,
        description="worker threads or processes; default: CPUs (cgroup-aware) for processes, "
        "min(32, CPUs + 4) for threads",
    )
    max_pending: NonNegativeInt = Field(
        default=1000,
        description="calls allowed to wait for a worker; past that a call gets PoolOverloaded",
    )
    timeout: PositiveFloat | None = Field(
        default=None,
        description="seconds from the call (queue wait included) to OffloadTimeout; unset: none",
    )
    initializer: str | None = Field(
        default=None,
        description='"package.module:function" run once in each worker before its first call',
    )
    initializer_args: tuple[Any, ...] = Field(
        default=(), description="positional arguments for the initializer"
    )
    max_tasks_per_worker: PositiveInt | None = Field(
        default=None, description="replace a worker process after this many calls"
    )
    max_memory_per_worker: ByteSize | None = Field(
        default=None,
        description='replace a worker process whose resident memory passes this (bytes or "512MB")',
    )
    hard_memory_limit: ByteSize | None = Field(
        default=None,
        gt=0,
        description="kind process: the most heap and private memory each worker process "
        'may map (bytes or "1GB"; RLIMIT_DATA): a call that allocates past it fails alone '
        "with MemoryError, whose note names the limit, and its worker is replaced; mapped, "
        "not resident, memory: see Notes",
    )
    max_payload: ByteSize = Field(
        default=ByteSize(1 << 30),
        gt=0,
        description="largest pickled arguments or result of one process call, in bytes or "
        'as "256MB"; a call over it fails alone with SerializationError',
    )
    cross_memory: bool = Field(
        default=True,
        description="kind process, on Linux: buffers of 4 MiB and more (NumPy arrays, "
        "bytes) are copied straight between the memories of the parent and the worker "
        "(process_vm_readv/writev), one copy instead of two through the channel; off, "
        "or where the system refuses it (seccomp, Yama scope 2), they go through the channel",
    )
    niceness: int = Field(
        default=10,
        ge=0,
        le=19,
        description="added to worker processes' nice value, so that the event loop wins "
        "the CPU when both want it; above 0, on Linux, workers also run under SCHED_BATCH "
        "(a worker woken by a call never preempts the event loop) and, on Linux 6.12+, ask "
        "for the longest time slice, so that a waking event loop preempts them at once; 0 "
        "keeps the parent's priority and policy (no effect under idle_priority); kind "
        "dask: to an embedded cluster's processes",
    )
    idle_priority: bool = Field(
        default=False,
        description="on Linux, run worker processes under the SCHED_IDLE policy: they "
        "use the CPU only when no normal process wants it, and the event loop's thread "
        "takes it from them at once when it wakes up; but they get almost no CPU while "
        "other processes of their scheduling group keep every CPU busy (measured: the "
        "same throughput under HTTP load as the default; see docs/fastapi.md); kind "
        "dask: an embedded cluster's processes",
    )
    address: str | None = Field(
        default=None,
        description="kind dask: the scheduler's address (tcp://host:8786); unset: "
        "DASK_SCHEDULER_ADDRESS, else an embedded local cluster of max_workers processes",
    )
    start_timeout: PositiveFloat = Field(
        default=60.0,
        description="kind process: seconds a worker may take to start (interpreter, "
        "imports, initializer); past that the pool's start fails with PoolStartError",
    )
    hard_cancel: bool = Field(
        default=False,
        description="kind dask: when a running call is cancelled or passes its deadline, "
        "restart the worker process running it (Dask cannot interrupt a task; other calls "
        "running on that worker fail with WorkerCrashed, calls waiting there are sent "
        "again). Process pools always stop the work; "
        "threads cannot",
    )
    forward_logs: bool = Field(
        default=True,
        description="kinds process and dask: records logged in a worker go to the parent's "
        "logger of the same name, and its handlers, as if the call ran here (kind "
        "process: only records at or above the parent's levels at call time are sent); "
        "off: they stay in the worker (its stderr)",
    )

    @model_validator(mode="after")
    def _check_kind_options(self) -> PoolSettings:
        self._refuse_what_the_kind_cannot_do()
        return self

    def _refuse_what_the_kind_cannot_do(self) -> None:
        if self.hard_cancel and self.kind == "thread":
            raise ValueError("hard_cancel: a thread cannot be stopped; use kind process or dask")
        if self.hard_memory_limit is not None and self.kind in ("thread", "dask"):
            raise ValueError(
                f"hard_memory_limit: a {self.kind} pool's memory cannot be capped per call; "
                "use kind process"
            )

    @field_validator("initializer")
    @classmethod
    def _check_import_string(cls, value: str | None) -> str | None:
        if value is not None:
            module, sep, attr = value.partition(":")
            if not (sep and module and attr):
                raise ValueError('must look like "package.module:function"')
        return value

    def resolved_max_workers(self, kind: Kind) -> int:
        """``max_workers``, or the default for ``kind`` when unset."""
        if self.max_workers is not None:
            return self.max_workers
        if kind == "thread":
            return min(32, (os.cpu_count() or 1) + 4)
        return usable_cpus()


@functools.cache
def usable_cpus() -> int:
    """The CPUs this process may use: loky's ``cpu_count()``. It takes the smallest of
    the CPU count, the affinity mask, the cgroup's CPU quota rounded up (v2's
    ``cpu.max``, else v1's ``cpu.cfs_quota_us`` over ``cpu.cfs_period_us``) and
    ``LOKY_MAX_CPU_COUNT``, so that a container limited to 2 CPUs does not start one
    worker per host core.

    loky is imported here, not at the top: ``import offload`` and worker processes
    never need it. :mod:`offload._offloader` imports it with the pool kinds, so that
    an Offloader's start imports nothing (an import holds the GIL). The first call
    reads files under /sys: an Offloader makes it in a thread before it starts its
    pools, and later calls (on the loop's thread) find it cached.
    """
    from loky import cpu_count

    count: int = cpu_count()
    return count


class PoolSettingsDict(TypedDict, total=False):
    """:class:`PoolSettings` as a plain dict, e.g. ``{"max_workers": 2}``: typed for mypy."""

    kind: Kind
    max_workers: int
    max_pending: int
    timeout: float | None
    initializer: str | None
    initializer_args: tuple[Any, ...]
    max_tasks_per_worker: int | None
    max_memory_per_worker: int | str | None
    hard_memory_limit: int | str | None
    max_payload: int | str
    cross_memory: bool
    niceness: int
    idle_priority: bool
    address: str | None
    start_timeout: float
    hard_cancel: bool
    forward_logs: bool


class OffloadSettings(BaseSettings):
    """Settings of an :class:`~offload.Offloader`: its pools and its shutdown.

    Read from the environment with the prefix ``OFFLOAD_`` and ``__`` between
    nested names (``OFFLOAD_PROCESS__TIMEOUT=10``). A ``.env`` file is read only when
    the application names one: ``OffloadSettings(_env_file=".env")``.

    :raises pydantic.ValidationError: a value is invalid, or a variable with the
        prefix ``OFFLOAD_`` (in the environment or the file) sets no setting
    """

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        # Never a file by default: whoever can write to the working directory would
        # choose the pools, and an initializer can name any importable function.
        env_file=None,
        extra="ignore",
        frozen=True,
    )

    default_pool: str = Field(
        default="process",
        description="pool used by Executor.run and by a bare @offload",
    )
    thread: PoolSettings = Field(default_factory=lambda: PoolSettings(kind="thread"))
    process: PoolSettings = Field(default_factory=lambda: PoolSettings(kind="process"))
    pools: dict[str, PoolSettings] = Field(
        default_factory=dict, description="named pools; each needs a kind"
    )
    cancel_on_disconnect: bool = Field(
        default=True,
        description="FastAPI: cancel a request's offloaded calls when its client disconnects",
    )
    server_timing: bool = Field(
        default=False,
        description="FastAPI, with install(app): give each response a Server-Timing header "
        "with the summed queue wait, transfer and run of the offloaded calls its request made",
    )
    lag_probe: bool = Field(
        default=True,
        description="measure the event loop's lag with a light probe task "
        "(Offloader.stats().loop, Prometheus offload_event_loop_lag_seconds)",
    )
    lag_probe_interval: PositiveFloat = Field(
        default=0.1, description="seconds between two wake-ups of the lag probe"
    )
    shutdown_timeout: PositiveFloat = Field(
        default=30.0,
        description="seconds that shutdown waits for calls in flight before killing them",
    )
    context_vars: tuple[str, ...] = Field(
        default=(),
        description='contextvars.ContextVar objects, as "package.module:name", whose values '
        "in the calling task travel with each process and dask call (pickled) and are set "
        "for the call's run in the worker; thread calls see the caller's whole context anyway",
    )
    propagate_trace: bool = Field(
        default=True,
        description="when the application uses OpenTelemetry, send the current trace "
        "context with each process and dask call, so that spans opened in the worker are "
        "children of the caller's span",
    )

    if TYPE_CHECKING:
        # What pydantic accepts, spelled out so that type checkers accept plain
        # dicts for the pools too: OffloadSettings(process={"max_workers": 2}).
        def __init__(
            self,
            *,
            default_pool: str = ...,
            thread: PoolSettings | PoolSettingsDict = ...,
            process: PoolSettings | PoolSettingsDict = ...,
            pools: Mapping[str, PoolSettings | PoolSettingsDict] = ...,
            shutdown_timeout: float = ...,
            cancel_on_disconnect: bool = ...,
            server_timing: bool = ...,
            lag_probe: bool = ...,
            lag_probe_interval: float = ...,
            context_vars: tuple[str, ...] | list[str] = ...,
            propagate_trace: bool = ...,
            _env_file: str | os.PathLike[str] | None = ...,
        ) -> None: ...

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        check = _UnknownVariables(settings_cls, (env_settings, dotenv_settings))
        return init_settings, check, env_settings, dotenv_settings, file_secret_settings

    @field_validator("context_vars")
    @classmethod
    def _check_context_vars(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for name in value:
            module, sep, attr = name.partition(":")
            if not (sep and module and attr):
                raise ValueError(f'{name!r} must look like "package.module:name"')
        return value

    @model_validator(mode="after")
    def _check_pools(self) -> OffloadSettings:
        for name in BUILTIN_POOLS:
            pool: PoolSettings = getattr(self, name)
            if pool.kind is None:
                pool = pool.model_copy(update={"kind": name})
                try:
                    pool._refuse_what_the_kind_cannot_do()  # model_copy does not validate
                except ValueError as exc:
                    raise ValueError(f"{name}.{exc}") from None
                object.__setattr__(self, name, pool)
            elif pool.kind != name:
                raise ValueError(f"{name}.kind must be {name!r} (or unset), not {pool.kind!r}")
        for pool_name, pool in self.pools.items():
            if pool_name in BUILTIN_POOLS:
                raise ValueError(f"pools.{pool_name}: the name is reserved for the built-in pool")
            if pool.kind is None:
                raise ValueError(f"pools.{pool_name}.kind is required (thread, process or dask)")
        if self.default_pool not in self.pool_settings():
            raise ValueError(
                f"default_pool {self.default_pool!r} is not a pool; "
                f"pools: {', '.join(self.pool_settings())}"
            )
        return self

    def pool_settings(self) -> dict[str, PoolSettings]:
        """Every pool by name, the built-in ones first."""
        return {"thread": self.thread, "process": self.process, **self.pools}


class _UnknownVariables(PydanticBaseSettingsSource):
    """Refuses every ``OFFLOAD_`` variable that sets nothing, naming it: pydantic-settings
    ignores a misspelled pool or setting (``OFFLOAD_PROCES__MAX_WORKERS=3``), and the
    application would run with values it did not choose. Contributes no value."""

    def __init__(
        self, settings_cls: type[BaseSettings], sources: tuple[PydanticBaseSettingsSource, ...]
    ) -> None:
        super().__init__(settings_cls)
        self._sources = [s for s in sources if isinstance(s, EnvSettingsSource)]

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        errors: list[InitErrorDetails] = []
        seen: set[str] = set()
        for source in self._sources:
            for name, value in source.env_vars.items():
                if name in seen or not name.upper().startswith(ENV_PREFIX):
                    continue
                seen.add(name)
                if not _sets_a_setting(name[len(ENV_PREFIX) :].lower()):
                    errors.append(
                        InitErrorDetails(
                            type=PydanticCustomError(
                                "unknown_variable",
                                "{name} is not an offload setting (a misspelled pool or "
                                "field?); the variables are listed in docs/settings.md",
                                {"name": name.upper()},
                            ),
                            loc=(name.upper(),),
                            input=value,
                        )
                    )
        if errors:
            raise ValidationError.from_exception_data(self.settings_cls.__name__, errors)
        return {}


def _sets_a_setting(path: str) -> bool:
    """Whether ``path`` (a variable's name after the prefix, lower case) names a
    setting: a field, a pool field, a whole pool (JSON) or a named pool's field."""
    head, *rest = path.split("__")
    pool_fields = PoolSettings.model_fields
    if head in BUILTIN_POOLS:
        return not rest or (len(rest) == 1 and rest[0] in pool_fields)
    if head == "pools":
        return len(rest) <= 1 or (len(rest) == 2 and rest[1] in pool_fields)
    return not rest and head in OffloadSettings.model_fields
