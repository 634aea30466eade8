"""What this machine gives the pools: the CPUs they may use, and which of the process
pool's fast paths and safeguards work here.

The fast paths are tried, not guessed: a child is forked (a copy of this process, at
once, with no interpreter to start) and given what the pool gives a worker: its
parent-death signal, a lower priority and the longest time slice, ``SCHED_IDLE``, a
memory cap, a pidfd; and this process reads the child's memory as it reads a
worker's. The child waits for the end of a pipe that only this process writes to,
and dies with it (its death signal, or that pipe's EOF), so it never outlives the
command.
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import shutil
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .._pools.process import cross_memory
from .._pools.process.scheduling import LONG_SLICE_NS, lower_priority, time_slice
from .._pools.process.worker_lifetime import prctl_function
from .._settings import PoolSettings, usable_cpus

__all__ = ("CpuBudget", "Feature", "cpu_budget", "features")

_PR_SET_PDEATHSIG = 1
#: what :func:`features` tries on a forked child, in the order it reports them
TRIED_ON_A_CHILD = (
    "death_signal",
    "cross_memory",
    "niceness",
    "long_time_slice",
    "idle_priority",
    "hard_memory_limit",
    "pidfd",
)
#: what the memory-cap probe caps the child at
_PROBE_CAP = 1 << 30
#: loky's cgroup files, read as loky reads them (``loky.backend.context``)
_CPU_MAX = "/sys/fs/cgroup/cpu.max"
_CFS_QUOTA = "/sys/fs/cgroup/cpu/cpu.cfs_quota_us"
_CFS_PERIOD = "/sys/fs/cgroup/cpu/cpu.cfs_period_us"


@dataclass(frozen=True)
class CpuBudget:
    """The CPUs the pools may use (``loky.cpu_count()``) and each limit behind it."""

    usable: int
    cpu_count: int | None  #: ``os.cpu_count()``
    affinity: int | None  #: CPUs in ``os.sched_getaffinity(0)``; None where unknown
    cgroup_version: int | None  #: 1 or 2 where a cgroup sets a quota
    cgroup_quota: float | None  #: CPUs of the cgroup's quota (quota over period)
    loky_max_cpu_count: int | None  #: ``LOKY_MAX_CPU_COUNT``
    limited_by: tuple[str, ...]  #: which of the above make ``usable``; empty: none


def _cgroup_quota() -> tuple[int | None, float | None]:
    """``(version, CPUs)`` of the cgroup's CPU quota; ``(None, None)`` without one."""
    quota = period = None
    version = None
    with contextlib.suppress(OSError, ValueError):
        with open(_CPU_MAX) as fh:
            parts = fh.read().split()
        if len(parts) == 2:
            version = 2
            if parts[0] == "max":
                return None, None
            quota, period = int(parts[0]), int(parts[1])
    if version is None:
        with contextlib.suppress(OSError, ValueError):
            with open(_CFS_QUOTA) as q, open(_CFS_PERIOD) as p:
                quota, period = int(q.read()), int(p.read())
            version = 1
    if quota is None or period is None or quota <= 0 or period <= 0:
        return None, None
    return version, quota / period


def cpu_budget() -> CpuBudget:
    """The CPUs the pools may use, and what limits them."""
    count = os.cpu_count()
    affinity = None
    if hasattr(os, "sched_getaffinity"):
        with contextlib.suppress(OSError, NotImplementedError):
            affinity = len(os.sched_getaffinity(0))
    version, quota = _cgroup_quota()
    try:
        loky_max: int | None = int(os.environ["LOKY_MAX_CPU_COUNT"])
    except (KeyError, ValueError):
        loky_max = None
    usable = usable_cpus()
    limits = {
        "affinity": affinity,
        "cgroup": None if quota is None else math.ceil(quota),
        "LOKY_MAX_CPU_COUNT": loky_max,
    }
    limited_by = tuple(
        name
        for name, value in limits.items()
        if value is not None and value == usable and value < (count or usable + 1)
    )
    return CpuBudget(usable, count, affinity, version, quota, loky_max, limited_by)


@dataclass
class Feature:
    """A fast path or safeguard of the process pool: whether it works here, and why."""

    on: bool
    detail: str


@dataclass
class _Child:
    pid: int
    death_signal: bool | None = None
    results: dict[str, Feature] = field(default_factory=dict)


def features() -> dict[str, Feature]:
    """Each fast path and safeguard, tried on a forked child where it can be."""
    found: dict[str, Feature] = {}
    prctl = prctl_function()
    if not hasattr(os, "fork") or threading.active_count() > 1:
        # A fork copies one thread: whatever lock another holds would stay held.
        why = "no fork here" if not hasattr(os, "fork") else "other threads run"
        for name in TRIED_ON_A_CHILD:
            found[name] = Feature(False, f"not tried: {why}")
        found["cross_memory"] = Feature(
            cross_memory.available(), f"this process's own memory only ({why})"
        )
    else:
        _with_child(prctl, found)
    return {**found, **_without_child(prctl)}


