"""``Offloader``: owns the pools, starts them, drains and stops them."""

from __future__ import annotations

import logging
import os
import sys
from contextvars import ContextVar, Token
from types import TracebackType
from typing import TYPE_CHECKING, Any

import anyio
import anyio.lowlevel

# loky (for usable_cpus) and the built-in pool kinds (below) come with the
# Offloader, not at its first start: an import holds the GIL, and made in a thread
# while the loop ran, it made a sleeper on the loop wake up several times later
# than asked (docs/benchmarks.md, "Figures behind the code"). The dask kind stays
# imported on first use: distributed is large, and optional.
import loky  # noqa: F401
from anyio.lowlevel import RunVar

from ._context import capture, resolve
from ._errors import PoolClosed
from ._executor import Executor
from ._helper_threads import run_in_helper_thread
from ._lag import LagProbe
from ._pools import pool_class
from ._pools import thread as _thread_kind  # noqa: F401
from ._pools.process import pool as _process_kind  # noqa: F401
from ._settings import OffloadSettings, usable_cpus
from ._stats import OffloaderStats, Phases

if TYPE_CHECKING:
    from anyio.abc import TaskGroup

    from ._context import Carried
    from ._pools.base import Pool
    from ._settings import Kind

__all__ = (
    "Offloader",
    "active_offloader",
    "histograms",
    "newest_offloader",
    "starts_on_first_use",
)

logger = logging.getLogger("offload")

# The Offloaders whose ``async with`` block is running on this event loop, newest
# last. A RunVar, not a ContextVar: request tasks under a lifespan are not children
# of the task that entered the Offloader, yet must find it.
_running: RunVar[list[Offloader]] = RunVar("offload_running")
# The Offloader entered by this task or an ancestor: wins when several run at once.
_entered: ContextVar[Offloader | None] = ContextVar("offload_entered", default=None)


# Every Offloader running in this process, on any loop or thread, newest last: for
# readers outside the event loop, such as a metrics scrape.
_everywhere: list[Offloader] = []


def newest_offloader() -> Offloader | None:
    """The Offloader that started last among those running in this process."""
    return _everywhere[-1] if _everywhere else None


def histograms(offloader: Offloader) -> dict[str, tuple[Phases, dict[str, Phases]]]:
    """Each pool's histograms since it started (``Counters``): of all its calls, and
    by function; copies, for readers outside the event loop."""
    return {
        name: (
            pool.counters.histograms(),
            {function: phases.copy() for function, phases in list(pool.counters.functions.items())},
        )
        for name, pool in list(offloader._pools.items())
    }


def active_offloader() -> Offloader | None:
    """The Offloader a decorated function should use here, if one is running.

    One that is shutting down still counts: its calls are refused with PoolClosed,
    rather than handed to a default Offloader that would start behind its back.
    """
    entered = _entered.get()
    if entered is not None and entered.running:
        return entered
    running = _running.get(None)
    if not running:
        return None
    for offloader in reversed(running):
        if offloader.running:
            return offloader
    # Every one is shutting down: the one entered here, else the newest.
    return entered if entered is not None and entered in running else running[-1]


