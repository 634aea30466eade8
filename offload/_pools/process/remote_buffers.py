"""REMOTE buffers: large buffers the parent copies between memories, outside the frame.

A buffer of :data:`~.buffers.BIG_BUFFER` bytes or more is REMOTE when the pool copies
between memories (``cross_memory.py``): it stays out of the frame, in the sender's
memory, and the parent copies it in one system call:

* a result: the entry gives its address in the worker; the parent reads it into a
  buffer of its own (:func:`fetch`), then sends :data:`GO_AHEAD`, after which the
  worker lets it go;
* an argument: the worker makes room for it (:func:`make_room`) and answers
  ``(WRITE_TO, addresses)``; the parent writes it there (:func:`deliver`) and sends
  :data:`GO_AHEAD`, after which the worker decodes the call.

Workers import it at start: it keeps to the modules they load anyway (no typing, no
contextlib), as does ``worker.py``; ``cross_memory.py`` (ctypes) loads when first used.
"""

from __future__ import annotations

import functools
import mmap
import socket
from collections.abc import Sequence

from .buffers import MappedBuffer, Received
from .framing import Remote, encode

TYPE_CHECKING = False  # not typing's: see offload/__init__.py
if TYPE_CHECKING:
    from typing import Any

__all__ = (
    "GO_AHEAD",
    "deliver",
    "fetch",
    "has_remote",
    "inline_buffers",
    "make_room",
    "recv_go_ahead",
)

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


def has_remote(buffers: Sequence[object]) -> bool:
    return bool(buffers) and any(type(buf) is Remote for buf in buffers)


def inline_buffers(buffers: Sequence[Received | Remote]) -> list[Received]:
    """The buffers of a frame that has no REMOTE ones (raises ValueError if it has)."""
    if not buffers:
        return []
    inline = [buf for buf in buffers if not isinstance(buf, Remote)]
    if len(inline) != len(buffers):
        raise ValueError("unexpected REMOTE buffer in this frame")
    return inline


def _room_for(size: int, as_bytes: bool) -> Received:
    """Room for a REMOTE buffer: a ``bytes`` not yet shown to anyone, or a private
    mapping on transparent huge pages (a 64 MiB buffer then takes 32 page faults,
    not 16,384; docs/benchmarks.md, "Figures behind the code")."""
    if as_bytes:
        made: bytes = _bytes_maker()(None, size)
        from .cross_memory import huge_pages

        huge_pages(made)
        return made
    mapping = MappedBuffer(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
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


def _with_room(
    buffers: Sequence[Received | Remote],
) -> tuple[list[Received], list[tuple[Received, Remote]]]:
    """``buffers`` with room made for each :class:`Remote`, and (room, remote) pairs."""
    filled: list[Received] = []
    pairs: list[tuple[Received, Remote]] = []
    for buf in buffers:
        if isinstance(buf, Remote):
            room = _room_for(buf.size, buf.as_bytes)
            pairs.append((room, buf))
            filled.append(room)
        else:
            filled.append(buf)
    return filled, pairs


def fetch(pid: int, buffers: Sequence[Received | Remote]) -> list[Received]:
    """The parent's side of a result: ``buffers`` with every :class:`Remote` read
    out of worker ``pid`` into a buffer of our own. Blocking: call in a thread."""
    from .cross_memory import address_of, read

    filled, pairs = _with_room(buffers)
    read(pid, [(address_of(room), buf.address, buf.size) for room, buf in pairs])
    return filled


def make_room(buffers: Sequence[Received | Remote]) -> tuple[list[Received], list[int]]:
    """The worker's side of a call: ``buffers`` with every :class:`Remote` replaced
    by room for it, and the addresses of that room, for the parent to write to."""
    from .cross_memory import address_of

    filled, pairs = _with_room(buffers)
    return filled, [address_of(room) for room, _ in pairs]


def deliver(pid: int, remote: Sequence[memoryview], addresses: Sequence[int]) -> None:
    """Write a call's REMOTE buffers where worker ``pid`` made room for them.
    Blocking: call in a thread."""
    from .cross_memory import address_of, write

    write(
        pid,
        [
            (address_of(raw), there, raw.nbytes)
            for raw, there in zip(remote, addresses, strict=True)
        ],
    )
