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

import contextlib
import mmap
import os
import pickle
import socket
import struct
from collections.abc import Callable, Generator, Sequence
from typing import Any, SupportsIndex

__all__ = (
    "BAD_REQUEST",
    "BAD_RESULT",
    "HEADER",
    "OK",
    "RAISED",
    "RAISED_UNPICKLABLE",
    "TOO_LARGE",
    "big",
    "decode",
    "encode",
    "frame_size",
    "head",
    "out_of_band",
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
TOO_LARGE = 5  # value: (bytes of the pickled result, the limit)

HEADER = struct.Struct("!QI")
_LENGTH = struct.Struct("!Q")
Buffer = bytes | bytearray | memoryview | mmap.mmap
#: a buffer :func:`parse_frame` reads into
Received = bytearray | mmap.mmap


#: ``bytes`` at least this long travel out of band too (pickle would copy them into
#: its stream): top-level arguments and results, see :func:`out_of_band`
BIG_BYTES = 1 << 16
#: a buffer at least this large (4 MiB) is read into a fresh mapping, not a bytearray:
#: bytearray(n) zero-fills n bytes at once, a mapping gets its pages as they are
#: written; on Linux the mapping is a memfd's, so that the ``bytes`` made from it
#: come from ``os.pread``, a copy made without holding the GIL
BIG_BUFFER = 1 << 22


class _OutOfBand:
    """A ``bytes`` that pickles out of band (pickle protocol 5 keeps ``bytes`` in
    band, and ``reducer_override`` is never asked about them)."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data

    def __reduce_ex__(self, protocol: SupportsIndex) -> tuple[Any, ...]:
        return _bytes_from, (pickle.PickleBuffer(self.data),)


def out_of_band(obj: Any) -> Any:
    """``obj``, marked to travel out of band if it is a large ``bytes``."""
    if type(obj) is bytes and len(obj) >= BIG_BYTES:
        return _OutOfBand(obj)
    return obj


def _bytes_from(buffer: Buffer) -> bytes:
    # pickle hands over a memoryview of the buffer it was given
    owner = buffer.obj if isinstance(buffer, memoryview) else buffer
    if isinstance(owner, _Mapping) and owner.fd >= 0 and len(buffer) == len(owner):
        return os.pread(owner.fd, len(owner), 0)
    return bytes(buffer)


class _Mapping(mmap.mmap):
    """A received buffer in a fresh mapping; ``fd`` is its memfd until decoded."""

    __slots__ = ("fd",)
    fd: int

    def __del__(self) -> None:  # not decoded: a cancelled call, a bad frame
        if getattr(self, "fd", -1) >= 0:
            os.close(self.fd)
            self.fd = -1


def _buffer(size: int) -> Received:
    if size < BIG_BUFFER:
        return bytearray(size)
    fd = -1
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("offload-frame", os.MFD_CLOEXEC)
        os.ftruncate(fd, size)
    mapping = _Mapping(fd, size)
    mapping.fd = fd
    return mapping


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
    """The object of a frame read by :func:`parse_frame`."""
    try:
        return pickle.loads(data, buffers=buffers)
    finally:
        for part in (data, *buffers):
            if isinstance(part, _Mapping):
                if part.fd >= 0:
                    os.close(part.fd)  # the mapping, and what views it, stay valid
                    part.fd = -1
                # Unmapping 64 MB takes ~20 ms: here, in the decoding thread, rather
                # than wherever the last reference goes. Arrays made on the mapping
                # still export it, and keep it.
                with contextlib.suppress(BufferError):
                    part.close()


def big(buffers: Sequence[Buffer]) -> bool:
    """Whether decoding these buffers may take long (``bytes`` made from them)."""
    return any(isinstance(part, _Mapping) for part in buffers)


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


def head(parts: Sequence[Buffer], limit: int) -> Sequence[Buffer]:
    """The first ``limit`` bytes of ``parts`` (all of them if shorter); like
    :func:`remaining`, for the 1-D byte buffers :func:`encode` makes."""
    views: list[Buffer] = []
    for part in parts:
        if len(part) >= limit:
            views.append(memoryview(part)[:limit])
            return views
        views.append(part)
        limit -= len(part)
    return parts


def send_parts(sock: socket.socket, parts: Sequence[Buffer]) -> None:
    """Write every part on a blocking socket: one ``sendmsg`` unless it is large."""
    views = parts
    while views:
        views = remaining(views, sock.sendmsg(views))


#: bytes read at once into a reader's scratch buffer; larger frames are read in place
SCRATCH = 1 << 16


def parse_frame(
    scratch: memoryview,
) -> Generator[memoryview, int, tuple[Received, list[Received]]]:
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
    data = _buffer(length)
    buffers = [_buffer(size) for size in sizes]
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


def frame_size(parts: Sequence[Buffer]) -> int:
    """Bytes of a frame made by :func:`encode` (its buffers are 1-D byte views)."""
    return sum(map(len, parts))


def recv_frame(sock: socket.socket, scratch: memoryview) -> tuple[Received, list[Received]]:
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
