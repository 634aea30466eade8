"""How worker processes are scheduled: below the event loop that waits for them.

A process is below the loop from its first instruction
(:func:`start_at_lower_priority`), not from when the parent gets to it after ``Popen``
returns: an interpreter's start takes tens of milliseconds of CPU (a Dask cluster's
host, seconds), and in ``perf`` traces of sched_switch events, a process still at the
loop's priority held the CPU the loop's thread was waiting for several milliseconds at
a time (docs/benchmarks.md, "Figures behind the code"). On Linux each of these is per
thread and inherited, so it reaches every thread and child process the worker starts
later (a Dask cluster's nannies and workers included).

- ``niceness`` lowers the worker's weight: when the loop's thread and a worker both
  want a CPU, the loop gets most of it.
- A weight decides shares, not when a waking thread gets the CPU. Since Linux 6.12 the
  scheduler (EEVDF) lets a task ask for its time slice (``sched_attr.sched_runtime``
  of a normal task), and a waking task that asked for a shorter slice than the
  running one preempts it at once (the kernel's ``PREEMPT_SHORT``); with equal
  slices the running worker may finish its slice first, or run to the next tick
  (4 ms at ``HZ=250``). So workers below the loop also ask for the longest slice,
  100 ms: the loop's thread, with the default slice, takes the CPU from them the
  moment it wakes up. Shares stay as the weights say. Older kernels ignore the
  request. Measured by ``python benchmarks/diagnose.py slices`` (docs/benchmarks.md,
  "The event loop under offload's heaviest work").
- Below the loop, a worker also runs under ``SCHED_BATCH`` (where it would run under
  ``SCHED_OTHER``): the same weights, but a waking batch task never preempts the
  running one. The loop's thread wakes a worker each time it sends a call to an idle
  one; with the other CPUs busy, the kernel puts the worker on the loop's CPU, and a
  worker under ``SCHED_OTHER`` that had slept long enough took that CPU at once, for
  as long as its call ran: the loop's thread stood still for 130-250 µs in up to
  one send in two of a chunked map (measured on Linux 6.18, niceness 10 and 19
  alike; docs/benchmarks.md, "Figures behind the code"). Set once ``Popen``
  returns, like ``SCHED_IDLE``: the interpreter's start does not wake up often.
- ``idle_priority`` puts the worker under ``SCHED_IDLE``: any waking normal task
  preempts it at once, and it gets almost no CPU while they keep every CPU busy.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
import platform
import shutil
import subprocess
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable

    from ..._settings import PoolSettings

__all__ = ("start_at_lower_priority", "time_slice")

logger = logging.getLogger("offload")

#: what a worker below the loop asks for: the longest slice the kernel grants
LONG_SLICE_NS = 100_000_000
#: the policies a custom slice applies to, by number: SCHED_OTHER and SCHED_BATCH
_FAIR = (0, 3)
_SCHED_FLAG_RESET_ON_FORK = 0x01

# sched_setattr(2) and sched_getattr(2) have no wrapper in os (nor in glibc).
_SYSCALLS = {
    "x86_64": (314, 315),
    "aarch64": (274, 275),
    "arm64": (274, 275),
    "riscv64": (274, 275),
    "loongarch64": (274, 275),
    "ppc64le": (355, 356),
    "ppc64": (355, 356),
    "s390x": (345, 346),
    "i686": (351, 352),
    "i386": (351, 352),
    "armv7l": (380, 381),
}


class _SchedAttr(ctypes.Structure):
    """``struct sched_attr`` as of its first version (48 bytes)."""

    _fields_ = (
        ("size", ctypes.c_uint32),
        ("sched_policy", ctypes.c_uint32),
        ("sched_flags", ctypes.c_uint64),
        ("sched_nice", ctypes.c_int32),
        ("sched_priority", ctypes.c_uint32),
        ("sched_runtime", ctypes.c_uint64),
        ("sched_deadline", ctypes.c_uint64),
        ("sched_period", ctypes.c_uint64),
    )


def start_at_lower_priority(
    args: list[str], settings: PoolSettings, **popen: Any
) -> subprocess.Popen[bytes]:
    """``subprocess.Popen(args, **popen)``, the process below the event loop as its
    pool's settings say. Only on the spawner thread (``spawner.py``), whose own time
    slice it sets.

    - The time slice is inherited: the spawner thread asks for the one the child must
      have (the long one below the loop, else the kernel's) just before it forks.
    - The nice value is inherited too, but the spawner runs at the loop's: the child
      starts as ``nice -n N <args>``, which lowers itself before it execs Python. The
      ``nice`` command is POSIX; where it is missing (a distroless image), the parent
      lowers the process once ``Popen`` returns, as offload did before.
    - ``SCHED_IDLE``, or ``SCHED_BATCH`` below the loop, is set once ``Popen``
      returns: until then the child runs at the pool's niceness, under the
      application's policy (the spawner thread's).
    - Otherwise the child keeps the scheduling policy of the spawner thread, which is
      the application's (``SCHED_BATCH`` under ``chrt -b``): only its slice changes.

    Each of these is skipped, with a debug log, where the system lacks what it needs.
    """
    long = bool(settings.niceness) and not settings.idle_priority
    _ask_for_slice(0, LONG_SLICE_NS if long else 0)
    nice = _nice_command() if settings.niceness else None
    if nice is not None:
        args = [nice, "-n", str(settings.niceness), *args]
    proc: subprocess.Popen[bytes] = subprocess.Popen(args, **popen)
    try:
        if nice is None:
            lower_priority(proc.pid, settings)
        elif settings.idle_priority:
            _set_idle(proc.pid)
        elif long:
            _set_batch(proc.pid)
    except BaseException:
        # Nobody else knows of the process yet: it would wait for its boot for ever.
        proc.kill()
        proc.wait()
        raise
    return proc


@functools.cache
def _nice_command() -> str | None:
    # The system's, not whatever a PATH entry calls "nice".
    return shutil.which("nice", path=os.defpath)


def _os_call(name: str) -> Any:
    """``os.<name>``, or None, logged, where this system has no such call."""
    call = getattr(os, name, None)
    if call is None:
        logger.debug("os.%s is missing here: worker processes go without it", name)
    return call


def lower_priority(pid: int, settings: PoolSettings) -> None:
    """Put a process just started below the event loop, as its pool's settings say."""
    if settings.niceness:
        getpriority, setpriority = _os_call("getpriority"), _os_call("setpriority")
        if getpriority is not None and setpriority is not None:
            with contextlib.suppress(OSError):  # the process may be gone already
                nice = min(19, getpriority(os.PRIO_PROCESS, 0) + settings.niceness)
                setpriority(os.PRIO_PROCESS, pid, nice)
    if settings.idle_priority:
        _set_idle(pid)
    elif settings.niceness:
        _ask_for_slice(pid, LONG_SLICE_NS)
        _set_batch(pid)


