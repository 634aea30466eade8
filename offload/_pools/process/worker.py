"""The worker process: read a call, run it, write the answer, repeat.

Started by ``launch.py`` as ``python -c "...main()" CHANNEL_FD DEATH_FD PARENT_PID
CRASH_FD PATH...``, PATH the parent's ``sys.path``, installed before anything is
imported, and CRASH_FD the file its fault handler writes to (``crash_reports.py``).
It imports neither anyio nor pydantic (nor typing, contextlib, traceback), so it starts
in a few tens of milliseconds; ``logging`` and what it imports load once it has
started, when the parent forwards logs.

It dies with its parent, however the parent dies: Linux delivers SIGKILL on the
parent's death (``PR_SET_PDEATHSIG``); elsewhere a thread watches a pipe whose only
writer is the parent, and exits when the pipe reaches EOF. An idle worker also
exits when its channel reaches EOF.

Whatever the user's code does (the function, its arguments' and result's pickling
hooks, an exception's ``__str__``, the initializer), down to ``SystemExit``, fails only
its call: every call gets one answer, and only from this process (a process the
function forks loses the channel, see :func:`_after_fork_in_child`).

The records a call logs go to the parent before its answer, as LOG frames, when the
parent forwards logs (``worker_logs.py``).
"""

from __future__ import annotations

import contextvars
import faulthandler
import functools
import os
import pickle
import signal
import socket
import sys
from collections.abc import Callable
from time import perf_counter
from types import GeneratorType

from ..._context import enter, enter_traced, import_string, run_traced
from ..._where import mark_worker_process
from . import worker_logs
from .buffers import out_of_band
from .framing import (
    BAD_REQUEST,
    BAD_RESULT,
    CLOSE,
    HEADER,
    ITEM,
    LOG,
    OK,
    RAISED_UNPICKLABLE,
    SCRATCH_SIZE,
    STARTED,
    TOO_LARGE,
    WRITE_TO,
    decode,
    encode,
    recv_frame,
    whole_frame,
)
from .remote_buffers import has_remote, inline_buffers, make_room, recv_go_ahead
from .sending import send_parts
from .worker_errors import describe, exception_reply, str_of, traceback_of, type_name
from .worker_lifetime import die_with_parent, guard_group

TYPE_CHECKING = False  # not typing's: see offload/__init__.py
if TYPE_CHECKING:
    from typing import Any

    from ..._context import Carried
    from .buffers import Received
    from .framing import Frame, Remote

__all__ = ("main",)

#: the exit status of a worker that leaves after running out of its memory cap
EXIT_OUT_OF_MEMORY = 75


#: this worker's pid: a process forked by the function has another
_pid = 0


def main() -> None:
    global _pid
    mark_worker_process()
    channel_fd, death_fd, parent_pid, crash_fd = (int(arg) for arg in sys.argv[1:5])
    _pid = os.getpid()
    # A fatal signal's report goes where the parent reads it once the worker is dead.
    faulthandler.enable(crash_fd, all_threads=True)
    # None goes to a program the function starts (unless it passes them on).
    for fd in (channel_fd, death_fd, crash_fd):
        os.set_inheritable(fd, False)
    os.register_at_fork(
        after_in_child=functools.partial(_after_fork_in_child, channel_fd, crash_fd)
    )
    # In a session of its own, Ctrl-C at a terminal does not reach the worker; were
    # it started otherwise, the parent decides what happens to running calls.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    die_with_parent(death_fd, parent_pid)
    guard_group()
    sock = socket.socket(fileno=channel_fd)
    scratch = memoryview(bytearray(SCRATCH_SIZE))
    data, received = _recv(sock, scratch)
    boot = decode(data, inline_buffers(received))
    max_payload, cross_memory, memory_limit, initializer, initializer_args = boot
    if memory_limit is not None:
        _cap_memory(memory_limit)
    if initializer is not None:
        logs = None
        try:
            fn = import_string(initializer)
            # Its records reach the parent if its module has imported logging.
            logs = worker_logs.install_if_imported()
            if logs is not None:
                logs.in_call = True
            fn(*initializer_args)
        except BaseException as exc:
            failure = (type_name(exc), str_of(exc), traceback_of(exc))
            _leave_if_forked()
            if logs is not None:
                logs.end()
            send_parts(sock, encode((RAISED_UNPICKLABLE, failure)))
            sys.exit(1)
        _leave_if_forked()
        if logs is not None:
            logs.end()
    probe = 0
    if cross_memory:
        from .cross_memory import PROBE, address_of

        probe = address_of(PROBE)
    send_parts(sock, encode((OK, (os.getpid(), probe))))
    worker_logs.install()  # if the parent forwards logs: after its start, not during
    _serve(sock, scratch, max_payload, cross_memory)


