"""A worker's life bound to its parent's: it dies with the parent, however the parent
dies, and its process group (what its calls started) with it.

Linux delivers SIGKILL on the parent's death (``PR_SET_PDEATHSIG``); elsewhere a
thread watches a pipe whose only writer is the parent. A guard process ends the
worker's process group at the worker's death. Workers import it at start: no typing.
"""

from __future__ import annotations

import atexit
import functools
import os
import signal
import sys
import threading

TYPE_CHECKING = False  # not typing's: see offload/__init__.py
if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ("GUARD_NAME", "die_with_parent", "guard_group", "prctl_function")

_PR_SET_PDEATHSIG = 1


@functools.cache
def prctl_function() -> Callable[..., int] | None:
    """Linux's ``prctl(2)``, or None."""
    if sys.platform != "linux":
        return None
    import ctypes

    try:
        prctl: Callable[..., int] = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return prctl


#: the guard: killed with its process group when SIGHUP comes, asleep until then (a
#: ``read`` from a pipe it holds both ends of; a trapped signal interrupts it)
_GUARD = "trap 'kill -KILL 0' HUP; while read -r _; do :; done"
#: the guard's $0, by which ``ps`` and tests tell it apart
GUARD_NAME = "offload-guard"
#: in the guard until its exec: the write end of the pipe its worker reads EOF from
_EXEC_FD = 4


def guard_group() -> None:
    """Start a guard that ends this worker's process group when the worker dies.

    The worker leads a process group of its own (the parent starts it in a new
    session), which the programs its calls start join. The parent ends that group
    whenever it sees the worker exit; the guard does when the parent cannot, because
    it is dead (its death killed the worker, by a death signal nothing can handle).
    The guard is a shell, in the group, that asks for SIGHUP at the worker's death
    (``PR_SET_PDEATHSIG``, which survives its exec) and then kills its group, itself
    included: one small process per worker, asleep, holding none of the worker's
    descriptors. Linux only, and where there is a ``/bin/sh``: elsewhere the parent
    alone ends the group, and a program outlives a killed parent.

    A worker that exits cleanly kills and reaps its guard first, rather than leave it
    to whoever adopts orphans (the server itself, as a container's PID 1).

    Returns once the guard runs ``/bin/sh``: until then it is a copy of the worker,
    with the worker's command line, and whatever counts workers by theirs (``ps``, a
    monitor, the tests) would count one more, for as long as the worker's start takes.
    """
    prctl = prctl_function()
    if prctl is None or os.getpgid(0) != os.getpid() or not os.path.exists("/bin/sh"):
        return  # not a group of its own, or no way to guard it
    worker = os.getpid()
    # Closed on exec (os.pipe's descriptors are not inheritable), or at the guard's exit.
    exec_read, exec_write = os.pipe()
    guard = os.fork()
    if guard != 0:
        os.close(exec_write)
        try:
            os.read(exec_read, 1)  # EOF once the guard has run /bin/sh, or failed to
        finally:
            os.close(exec_read)
        atexit.register(_end_guard, guard, worker)
        return
    try:
        if exec_write != _EXEC_FD:
            os.dup2(exec_write, _EXEC_FD, inheritable=False)
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (1, 2):
            os.dup2(null, fd)
        read_end, write_end = os.pipe()  # never written to, never closed: no EOF
        os.dup2(read_end, 0)
        os.dup2(write_end, 3)
        os.closerange(_EXEC_FD + 1, _max_fd())
        if prctl(_PR_SET_PDEATHSIG, signal.SIGHUP) != 0 or os.getppid() != worker:
            os.killpg(0, signal.SIGKILL)  # dead already, or it could not be watched
        os.execv("/bin/sh", ["/bin/sh", "-c", _GUARD, GUARD_NAME])
    finally:
        os._exit(1)


def _end_guard(guard: int, worker: int) -> None:
    if os.getpid() == worker:  # not in a process a call forked, which exits too
        os.kill(guard, signal.SIGKILL)
        os.waitpid(guard, 0)


def _max_fd() -> int:
    try:
        return os.sysconf("SC_OPEN_MAX")
    except (AttributeError, OSError, ValueError):
        return 1 << 16


def die_with_parent(death_fd: int, parent_pid: int) -> None:
    prctl = prctl_function()
    signalled = prctl is not None and prctl(_PR_SET_PDEATHSIG, signal.SIGKILL) == 0
    if os.getppid() != parent_pid:
        os._exit(1)  # the parent died before we could ask to die with it
    if signalled:
        # No watcher thread then: a single-threaded process dies at once when
        # killed, so the parent sees it dead (waitpid) as soon as it looks dead.
        # An idle worker also leaves when its channel reaches EOF.
        return

    def watch() -> None:
        while os.read(death_fd, 1):
            pass
        os._exit(1)

    threading.Thread(target=watch, name="offload-parent-watch", daemon=True).start()
