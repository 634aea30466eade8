"""Launching a worker process: its command line, its start, its boot.

A worker is started on the spawner thread (``spawner.py``), below the event loop from
its first instruction (``scheduling.py``), in a session of its own, with one end of a
socketpair (its channel to the parent) and the read end of the pool's death pipe
(which reaches EOF when the parent dies, however it dies). Once it runs, the parent
sends it the boot message (limits, cross-memory copies, the initializer) and waits
for its answer: ready, or the initializer's failure.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import anyio

from ..._errors import PoolStartError, RemoteTraceback
from . import crash_reports, worker_handle
from .framing import OK, decode, encode
from .remote_buffers import inline_buffers
from .scheduling import start_at_lower_priority
from .spawner import spawner, wait_future
from .worker_handle import EXIT_STATUS_WAIT, WorkerHandle

if TYPE_CHECKING:
    from ..._settings import PoolSettings

__all__ = ("boot", "quiet_channel", "spawn", "worker_command")

logger = logging.getLogger("offload")

# The parent's sys.path, from the command line, is the worker's before it imports
# anything: ``-c`` puts the current directory first on the path, where a
# ``socket.py`` would run in every worker (and offload itself may be importable only
# from a directory of the parent's path). ``sys`` is built in: importing it reads no
# directory.
_BOOT = (
    "import sys; sys.path[:] = sys.argv[5:]; from offload._pools.process.worker import main; main()"
)


def worker_command(*args: str) -> list[str]:
    """The command line of a worker: this interpreter with the options it runs with
    (``-E``, ``-s``, ``-O``, ``-X ...``, as multiprocessing passes them on), the boot,
    ``args``, then the parent's ``sys.path``."""
    # Private, but what multiprocessing's spawn uses for the same purpose.
    flags: Callable[[], list[str]] = getattr(subprocess, "_args_from_interpreter_flags", list)
    return [sys.executable, *flags(), "-c", _BOOT, *args, *sys.path]