def _recv(sock: socket.socket, scratch: memoryview) -> tuple[Received, list[Received | Remote]]:
    """Read the parent's next frame (``framing.recv_frame``), applying the logger
    levels it may send before it (``worker_logs.py``)."""
    n = sock.recv_into(scratch)
    if not n:
        raise EOFError("connection closed")
    frame = whole_frame(scratch, n)
    if frame is not None:
        return frame
    if n >= HEADER.size and HEADER.unpack_from(scratch)[1] == LOG:
        n = worker_logs.take_levels(sock, scratch, n)
    return recv_frame(sock, scratch, n)


#: the cap set by :func:`_cap_memory`, in bytes; None: no cap
_memory_cap: int | None = None


def _cap_memory(limit: int) -> None:
    """Cap the memory this process may map (heap and private mappings): past it an
    allocation fails, and the call that made it gets MemoryError. The hard limit too,
    so that the function cannot raise it again (unless privileged)."""
    global _memory_cap
    try:
        import resource

        _, hard = resource.getrlimit(resource.RLIMIT_DATA)
        if hard != resource.RLIM_INFINITY:
            limit = min(limit, hard)
        resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
    except (ImportError, AttributeError, OSError, ValueError):
        return  # not POSIX: the parent documents the setting as having no effect
    _memory_cap = limit