def _with_child(prctl: Callable[..., int] | None, found: dict[str, Feature]) -> None:
    report_r, report_w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: as little as can be, then wait for the parent
        try:
            os.close(report_r)
            os.close(go_w)
            signalled = prctl is not None and prctl(_PR_SET_PDEATHSIG, signal.SIGKILL) == 0
            os.write(report_w, b"1" if signalled else b"0")
            os.read(go_r, 1)  # EOF when the parent is done, or dead
        finally:
            os._exit(0)
    os.close(report_w)
    os.close(go_r)
    try:
        signalled = os.read(report_r, 1) == b"1"
        found["death_signal"] = (
            Feature(True, "PR_SET_PDEATHSIG: workers die with this process")
            if signalled
            else Feature(False, "no PR_SET_PDEATHSIG: workers watch a pipe instead")
        )
        found["cross_memory"] = _try_cross_memory(pid)
        found.update(_try_scheduling(pid))
        found["hard_memory_limit"] = _try_memory_cap(pid)
        found["pidfd"] = _try_pidfd(pid)
    finally:
        os.close(report_r)
        os.close(go_w)
        os.waitpid(pid, 0)


def _try_cross_memory(pid: int) -> Feature:
    if not cross_memory.available():
        return Feature(
            False,
            "process_vm_readv refused or missing (not Linux, seccomp, Yama ptrace_scope "
            ">= 2): large buffers go through the channel",
        )
    if not cross_memory.readable(pid, cross_memory.address_of(cross_memory.PROBE)):
        return Feature(False, "a child's memory is not readable: buffers go through the channel")
    return Feature(True, "process_vm_readv/writev of a child's memory: works")


def _try_scheduling(pid: int) -> dict[str, Feature]:
    found: dict[str, Feature] = {}
    if not hasattr(os, "getpriority"):
        found["niceness"] = Feature(False, "no os.setpriority here")
        found["long_time_slice"] = Feature(False, "no os.setpriority here: not asked for")
    else:
        mine = os.getpriority(os.PRIO_PROCESS, 0)
        lower_priority(pid, PoolSettings(niceness=10))
        theirs = os.getpriority(os.PRIO_PROCESS, pid)
        command = shutil.which("nice", path=os.defpath)
        how = f"started by {command}" if command else "no nice command: lowered once started"
        found["niceness"] = Feature(
            theirs > mine or mine == 19, f"niceness 10: nice {mine} -> {theirs}; {how}"
        )
        slice_ns = time_slice(pid)
        kernel = f"{platform.system()} {platform.release()}"
        if slice_ns == LONG_SLICE_NS:
            found["long_time_slice"] = Feature(True, f"{slice_ns // 1_000_000} ms, on {kernel}")
        elif sys.platform != "linux":
            found["long_time_slice"] = Feature(False, f"Linux 6.12+ only, not {kernel}")
        else:
            found["long_time_slice"] = Feature(
                False, f"not granted on {kernel} (custom slices need Linux 6.12+)"
            )
    idle = getattr(os, "SCHED_IDLE", None)
    if idle is None or not hasattr(os, "sched_getscheduler"):
        found["idle_priority"] = Feature(False, "no SCHED_IDLE here: idle_priority does nothing")
    else:
        lower_priority(pid, PoolSettings(niceness=0, idle_priority=True))
        took = os.sched_getscheduler(pid) == idle
        found["idle_priority"] = Feature(
            took, "SCHED_IDLE: works" if took else "SCHED_IDLE refused: idle_priority does nothing"
        )
    return found


def _try_memory_cap(pid: int) -> Feature:
    try:
        import resource

        _, hard = resource.getrlimit(resource.RLIMIT_DATA)
        cap = _PROBE_CAP if hard == resource.RLIM_INFINITY else min(_PROBE_CAP, hard)
        resource.prlimit(pid, resource.RLIMIT_DATA, (cap, cap))
        took = resource.prlimit(pid, resource.RLIMIT_DATA) == (cap, cap)
    except (ImportError, AttributeError, OSError, ValueError) as exc:
        return Feature(False, f"RLIMIT_DATA cannot be set here ({exc}): no effect")
    now = "unlimited" if hard == resource.RLIM_INFINITY else f"at most {hard} bytes"
    return Feature(took, f"RLIMIT_DATA; this process's hard limit: {now}")


def _try_pidfd(pid: int) -> Feature:
    if not hasattr(os, "pidfd_open"):
        return Feature(False, "no os.pidfd_open: a worker's exit is polled")
    try:
        os.close(os.pidfd_open(pid))
    except OSError as exc:
        return Feature(False, f"pidfd_open refused ({exc.strerror}): a worker's exit is polled")
    return Feature(True, "a worker's exit wakes its watcher at once")


def _without_child(prctl: Callable[..., int] | None) -> dict[str, Feature]:
    found: dict[str, Feature] = {}
    if prctl is None:
        found["group_guard"] = Feature(
            False, "Linux only: a killed server leaves its calls' programs"
        )
    elif not os.path.exists("/bin/sh"):
        found["group_guard"] = Feature(
            False, "no /bin/sh: a killed server leaves its calls' programs"
        )
    else:
        found["group_guard"] = Feature(
            True, "a /bin/sh per worker ends its process group at its death"
        )
    return found


def describe_platform() -> dict[str, Any]:
    return {
        "system": platform.system(),
        "release": platform.release(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
    }