def _start_process(
    args: list[str], fds: tuple[int, ...], settings: PoolSettings
) -> tuple[subprocess.Popen[bytes], int]:
    """Start a worker process, below the event loop from its start (``scheduling.py``);
    it and the file its fault handler writes to (made here, off the event loop: where
    there is no memfd, it is a file in the temporary directory).

    In a session of its own, so that the programs its calls start share its process
    group, and end with it (:meth:`WorkerHandle.end_group`).
    """
    crash_fd = crash_reports.create()
    try:
        proc = start_at_lower_priority(
            worker_command(*args, str(crash_fd)),
            settings,
            pass_fds=(*fds, crash_fd),
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    except BaseException:
        os.close(crash_fd)
        raise
    return proc, crash_fd


async def spawn(
    death_fd: int, settings: PoolSettings, loop: asyncio.AbstractEventLoop | None
) -> WorkerHandle:
    """Start a worker process; the parent's handle on it, its channel not yet used."""
    parent, child = socket.socketpair()
    args = [str(child.fileno()), str(death_fd), str(os.getpid())]
    try:
        # On the spawner thread (see spawner.py); waited for even when
        # cancelled, so that a started process always reaches the pool.
        future = spawner().submit(_start_process, args, (child.fileno(), death_fd), settings)
        proc, crash_fd = await wait_future(future)
    except BaseException:
        parent.close()
        raise
    finally:
        child.close()
    parent = quiet_channel(parent)
    parent.setblocking(False)
    return WorkerHandle(proc, parent, loop, crash_fd)


async def boot(
    worker: WorkerHandle,
    settings: PoolSettings,
    cross_memory: bool,
    pool_name: str,
    kill: Callable[[WorkerHandle], None],
) -> int:
    """Send a new worker what it needs before its first call, and wait (up to
    ``start_timeout``) for its answer: ready, with the address of its
    ``cross_memory.PROBE`` (0 without cross-memory copies), which is returned.

    :raises PoolStartError: it did not answer in time, died, or its initializer
        raised; it is stopped with ``kill`` first, as on any other exception
    """
    start_timeout = settings.start_timeout
    limit = settings.hard_memory_limit
    # Plain ints: the sizes are pydantic's ByteSize here, and unpickling one would
    # import pydantic in the worker (a tenth of a second of CPU at every start).
    message = (
        int(settings.max_payload),
        cross_memory,
        None if limit is None else int(limit),
        settings.initializer,
        settings.initializer_args,
    )
    # The channel is this exchange's until it ends, as it is a call's: a worker seen
    # to exit meanwhile has its channel shut for reading, not closed under the read
    # (its end may outlive it, in a process it forked), and is closed here after.
    worker.in_use = True
    try:
        with anyio.fail_after(start_timeout):
            # The logger levels first, if it forwards logs: its initializer's records.
            await worker.send(worker.with_levels(encode(message)))
            data, received = await worker.recv()
            status, value = decode(data, inline_buffers(received))
    except BaseException as exc:
        kill(worker)
        if isinstance(exc, TimeoutError):
            raise PoolStartError(
                f"a worker of pool {pool_name!r} did not start within "
                f"{start_timeout:g} s (start_timeout)"
            ) from exc
        if isinstance(exc, (EOFError, OSError)):
            with anyio.move_on_after(EXIT_STATUS_WAIT, shield=True):
                await worker.exited.wait()
            initializer = settings.initializer
            doing = "starting" if initializer is None else f"starting (initializer {initializer})"
            crash = worker.crashed(doing, initializer)
            raise PoolStartError(
                f"a worker of pool {pool_name!r} failed to start: {crash}"
            ) from crash
        raise
    finally:
        worker.in_use = False
        if worker.exited.is_set():
            worker.close()
    if status != OK:
        kill(worker)
        type_name, message, tb = value
        raise PoolStartError(
            f"the initializer of pool {pool_name!r} raised {type_name}: {message}"
        ) from RemoteTraceback(tb)
    probe: int = value[1]
    return probe


#: where sends have no flag against SIGPIPE (macOS), the socket option that does the
#: same
_SO_NOSIGPIPE: int | None = getattr(
    socket, "SO_NOSIGPIPE", 0x1022 if sys.platform == "darwin" else None
)


def quiet_channel(sock: socket.socket) -> socket.socket:
    """``sock``, or a socket on the same descriptor, whose sends to a dead worker fail
    with EPIPE and never raise SIGPIPE: :data:`worker_handle.NO_SIGNAL` where sends have the flag,
    else ``SO_NOSIGPIPE``, else SIGPIPE blocked around each send."""
    if worker_handle.NO_SIGNAL:
        return sock
    if _SO_NOSIGPIPE is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, _SO_NOSIGPIPE, 1)
        except OSError:
            pass
        else:
            return sock
    if not hasattr(signal, "pthread_sigmask"):
        return sock  # Windows: no SIGPIPE
    logger.debug("neither MSG_NOSIGNAL nor SO_NOSIGPIPE here: SIGPIPE is blocked around sends")
    return _SigpipeBlocked(fileno=sock.detach())


class _SigpipeBlocked(socket.socket):
    """A socket whose ``sendmsg`` runs with SIGPIPE blocked in the calling thread, and
    takes back the SIGPIPE a send to a closed peer leaves pending."""

    __slots__ = ()

    def sendmsg(self, *args: Any) -> int:
        old = signal.pthread_sigmask(signal.SIG_BLOCK, (signal.SIGPIPE,))
        if signal.SIGPIPE in old:  # blocked already: whoever blocked it handles it
            return super().sendmsg(*args)
        try:
            return super().sendmsg(*args)
        except BrokenPipeError:
            if signal.SIGPIPE in signal.sigpending():
                signal.sigwait((signal.SIGPIPE,))
            raise
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