def _after_fork_in_child() -> None:
    # The running Offloaders are the parent's: a child forked inside one's block still
    # sees it (its context was copied), and must start its own instead of using it.
    for offloader in _everywhere:
        offloader._running = False
        offloader._inherited = True
    _everywhere.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class Offloader:
    """Owns a set of pools: ``async with Offloader(settings) as ex:``.

    Entering starts every pool (process workers are warm before the block runs)
    and binds an :class:`Executor` for the default pool. Leaving stops new calls,
    lets calls in flight finish for ``settings.shutdown_timeout`` seconds, then
    cancels the rest and stops every worker. Leaving because of cancellation
    skips the wait.

    While the block runs, functions decorated with :func:`~offload.offload` use
    this Offloader, from any task on the same event loop.

    :param settings: the pools and shutdown timeout; default: ``OffloadSettings()``,
        read from the environment
    :raises TypeError: ``settings`` is not an :class:`~offload.OffloadSettings`
    """

    def __init__(self, settings: OffloadSettings | None = None) -> None:
        if settings is None:
            settings = OffloadSettings()
        elif not isinstance(settings, OffloadSettings):
            raise TypeError(
                f"settings must be an OffloadSettings, not {type(settings).__name__}: "
                "OffloadSettings(**your_dict) builds one"
            )
        self.settings = settings
        self._pools: dict[str, Pool] = {}
        self._task_group: TaskGroup | None = None
        self._lag: LagProbe | None = None
        self._running = False
        self._started = False
        self._register = True
        self._owner = os.getpid()
        self._inherited = False  # this process was forked from the one running it
        self._entered_token: Token[Offloader | None] | None = None
        # (context variables, propagate_trace) once started; None: nothing to carry
        self._carries: tuple[tuple[tuple[str, ContextVar[Any]], ...], bool] | None = None
        self.executor = Executor(self)

    def __repr__(self) -> str:
        state = "running" if self._running else "stopped" if self._started else "new"
        return f"<Offloader {state} pools={list(self.settings.pool_settings())}>"

    @property
    def running(self) -> bool:
        return self._running

    def check_pool_name(self, name: str) -> None:
        """:raises LookupError: if the settings define no pool called ``name``"""
        if name not in self.settings.pool_settings():
            raise LookupError(
                f"no pool named {name!r}; pools: {', '.join(self.settings.pool_settings())}"
            )

    def get_pool(self, name: str, *, refusing: bool = False) -> Pool:
        """The running pool called ``name``.

        :param refusing: a call asks: if it is refused, the pool counts it as ``closed``
        :raises LookupError: if there is no such pool
        :raises PoolClosed: if the Offloader is not running
        """
        pool = self._pools.get(name)
        if pool is None or not self._running:
            self.check_pool_name(name)
            if pool is not None and refusing:
                pool.counters.closed += 1
            if self._inherited:
                raise PoolClosed(
                    f"pool {name!r}: the Offloader runs in process {self._owner}, from "
                    "which this process was forked; start an Offloader in this process"
                )
            state = "has stopped" if self._started else "has not started"
            raise PoolClosed(
                f"pool {name!r}: the Offloader {state}; "
                "run calls inside `async with Offloader(...)`"
            )
        return pool

    def _capture_context(self) -> Carried | None:
        """What a process or dask call made now carries from the calling task's
        context: the ``context_vars`` set in it, the trace context; ``None`` if nothing."""
        carries = self._carries
        if carries is None:
            return None
        variables, trace = carries
        if not variables and not (trace and "opentelemetry.context" in sys.modules):
            return None  # the usual call: no variable chosen, no tracing loaded
        return capture(variables, trace)

    def stats(self) -> OffloaderStats:
        """A snapshot of every pool, by name, with the event loop's lag as ``.loop``."""
        return OffloaderStats(
            {name: pool.stats() for name, pool in self._pools.items()},
            self._lag.stats() if self._lag is not None else None,
        )

    async def __aenter__(self) -> Executor:
        if self._started:
            await anyio.lowlevel.checkpoint()  # every await yields, failing or not
            raise RuntimeError("an Offloader can be entered only once; make a new one")
        self._started = True
        pools = self.settings.pool_settings()
        # What takes long once per process, in a thread: the CPU count (cgroup files),
        # the spawner thread's start, importing distributed (seconds), the modules of
        # the context variables.
        classes, context_vars = await run_in_helper_thread(
            _prepare, [s.kind for s in pools.values()], self.settings
        )
        if context_vars or self.settings.propagate_trace:
            self._carries = context_vars, self.settings.propagate_trace
        self._task_group = anyio.create_task_group()
        await self._task_group.__aenter__()
        try:
            for (name, settings), cls in zip(pools.items(), classes, strict=True):
                self._pools[name] = cls(name, settings, self._task_group)
            errors: list[Exception] = []

            async def start(pool: Pool) -> None:
                try:
                    await pool.start()
                except Exception as exc:
                    errors.append(exc)

            lazy = starts_on_first_use(self.settings)
            async with anyio.create_task_group() as tg:
                for name, pool in self._pools.items():
                    if name in lazy:
                        pool.start_on_first_use()
                    else:
                        tg.start_soon(start, pool)
            if errors:
                # The first failure, as itself: an ExceptionGroup of one start
                # error would only make the cause harder to catch and read.
                raise errors[0]
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self._close_pools(0)
            await self._close_task_group()
            raise
        if self.settings.lag_probe:
            self._lag = LagProbe(self.settings.lag_probe_interval)
            self._task_group.start_soon(self._lag.run, name="offload-lag-probe")
        self._running = True
        _everywhere.append(self)
        if self._register:
            running = _running.get(None)
            if running is None:
                running = []
                _running.set(running)
            running.append(self)
            self._entered_token = _entered.set(self)
        return self.executor

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        self._running = False
        if self in _everywhere:
            _everywhere.remove(self)
        cancelled = exc_type is not None and issubclass(exc_type, anyio.get_cancelled_exc_class())
        try:
            with anyio.CancelScope(shield=True):
                await self._close_pools(0 if cancelled else self.settings.shutdown_timeout)
        finally:
            # Only now: until its pools are closed, decorated calls made here must find
            # it, and be refused, rather than start a default Offloader.
            self._unregister()
        await self._close_task_group()
        return None

    def _unregister(self) -> None:
        if not self._register:
            return
        running = _running.get(None)
        if running is not None and self in running:
            running.remove(self)
        if self._entered_token is not None:
            try:
                _entered.reset(self._entered_token)
            except ValueError:  # left from another context than it was entered in
                pass

    async def _close_task_group(self) -> None:
        # Left in it: watchers of processes that are gone, replacements that will
        # not start. The body's exception is not passed in: anyio would wrap it in
        # an ExceptionGroup, and the user's own error must reach them as it is.
        assert self._task_group is not None
        scope = self._task_group.cancel_scope
        scope.shield = True
        scope.cancel()
        await self._task_group.__aexit__(None, None, None)

    async def _close_pools(self, drain_timeout: float) -> None:
        async with anyio.create_task_group() as tg:
            for pool in self._pools.values():
                tg.start_soon(pool.aclose, drain_timeout)


