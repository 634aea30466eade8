"""The frame: how one message between the parent and a worker is laid out.

A frame is a pickle (protocol 5) whose large buffers travel out of band
(``buffers.py``), so a NumPy array is written from its own memory and read into a
fresh buffer without ever being copied into the pickle stream::

    header  !QI   pickle length, buffer count
    entries !QQ   one per out-of-band buffer: length (| flags), address
    pickle  bytes
    buffers bytes, each as long as its entry says, except the REMOTE ones

A REMOTE buffer stays out of the frame, in the sender's memory, for the parent to
copy (``remote_buffers.py``); its entry gives its address there.

A LOG frame (the :data:`LOG` bit set in the buffer count, no buffers) travels beside
the exchange of a call without being part of it: a worker's log record, or its count
of records dropped, sent before the reply; the parent's logger levels, sent before a
call (``logs.py``, ``worker_logs.py``). A reader tells it apart by its header alone.

Both sides use :func:`encode` and send the parts it makes with ``sending.py``; the
worker reads with :func:`recv_frame` on a blocking socket, the parent with
:func:`whole_frame` and :func:`parse_frame` without blocking the event loop (see
``worker_handle.py``). Every frame a worker sends, LOG frames aside, is ``(status,
value)``, one of the statuses below.

Workers import it at start: it keeps to the modules they load anyway (no typing, no
contextlib), as does ``worker.py``.
"""

from __future__ import annotations

import pickle
import socket
import struct
from collections.abc import Callable, Generator

from .buffers import BIG_BUFFER, Buffer, Received, receive_buffer, release

TYPE_CHECKING = False  # not typing's: see offload/__init__.py
if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import Any

__all__ = (
    "BAD_REQUEST",
    "BAD_RESULT",
    "CLOSE",
    "HEADER",
    "ITEM",
    "LOG",
    "MORE",
    "OK",
    "RAISED",
    "RAISED_UNPICKLABLE",
    "SCRATCH_SIZE",
    "STARTED",
    "TOO_LARGE",
    "WRITE_TO",
    "Frame",
    "Remote",
    "decode",
    "encode",
    "log_frame",
    "parse_frame",
    "recv_frame",
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
#: a stream's item (value: the item), before its final answer: OK (value None) at
#: the generator's end or once closed, or any other status at its position
ITEM = 7
#: a stream's first frame (value None), once the worker runs it: from then on, the
#: parent's last frame of the stream is CLOSE, which the worker reads before its next call
STARTED = 10
# The parent's frames to a worker running a stream, between its items:
MORE = 8  # value: how many more items it may send (credit, as the consumer takes them)
CLOSE = 9  # value: None; close the generator and answer OK

HEADER = struct.Struct("!QI")
_ENTRY = struct.Struct("!QQ")
#: entry flag: the buffer is not in the frame, but at the entry's address
REMOTE = 1 << 63
#: entry flag: the buffer is a ``bytes`` object's, and is received as one
AS_BYTES = 1 << 62
_FLAGS = REMOTE | AS_BYTES

#: bytes read at once into a reader's scratch buffer; larger frames are read in place
SCRATCH_SIZE = 1 << 16
#: out-of-band buffers a frame may have: a sanity bound on a header's count (its
#: table takes 16 bytes per buffer)
MAX_BUFFERS = 1 << 24
#: header flag, in the buffer count: a LOG frame, a pickle without buffers that is no
#: answer to the call (above :data:`MAX_BUFFERS`, so :func:`parse_frame` refuses it)
LOG = 1 << 31


class Frame(list[Buffer]):
    """The parts of one frame, ready for ``sending.send_parts``; ``remote``: the
    buffers left out of it, in their order (REMOTE entries); ``size``: its bytes,
    the REMOTE buffers included."""

    __slots__ = ("remote", "size")
    # No __init__ of its own: list's, in C, is on every call's path.
    remote: list[memoryview]
    size: int


class Remote:
    """A REMOTE buffer of a received frame: ``size`` bytes at ``address`` in the
    sender's memory."""

    __slots__ = ("address", "as_bytes", "size")

    def __init__(self, size: int, address: int, as_bytes: bool) -> None:
        self.size = size
        self.address = address
        self.as_bytes = as_bytes


def encode(
    obj: Any, dumps: Callable[..., bytes] = pickle.dumps, cross_memory: bool = False
) -> Frame:
    """``obj`` as one frame.

    ``dumps`` may be ``cloudpickle.dumps`` for objects plain pickle refuses. With
    ``cross_memory``, buffers of :data:`~.buffers.BIG_BUFFER` bytes or more are REMOTE.
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
            from .cross_memory import address_of

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


def log_frame(data: bytes) -> list[Buffer]:
    """``data``, a pickle, as a LOG frame."""
    return [HEADER.pack(len(data), LOG), data]


def decode(data: Buffer, buffers: Sequence[Buffer]) -> Any:
    """The object of a frame read by :func:`parse_frame`."""
    if not buffers and type(data) is bytes:  # a small frame (whole_frame)
        return pickle.loads(data)
    try:
        return pickle.loads(data, buffers=buffers)
    finally:
        release((data, *buffers))


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
    table_end = HEADER.size + _ENTRY.size * count
    if table_end > len(scratch):
        # More entries than the scratch buffer holds: the table gets its own room,
        # and everything read so far is part of it.
        table = memoryview(bytearray(table_end))
        table[:n] = scratch[:n]
        while n < table_end:
            n += yield table[n:]
        scratch = table
    while n < table_end:
        n += yield scratch[n:]
    data = receive_buffer(length)
    buffers: list[Received | Remote] = []
    for size, address in _ENTRY.iter_unpack(scratch[HEADER.size : table_end]):
        if size & REMOTE:
            buffers.append(Remote(size & ~_FLAGS, address, bool(size & AS_BYTES)))
        else:
            buffers.append(receive_buffer(size))
    consumed = table_end  # bytes of scratch already placed
    for part in (data, *buffers):
        if isinstance(part, Remote):
            continue
        view = memoryview(part)
        take = min(n - consumed, len(part))
        view[:take] = scratch[consumed : consumed + take]
        consumed += take
        while take < len(part):
            take += yield view[take:]
    if consumed != n:
        raise ValueError("frame longer than its header says")
    return data, buffers


def recv_frame(
    sock: socket.socket, scratch: memoryview, n: int = 0
) -> tuple[Received, list[Received | Remote]]:
    """Read one frame from a blocking socket: its pickle and buffers, for :func:`decode`.
    ``n``: bytes of it already read into ``scratch``.

    :raises EOFError: the other side closed the connection
    """
    if not n:
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
