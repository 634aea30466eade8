"""Framing of messages between the parent and a worker process.

A frame is a pickle (protocol 5) whose large buffers travel out of band, so a
NumPy array is written from its own memory and read into a fresh buffer without
ever being copied into the pickle stream::

    header  !QI   pickle length, buffer count
    lengths !Q    one per out-of-band buffer
    pickle  bytes
    buffers bytes, each as long as its length says

Both sides use :func:`encode`; the worker reads with :func:`recv_frame` on a
blocking socket, the parent reads without blocking the event loop (see
``_process.py``). This module imports neither anyio nor pydantic: workers load it.
"""

from __future__ import annotations

import pickle
import socket
import struct
from collections.abc import Callable, Generator, Sequence
from typing import Any

__all__ = (
    "BAD_REQUEST",
    "BAD_RESULT",
    "HEADER",
    "OK",
    "RAISED",
    "RAISED_UNPICKLABLE",
    "decode",
    "encode",
    "parse_frame",
    "recv_frame",
    "remaining",
    "send_parts",
)

# A worker answers every frame with (status, value):
OK = 0  # value: the result (or, at start, the worker's pid)
RAISED = 1  # value: (pickled exception, formatted traceback)
RAISED_UNPICKLABLE = 2  # value: (exception type name, message, formatted traceback)
BAD_REQUEST = 3  # value: traceback of unpickling the call
BAD_RESULT = 4  # value: traceback of pickling the result

HEADER = struct.Struct("!QI")
_LENGTH = struct.Struct("!Q")
Buffer = bytes | bytearray | memoryview


def encode(obj: Any, dumps: Callable[..., bytes] = pickle.dumps) -> list[Buffer]:
    """``obj`` as the parts of one frame, ready for :func:`send_parts`.

    ``dumps`` may be ``cloudpickle.dumps`` for objects plain pickle refuses.
    """
    buffers: list[pickle.PickleBuffer] = []
    data = dumps(obj, protocol=5, buffer_callback=buffers.append)
    raws = [buf.raw() for buf in buffers]
    lengths = b"".join(_LENGTH.pack(raw.nbytes) for raw in raws)
    return [HEADER.pack(len(data), len(raws)) + lengths, data, *raws]


def decode(data: Buffer, buffers: Sequence[Buffer]) -> Any:
    return pickle.loads(data, buffers=buffers)


def remaining(parts: Sequence[Buffer], sent: int) -> list[Buffer]:
    """What is left of ``parts`` once ``sent`` bytes of them are written."""
    views: list[Buffer] = []
    for part in parts:
        size = len(part)
        if sent >= size:
            sent -= size
            continue
        views.append(memoryview(part)[sent:])
        sent = 0
    return views


def send_parts(sock: socket.socket, parts: Sequence[Buffer]) -> None:
    """Write every part on a blocking socket: one ``sendmsg`` unless it is large."""
    views = parts
    while views:
        views = remaining(views, sock.sendmsg(views))


#: bytes read at once into a reader's scratch buffer; larger frames are read in place
SCRATCH = 1 << 16


def parse_frame(
    scratch: memoryview,
) -> Generator[memoryview, int, tuple[bytearray, list[bytearray]]]:
    """Read one frame, sans I/O: yields the view to read into next, is sent the
    number of bytes read, returns the pickle and its buffers for :func:`decode`.

    Parent and worker exchange one frame at a time, so a read never runs into the
    next frame: the first read lands in ``scratch``, typically the whole frame in one
    system call; the rest of a large frame is read straight into its own buffer.
    """
    n = 0
    while n < HEADER.size:
        n += yield scratch[n:]
    length, count = HEADER.unpack_from(scratch)
    head = HEADER.size + 8 * count
    if head > len(scratch):
        raise ValueError(f"frame header announces {count} buffers")
    while n < head:
        n += yield scratch[n:]
    sizes = struct.unpack_from(f"!{count}Q", scratch, HEADER.size) if count else ()
    data = bytearray(length)
    buffers = [bytearray(size) for size in sizes]
    for part in (data, *buffers):
        view = memoryview(part)
        take = min(n - head, len(part))
        view[:take] = scratch[head : head + take]
        head += take
        while take < len(part):
            take += yield view[take:]
    if head != n:
        raise ValueError("frame longer than its header says")
    return data, buffers


def recv_frame(sock: socket.socket, scratch: memoryview) -> tuple[bytearray, list[bytearray]]:
    """Read one frame from a blocking socket: its pickle and buffers, for :func:`decode`.

    :raises EOFError: the other side closed the connection
    """
    parser = parse_frame(scratch)
    view = next(parser)
    while True:
        n = sock.recv_into(view)
        if not n:
            raise EOFError("connection closed")
        try:
            view = parser.send(n)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]
