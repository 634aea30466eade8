"""Framing of messages between the parent and a worker process.

A frame is a pickle (protocol 5) whose large buffers travel out of band, so a
NumPy array is written from its own memory and read into a fresh buffer without
ever being copied into the pickle stream::

    header  !QI   pickle length, buffer count
    entries !QQ   one per out-of-band buffer: length (| flags), address
    pickle  bytes
    buffers bytes, each as long as its entry says, except the REMOTE ones

A buffer of :data:`BIG_BUFFER` bytes or more is REMOTE when the pool copies between
memories (``cma.py``): it stays out of the frame, in the sender's memory, and the
parent copies it in one system call:

* a result: the entry gives its address in the worker; the parent reads it into a
  buffer of its own (:func:`fetch`), then sends :data:`GO_AHEAD`, after which the
  worker lets it go;
* an argument: the worker makes room for it (:func:`make_room`) and answers
  ``(WRITE_TO, addresses)``; the parent writes it there (:func:`deliver`) and sends
  :data:`GO_AHEAD`, after which the worker decodes the call.

Both sides use :func:`encode`; the worker reads with :func:`recv_frame` on a
blocking socket, the parent reads without blocking the event loop (see
``handle.py``). This module imports neither anyio nor pydantic: workers load it.

Workers import it at start: it keeps to the modules they load anyway (no typing, no
contextlib), as does ``worker.py``.
"""

from __future__ import annotations

import functools
import mmap
import os
import pickle
import socket
import struct
from collections.abc import Callable, Generator, Sequence

TYPE_CHECKING = False  # not typing's: see offload/__init__.py
if TYPE_CHECKING:
    from typing import Any, SupportsIndex

__all__ = (
    "BAD_REQUEST",
    "BAD_RESULT",
    "GO_AHEAD",
    "HEADER",
    "OK",
    "RAISED",
    "RAISED_UNPICKLABLE",
    "TOO_LARGE",
    "WRITE_TO",
    "Frame",
    "Remote",
    "batch",
    "big",
    "decode",
    "deliver",
    "encode",
    "fetch",
    "has_remote",
    "head",
    "local",
    "make_room",
    "out_of_band",
    "parse_frame",
    "recv_frame",
    "recv_go_ahead",
    "remaining",
    "send_parts",
    "whole_frame",
)

# A worker answers every frame with (status, value):
OK = 0  # value: the result (or, at start, the worker's pid and its probe's address)
RAISED = 1  # value: (pickled exception, formatted traceback)
#: value: (exception type name, message, formatted traceback, not an Exception?); at
#: start, for the initializer: (type name, message, traceback)
RAISED_UNPICKLABLE = 2
BAD_REQUEST = 3  # value: traceback of unpickling the call
BAD_RESULT = 4  # value: traceback of pickling the result
TOO_LARGE = 5  # value: (bytes of the pickled result, the limit)
WRITE_TO = 6  # value: where the call's REMOTE buffers go in the worker's memory

HEADER = struct.Struct("!QI")
_ENTRY = struct.Struct("!QQ")
#: entry flag: the buffer is not in the frame, but at the entry's address
REMOTE = 1 << 63
#: entry flag: the buffer is a ``bytes`` object's, and is received as one
AS_BYTES = 1 << 62
_FLAGS = REMOTE | AS_BYTES
Buffer = bytes | bytearray | memoryview | mmap.mmap
#: a buffer :func:`parse_frame` reads into, or :func:`fetch` and :func:`make_room` make
Received = bytes | bytearray | mmap.mmap


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
    if type(owner) is bytes and len(buffer) == len(owner):
        return owner  # made by fetch or make_room: no copy
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
        try:
            fd = os.memfd_create("offload-frame", os.MFD_CLOEXEC)
        except OSError:  # refused by a seccomp profile: an anonymous mapping will do
            pass
        else:
            os.ftruncate(fd, size)
    mapping = _Mapping(fd, size)
    mapping.fd = fd
    return mapping