def _set_idle(pid: int) -> None:
    setscheduler, param = _os_call("sched_setscheduler"), _os_call("sched_param")
    idle = getattr(os, "SCHED_IDLE", None)
    if setscheduler is None or param is None or idle is None:
        if idle is None:
            logger.debug("os.SCHED_IDLE is missing here: idle_priority has no effect")
        return
    with contextlib.suppress(OSError):  # the process may be gone already
        setscheduler(pid, idle, param(0))


def _set_batch(pid: int) -> None:
    """``SCHED_OTHER`` to ``SCHED_BATCH``, its nice value and slice kept; any other
    policy (the application's, inherited) is left as it is."""
    batch = getattr(os, "SCHED_BATCH", None)
    getscheduler = _os_call("sched_getscheduler")
    if batch is None or getscheduler is None:
        return
    try:
        if getscheduler(pid) != os.SCHED_OTHER:
            return
    except OSError:  # the process may be gone already
        return
    if _syscalls() is None:
        # sched_setscheduler keeps the nice value; a custom slice needs sched_setattr,
        # which is not known here.
        with contextlib.suppress(OSError):
            os.sched_setscheduler(pid, batch, os.sched_param(0))
        return

    def to_batch(attr: _SchedAttr) -> bool:
        attr.sched_policy = batch
        return True

    _change_attributes(pid, to_batch)


def time_slice(pid: int) -> int | None:
    """The time slice (ns) a normal process runs with, where the kernel tells it."""
    calls = _syscalls()
    if calls is None:
        return None
    attr = _SchedAttr()
    size = ctypes.c_uint(ctypes.sizeof(attr))
    if _syscall(calls, calls[2], pid, ctypes.byref(attr), size, ctypes.c_uint(0)) != 0:
        return None
    return attr.sched_runtime or None  # 0: a kernel without custom slices


def _ask_for_slice(pid: int, nanoseconds: int) -> None:
    """Ask for a time slice of ``nanoseconds`` (0: the kernel's) for ``pid`` (0: the
    calling thread), keeping its scheduling policy and nice value: a slice is asked
    for only under ``SCHED_OTHER`` and ``SCHED_BATCH``."""

    def to_slice(attr: _SchedAttr) -> bool:
        if attr.sched_policy not in _FAIR or attr.sched_runtime == nanoseconds:
            return False
        attr.sched_runtime = nanoseconds
        return True

    _change_attributes(pid, to_slice)


def _change_attributes(pid: int, change: Callable[[_SchedAttr], bool]) -> None:
    """Read ``pid``'s scheduling attributes, let ``change`` edit them (False: leave
    them), and write them back; where there is no sched_setattr, nothing."""
    calls = _syscalls()
    if calls is None:
        return
    attr = _SchedAttr()
    size = ctypes.c_uint(ctypes.sizeof(attr))
    if _syscall(calls, calls[2], pid, ctypes.byref(attr), size, ctypes.c_uint(0)) != 0:
        return
    if not change(attr):
        return
    # sched_setattr sets the policy, the nice value and the slice at once: what
    # ``change`` left alone goes back as it was.
    attr.size = ctypes.sizeof(_SchedAttr)
    attr.sched_flags &= _SCHED_FLAG_RESET_ON_FORK  # the others need a larger struct
    # Refused (an odd kernel, a security module) or ignored (a slice before 6.12): no
    # harm.
    _syscall(calls, calls[1], pid, ctypes.byref(attr), ctypes.c_uint(0))


def _syscall(calls: tuple[ctypes.CDLL, int, int], number: int, pid: int, *args: object) -> int:
    # syscall(2) is variadic and takes longs: plain ints would travel as C ints.
    result: int = calls[0].syscall(ctypes.c_long(number), ctypes.c_long(pid), *args)
    return result


@functools.cache
def _syscalls() -> tuple[ctypes.CDLL, int, int] | None:
    """libc, and the numbers of sched_setattr and sched_getattr here, on Linux."""
    numbers = _SYSCALLS.get(platform.machine()) if sys.platform == "linux" else None
    if numbers is None:
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    return libc, *numbers
