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
from collections.abc import Callable, Sequence
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
    "recv_exactly",
    "recv_frame",
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


def send_parts(sock: socket.socket, parts: list[Buffer]) -> None:
    """Write every part on a blocking socket, as few system calls as it takes."""
    views = [memoryview(p).cast("B") for p in parts if len(p)]
    while views:
        sent = sock.sendmsg(views)
        while sent:
            if sent >= len(views[0]):
                sent -= len(views[0])
                views.pop(0)
            else:
                views[0] = views[0][sent:]
                sent = 0


def recv_exactly(sock: socket.socket, size: int) -> bytearray:
    """Read exactly ``size`` bytes from a blocking socket.

    :raises EOFError: the other side closed the connection first
    """
    buf = bytearray(size)
    view = memoryview(buf)
    got = 0
    while got < size:
        n = sock.recv_into(view[got:])
        if not n:
            raise EOFError("connection closed")
        got += n
    return buf


def recv_frame(sock: socket.socket) -> tuple[bytearray, list[bytearray]]:
    """Read one frame from a blocking socket: its pickle and its buffers, for :func:`decode`."""
    length, count = HEADER.unpack(recv_exactly(sock, HEADER.size))
    sizes = struct.unpack(f"!{count}Q", recv_exactly(sock, 8 * count)) if count else ()
    data = recv_exactly(sock, length)
    return data, [recv_exactly(sock, size) for size in sizes]