def _new_buffer(size: int, as_bytes: bool) -> Received:
    """Room for a REMOTE buffer: a ``bytes`` not yet shown to anyone, or a private
    mapping on transparent huge pages (a 64 MiB buffer then takes 32 page faults,
    not 16384: ~15 ms less here)."""
    if as_bytes:
        made: bytes = _bytes_maker()(None, size)
        from .cma import huge_pages

        huge_pages(made)
        return made
    mapping = _Mapping(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    mapping.fd = -1
    if hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            mapping.madvise(mmap.MADV_HUGEPAGE)
        except OSError:
            pass
    return mapping


@functools.cache
def _bytes_maker() -> Any:
    """``PyBytes_FromStringAndSize(NULL, size)``: a ``bytes`` of ``size`` bytes left
    as they are, to be filled before anyone else sees it (as CPython itself does)."""
    import ctypes

    make = ctypes.pythonapi.PyBytes_FromStringAndSize
    make.restype = ctypes.py_object
    make.argtypes = (ctypes.c_char_p, ctypes.c_ssize_t)
    return make


class Frame(list[Buffer]):
    """The parts of one frame, ready for :func:`send_parts`; ``remote``: the
    buffers left out of it, in their order (REMOTE entries); ``size``: its bytes,
    the REMOTE buffers included."""

    __slots__ = ("remote", "size")
    # No __init__ of its own: list's, in C, is on every call's path.
    remote: list[memoryview]
    size: int


def encode(
    obj: Any, dumps: Callable[..., bytes] = pickle.dumps, cross_memory: bool = False
) -> Frame:
    """``obj`` as one frame.

    ``dumps`` may be ``cloudpickle.dumps`` for objects plain pickle refuses. With
    ``cross_memory``, buffers of :data:`BIG_BUFFER` bytes or more are REMOTE.
    """
    buffers: list[pickle.PickleBuffer] = []
    data = dumps(obj, protocol=5, buffer_callback=buffers.append)
    if not buffers:  # the usual small frame: every call and answer of a no-op
        frame = Frame((HEADER.pack(len(data), 0), data))
        frame.remote = []
        frame.size = HEADER.size + len(data)
        return frame
    table = bytearray(HEADER.pack(len(data), len(buffers)))
    inline: list[Buffer] = []
    remote: list[memoryview] = []
    total = len(data)
    for buf in buffers:
        raw = buf.raw()
        size = raw.nbytes
        total += size
        if cross_memory and size >= BIG_BUFFER:
            from .cma import address_of

            flags = REMOTE | (AS_BYTES if type(raw.obj) is bytes else 0)
            table += _ENTRY.pack(size | flags, address_of(raw))
            remote.append(raw)
        else:
            table += _ENTRY.pack(size, 0)
            inline.append(raw)
    frame = Frame((table, data, *inline))
    frame.remote = remote
    frame.size = total + len(table)
    return frame


#: what the parent sends once it has copied a frame's REMOTE buffers
GO_AHEAD = encode(None)
_GO_AHEAD = b"".join(GO_AHEAD)


def recv_go_ahead(sock: socket.socket) -> None:
    """Read :data:`GO_AHEAD` from a blocking socket, and not a byte more: after the
    go-ahead for a result the parent may send the next call at once.

    :raises EOFError: the other side closed the connection
    """
    got = bytearray(len(_GO_AHEAD))
    view = memoryview(got)
    n = 0
    while n < len(got):
        k = sock.recv_into(view[n:])
        if not k:
            raise EOFError("connection closed")
        n += k
    if got != _GO_AHEAD:
        raise ValueError("expected the parent's go-ahead")


class Remote:
    """A REMOTE buffer of a received frame: ``size`` bytes at ``address`` in the
    sender's memory."""

    __slots__ = ("address", "as_bytes", "size")

    def __init__(self, size: int, address: int, as_bytes: bool) -> None:
        self.size = size
        self.address = address
        self.as_bytes = as_bytes


def has_remote(buffers: Sequence[object]) -> bool:
    return bool(buffers) and any(type(buf) is Remote for buf in buffers)


def local(buffers: Sequence[Received | Remote]) -> list[Received]:
    """The buffers of a frame that has no REMOTE ones (raises ValueError if it has)."""
    if not buffers:
        return []
    mine = [buf for buf in buffers if not isinstance(buf, Remote)]
    if len(mine) != len(buffers):
        raise ValueError("unexpected REMOTE buffer in this frame")
    return mine


def _with_room(
    buffers: Sequence[Received | Remote],
) -> tuple[list[Received], list[tuple[Received, Remote]]]:
    """``buffers`` with room made for each :class:`Remote`, and (room, remote) pairs."""
    mine: list[Received] = []
    pairs: list[tuple[Received, Remote]] = []
    for buf in buffers:
        if isinstance(buf, Remote):
            room = _new_buffer(buf.size, buf.as_bytes)
            pairs.append((room, buf))
            mine.append(room)
        else:
            mine.append(buf)
    return mine, pairs


def fetch(pid: int, buffers: Sequence[Received | Remote]) -> list[Received]:
    """The parent's side of a result: ``buffers`` with every :class:`Remote` read
    out of worker ``pid`` into a buffer of our own. Blocking: call in a thread."""
    from .cma import address_of, read

    mine, pairs = _with_room(buffers)
    read(pid, [(address_of(room), buf.address, buf.size) for room, buf in pairs])
    return mine


def make_room(buffers: Sequence[Received | Remote]) -> tuple[list[Received], list[int]]:
    """The worker's side of a call: ``buffers`` with every :class:`Remote` replaced
    by room for it, and the addresses of that room, for the parent to write to."""
    from .cma import address_of

    mine, pairs = _with_room(buffers)
    return mine, [address_of(room) for room, _ in pairs]


def deliver(pid: int, remote: Sequence[memoryview], addresses: Sequence[int]) -> None:
    """Write a call's REMOTE buffers where worker ``pid`` made room for them.
    Blocking: call in a thread."""
    from .cma import address_of, write

    write(
        pid,
        [
            (address_of(raw), there, raw.nbytes)
            for raw, there in zip(remote, addresses, strict=True)
        ],
    )


def decode(data: Buffer, buffers: Sequence[Buffer]) -> Any:
    """The object of a frame read by :func:`parse_frame`."""
    if not buffers and type(data) is bytes:  # a small frame (whole_frame)
        return pickle.loads(data)
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
                try:
                    part.close()
                except BufferError:
                    pass


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


def _iov_max() -> int:
    try:
        return max(16, min(os.sysconf("SC_IOV_MAX"), 1024))
    except (AttributeError, ValueError, OSError):
        return 16  # the least POSIX allows


#: parts one ``sendmsg`` takes at most: past the system's IOV_MAX (1024 on Linux) it
#: fails with EMSGSIZE, and a frame has a part per out-of-band buffer
MAX_PARTS = _iov_max()


def batch(parts: Sequence[Buffer]) -> Sequence[Buffer]:
    """The first parts of ``parts`` that one ``sendmsg`` takes."""
    return parts if len(parts) <= MAX_PARTS else parts[:MAX_PARTS]


def send_parts(sock: socket.socket, parts: Sequence[Buffer]) -> None:
    """Write every part on a blocking socket: one ``sendmsg`` unless it is large."""
    views = parts
    while views:
        views = remaining(views, sock.sendmsg(batch(views)))


#: bytes read at once into a reader's scratch buffer; larger frames are read in place
SCRATCH = 1 << 16
#: out-of-band buffers a frame may have: a sanity bound on a header's count (its
#: table takes 16 bytes per buffer)
MAX_BUFFERS = 1 << 24


def whole_frame(scratch: memoryview, n: int) -> tuple[Received, list[Received | Remote]] | None:
    """The frame in the first ``n`` bytes of ``scratch``, if they hold all of it and it
    has no out-of-band buffer: the usual small call or answer, without the generator
    of :func:`parse_frame`. None otherwise."""
    if n < HEADER.size:
        return None
    length, count = HEADER.unpack_from(scratch)
    if count or n != HEADER.size + length:
        return None
    return scratch[HEADER.size : n].tobytes(), []


def parse_frame(
    scratch: memoryview, n: int = 0
) -> Generator[memoryview, int, tuple[Received, list[Received | Remote]]]:
    """Read one frame, sans I/O: yields the view to read into next, is sent the
    number of bytes read, returns the pickle and its buffers for :func:`decode`.
    ``n``: bytes of the frame already read into ``scratch``.

    Parent and worker exchange one frame at a time, so a read never runs into the
    next frame: the first read lands in ``scratch``, typically the whole frame in one
    system call; the rest of a large frame is read straight into its own buffer.
    """
    while n < HEADER.size:
        n += yield scratch[n:]
    length, count = HEADER.unpack_from(scratch)
    if count > MAX_BUFFERS:
        raise ValueError(f"frame header announces {count} buffers")
    head = HEADER.size + _ENTRY.size * count
    if head > len(scratch):
        # More entries than the scratch buffer holds: the table gets its own room,
        # and everything read so far is part of it.
        table = memoryview(bytearray(head))
        table[:n] = scratch[:n]
        while n < head:
            n += yield table[n:]
        scratch = table
    while n < head:
        n += yield scratch[n:]
    data = _buffer(length)
    buffers: list[Received | Remote] = []
    for size, address in _ENTRY.iter_unpack(scratch[HEADER.size : head]):
        if size & REMOTE:
            buffers.append(Remote(size & ~_FLAGS, address, bool(size & AS_BYTES)))
        else:
            buffers.append(_buffer(size))
    for part in (data, *buffers):
        if isinstance(part, Remote):
            continue
        view = memoryview(part)
        take = min(n - head, len(part))
        view[:take] = scratch[head : head + take]
        head += take
        while take < len(part):
            take += yield view[take:]
    if head != n:
        raise ValueError("frame longer than its header says")
    return data, buffers


def recv_frame(
    sock: socket.socket, scratch: memoryview
) -> tuple[Received, list[Received | Remote]]:
    """Read one frame from a blocking socket: its pickle and buffers, for :func:`decode`.

    :raises EOFError: the other side closed the connection
    """
    n = sock.recv_into(scratch)
    if not n:
        raise EOFError("connection closed")
    frame = whole_frame(scratch, n)
    if frame is not None:
        return frame
    parser = parse_frame(scratch, n)
    try:
        view = next(parser)
        while True:
            n = sock.recv_into(view)
            if not n:
                raise EOFError("connection closed")
            view = parser.send(n)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