def _out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is this capped worker running out of memory; if so, the
    exception says which limit it met. The worker then leaves after its answer: its
    heap may be fragmented, or held by what the call left behind."""
    if _memory_cap is None or not isinstance(exc, MemoryError):
        return False
    note = (
        f"the worker process {os.getpid()} ran out of memory under its "
        f"hard_memory_limit of {_memory_cap} bytes ({_memory_cap / (1 << 20):.0f} MiB, "
        "RLIMIT_DATA); it is replaced after this call"
    )
    notes = getattr(exc, "__notes__", None)
    if isinstance(notes, list):
        notes.append(note)
    else:
        exc.__notes__ = [note]  # what add_note (3.11+) does; 3.10 has no add_note
    return True


def _serve(sock: socket.socket, scratch: memoryview, max_payload: int, cross_memory: bool) -> None:
    while True:
        try:
            data, received = _recv(sock, scratch)
            if not received:  # no out-of-band buffer: the usual call
                buffers: list[Received] = []
            elif has_remote(received):
                buffers, addresses = make_room(received)
                send_parts(sock, encode((WRITE_TO, addresses)))
                recv_go_ahead(sock)  # the parent wrote them
            else:
                buffers = inline_buffers(received)
            del received
        except (EOFError, ConnectionError):
            return  # the parent closed the channel: a clean stop
        reply: tuple[Any, ...]
        leave_after_reply = False
        ran: float | None = None  # seconds the function ran, sent with its outcome
        logs = worker_logs.forwarder  # None unless the parent forwards logs
        if logs is not None:
            logs.in_call = True  # until logs.end()
        stream = 0  # a stream's buffer: items it may send ahead of the parent
        closed = False  # a stream's CLOSE read
        try:
            fn, args, kwargs, carried, stream = _load_call(data, buffers)
            # A context of its own, a copy of the worker's: nothing a call sets, nor
            # the values it brought, is there for the next.
            ctx = enter(carried, contextvars.copy_context())
        except BaseException as exc:
            if type(exc) is _StrayClose:
                if logs is not None:
                    logs.end()
                continue
            # Its module started a process pool: the refusal reaches the caller as itself.
            if _refused_pool(exc):
                reply = exception_reply(exc)
            else:
                reply = (BAD_REQUEST, (describe(exc), traceback_of(exc)))
            del data, buffers
        else:
            del data, buffers
            begun = perf_counter()
            try:
                if stream:
                    if carried is not None and carried[1] is not None:
                        enter_traced(carried[1], ctx)  # for every item, and the close
                    outcome = _stream(sock, ctx, fn, args, kwargs, stream, max_payload)
                    if outcome is None:
                        return  # the parent closed the channel
                    closed, *answer = outcome
                    ran = perf_counter() - begun
                    reply = (*answer, ran)
                else:
                    if carried is None or carried[1] is None:
                        result = ctx.run(fn, *args, **kwargs)
                    else:
                        result = ctx.run(run_traced, carried[1], fn, args, kwargs)
                    ran = perf_counter() - begun
                    reply = (OK, out_of_band(result), ran)
                    del result
            except BaseException as exc:
                if ran is None:
                    ran = perf_counter() - begun
                leave_after_reply = _out_of_memory(exc)
                reply = (*exception_reply(exc), ran)
            # A callable's state, the arguments and the call's context go now, not
            # when the next call comes (only plain functions are cached, see
            # call_encoding.function_blob).
            del fn, args, kwargs, carried, ctx
        # A stream's answer stays in the frame: its items did.
        parts = _encode_reply(reply, max_payload, cross_memory and not stream, ran)
        del reply
        _leave_if_forked()  # once per call: getpid is a system call
        if logs is not None:
            logs.end()  # its records, then the reply
        if leave_after_reply and not parts.remote:
            # A call sent to it from now on fails to send (EPIPE), and the parent
            # gives it to another worker, rather than to one about to leave.
            sock.shutdown(socket.SHUT_RD)
        send_parts(sock, parts)
        if parts.remote:
            try:
                recv_go_ahead(sock)  # the parent has read them
            except (EOFError, ConnectionError):
                return
        if stream and ran is not None and not closed:
            # The parent's last frame of a stream that ran (its answer says how long)
            # is CLOSE, sent once it read the answer: credit sent meanwhile must not
            # be read as the next call.
            try:
                while _recv_small(sock)[0] != CLOSE:
                    pass
            except (EOFError, ConnectionError):
                return
        if leave_after_reply:
            sys.exit(EXIT_OUT_OF_MEMORY)
        del parts


def _stream(
    sock: socket.socket,
    ctx: contextvars.Context,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    credit: int,
    max_payload: int,
) -> tuple[Any, ...] | None:
    """Run a stream's generator, sending each item as an ITEM frame while the parent
    has given credit for it (its consumer is at most ``credit`` items behind); return
    ``(closed, status, value)``, the final answer: OK at its end or once the parent
    closed it (CLOSE: ``closed``), else its exception or an item that could not be
    sent, at its position. None: the parent closed the channel.

    The parent's frames (MORE, CLOSE) are read between items: without waiting while
    there is credit, else waiting for one. So a CLOSE reaches a generator suspended at
    a ``yield``, which is closed here, its ``finally`` run in this process.
    """
    send_parts(sock, encode((STARTED, None)))
    iterator: Any = None
    status = OK
    try:
        try:
            result = ctx.run(fn, *args, **kwargs)
            iterator = result if type(result) is GeneratorType else ctx.run(iter, result)
            del result
        except BaseException as exc:
            return (False, *exception_reply(exc))
        while True:
            while credit <= 0 or _waiting(sock):
                try:
                    status, value = _recv_small(sock)
                except (EOFError, ConnectionError):
                    return None
                if status == CLOSE:
                    return True, OK, None  # closed below
                credit += value
            try:
                item = ctx.run(next, iterator)
            except StopIteration:
                iterator = None
                return False, OK, None
            except BaseException as exc:
                iterator = None
                return (False, *exception_reply(exc))
            # An item that cannot be sent fails the stream, at its position.
            try:
                parts = encode((ITEM, out_of_band(item)))
            except BaseException as exc:
                try:  # what plain pickle refuses: see _encode_reply
                    import cloudpickle

                    parts = encode((ITEM, item), cloudpickle.dumps)
                except BaseException:
                    return False, BAD_RESULT, (describe(exc), traceback_of(exc))
            del item
            if parts.size > max_payload:
                return False, TOO_LARGE, (parts.size, max_payload)
            send_parts(sock, parts)
            del parts
            credit -= 1
    finally:
        # Closed here, where it ran: its ``finally`` runs in this process (a no-op for
        # a generator that has finished). What closing raises fails the stream.
        close = getattr(iterator, "close", None)
        del iterator
        if close is not None:
            try:
                ctx.run(close)
            except BaseException as exc:
                return exception_reply(exc)


def _recv_small(sock: socket.socket) -> Any:
    """The parent's next frame while a stream runs (MORE, CLOSE): read exactly, since
    several may be waiting in the channel. The logger levels it may send before one
    (a LOG frame) are applied."""
    while True:
        length, count = HEADER.unpack(_recv_exactly(sock, HEADER.size))
        data = _recv_exactly(sock, length)
        if count == 0:
            return pickle.loads(data)
        if count != LOG:
            raise ConnectionError("unexpected frame from the parent during a stream")
        worker_logs.apply_levels(data, sock)


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = sock.recv(n, socket.MSG_WAITALL) if n else b""
    while len(data) < n:
        more = sock.recv(n - len(data))
        if not more:
            raise EOFError("connection closed")
        data += more
    return data


def _waiting(sock: socket.socket) -> bool:
    """Whether the parent has sent something (or closed the channel), unread."""
    try:
        sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)  # b"" at EOF: readable too
    except BlockingIOError:
        return False
    return True


def _encode_reply(
    reply: tuple[Any, ...], max_payload: int, cross_memory: bool, ran: float | None
) -> Frame:
    """``reply`` as a frame; whatever its pickling does, a frame the parent can read.

    A reply is ``(status, value)``, and ``(status, value, ran)`` once the function
    ran: ``ran`` the seconds it took, measured here (the parent's ``PoolStats.run_*``).
    """
    tail = () if ran is None else (ran,)
    try:
        parts = encode(reply, cross_memory=cross_memory)
    except BaseException as exc:
        try:
            # What plain pickle refuses or cannot name: an instance of a class that
            # came by value from the parent's __main__, a lambda. By value, such a
            # class is rebuilt in the parent as the very class it came from
            # (cloudpickle tracks the classes it sends).
            import cloudpickle

            parts = encode(reply, cloudpickle.dumps, cross_memory)
        except BaseException:
            try:
                parts = encode((BAD_RESULT, (describe(exc), traceback_of(exc)), *tail))
            except BaseException:  # a MemoryError, say: still an answer
                parts = encode((BAD_RESULT, ("the result could not be pickled", ""), *tail))
    size = parts.size
    if size > max_payload:
        parts = encode((TOO_LARGE, (size, max_payload), *tail))
    return parts


def _after_fork_in_child(channel_fd: int, crash_fd: int) -> None:
    """In a process the function forked: the channel and the crash report become
    /dev/null, so that this process can write to neither, nor keep the channel open
    once the worker is gone. Its own fatal signal is reported on stderr."""
    try:
        faulthandler.enable(2, all_threads=True)
    except (OSError, ValueError, RuntimeError):
        faulthandler.disable()
    for fd in (channel_fd, crash_fd):
        try:
            null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
            os.dup2(null, fd, inheritable=False)
            os.close(null)
        except OSError:
            pass


def _leave_if_forked() -> None:
    """A process the function forked that returned into the worker's loop ends here."""
    if os.getpid() != _pid:
        os._exit(0)


class _StrayClose(Exception):
    """The CLOSE that ends a stream whose request this worker could not decode (so it
    did not know it for a stream): no call."""


def _load_call(
    data: Received, buffers: list[Received]
) -> tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any], Carried | None, int]:
    """The call's function, arguments and context, and for a stream its buffer (a
    request with a sixth element; 0 for a plain call)."""
    request = decode(data, buffers)
    size = len(request)
    if size == 5:  # the usual call
        blob, cache, args, kwargs, carried = request
        stream = 0
    elif size == 6:
        blob, cache, args, kwargs, carried, stream = request
    else:
        raise _StrayClose
    fn = _cached_function(blob) if cache else _load_function(blob)
    return fn, args, kwargs, carried, stream


@functools.lru_cache(maxsize=256)
def _cached_function(blob: bytes) -> Callable[..., Any]:
    """A plain module-level function, by reference: no state to keep from one call
    to the next, and a pickle that costs an import lookup."""
    return _load_function(blob)


def _load_function(blob: bytes) -> Callable[..., Any]:
    fn = pickle.loads(blob)
    # A decorated function travels as a reference to the decorator's object;
    # in the worker we run what it wraps.
    if getattr(type(fn), "__offload_function__", False):
        fn = fn.__wrapped__
    return fn  # type: ignore[no-any-return]


def _refused_pool(exc: BaseException) -> bool:
    """Whether ``exc`` is offload's refusal to start a process pool in a worker, which
    reaches the caller as itself. (If it was raised, offload's errors are imported.)"""
    errors = sys.modules.get("offload._errors")
    return errors is not None and isinstance(exc, errors.PoolStartError)