def starts_on_first_use(settings: OffloadSettings) -> frozenset[str]:
    """The pools that start at their first call rather than with the Offloader.

    Only the built-in ``process`` pool, when the settings say nothing of it
    (``process`` not set, in code or in the environment) and nothing would call it
    by default: ``default_pool`` names another pool, or the settings define process
    pools of their own and leave ``default_pool`` unset. Such an application has
    given its CPUs to other pools, and a pool of one worker per CPU that nothing may
    call would double the worker processes. Every other pool starts warm.
    """
    given = settings.model_fields_set
    if "process" in given:
        return frozenset()
    own = any(
        s.kind == "process" for name, s in settings.pool_settings().items() if name != "process"
    )
    if settings.default_pool != "process" or (own and "default_pool" not in given):
        return frozenset({"process"})
    return frozenset()


def _prepare(
    kinds: list[Kind | None], settings: OffloadSettings
) -> tuple[list[type[Pool]], tuple[tuple[str, ContextVar[Any]], ...]]:
    """:raises ValueError: a name in ``settings.context_vars`` is not a ContextVar"""
    context_vars = resolve(settings.context_vars)
    if settings.propagate_trace and "opentelemetry" in sys.modules:
        # The application traces: the propagator loads its entry points here rather
        # than at the first call, on the loop's thread.
        try:
            import opentelemetry.propagate  # noqa: F401
        except Exception:
            pass
    usable_cpus()
    classes = []
    for kind in kinds:
        assert kind is not None  # the settings gave every pool its kind
        cls = pool_class(kind)
        if cls not in classes:
            cls.prepare()
        classes.append(cls)
    return classes, context_vars
