"""The parent's handle on one worker process: its channel, its pid, its exit."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import anyio
import anyio.lowlevel

from ..._call import describe
from ..._errors import WorkerCrashed, describe_exit
from . import crash_reports
from .framing import HEADER, LOG, SCRATCH_SIZE, Remote, parse_frame, whole_frame
from .logs import current_levels
from .sending import first_batch, first_bytes, remaining

if TYPE_CHECKING:
    from ..._call import Call
    from ..._settings import PoolSettings
    from .buffers import Buffer, Received
    from .logs import Levels, LogSink

__all__ = ("EXIT_STATUS_WAIT", "NO_SIGNAL", "WorkerHandle")

#: seconds a caller waits for a dead worker's exit status before reporting without it
EXIT_STATUS_WAIT = 2.0
#: bytes one system call may move: while the worker keeps up on the other end, a
#: single recv or send of a large frame would otherwise copy on and on
CHUNK = 1 << 18
#: bytes moved through a channel between two pauses for the rest of the event loop
YIELD_EVERY = 1 << 18
#: log records handled between two pauses for the rest of the event loop (each goes
#: through the application's handlers: tens of µs)
RECORDS_BETWEEN_PAUSES = 64
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
#: a send to a dead worker fails with EPIPE instead of raising SIGPIPE, even in an
#: application that restored SIGPIPE's default action (Python ignores it); where
#: sends have no such flag, ``launch.quiet_channel`` does the same otherwise
NO_SIGNAL = getattr(socket, "MSG_NOSIGNAL", 0)

logger = logging.getLogger("offload")


class WorkerHandle:
    """The parent's handle on one worker process."""

    __slots__ = (
        "_into",
        "_loop",
        "_reader_on",
        "_waiter",
        "call",
        "calls",
        "crash_fd",
        "crash_told",
        "exited",
        "in_use",
        "last_ended",
        "last_function",
        "levels",
        "log_sink",
        "pid",
        "pidfd",
        "proc",
        "ready",
        "replacement_started",
        "retiring",
        "scratch",
        "sock",
    )

    def __init__(
        self,
        proc: subprocess.Popen[bytes],
        sock: socket.socket,
        loop: asyncio.AbstractEventLoop | None,
        crash_fd: int = -1,
    ) -> None:
        self.proc = proc
        self.pid = proc.pid
        self.sock = sock
        self.scratch = memoryview(bytearray(SCRATCH_SIZE))
        self.pidfd: int | None = None
        if hasattr(os, "pidfd_open"):
            with contextlib.suppress(OSError):
                self.pidfd = os.pidfd_open(proc.pid)
        self.exited = anyio.Event()
        self.calls = 0
        self.call: Call | None = None  # the call it runs, for the logs
        # The function of its latest call (a plain function: its name is made only if
        # the worker dies; else the name, which holds no state), and when it ended.
        self.last_function: Callable[..., Any] | str | None = None
        self.last_ended = 0.0
        self.crash_fd = crash_fd  # its fault handler's report (crash_reports.py)
        self.crash_told = False  # a caller got WorkerCrashed before its exit status came
        self.in_use = False  # a caller is using the channel: only it may close it
        self.ready = False  # said it was ready; its exit then calls for a replacement
        self.retiring = False  # recycled: its replacement is already on the way
        self.replacement_started = False  # before it retired
        self.log_sink: LogSink | None = None  # where its LOG frames go, if it forwards logs
        self.levels: Levels | None = None  # the logger levels it was last sent
        # On asyncio the channel's reader stays registered between calls (see _read_into).
        self._loop = loop
        self._reader_on = False
        self._waiter: asyncio.Future[int] | None = None
        self._into: tuple[memoryview, int] | None = None  # where the waiter's read goes

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    def crash_report(self) -> str | None:
        """What the worker's fault handler wrote (see ``crash_reports.py``), if any."""
        return None if self.crash_fd < 0 else crash_reports.read(self.crash_fd)

    def crashed(self, doing: str, function: str | None) -> WorkerCrashed:
        """The error of a caller whose worker died ``doing`` something (``running
        f``), ``function`` by name: how it ended and, when its fault handler wrote a
        report, its head in the message and the whole as ``traceback``."""
        report = self.crash_report()
        message = f"the worker process {self.pid} {doing} {self.ending(report)}"
        if report is not None:
            message = (
                f"{message}; its fault handler's report (whole in .traceback):\n"
                f"{crash_reports.excerpt(report)}"
            )
        return WorkerCrashed(
            message, pid=self.pid, exitcode=self.returncode, function=function, traceback=report
        )

    def ending(self, report: str | None) -> str:
        """How the worker ended, unasked (``killed by SIGSEGV``), with what may explain
        it; ``report``: what its fault handler wrote."""
        status = describe_exit(self.returncode, unexpected=True)
        if self.returncode is None:
            return f"{status} (not there after {EXIT_STATUS_WAIT:g} s)"
        if report is None and self.returncode == -signal.SIGABRT:
            # faulthandler catches abort(), but the interpreter's own fatal errors
            # (Py_FatalError) turn it off first, having printed their stack.
            return (
                f"{status} (its fault handler caught nothing: a fatal error of the "
                "interpreter itself prints its message and stack on the worker's stderr)"
            )
        return status

    def last_call_name(self) -> str | None:
        """The name of the function of its latest call; None before its first."""
        fn = self.last_function
        return fn if fn is None or isinstance(fn, str) else describe(fn)

    def last_call(self) -> str:
        """Its latest call, for a log: ``its last call, to f, ended 2.5 s ago``."""
        name = self.last_call_name()
        if name is None:
            return "it had run no call"
        ago = time.monotonic() - self.last_ended
        return f"its last call, to {name}, ended {ago:.1f} s ago"

    def with_levels(self, parts: list[Buffer]) -> list[Buffer]:
        """``parts``, a frame for the worker, after this process's logger levels if
        they changed since the worker got them (a worker that forwards logs)."""
        if self.log_sink is None:
            return parts
        levels = current_levels()
        if levels is self.levels:
            return parts
        self.levels = levels
        return [*levels.frame, *parts]

    def send_some(self, parts: list[Buffer]) -> Sequence[Buffer]:
        """Write what the channel takes of a frame of at most :data:`CHUNK` bytes at
        once, without waiting; return the rest, for :meth:`send`. (A larger frame is
        returned whole: :meth:`send` pauses for the loop while writing it.)"""
        size = sum(map(len, parts))
        if size > CHUNK:
            return parts
        try:
            sent = self.sock.sendmsg(first_batch(parts), (), NO_SIGNAL)
        except BlockingIOError:
            return parts
        return remaining(parts, sent) if sent < size else ()

    async def send(self, parts: Sequence[Buffer]) -> None:
        sock = self.sock
        views = parts
        if sum(map(len, parts)) <= CHUNK:  # the usual frame: one system call
            while views:
                try:
                    views = remaining(views, sock.sendmsg(first_batch(views), (), NO_SIGNAL))
                except BlockingIOError:
                    await anyio.wait_writable(sock)
            return
        unyielded = 0
        while views:
            try:
                sent = sock.sendmsg(first_batch(first_bytes(views, CHUNK)), (), NO_SIGNAL)
            except BlockingIOError:
                unyielded = 0
                await anyio.wait_writable(sock)
                continue
            views = remaining(views, sent)
            unyielded += sent
            if unyielded >= YIELD_EVERY and views:
                # The worker drains the channel as fast as it is filled: without a
                # pause a large frame would hold the loop to the end.
                unyielded = 0
                await anyio.lowlevel.checkpoint()

    async def recv(self) -> tuple[Received, list[Received | Remote]]:
        scratch = self.scratch
        # Not tried at once: the frame was just sent, the answer is not here yet.
        n = await self._read_into(scratch, len(scratch), eager=False)
        if not n:
            raise EOFError("the worker closed its channel")
        frame = whole_frame(scratch, n)
        if frame is not None:
            return frame
        if n >= HEADER.size and HEADER.unpack_from(scratch)[1] == LOG:
            n = await self._take_logs(n)
            frame = whole_frame(scratch, n)
            if frame is not None:
                return frame
        parser = parse_frame(scratch, n)
        unyielded = n
        try:
            view = next(parser)
            while True:
                if unyielded >= YIELD_EVERY:
                    # The worker fills the channel as fast as it is drained: without
                    # a pause a large frame would hold the loop to the end.
                    unyielded = 0
                    await anyio.lowlevel.checkpoint()
                n = await self._read_into(view, min(len(view), CHUNK))
                if not n:
                    raise EOFError("the worker closed its channel")
                unyielded += n
                view = parser.send(n)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]

    async def _take_logs(self, n: int) -> int:
        """Hand the LOG frames at the start of the ``n`` bytes read into the scratch
        buffer to the log sink, reading on as needed; return how many bytes of the
        next frame, which is no LOG frame, are then at its start.

        A worker sends LOG frames only while it runs a call (or its initializer), and
        nothing after its reply: the frame that follows them is the last one read.
        """
        scratch = self.scratch
        sink = self.log_sink
        unyielded = 0
        while True:
            while n < HEADER.size:
                n += await self._read_more(scratch[n:])
            length, count = HEADER.unpack_from(scratch)
            if count != LOG:
                return n
            end = HEADER.size + length
            if end <= n:
                if sink is not None:
                    sink.handle(scratch[HEADER.size : end], self.call)
                scratch[: n - end] = scratch[end:n]
                n -= end
            elif end <= len(scratch):
                n += await self._read_more(scratch[n:])
                continue
            else:  # a record larger than the scratch buffer: read into its own
                data = memoryview(bytearray(length))
                got = n - HEADER.size
                data[:got] = scratch[HEADER.size : n]
                while got < length:
                    got += await self._read_more(data[got:])
                if sink is not None:
                    sink.handle(data, self.call)
                n = 0
            unyielded += 1
            if unyielded >= RECORDS_BETWEEN_PAUSES:
                # A call that logs on and on: the loop's other tasks run meanwhile.
                unyielded = 0
                await anyio.lowlevel.checkpoint()

    async def _read_more(self, view: memoryview) -> int:
        n = await self._read_into(view, min(len(view), CHUNK))
        if not n:
            raise EOFError("the worker closed its channel")
        return n

    async def _read_into(self, view: memoryview, nbytes: int, eager: bool = True) -> int:
        """``sock.recv_into(view, nbytes)``, once the channel has something to read.

        On asyncio the reader callback stays registered from one call to the next
        (``anyio.wait_readable`` would add and remove it, two ``epoll_ctl`` calls and
        their bookkeeping, on every round trip), and it reads for the waiting caller
        (see :meth:`_on_readable`). Elsewhere, anyio's own wait.
        """
        sock = self.sock
        if eager:
            try:
                return sock.recv_into(view, nbytes)
            except BlockingIOError:
                pass
        loop = self._loop
        if loop is None:
            while True:
                await anyio.wait_readable(sock)
                try:
                    return sock.recv_into(view, nbytes)
                except BlockingIOError:
                    continue
        waiter: asyncio.Future[int] = loop.create_future()
        self._waiter = waiter
        self._into = view, nbytes
        if not self._reader_on:
            loop.add_reader(sock.fileno(), self._on_readable)
            self._reader_on = True
        try:
            return await waiter
        finally:
            self._waiter = self._into = None

    def _on_readable(self) -> None:
        waiter = self._waiter
        if waiter is None:
            # Data or EOF nobody waits for (a cancelled caller, a crash): stop
            # watching, or the loop would call us on every turn. Readiness is
            # level-triggered: left unread, it would be reported on every turn.
            try:
                self.sock.recv(1, socket.MSG_PEEK)
            except BlockingIOError:
                return  # not ready after all: stay registered
            except OSError:
                pass
            self._stop_reader()
        elif not waiter.done():
            # Read now, in the turn the loop saw the data, not in the caller's task a
            # turn later: left unread until then, the data would be reported once
            # more and wake the caller's next wait for nothing (a loop turn, a future
            # and a failed recv per call, for a lone caller).
            assert self._into is not None
            try:
                n = self.sock.recv_into(*self._into)
            except BlockingIOError:
                return
            except OSError as exc:
                waiter.set_exception(exc)
                return
            waiter.set_result(n)

    def _stop_reader(self) -> None:
        if self._reader_on and self._loop is not None:
            self._loop.remove_reader(self.sock.fileno())
            self._reader_on = False

    async def wait_exit(self) -> None:
        """Return once the process has exited, and reap it."""
        if self.pidfd is not None:
            await anyio.wait_readable(self.pidfd)
        else:
            while self.proc.poll() is None:  # noqa: ASYNC110 (no pidfd to wait on)
                await anyio.sleep(0.05)
        self.proc.poll()

    def rss(self) -> int:
        """Resident memory of the worker in bytes; 0 if it cannot be read."""
        try:
            with open(f"/proc/{self.pid}/statm", "rb") as statm:
                return int(statm.read().split()[1]) * _PAGE_SIZE
        except (OSError, ValueError, IndexError):
            return 0

    def due_for_recycling(self, settings: PoolSettings, pool_name: str) -> bool:
        """Whether the worker is due for replacement after its latest call (logged)."""
        limit = settings.max_tasks_per_worker
        if limit is not None and self.calls >= limit:
            logger.info("pool %r: recycling worker %d after %d calls", pool_name, self.pid, limit)
            return True
        memory = settings.max_memory_per_worker
        if memory is not None and (rss := self.rss()) > memory:
            logger.info(
                "pool %r: recycling worker %d: %d bytes resident, limit %d",
                pool_name,
                self.pid,
                rss,
                memory,
            )
            return True
        return False

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the worker and to every process of its process group (what
        its calls started), unless the worker has been reaped: its pid, and so the
        group's id, may then be another process's."""
        if self.proc.returncode is None:
            self._signal_group(sig)

    def end_group(self) -> bool:
        """SIGKILL what is left of the worker's process group: the programs its calls
        started, which outlive it otherwise. Right after the worker's exit is seen, and
        it is reaped: while a process is left in the group, its id cannot be reused.

        Returns whether some of them are this process's to reap: they were orphaned,
        and this process adopts orphans (a container's PID 1, a subreaper); see
        :meth:`reap_group`.
        """
        self._signal_group(signal.SIGKILL)
        return self._reap_group()

    async def reap_group(self) -> None:
        """Reap the processes of the worker's group that :meth:`end_group` left to this
        process, as they die (SIGKILL takes effect soon, not at once)."""
        with anyio.move_on_after(5):
            while self._reap_group():  # noqa: ASYNC110 (no event: nobody is told)
                await anyio.sleep(0.05)

    def _reap_group(self) -> bool:
        """Reap what of the worker's group is this process's and dead; whether some of
        it is this process's and still alive."""
        if self.proc.returncode is None or not hasattr(os, "WNOHANG"):
            return False  # the worker itself is its Popen's to reap
        while True:
            try:
                pid, _ = os.waitpid(-self.pid, os.WNOHANG)
            except ChildProcessError:
                return False  # none of them is this process's: the usual case
            if pid == 0:
                return True

    def _signal_group(self, sig: int) -> None:
        killpg = getattr(os, "killpg", None)
        if killpg is not None:
            try:
                killpg(self.pid, sig)
                return
            except ProcessLookupError:
                return  # nothing left in it
            except PermissionError:
                pass  # not its own group after all (a pid the worker no longer leads)
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)

    def close(self) -> None:
        if self.sock.fileno() >= 0:
            self._stop_reader()
            if self._waiter is not None and not self._waiter.done():
                self._waiter.set_exception(anyio.ClosedResourceError())
            anyio.notify_closing(self.sock)
            self.sock.close()
        if self.pidfd is not None:
            anyio.notify_closing(self.pidfd)
            os.close(self.pidfd)
            self.pidfd = None
        self.close_crash_report()

    def close_crash_report(self) -> None:
        if self.crash_fd >= 0:
            os.close(self.crash_fd)
            self.crash_fd = -1
